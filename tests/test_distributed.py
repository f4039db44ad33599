"""Acceptance of training past one process: 2 processes under torchrun, gloo on the CPU, a test-built tiny model,
float32 compute (--compute-dtype float32, so the results hold on every CPU).

- DDP and FSDP2 train with the losses of one process on the same global batch, and the ranks hold the same adapter;
  under FSDP2 each rank holds half of the packed 4-bit bytes;
- a 2-rank run killed after a checkpoint and resumed ends bit-identical to the uninterrupted 2-rank run, and the
  checkpoint also resumes in one process (close, not bitwise: another summation order);
- the adapter of a 2-rank run loads in peft.PeftModel.from_pretrained and gives our logits;
- a rank that fails ends the whole job with a non-zero exit and a one-line error, well under a minute;
- --parallel and a batch that the ranks cannot share are refused before anything is loaded.
Every launch costs ~10 s on the 2-core CI machine (two interpreters importing torch), so the runs are shared.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nf4lora.train.cli import main
from test_train_helpers import read_metrics, write_tiny_run

# The rows of a step split over 2 ranks are the micro-batches one process runs, so DDP's losses come out equal; FSDP2
# sums the gradient norm over shards in another order (observed: 4e-8 relative). The bound is the acceptance's.
LOSS_RTOL = 1e-6

# Test hooks, chosen by TEST_HOOK, around the real command line:
#   dump          every rank also writes the LoRA weights it holds (whole) to <output-dir>/rank<r>.safetensors
#   kill:K:R      rank R is SIGKILLed at its K-th optimizer step (no cleanup, as a machine failure)
#   fail:K:R      rank R raises at its K-th optimizer step, as an out-of-memory error would
RUNNER = """
import os, signal, sys
from safetensors.torch import save_file
from nf4lora.train import distributed, optim
rank, hook = int(os.environ["RANK"]), os.environ.get("TEST_HOOK", "")
if hook == "dump":
    save = distributed.Parallel.save_adapter
    def save_and_dump(self, model, directory, **kwargs):
        save_file(self.whole_lora_weights(model), os.path.join(os.path.dirname(directory), f"rank{rank}.safetensors"))
        return save(self, model, directory, **kwargs)
    distributed.Parallel.save_adapter = save_and_dump
elif hook:
    kind, at, who = hook.split(":")
    step, calls = optim.PagedAdamW.step, [0]
    def patched(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == int(at) and rank == int(who):
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure at an optimizer step")
        return step(self, *args, **kwargs)
    optim.PagedAdamW.step = patched
from nf4lora.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _common(setup, dropout: float) -> list[str]:
    root, model, data = setup
    return ["--model", model, "--data", data, "--seq-len", "128", "--batch-size", "4", "--micro-batch-size", "2",
            "--max-steps", "5", "--save-every", "2", "--eval-every", "2", "--warmup-steps", "1", "--lr", "5e-3",
            "--lora-r", "4", "--lora-dropout", str(dropout), "--compute-dtype", "float32", "--no-progress"]  # fmt: skip


def _torchrun(setup, args: list[str], hook: str | None = None, timeout: float = 120, nproc: int = 2):
    """`torchrun --nproc_per_node=2` of the command line (`-m nf4lora`, or the hooks' runner); --standalone picks
    a free port, so concurrent runs on one machine do not collide."""
    root = setup[0]
    if hook is None:
        target = ["-m", "nf4lora"]
    else:
        script = root / "runner.py"
        script.write_text(RUNNER)
        target = [str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEST_HOOK": hook or ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("distributed"), 40, seed=5)


@pytest.fixture(scope="module")
def one_process(setup):
    """The reference: the same run in one process (`python -m nf4lora`, one thread like each rank)."""
    out = setup[0] / "one"
    run = subprocess.run([sys.executable, "-m", "nf4lora", "finetune", *_common(setup, 0.0), "--output-dir", str(out)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(setup):
    """two_ranks(parallel): the directory of a 2-rank run of the reference's settings (run once per mode)."""
    done = {}

    def run(parallel: str):
        if parallel not in done:
            out = setup[0] / parallel
            args = ["finetune", *_common(setup, 0.0), "--parallel", parallel, "--output-dir", str(out)]
            result = _torchrun(setup, args, hook="dump")
            assert result.returncode == 0, result.stderr[-3000:]
            assert result.stdout.count("config: ") == 1  # rank 0 prints, rank 1 does not
            done[parallel] = out
        return done[parallel]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_as_one_process_does(one_process, two_ranks, parallel):
    out = two_ranks(parallel)

    ours, ref = read_metrics(out), read_metrics(one_process)
    assert [m["step"] for m in ours] == [1, 2, 3, 4, 5]
    for a, b in zip(ours, ref):
        assert a["batch_sha1"] == b["batch_sha1"] and a["tokens"] == b["tokens"]  # the same global batch
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
        assert ("val_loss" in a) == ("val_loss" in b) and a.get("val_loss", 0) == pytest.approx(b.get("val_loss", 0),
                                                                                          rel=1e-5), a["step"]  # fmt: skip
    assert ours[-1]["loss"] < ours[0]["loss"]

    # Every rank holds the same adapter, and it is the one written (and one process's, to rounding).
    rank0, rank1 = (load_file(out / f"rank{r}.safetensors") for r in (0, 1))
    written = load_file(out / "adapter" / "adapter_model.safetensors")
    single = load_file(one_process / "adapter" / "adapter_model.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) == len(written) == 2 * 14
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], written[f"base_model.model.{name}"]), name
        # Another summation order (the ranks' reduction; FSDP2's reduce-scatter) moves elements by float32 rounding,
        # which five Adam steps amplify where a gradient is near zero: 6e-7 seen for an element of a tensor whose
        # largest is 0.13 (torch at AVX2), so the bound is relative to the tensor's largest value.
        ref = single[f"base_model.model.{name}"]
        torch.testing.assert_close(written[f"base_model.model.{name}"], ref, rtol=1e-5,
                                   atol=1e-5 * float(ref.abs().max()), msg=name)  # fmt: skip

    memory = ours[-1]["memory"]
    whole, per_rank = memory["packed_bytes_whole"], memory["packed_bytes"]
    if parallel == "fsdp":  # each rank holds its half of every packed weight (a row more where uneven)
        assert all(abs(b - whole / 2) <= 14 for b in per_rank), (per_rank, whole)
    else:
        assert per_rank == [whole, whole]
    assert all(p > 0 for p in memory["peak_load_mib"] + memory["peak_train_mib"])


@pytest.mark.slow
def test_the_adapter_of_two_ranks_loads_in_peft_with_our_logits(setup, two_ranks):
    """On the FSDP2 run's adapter: PEFT on transformers' model with the weights our 4-bit layers dequantize to."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from nf4lora.lora import Linear4bit, load_adapter
    from nf4lora.models import load_model

    model_dir, adapter = setup[1], two_ranks("fsdp") / "adapter"
    ours = load_model(model_dir, quantize="nf4", compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, Linear4bit):
                hf.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    load_adapter(ours, adapter)
    ref = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, ref_logits = ours.eval()(ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    with ref.disable_adapter(), torch.no_grad():
        base_logits = ref(input_ids=ids).logits
    assert not torch.allclose(logits, base_logits, rtol=1e-4, atol=1e-5)  # the adapter changes the output


@pytest.mark.slow
def test_killed_two_rank_run_resumes_bit_for_bit(setup):
    """FSDP2 with dropout (each rank reseeds per step) killed after the checkpoint of step 2, in step 4."""
    root = setup[0]
    common = ["finetune", *_common(setup, 0.1), "--parallel", "fsdp"]
    full = _torchrun(setup, [*common, "--output-dir", str(root / "full")])
    assert full.returncode == 0, full.stderr[-3000:]

    out = root / "killed"
    killed = _torchrun(setup, [*common, "--output-dir", str(out)], hook="kill:4:0")
    assert killed.returncode != 0
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert not (out / "adapter").exists()

    resumed = _torchrun(setup, [*common, "--output-dir", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(root / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise
    assert any(bool(t.abs().sum()) for k, t in a.items() if "lora_B" in k)  # training did move the adapter
    for x, y in zip(read_metrics(root / "full"), read_metrics(out), strict=True):
        for key in ("batch_sha1", "loss", "grad_norm", "lr", "val_loss"):
            assert x.get(key) == y.get(key), (x["step"], key)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_two_rank_checkpoint_resumes_in_one_process(setup, two_ranks):
    """The FSDP2 run's checkpoint of step 2, continued by one process: the same rows, summed in another order, so
    the result is the 2-rank run's to float32 rounding (dropout is off in these runs)."""
    run = two_ranks("fsdp")
    out = setup[0] / "one-process-from-two"
    shutil.copytree(run, out)
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    assert main(["finetune", *_common(setup, 0.0), "--output-dir", str(out), "--resume"]) == 0
    two, one = read_metrics(run), read_metrics(out)
    assert [m["batch_sha1"] for m in one] == [m["batch_sha1"] for m in two]
    for x, y in zip(two[2:], one[2:], strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=LOSS_RTOL), x["step"]
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_a_one_line_error(setup):
    out = setup[0] / "failing"
    start = time.monotonic()
    run = _torchrun(setup, ["finetune", *_common(setup, 0.0), "--parallel", "ddp", "--output-dir", str(out)],
                    hook="fail:2:1", timeout=90)  # fmt: skip
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    assert elapsed < 60, elapsed
    lines = [line for line in run.stderr.splitlines() if line.startswith("nf4lora: error: [rank 1]")]
    assert lines == ["nf4lora: error: [rank 1] RuntimeError: injected failure at an optimizer step"], run.stderr[-3000:]
    assert not (out / "adapter").exists()


def test_parallel_and_batch_are_checked_before_anything_is_loaded(setup, monkeypatch, capsys):
    """In process, as rank 0 of 3 would see it: the model path does not exist, so an error about the batch proves
    the batch was checked first."""
    root = setup[0]
    missing = str(root / "no-such-model")
    args = ["finetune", "--model", missing, "--data", setup[2], "--output-dir", str(root / "refused"),
            "--batch-size", "4", "--micro-batch-size", "2"]  # fmt: skip
    assert main([*args, "--parallel", "fsdp"]) == 2
    assert "runs under torchrun" in capsys.readouterr().err
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(name, value)
    assert main([*args, "--parallel", "ddp"]) == 2
    err = capsys.readouterr().err
    assert "nf4lora: error: [rank 0] --batch-size=4 cannot be shared by 3 ranks" in err and "multiple of 6" in err
    assert main(args) == 2
    assert "torchrun started 3 processes but --parallel is 'none'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_one_rank_on_cuda_with_nccl_trains_as_one_process(setup, parallel):
    """The CUDA path (nccl, cuda:LOCAL_RANK, PagedAdamW paging DTensor shards) with the one GPU a machine may have."""
    root = setup[0]
    args = ["finetune", *_common(setup, 0.0), "--device", "cuda"]
    one = subprocess.run([sys.executable, "-m", "nf4lora", *args, "--output-dir", str(root / "cuda-one")], cwd=root,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    run = _torchrun(setup, [*args, "--parallel", parallel, "--output-dir", str(root / f"cuda-{parallel}")], nproc=1)
    assert run.returncode == 0, run.stderr[-3000:]
    for a, b in zip(read_metrics(root / f"cuda-{parallel}"), read_metrics(root / "cuda-one"), strict=True):
        assert a["batch_sha1"] == b["batch_sha1"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    assert all(p > 0 for p in read_metrics(root / f"cuda-{parallel}")[-1]["memory"]["peak_train_mib"])

"""The training loop in process: schedule, accumulation, loss going down, outputs, atomic checkpoints, what
--resume and a fresh run accept in an output directory that holds an earlier run."""

import dataclasses
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nf4lora.train import checkpoint as ckpt_mod
from nf4lora.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nf4lora.train.config import RESUMABLE_CHANGES, TrainConfig
from nf4lora.train.loop import _grad_norm, lr_at, prepare, train
from nf4lora.train.optim import PagedAdamW
from test_train_helpers import read_metrics, write_tiny_run


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("train"), 48, seed=2)


def _config(setup, out, **kw):
    root, model, data = setup
    base = dict(model=model, data=data, output_dir=str(root / out), seq_len=128, batch_size=4, micro_batch_size=2,
                max_steps=3, warmup_steps=1, lr=1e-2, lora_r=4, eval_every=0, save_every=0, progress=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule_warms_up_then_holds_or_decays(schedule):
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, schedule=schedule)
    lrs = [lr_at(s, cfg, total_steps=20) for s in range(20)]
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5]))  # linear warmup rises
    assert max(lrs) <= cfg.lr and lrs[4] == cfg.lr
    if schedule == "constant":
        assert all(lr == cfg.lr for lr in lrs[4:])
    else:
        assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
        assert lrs[-1] < 0.01 * cfg.lr


def test_accumulated_micro_batches_equal_one_big_batch(setup):
    """batch 4 as 2 x 2 rows gives the same update as 1 x 4 rows (token-weighted loss; fp32, no dropout)."""
    # adam_eps=1: the first Adam update lr * g / (|g| + eps) is then ~ lr * g, so it compares gradients; with a
    # tiny eps it would be lr * sign(g) and round-off on near-zero gradients would flip whole entries.
    common = dict(max_steps=1, lora_dropout=0.0, bf16=False, compute_dtype="float32", max_grad_norm=0.0, pack=False,
                  adam_eps=1.0)
    a = train(_config(setup, "acc2", micro_batch_size=2, **common))
    b = train(_config(setup, "acc1", micro_batch_size=4, **common))
    ta = load_file(os.path.join(a.adapter_dir, "adapter_model.safetensors"))
    tb = load_file(os.path.join(b.adapter_dir, "adapter_model.safetensors"))
    assert a.metrics[0]["tokens"] == b.metrics[0]["tokens"]
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-5, atol=1e-6)  # fp32 summation order differs
    assert any(bool(t.abs().sum()) for k, t in ta.items() if "lora_B" in k)


def test_loss_falls_and_outputs_are_written(setup):
    cfg = _config(setup, "falls", max_steps=12, eval_every=4, save_every=4, lr=2e-2)
    result = train(cfg)
    losses = [m["loss"] for m in result.metrics]
    val = [m["val_loss"] for m in result.metrics if "val_loss" in m]
    assert len(val) == 3 and val[-1] < val[0] and losses[-1] < losses[0]
    out = cfg.output_dir
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 13))
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest.json", "step-00000004", "step-00000008"]
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    for m in result.metrics:
        assert m["tokens_per_s"] > 0 and m["grad_norm"] >= 0


@pytest.fixture
def umask_002():
    before = os.umask(0o002)  # group-writable: unlike both 0600 (mkstemp, safetensors' save_file) and the usual 0644
    yield
    os.umask(before)


def test_written_files_get_the_ordinary_mode_of_the_umask(setup, umask_002):
    """Adapter, checkpoints, metrics, a merged checkpoint and a saved tokenizer: files 0666 and directories 0777
    less the umask, as open() and mkdir() give (PEFT's files are 0644 under the usual umask 022)."""
    from nf4lora.models import Tokenizer
    from nf4lora.train.cli import main

    cfg = _config(setup, "modes", max_steps=2, save_every=1, compute_dtype="float32")
    result = train(cfg)
    merged = os.path.join(cfg.output_dir, "merged")
    assert main(["merge", "--model", cfg.model, "--adapter", result.adapter_dir, "--out", merged]) == 0
    Tokenizer.from_pretrained(cfg.model).save_pretrained(os.path.join(cfg.output_dir, "tokenizer"))
    modes, names = {}, set()
    for root, dirs, files in os.walk(cfg.output_dir):
        for name in dirs:
            modes[os.path.join(root, name)] = (os.stat(os.path.join(root, name)).st_mode & 0o777, 0o775)
        for name in files:
            modes[os.path.join(root, name)] = (os.stat(os.path.join(root, name)).st_mode & 0o777, 0o664)
        names |= set(files)
    written = {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "rng.safetensors",
               "trainer_state.json", "latest.json", "model.safetensors", "config.json", "tokenizer.json"}  # fmt: skip
    assert written <= names
    assert {path: oct(mode) for path, (mode, want) in modes.items() if mode != want} == {}


def test_a_non_finite_step_stops_training_before_it_spoils_anything(setup):
    """lr 1e30 blows the adapter up in one update, so step 2's loss is not finite: training stops there with an
    error, before the update, keeping step 1's checkpoint, its metrics and no adapter."""
    cfg = _config(setup, "nonfinite", max_steps=4, warmup_steps=0, lr=1e30, save_every=1, schedule="constant")
    with pytest.raises(ValueError, match=r"step 2: the loss \(.*\) or the gradient norm \(.*\) is not finite"):
        train(cfg)
    out = cfg.output_dir
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest.json", "step-00000001"]
    assert [m["step"] for m in read_metrics(out)] == [1]
    assert not os.path.exists(os.path.join(out, "adapter"))


def test_interrupted_checkpoint_write_keeps_the_previous_one(setup, monkeypatch):
    cfg = _config(setup, "atomic")
    model, _, _, _, _ = prepare(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    root = os.path.join(cfg.output_dir, "checkpoints")
    save_checkpoint(root, 2, model, opt, {"total_steps": 3, "data": {"epoch": 0, "index": 4, "seed": 0}}, keep=2)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    real_save_file = ckpt_mod.save_file

    def torn_write(tensors, path, metadata=None):  # writes part of the file, then the "machine dies"
        real_save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(16)
        raise KeyboardInterrupt("killed mid-write")

    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    monkeypatch.setattr(ckpt_mod, "save_file", torn_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 4, model, opt, {"total_steps": 3, "data": {"epoch": 0, "index": 8, "seed": 0}}, keep=2)
    monkeypatch.undo()

    assert sorted(os.listdir(root)) == ["latest.json", "step-00000002"]  # no torn step-4, no temporary left
    state = load_checkpoint(latest_checkpoint(root), model, opt)
    assert state["step"] == 2 and state["data"]["index"] == 4
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, saved[n]), n


def test_checkpoint_write_removes_what_a_killed_write_left(setup):
    cfg = _config(setup, "leftovers")
    model, _, _, _, _ = prepare(cfg)
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    root = os.path.join(cfg.output_dir, "checkpoints")
    os.makedirs(os.path.join(root, ".step-00000004.k1ll3d", "adapter"))  # killed while assembling step 4
    os.makedirs(os.path.join(root, ".step-00000002.old.x9z", "step-00000002"))  # killed while replacing step 2
    with open(os.path.join(root, ".latest.json.a1b2.tmp"), "w") as f:  # killed while pointing latest.json
        f.write("{")
    save_checkpoint(root, 2, model, opt, {"total_steps": 3, "data": {"epoch": 0, "row": 4, "seed": 0}}, keep=2)
    assert sorted(os.listdir(root)) == ["latest.json", "step-00000002"]


def test_grad_norm_of_parameters_without_gradients_is_zero():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    for max_norm in (0.0, 0.3):  # unclipped and clipped paths
        assert float(_grad_norm(params, max_norm)) == 0.0
    params[0].grad = torch.tensor([3.0, 4.0, 0.0])
    assert float(_grad_norm(params, 0.0)) == 5.0 and params[0].grad.tolist() == [3.0, 4.0, 0.0]


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig) if f.type == "float"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_config_rejects_non_finite_floats(name, value):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=rf"^{flag}=(-?inf|nan): must be a finite number$"):
        TrainConfig(**{name: value}).validate()


# ------------------------------------------------------------------ resuming, and runs in a used output directory
def test_resumable_changes_name_config_fields():
    assert RESUMABLE_CHANGES <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert "micro_batch_size" in RESUMABLE_CHANGES and "batch_size" not in RESUMABLE_CHANGES


@pytest.fixture(scope="module")
def finished(setup):
    """A finished 4-step run with its checkpoint at step 2; each test resumes a copy (redoing steps 3 and 4)."""
    cfg = _config(setup, "finished", max_steps=4, save_every=2)
    train(cfg)
    return cfg


def _copy(run: TrainConfig, tmp_path, **changes) -> TrainConfig:
    out = str(tmp_path / "run")
    shutil.copytree(run.output_dir, out)
    return dataclasses.replace(run, output_dir=out, **changes)


def test_resume_refuses_other_training_settings_naming_each(finished, tmp_path):
    cfg = _copy(finished, tmp_path, resume=True, lr=1e-3, weight_decay=0.1, adam_beta2=0.95, lora_r=8)
    with pytest.raises(ValueError, match="--resume: checkpoint .*step-00000002.* other settings") as err:
        train(cfg)
    msg = str(err.value)
    for line in ("--lr: saved 0.01, given 0.001", "--weight-decay: saved 0.0, given 0.1",
                 "--adam-beta2: saved 0.999, given 0.95", "--lora-r: saved 4, given 8"):  # fmt: skip
        assert line in msg
    assert msg.count("\n  --") == 4  # one line per differing field, and no other
    assert read_metrics(cfg.output_dir) == read_metrics(finished.output_dir)  # nothing was touched


def test_resume_with_another_micro_batch_size_trains_the_same_rows(finished, tmp_path):
    """Only how a step is split changes (4 rows as 4 x 1 instead of 2 x 2): same rows, same loss up to rounding."""
    cfg = _copy(finished, tmp_path, resume=True, micro_batch_size=1, eval_every=1, save_every=1, keep_checkpoints=1)
    result = train(cfg)
    before, after = read_metrics(finished.output_dir), result.metrics
    assert [m["step"] for m in after] == [1, 2, 3, 4]
    assert [m["batch_sha1"] for m in after] == [m["batch_sha1"] for m in before]  # packed: the split hashes alike
    for x, y in zip(before, after):
        assert (x["data_epoch"], x["data_row"]) == (y["data_epoch"], y["data_row"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-2)  # bf16 autocast; summation order differs


def test_resume_drops_a_partly_written_last_metrics_line(finished, tmp_path):
    cfg = _copy(finished, tmp_path, resume=True)
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a kill in the middle of _append_metrics
    train(cfg)
    assert [m["step"] for m in read_metrics(cfg.output_dir)] == [1, 2, 3, 4]
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines([lines[0], lines[1][:30] + "\n", *lines[2:]])  # a bad line that is not the last one
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a metrics record"):
        train(cfg)


def test_fresh_run_refuses_an_earlier_run_and_overwrite_replaces_it(finished, tmp_path):
    cfg = _copy(finished, tmp_path, lr=5e-3, max_steps=1, save_every=0)
    out = cfg.output_dir
    with pytest.raises(ValueError, match="holds an earlier run .*checkpoints.*--resume.*--overwrite") as err:
        train(cfg)
    assert out in str(err.value)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest.json", "step-00000002"]  # untouched
    assert len(read_metrics(out)) == 4
    train(dataclasses.replace(cfg, overwrite=True))
    assert not os.path.exists(os.path.join(out, "checkpoints"))  # the earlier run's; this one saved none
    assert [(m["step"], m["lr"]) for m in read_metrics(out)] == [(1, 5e-3 / 2)]  # warmup step 0 of 1
    with pytest.raises(ValueError, match="--resume .* --overwrite"):
        dataclasses.replace(cfg, resume=True, overwrite=True).validate()

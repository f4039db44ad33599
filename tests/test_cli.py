"""The nf4lora command line: help, flags -> TrainConfig, bad input rejected before training, merge and eval
against transformers (+ PEFT)."""

import dataclasses
import errno
import json
import math
import os
import re
import shutil

import pytest
import torch

from nf4lora.train.cli import build_parser, config_from_args, main
from nf4lora.train.config import TrainConfig
from test_train_helpers import date_records, write_jsonl, write_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "model": write_tiny_model(root / "model"),
        "other": write_tiny_model(root / "other", hidden_size=32, intermediate_size=64),
        "data": write_jsonl(root / "train.jsonl", date_records(24, seed=4)),
    }


@pytest.fixture(scope="module")
def adapter(files):
    """A trained adapter of the tiny model (a few steps, so B != 0)."""
    out = str(files["root"] / "run")
    rc = main(["finetune", "--model", files["model"], "--data", files["data"], "--output-dir", out, "--seq-len", "128",
               "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "3", "--lr", "2e-2", "--lora-r", "4",
               "--save-every", "0", "--no-progress", "--show", "0"])  # fmt: skip
    assert rc == 0
    return os.path.join(out, "adapter")


def test_help_lists_every_command_and_every_config_field(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for command in ("finetune", "merge", "eval", "generate", "convert-gguf"):
        assert command in top
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "(default: None)" not in text  # a field whose default is None says in its help what None means


def test_flags_fill_the_dataclass_and_demo_settings_apply_only_to_the_builtin_run():
    parser = build_parser()
    argv = ["finetune", "--model", "m", "--data", "d.jsonl", "--lora-r", "8", "--no-pack", "--lr", "1e-3"]
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    assert (cfg.model, cfg.data, cfg.lora_r, cfg.pack, cfg.lr) == ("m", "d.jsonl", 8, False, 1e-3)
    qlora = (cfg.quant_type, cfg.double_quant, cfg.blocksize, cfg.lora_alpha, cfg.max_grad_norm)
    assert qlora == ("nf4", True, 64, 32.0, 0.3)
    assert cfg.max_steps == TrainConfig.max_steps  # the demo's settings are not applied to a user's run
    demo = config_from_args(parser.parse_args(["finetune", "--lr", "5e-4"]))
    assert demo.lr == 5e-4 and demo.max_steps > 0


def test_demo_runs_again_into_its_directory_and_its_length_follows_epochs():
    parser = build_parser()
    demo = config_from_args(parser.parse_args(["finetune"]))
    assert demo.overwrite and not demo.resume  # a second `nf4lora finetune` replaces the first one's run
    demo.validate()
    resumed = config_from_args(parser.parse_args(["finetune", "--resume"]))
    assert resumed.resume and not resumed.overwrite
    resumed.validate()
    user = config_from_args(parser.parse_args(["finetune", "--model", "m", "--data", "d.jsonl"]))
    assert not user.overwrite  # a user's run is never replaced without --overwrite
    elsewhere = config_from_args(parser.parse_args(["finetune", "--output-dir", "runs/mine"]))
    assert not elsewhere.overwrite  # the demo replaces only its own runs/finetune
    by_epochs = config_from_args(parser.parse_args(["finetune", "--epochs", "3"]))
    assert (by_epochs.epochs, by_epochs.max_steps) == (3.0, 0)  # --epochs decides the length, not the demo's steps
    both = config_from_args(parser.parse_args(["finetune", "--epochs", "3", "--max-steps", "5"]))
    assert both.max_steps == 5


def _bad(capsys, files, *extra, data=None):
    out = files["root"] / "bad-out"
    argv = ["finetune", "--model", files["model"], "--data", data or files["data"], "--output-dir", str(out),
            "--seq-len", "128", "--no-progress", *extra]  # fmt: skip
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("nf4lora: error:")
    assert not os.path.exists(out / "metrics.jsonl")  # nothing was trained
    return err


def test_bad_input_is_reported_before_training(capsys, files, tmp_path):
    assert "does not exist" in _bad(capsys, files, data=str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in _bad(capsys, files, data=str(tmp_path / "empty.jsonl"))
    err = _bad(capsys, files, "--seq-len", "512")
    assert "--seq-len=512" in err and "context (256" in err
    err = _bad(capsys, files, "--batch-size", "6", "--micro-batch-size", "4")
    assert "--batch-size=6" in err and "--micro-batch-size=4" in err
    (tmp_path / "a-file").write_text("x")
    err = _bad(capsys, files, "--output-dir", str(tmp_path / "a-file" / "out"))
    assert "not a writable directory" in err
    err = _bad(capsys, files, "--resume", "--output-dir", str(tmp_path / "fresh"))
    assert "no checkpoint" in err
    err = _bad(capsys, files, "--epochs", "inf")
    assert "--epochs=inf: must be a finite number" in err
    err = _bad(capsys, files, "--lr", "inf")
    assert "--lr=inf: must be a finite number" in err


def test_fresh_run_into_an_earlier_runs_directory_is_refused(capsys, files, adapter):
    run = os.path.dirname(adapter)
    before = sorted(os.listdir(run))
    rc = main(["finetune", "--model", files["model"], "--data", files["data"], "--output-dir", run, "--seq-len", "128",
               "--no-progress", "--show", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"nf4lora: error: --output-dir={run!r} holds an earlier run")
    assert "--resume" in err and "--overwrite" in err
    assert sorted(os.listdir(run)) == before


def test_adapter_from_another_model_is_rejected(capsys, files, adapter, tmp_path):
    rc = main(["eval", "--model", files["other"], "--adapter", adapter, "--data", files["data"]])
    assert rc == 2 and "shape" in capsys.readouterr().err
    rc = main(["merge", "--model", files["other"], "--adapter", adapter, "--out", str(tmp_path / "m")])
    assert rc == 2 and "shape" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m" / "model.safetensors")


def test_merged_checkpoint_loads_in_transformers_with_our_logits(files, adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nf4lora.lora import load_adapter
    from nf4lora.models import load_model

    out = str(tmp_path / "merged")
    assert main(["merge", "--model", files["model"], "--adapter", adapter, "--out", out, "--dtype", "float32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    copied, original = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(files["model"])
    assert copied.encode("hello 12/05/2020") == original.encode("hello 12/05/2020")
    ours = load_model(files["model"], quantize="nf4", compute_dtype=torch.float32)
    load_adapter(ours, adapter)
    ours.eval()  # load_adapter adds LoRA modules in training mode (dropout on)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(ids).logits, hf(ids).logits
    # fp32 throughout; the merged weight W + s*B@A is rounded once where ours adds the two products.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _eval(capsys, argv):
    assert main(argv) == 0
    line = capsys.readouterr().out
    return float(re.search(r"perplexity ([0-9.]+)", line).group(1))


def _hf_perplexity(model, ids, seq_len):
    total, count = 0.0, 0
    for i in range(0, len(ids), seq_len):
        window = torch.tensor([ids[i : i + seq_len]])
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(window, labels=window).loss
        total += float(loss) * (window.shape[1] - 1)
        count += window.shape[1] - 1
    return math.exp(total / count)


def test_eval_perplexity_matches_transformers_and_peft(capsys, files, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tmp_path / "text.txt"
    records = date_records(12, seed=1)
    text.write_text(" ".join(f"{r['messages'][0]['content']} {r['messages'][1]['content']}" for r in records))
    common = ["--model", files["model"], "--data", str(text), "--seq-len", "64", "--quant-type", "none",
              "--compute-dtype", "float32"]  # fmt: skip
    ours = _eval(capsys, ["eval", *common])
    ours_adapted = _eval(capsys, ["eval", *common, "--adapter", adapter])

    ids = AutoTokenizer.from_pretrained(files["model"]).encode(text.read_text())
    hf = AutoModelForCausalLM.from_pretrained(files["model"], dtype=torch.float32).eval()
    assert ours == pytest.approx(_hf_perplexity(hf, ids, 64), rel=1e-5)  # printed with 6 decimals, fp32
    # Without --seq-len the windows are 512 tokens, or the model's context when shorter (as here).
    context = hf.config.max_position_embeddings
    assert context < 512 and len(ids) > context
    default = _eval(capsys, ["eval", *[a for a in common if a not in ("--seq-len", "64")]])
    assert default == pytest.approx(_hf_perplexity(hf, ids, context), rel=1e-5)
    peft = PeftModel.from_pretrained(hf, adapter).eval()  # wraps hf in place
    reference = _hf_perplexity(peft, ids, 64)
    assert ours_adapted == pytest.approx(reference, rel=1e-5)
    assert ours_adapted != pytest.approx(ours, rel=1e-3)  # the adapter does change the model


def _peft_adapter(base: str, out, targets: list[str], seed: int = 1) -> str:
    """A PEFT LoRA adapter of `base` on `targets` with random A and B (r=4, alpha=8)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)  # large enough that a dropped or half-applied adapter shows in the logits
    peft.save_pretrained(str(out), save_embedding_layers=False)
    return str(out)


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_merge_of_an_adapter_on_some_layers_writes_every_layer_dense_and_matches_peft(files, tmp_path):
    """Layers the adapter does not cover are dequantized too (not written as packed bytes): the result equals PEFT's
    merge_and_unload on the base as nf4lora holds it (every 4-bit layer dequantized)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from nf4lora.lora import Linear4bit
    from nf4lora.models import load_model

    adapter = _peft_adapter(files["model"], tmp_path / "qv", ["q_proj", "v_proj"])  # PEFT's LLaMA default
    out = str(tmp_path / "merged")
    assert main(["merge", "--model", files["model"], "--adapter", adapter, "--out", out, "--dtype", "float32"]) == 0
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert all(k.endswith(".weight") for k in keys), sorted(keys)  # no .absmax / .quant_map / ... keys
    assert "model.layers.0.mlp.up_proj.weight" in keys and "lm_head.weight" not in keys  # still tied
    assert json.loads(open(os.path.join(out, "config.json")).read())["tie_word_embeddings"] is True

    base = AutoModelForCausalLM.from_pretrained(files["model"], dtype=torch.float32)
    ours = load_model(files["model"], quantize="nf4", compute_dtype=torch.float32)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, Linear4bit):
                base.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    reference = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), _logits(reference), rtol=1e-4, atol=1e-4)  # fp32 throughout


def test_merge_of_a_lora_on_the_tied_lm_head_unties_it(files, tmp_path):
    """lm_head = embed + B @ A * s after merging, the embedding unchanged: lm_head is written and the tie undone,
    and transformers computes what PEFT computes with the adapter applied."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = _peft_adapter(files["model"], tmp_path / "head", ["q_proj", "lm_head"])
    out = str(tmp_path / "merged")
    argv = ["merge", "--model", files["model"], "--adapter", adapter, "--out", out, "--quant-type", "none",
            "--dtype", "float32"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(open(os.path.join(out, "config.json")).read())["tie_word_embeddings"] is False
    written, base = load_file(os.path.join(out, "model.safetensors")), load_file(files["model"] + "/model.safetensors")
    assert torch.equal(written["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["model"]), adapter).eval()
    torch.testing.assert_close(_logits(merged), _logits(reference), rtol=1e-4, atol=1e-4)


def test_merge_refuses_an_out_that_is_or_holds_the_base_before_loading_anything(capsys, files, tmp_path, monkeypatch):
    from nf4lora.train import resources

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(resources, "load_base", no_loading)
    base = shutil.copytree(files["model"], tmp_path / "base")
    before = {name: (base / name).read_bytes() for name in os.listdir(base)}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (tmp_path / "link").symlink_to(base)
    cases = [(str(base), [], "is --model="), (str(tmp_path / "link") + "/", ["--overwrite"], "is --model="),
             (str(base / ".." / "base"), [], "is --model="), (str(tmp_path), ["--overwrite"], "contains --model=")]
    for out, extra, says in cases:
        rc = main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", out, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"nf4lora: error: --out={out!r} {says}"), err
    assert {name: (base / name).read_bytes() for name in os.listdir(base)} == before


def test_merge_replaces_an_earlier_checkpoint_only_with_overwrite_and_as_a_whole(capsys, files, tmp_path, monkeypatch):
    from nf4lora.models import safetensors_io

    adapter = _peft_adapter(files["model"], tmp_path / "qv", ["q_proj", "v_proj"])
    out = tmp_path / "out"
    out.mkdir()
    stale = {"config.json": "{}", "chat_template.jinja": "OLD {{ messages }}", "model.safetensors.index.json": "{}"}
    for name, text in stale.items():
        (out / name).write_text(text)
    argv = ["merge", "--model", files["model"], "--adapter", adapter, "--out", str(out), "--quant-type", "none"]

    assert main(argv) == 2
    assert "is not empty" in capsys.readouterr().err and sorted(os.listdir(out)) == sorted(stale)

    def full_disk(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(safetensors_io, "save_safetensors_atomic", full_disk)
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nf4lora: error: --out={str(out)!r}: writing the output failed (No space left on device)")
    assert {name: (out / name).read_text() for name in os.listdir(out)} == stale  # a failure changes nothing
    assert sorted(os.listdir(tmp_path)) == ["out", "qv"]  # and leaves no temporary directory behind
    monkeypatch.undo()

    assert main([*argv, "--overwrite"]) == 0
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert set(os.listdir(out)) == expected  # nothing of the earlier checkpoint survives
    assert sorted(os.listdir(tmp_path)) == ["out", "qv"]

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("not a checkpoint")
    assert main(["merge", "--model", files["model"], "--adapter", adapter, "--out", str(notes), "--overwrite"]) == 2
    assert "no config.json" in capsys.readouterr().err and os.listdir(notes) == ["mine.txt"]


def test_output_paths_that_cannot_be_directories_are_reported(capsys, files, tmp_path, monkeypatch):
    from nf4lora.train import cli

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (tmp_path / "a-file").write_text("x")
    for out, says in [(tmp_path / "a-file", "exists and is not a directory"),
                      (tmp_path / "a-file" / "out", "cannot create a directory")]:  # fmt: skip
        rc = main(["merge", "--model", files["model"], "--adapter", str(adapter), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"nf4lora: error: --out={str(out)!r}") and says in err, err
    assert (tmp_path / "a-file").read_text() == "x"

    def full_disk(args):  # any command's OSError (a checkpoint of finetune on a full disk) is an error line
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/checkpoint/optimizer.pt")

    monkeypatch.setattr(cli, "cmd_eval", full_disk)
    assert main(["eval", "--model", files["model"]]) == 2
    assert capsys.readouterr().err == "nf4lora: error: 'runs/x/checkpoint/optimizer.pt': No space left on device\n"


@pytest.fixture
def no_model_loading(monkeypatch):
    """Every command loads its model through nf4lora.models.loading.load_model: here that fails the test."""
    from nf4lora.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_model", refuse)


def test_bad_inputs_fail_before_the_model_is_loaded(capsys, files, adapter, tmp_path, no_model_loading):
    good = json.dumps(date_records(1, seed=0)[0])
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(f"{good}\n{{not json\n")
    shapeless = tmp_path / "shapeless.jsonl"
    shapeless.write_text(f'{good}\n{{"question": "?"}}\n')
    run = ["finetune", "--model", files["model"], "--output-dir", str(tmp_path / "run"), "--seq-len", "128"]
    no_dir = str(tmp_path / "no-adapter")
    cases = [
        ([*run, "--data", str(malformed)], f"{malformed}:2: not valid JSON"),
        ([*run, "--data", str(shapeless)], f"{shapeless}:2: a record needs 'text', 'prompt' + 'completion'"),
        ([*run, "--data", files["data"], "--val-data", str(malformed)], f"{malformed}:2: not valid JSON"),
        ([*run, "--data", files["data"], "--seq-len", "512"], "--seq-len=512 exceeds the model's context (256"),
        ([*run, "--data", files["data"], "--resume"], "--resume: no checkpoint under"),
        ([*run, "--data", files["data"], "--lora-targets", "q_proj,v_prj"],
         "--lora-targets='q_proj,v_prj': target_modules ['v_prj'] match no Linear layer"),
        (["eval", "--model", files["model"], "--data", str(malformed)], f"{malformed}:2: not valid JSON"),
        (["eval", "--model", files["model"], "--data", files["data"], "--seq-len", "300"], "--seq-len=300 exceeds"),
        (["eval", "--model", files["other"], "--adapter", adapter], "lora_A.weight has shape"),
        (["eval", "--model", files["model"], "--adapter", no_dir], f"--adapter={no_dir!r} is not a directory"),
        (["eval", "--model", files["model"], "--adapter", str(tmp_path)], "adapter_config.json does not exist"),
        (["generate", "--model", files["other"], "--adapter", adapter, "--prompt", "hi"], "lora_A.weight has shape"),
        (["merge", "--model", files["other"], "--adapter", adapter, "--out", str(tmp_path / "m")], "has shape"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.splitlines()[-1]  # generate prints its compute dtype to stderr first
        assert err.startswith("nf4lora: error: ") and says in err, (argv, err)
    assert not os.path.exists(tmp_path / "m") and not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def _fake_checkpoint(out, argv: list[str], **state) -> None:
    """A checkpoint of step 2 under `out` saved by a run of the finetune flags `argv` (only trainer_state.json and
    latest.json: what --resume reads before loading the model)."""
    config = config_from_args(build_parser().parse_args(["finetune", *argv]))
    config.resolve(torch.device("cpu"))
    os.makedirs(out / "checkpoints" / "step-00000002")
    state = {"step": 2, "total_steps": 6, "data": {"epoch": 0, "row": 8, "seed": 0}, "config": config.to_dict(),
             **state}
    (out / "checkpoints" / "step-00000002" / "trainer_state.json").write_text(json.dumps(state))
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))


def test_resume_refuses_a_checkpoint_of_other_data_before_the_model_is_loaded(capsys, files, tmp_path,
                                                                               no_model_loading):  # fmt: skip
    """The settings are the checkpoint's, but its run had another number of steps (as when the data file changed
    since: here the step count is --max-steps), or its data position is an older nf4lora's."""
    argv = ["--model", files["model"], "--data", files["data"], "--seq-len", "128", "--batch-size", "4",
            "--micro-batch-size", "2", "--max-steps", "6", "--compute-dtype", "float32", "--no-progress"]  # fmt: skip
    cases = [({"total_steps": 99}, "belongs to a run of 99 steps, and the same settings make 6 of this data"),
             ({"data": {"epoch": 0, "index": 4, "seed": 0}}, "counts micro-batches (a checkpoint of an older")]
    for i, (state, says) in enumerate(cases):
        out = tmp_path / f"run{i}"
        _fake_checkpoint(out, argv, **state)
        assert main(["finetune", *argv, "--output-dir", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nf4lora: error: ") and says in err, err


def test_resume_of_a_checkpoint_from_before_compute_dtype_auto_says_why_bf16_differs(capsys, files, tmp_path,
                                                                                      no_model_loading):  # fmt: skip
    """--bf16 defaulted to on before compute dtype "auto"; now it follows the compute dtype, so an old float32 run
    (bf16 autocast on, no --parallel saved) resumed with the same flags differs in a flag the user never gave."""
    argv = ["--model", files["model"], "--data", files["data"], "--seq-len", "128", "--max-steps", "6",
            "--compute-dtype", "float32"]
    out = tmp_path / "old"
    _fake_checkpoint(out, [*argv, "--bf16"])
    state_file = out / "checkpoints" / "step-00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["parallel"]
    state_file.write_text(json.dumps(state))
    assert main(["finetune", *argv, "--output-dir", str(out), "--resume"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == ("  --bf16: saved True, given False (the default for compute dtype float32, which was on "
                         "before compute dtype 'auto')")  # fmt: skip
    with pytest.raises(AssertionError, match="the model was loaded"):  # past the checks: no_model_loading stops it
        main(["finetune", *argv, "--bf16", "--output-dir", str(out), "--resume"])


def test_a_model_path_that_is_not_a_checkpoint_directory_is_named_exactly(capsys, files, tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    commands = [["finetune", "--data", files["data"], "--output-dir", str(tmp_path / "run")], ["eval"],
                ["generate", "--prompt", "hi"], ["merge", "--adapter", "a", "--out", str(tmp_path / "m")]]  # fmt: skip
    paths = [(tmp_path / "does" / "not" / "exist", "does not exist"),
             (tmp_path / "weights.safetensors", "is a file, not a directory"),
             (tmp_path / "empty", "is a directory without config.json")]  # fmt: skip
    for command in commands:
        for path, says in paths:
            assert main([*command, "--model", str(path)]) == 2
            err = capsys.readouterr().err.splitlines()[-1]
            assert err.startswith(f"nf4lora: error: --model={str(path)!r} {says}"), (command, err)

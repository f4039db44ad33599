"""The nf4lora command line: help, flags -> TrainConfig, bad input rejected before training, merge and eval
against transformers (+ PEFT)."""

import dataclasses
import math
import os
import re

import pytest
import torch

from nf4lora.train.cli import build_parser, config_from_args, main
from nf4lora.train.config import TrainConfig
from test_train_helpers import date_records, write_jsonl, write_tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; OpenMP spinning on a shared 2-core machine costs ~10x
    yield
    torch.set_num_threads(before)


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
    peft = PeftModel.from_pretrained(hf, adapter).eval()
    reference = _hf_perplexity(peft, ids, 64)
    assert ours_adapted == pytest.approx(reference, rel=1e-5)
    assert ours_adapted != pytest.approx(ours, rel=1e-3)  # the adapter does change the model

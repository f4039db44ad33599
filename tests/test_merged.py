"""Merged checkpoints keep their fine-tune: `merge` records itself in config.json and reports how far the merged
model is from base + adapter; generate / eval hold a merged checkpoint at 16 bits unless 4 bits are asked for, and
then print what the 4 bits cost; finetune quantizes it as asked and says so."""

import contextlib
import io
import json
import os
import re
import warnings

import pytest
import torch

from nf4lora.train.cli import main
from test_train_helpers import date_records, write_jsonl, write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Write the date 03/04/2011 in words."
FLOAT32 = ["--compute-dtype", "float32"]  # the same arithmetic on every CPU kind, so the comparisons can be tight


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base, a hand-set adapter of it that changes its answers, data, and their merge (float32 weights)."""
    from nf4lora.lora import add_lora, save_adapter
    from nf4lora.models import load_model

    root = tmp_path_factory.mktemp("merged")
    base = write_tiny_model(root / "base")
    model = load_model(base, quantize=None, compute_dtype=torch.float32)
    add_lora(model, r=4, alpha=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    adapter = str(save_adapter(model, root / "adapter"))
    merged = str(root / "merged")
    assert main(["merge", "--model", base, "--adapter", adapter, "--out", merged, "--dtype", "float32"]) == 0
    data = write_jsonl(root / "data.jsonl", date_records(6, seed=3))
    return {"base": base, "adapter": adapter, "merged": merged, "data": data}


def _run(argv) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == 0, err.getvalue()
    return out.getvalue(), err.getvalue()


def _eval(*argv) -> tuple[float, str]:
    out, _ = _run(["eval", *argv, *FLOAT32])
    return float(re.search(r"target tokens, loss ([0-9.]+)", out).group(1)), out


def test_merge_records_itself_in_config_json_which_transformers_loads_without_complaint(files):
    from transformers import AutoConfig, AutoModelForCausalLM

    record = json.loads(open(os.path.join(files["merged"], "config.json")).read())["nf4lora_merged"]
    assert record["base_model"] == os.path.abspath(files["base"])
    assert record["adapter"] == os.path.abspath(files["adapter"])
    assert {k: record["adapter_config"][k] for k in ("r", "lora_alpha")} == {"r": 4, "lora_alpha": 8}
    assert record["base_held_as"] == {"quant_type": "nf4", "double_quant": True, "blocksize": 64}
    assert record["dtype"] == "float32"
    difference = record["logits_vs_base_plus_adapter"]
    assert difference["sequences"] == 4 and difference["argmax_agrees"] == 1.0
    assert difference["mean_abs"] <= difference["max_abs"] < 1e-3  # float32: only summation order differs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown-key warning would fail here
        assert AutoConfig.from_pretrained(files["merged"]).nf4lora_merged == record
        assert AutoModelForCausalLM.from_pretrained(files["merged"]).config.nf4lora_merged == record


def test_merge_reports_the_logit_difference_in_the_written_dtype(files, tmp_path):
    out, _ = _run(["merge", "--model", files["base"], "--adapter", files["adapter"], "--out", str(tmp_path / "bf16")])
    line = next(line for line in out.splitlines() if "against base + adapter" in line)
    assert line.startswith("merged model (bfloat16 weights as written, computed in float32)")
    worst, mean = map(float, re.search(r"max ([0-9.e-]+), mean ([0-9.e-]+)", line).groups())
    recorded = json.loads((tmp_path / "bf16" / "config.json").read_text())["nf4lora_merged"]
    assert recorded["logits_vs_base_plus_adapter"]["max_abs"] == pytest.approx(worst, rel=1e-2)
    exact = json.loads(open(os.path.join(files["merged"], "config.json")).read())["nf4lora_merged"]
    assert mean > 10 * exact["logits_vs_base_plus_adapter"]["mean_abs"]  # bf16 rounding shows, float32 barely


def test_merge_measures_the_written_weights_without_a_float32_copy_of_the_model(files, tmp_path, monkeypatch):
    """A bf16 base merged to bf16: while merge runs the merged model in float32 to compare it, only the layer
    running holds float32 copies of its weights; the others keep the bf16 tensors being written (a float32 copy
    of every layer at once would triple the memory merge needs)."""
    from safetensors.torch import load_file, save_file

    from nf4lora.train import merged

    base = write_tiny_model(tmp_path / "base")
    tensors = load_file(os.path.join(base, "model.safetensors"))
    save_file({k: v.bfloat16() for k, v in tensors.items()}, os.path.join(base, "model.safetensors"))
    others = []  # per decoder layer run: the dtypes of the other layers' Linear weights
    sample_logits = merged.sample_logits

    def spy(model, sample):
        layers = model.model.layers

        def record(layer, args):
            others.append({m.weight.dtype for other in layers if other is not layer
                           for m in other.modules() if isinstance(m, torch.nn.Linear)})  # fmt: skip

        hooks = [layer.register_forward_pre_hook(record) for layer in layers]
        others.clear()  # only the last call counts: the merged model's
        try:
            return sample_logits(model, sample)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(merged, "sample_logits", spy)
    _run(["merge", "--model", base, "--adapter", files["adapter"], "--out", str(tmp_path / "merged")])
    assert others and all(dtypes == {torch.bfloat16} for dtypes in others), others


def test_generate_and_eval_of_a_merged_checkpoint_give_the_fine_tuned_answers_by_default(files):
    generate = ["generate", "--prompt", PROMPT, "--max-new-tokens", "8", *FLOAT32]
    base, _ = _run([*generate, "--model", files["base"]])
    tuned, _ = _run([*generate, "--model", files["base"], "--adapter", files["adapter"]])
    merged, err = _run([*generate, "--model", files["merged"]])
    assert tuned != base  # the adapter changes the answer
    assert merged == tuned
    assert "base weights: 16-bit as stored, because" in err and "is a merged checkpoint" in err

    loss_tuned, _ = _eval("--model", files["base"], "--adapter", files["adapter"], "--data", files["data"])
    loss_merged, out = _eval("--model", files["merged"], "--data", files["data"])
    assert loss_merged == pytest.approx(loss_tuned, rel=1e-5)
    assert "base weights: 16-bit as stored" in out


def test_asking_for_4_bits_of_a_merged_checkpoint_prints_what_they_cost(files):
    loss16, _ = _eval("--model", files["merged"], "--data", files["data"])
    loss4, out = _eval("--model", files["merged"], "--data", files["data"], "--quant-type", "nf4")
    assert "base weights: NF4 as asked (--quant-type nf4), although" in out
    cost = next(line for line in out.splitlines() if line.startswith("NF4 against 16-bit:"))
    worst, mean = map(float, re.search(r"max ([0-9.e-]+), mean ([0-9.e-]+)", cost).groups())
    assert 0 < mean < worst
    before, after = map(float, re.search(r"target tokens ([0-9.]+) \(16-bit\) -> ([0-9.]+) \(NF4\)", cost).groups())
    assert before != after and loss4 != pytest.approx(loss16, rel=1e-4)

    _, err = _run(["generate", "--model", files["merged"], "--prompt", PROMPT, "--max-new-tokens", "2",
                   "--quant-type", "fp4", *FLOAT32])  # fmt: skip
    assert "FP4 against 16-bit: max" in err  # measured on the prompt: logits, no loss

    _, out = _eval("--model", files["base"], "--data", files["data"], "--quant-type", "nf4")
    assert "base weights: NF4 (--quant-type nf4)" in out and "against 16-bit" not in out  # not merged: no cost


def test_an_adapter_on_a_merged_checkpoint_gets_the_base_finetune_trained_it_on(files, monkeypatch):
    """finetune holds a merged base in NF4 (QLoRA) and says so; eval with that adapter holds it the same way."""
    from nf4lora.models import loading

    def stop(*args, **kwargs):
        raise KeyboardInterrupt("the model would be loaded here")

    monkeypatch.setattr(loading, "load_model", stop)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(KeyboardInterrupt):
        main(["finetune", "--model", files["merged"], "--data", files["data"], "--output-dir",
              os.path.join(os.path.dirname(files["data"]), "run"), "--seq-len", "128"])  # fmt: skip
    assert "is a merged checkpoint" in out.getvalue() and "finetune holds it in NF4 (--quant-type nf4" in out.getvalue()
    monkeypatch.undo()

    _, out = _eval("--model", files["merged"], "--adapter", files["adapter"], "--data", files["data"])
    assert "base weights: NF4, as finetune holds a base by default, because --adapter was trained on that" in out

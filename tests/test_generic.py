"""Architectures without native support, through transformers' own modules with our Linear4bit and LoRA
(models/generic.py): Falcon, MPT, GPT-NeoX and GPT-2 (Conv1D layers), as tiny random checkpoints saved here.

For each: `nf4lora finetune` runs, a run killed (SIGKILL) after a checkpoint resumes to the uninterrupted run's
adapter bit for bit, PEFT loads the adapter onto transformers' model (with the weights our 4-bit layers
dequantize to) and gives our logits, greedy generation and `eval` agree with that reference, and `merge` writes a
checkpoint transformers loads with our logits. Packed documents equal separate sequences; native checkpoints never
import transformers; configs we cannot honour are refused in one line naming the field.
"""

import json
import os
import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from reference_packages import require
from test_train_helpers import date_records, read_metrics, write_jsonl, write_tiny_model, write_tokenizer
from test_train_resume import STEP_KILLER, _run

transformers = require("transformers")
peft = require("peft")
require("accelerate")  # the hf extra's other package

from nf4lora.lora import Linear4bit, LoRALinear, add_lora, load_adapter  # noqa: E402
from nf4lora.models import Tokenizer, generate, load_any  # noqa: E402
from nf4lora.train.cli import main  # noqa: E402
from nf4lora.train.data import eval_batches  # noqa: E402
from nf4lora.train.evaluate import file_examples  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 320  # the tokenizer of write_tokenizer has 300 ids
ARCHS = {
    # Falcon-7B's layout: multi-query attention, parallel attention + MLP, rotary, no biases, tied head
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True,
                   new_decoder_architecture=False, alibi=False, bias=False, max_position_embeddings=256),
    # ALiBi, no position ids, no biases, tied head; context named max_seq_len
    "mpt": dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=256, expansion_ratio=2),
    # partial rotary (Pythia's 25%), biases, untied head stored as embed_out
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=256, rotary_pct=0.25, tie_word_embeddings=False),
    # Conv1D layers (weights stored (in, out)), learned positions, dropout 0.1 everywhere, tied head
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
}  # fmt: skip
CLASSES = {"falcon": "FalconForCausalLM", "mpt": "MptForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
           "gpt2": "GPT2LMHeadModel"}  # fmt: skip
# Both sides compute in float32; they differ in summation order only.
TOL = dict(rtol=1e-4, atol=1e-5)

# Importing torch and transformers takes ~10 s on 2 busy cores: one process imports them once and forks a child per
# architecture, which STEP_KILLER kills (SIGKILL) when its optimizer is about to take step KILL_AT (after the
# checkpoint of step KILL_AT - 1). OMP_NUM_THREADS=1: no OpenMP threads exist to be lost in the fork (and bitwise
# equality needs the same setting in every run).
FORKING_KILLER = STEP_KILLER + """
import json
import transformers
from nf4lora.train.cli import main
runs = json.loads(sys.argv[1])
for run in runs:
    getattr(transformers, run["class"])  # transformers imports each model's module on first use: before forking
signals = {}
for run in runs:
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        log = os.open(run["log"], os.O_WRONLY | os.O_CREAT)
        os.dup2(log, 1), os.dup2(log, 2)
        os._exit(main(run["args"]))
    status = os.waitpid(pid, 0)[1]
    signals[run["name"]] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
print(json.dumps(signals))
"""


def write_checkpoint(path, model_type: str, **overrides) -> str:
    """A tiny random `model_type` checkpoint saved by transformers (config.json, model.safetensors,
    generation_config.json) with a byte-level BPE tokenizer; biases and norms random too, so they matter."""
    kwargs = {**ARCHS[model_type], "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            else:  # norm weights near 1, biases near 0
                p.copy_(float(name.endswith("weight")) + 0.1 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    write_tokenizer(path)
    return str(path)


def dequantized_twin(path, ours):
    """transformers' model of the checkpoint at `path` whose 4-bit layers hold the weights ours dequantize to
    (a Conv1D's transposed back to (in, out))."""
    twin = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, Linear4bit):
                name = name.removesuffix(".base_layer")
                weight = module.dequantize(torch.float32)
                twin.get_submodule(name).weight.copy_(weight.t() if name in ours.nf4lora_transposed else weight)
    return twin


def tokens(seed: int, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(seed))


def finetune_args(root, model_type: str) -> list[str]:
    return ["finetune", "--model", os.path.join(root, model_type, "model"), "--data", os.path.join(root, "train.jsonl"),
            "--seq-len", "96", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "4", "--save-every", "2",
            "--eval-every", "2", "--warmup-steps", "1", "--lr", "5e-3", "--lora-r", "4", "--lora-dropout", "0.1",
            "--threads", "1", "--compute-dtype", "float32", "--show", "0", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """{model_type: (signal that ended the run, its output)} for a finetune of each architecture's tiny checkpoint
    killed in step 3, after the checkpoint of step 2 (the checkpoints and data are under the returned root)."""
    root = str(tmp_path_factory.mktemp("generic"))
    write_jsonl(os.path.join(root, "train.jsonl"), date_records(24, seed=5))
    runs = []
    for model_type in ARCHS:
        write_checkpoint(os.path.join(root, model_type, "model"), model_type)
        args = [*finetune_args(root, model_type), "--output-dir", os.path.join(root, model_type, "killed")]
        runs.append({"name": model_type, "class": CLASSES[model_type], "args": args,
                     "log": os.path.join(root, model_type, "killed.log")})  # fmt: skip
    result = _run(FORKING_KILLER, [json.dumps(runs)], root, env={"KILL_AT": "3"})
    assert result.returncode == 0, result.stderr
    signals = json.loads(result.stdout.splitlines()[-1])
    logs = {}
    for run in runs:
        with open(run["log"]) as f:
            logs[run["name"]] = f.read()
    return root, {name: (signals[name], logs[name]) for name in ARCHS}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(ARCHS))
def test_finetune_resume_peft_merge(tmp_path, capsys, killed_runs, model_type):
    root, runs = killed_runs
    signal_number, log = runs[model_type]
    assert signal_number == signal.SIGKILL, log
    notice = (f"model_type {model_type!r} has no native support: using transformers' {CLASSES[model_type]} with "
              "nf4lora's 4-bit layers")  # fmt: skip
    assert notice in log.splitlines()
    model, killed_dir = os.path.join(root, model_type, "model"), os.path.join(root, model_type, "killed")
    with open(os.path.join(killed_dir, "checkpoints", "latest.json")) as f:
        assert json.load(f)["step"] == 2
    assert not os.path.exists(os.path.join(killed_dir, "adapter"))
    common = finetune_args(root, model_type)
    assert main([*common, "--output-dir", killed_dir, "--resume"]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "full")]) == 0
    capsys.readouterr()

    adapter = str(tmp_path / "full" / "adapter")
    a = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    b = load_file(os.path.join(killed_dir, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bitwise
    assert all(bool(t.abs().sum()) for k, t in a.items() if "lora_B" in k)  # training moved every adapter
    m_full, m_resumed = read_metrics(tmp_path / "full"), read_metrics(killed_dir)
    assert [m["step"] for m in m_resumed] == [1, 2, 3, 4]
    for x, y in zip(m_full, m_resumed):
        for key in ("batch_sha1", "loss", "grad_norm", "lr", "val_loss"):
            assert x.get(key) == y.get(key), (x["step"], key)

    # PEFT: the adapter's keys are its own for transformers' model, and give our logits there.
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    assert adapter_config["task_type"] == "CAUSAL_LM"
    ours = load_any(model, compute_dtype=torch.float32)
    twin = dequantized_twin(model, ours)
    linear_types = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    all_linear = [n for n, m in twin.named_modules()
                  if isinstance(m, linear_types) and m is not twin.get_output_embeddings()]  # fmt: skip
    assert load_adapter(ours, adapter) == all_linear  # PEFT's all-linear
    ids = tokens(1)
    with torch.no_grad():
        base_logits = twin(ids).logits
    ref = peft.PeftModel.from_pretrained(twin, adapter).eval()  # wraps twin's layers in place
    with torch.no_grad():
        logits, ref_logits = ours(ids).logits, ref(input_ids=ids).logits
    assert not torch.allclose(logits, base_logits, **TOL)
    torch.testing.assert_close(logits, ref_logits, **TOL)

    # Generation is transformers' generate() with its cache; `eval` gives the reference's loss on the data.
    prompt = tokens(2, (1, 7))
    expected = ref.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                            do_sample=False, eos_token_id=[], pad_token_id=2)  # fmt: skip
    assert generate(ours, prompt[0], 6).tolist() == expected[0, 7:].tolist()
    data = os.path.join(root, "train.jsonl")
    assert main(["eval", "--model", model, "--adapter", adapter, "--data", data, "--compute-dtype", "float32"]) == 0
    printed = float(capsys.readouterr().out.split(" loss ")[1].split(",")[0])
    total, count = 0.0, 0
    examples = file_examples(data, Tokenizer.from_pretrained(model), 512)
    with torch.no_grad():
        for batch in eval_batches(examples, 8, 0, False, pad_id=2):
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + float(ref(**batch).loss) * n, count + n
    assert printed == pytest.approx(total / count, rel=1e-5)
    # an adapter of another architecture is refused before anything is loaded
    other = os.path.join(root, list(ARCHS)[(list(ARCHS).index(model_type) + 1) % len(ARCHS)], "model")
    assert main(["eval", "--model", other, "--adapter", adapter, "--data", data]) == 2
    assert "names no Linear layer of the model" in capsys.readouterr().err

    # merge: transformers loads the checkpoint, under the names transformers itself writes, with our logits.
    merged = str(tmp_path / "merged")
    assert main(["merge", "--model", model, "--adapter", adapter, "--out", merged, "--dtype", "float32"]) == 0
    with safe_open(os.path.join(model, "model.safetensors"), "pt") as f, \
            safe_open(os.path.join(merged, "model.safetensors"), "pt") as g:  # fmt: skip
        assert set(f.keys()) == set(g.keys())
    with open(os.path.join(merged, "config.json")) as f:
        assert json.load(f)["nf4lora_merged"]["adapter"] == os.path.abspath(adapter)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert type(loaded).__name__ == CLASSES[model_type]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, **TOL)


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_packed_documents_equal_separate_sequences(tmp_path, model_type):
    """The loop's packed rows (doc_ids): each document's logits and loss are those of the document alone, and
    gradient checkpointing (transformers' own) gives the same gradients."""
    model = load_any(write_checkpoint(tmp_path, model_type), compute_dtype=torch.float32)
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)
    ids = tokens(3, (2, 14))
    doc_ids = torch.tensor([[0] * 5 + [1] * 6 + [-1] * 3, [0] * 9 + [1] * 5])
    labels = torch.where(doc_ids >= 0, ids, -100)
    labels[0, [0, 5]] = labels[1, [0, 9]] = -100  # nothing in a document predicts its first token
    model.eval()  # no dropout: the comparisons are exact up to rounding
    with torch.no_grad():
        packed = model(ids, labels=labels, doc_ids=doc_ids)
        pieces = [(0, 0, 5), (0, 5, 11), (1, 0, 9), (1, 9, 14)]
        total, count = 0.0, 0
        for row, start, stop in pieces:
            alone = model(ids[row : row + 1, start:stop], labels=labels[row : row + 1, start:stop])
            torch.testing.assert_close(packed.logits[row, start:stop], alone.logits[0], **TOL)
            n = int((labels[row, start + 1 : stop] != -100).sum())
            total, count = total + float(alone.loss) * n, count + n
        assert float(packed.loss) == pytest.approx(total / count, rel=1e-5)

    def grads(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks (GPT-2's), which recomputation must reproduce
        model(ids, labels=labels, doc_ids=doc_ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    model.train()  # checkpointing acts in training mode only (dropout too)
    plain, checkpointed = grads(False), grads(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules() if m is not model)
    for g, h in zip(plain, checkpointed):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)


def test_peft_adapter_with_fan_in_fan_out_loads_onto_gpt2(tmp_path):
    """PEFT writes fan_in_fan_out: true for GPT-2's Conv1D layers; loaded here it gives PEFT's logits."""
    path = write_checkpoint(tmp_path / "model", "gpt2")
    ours = load_any(path, compute_dtype=torch.float32)
    twin = dequantized_twin(path, ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False)
    ref = peft.get_peft_model(twin, config).eval()
    ref.save_pretrained(tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["fan_in_fan_out"] is True
    load_adapter(ours, tmp_path / "adapter")
    ids = tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(input_ids=ids).logits, **TOL)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox"])
def test_bitsandbytes_4bit_saves_load_as_stored(tmp_path, model_type):
    """A transformers + bitsandbytes 4-bit save (GPT-2's Conv1D layers quantized from (out, in); GPT-NeoX's head
    stored as embed_out) loads without re-quantizing and gives transformers' 4-bit logits."""
    from test_model_helpers import hf_4bit_model

    reference = hf_4bit_model(write_checkpoint(tmp_path / "model", model_type), bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True)  # fmt: skip
    reference.save_pretrained(tmp_path / "4bit")
    ours = load_any(tmp_path / "4bit", compute_dtype=torch.float32)
    stored = load_file(tmp_path / "4bit" / "model.safetensors")
    layer = next(name for name, m in ours.named_modules() if isinstance(m, Linear4bit))
    assert torch.equal(ours.get_submodule(layer).weight, stored[f"{layer}.weight"])  # the packed bytes as stored
    ids = tokens(5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, **TOL)


def test_stale_buffers_of_older_checkpoints_are_skipped_as_transformers_skips_them(tmp_path):
    """EleutherAI's GPT-Neo checkpoints still hold the causal-mask `bias` of their global layers and every layer's
    `masked_bias`, saved when those buffers were persistent; transformers loads them (listing them as unexpected),
    and so must we, with its logits. A tensor that fits nothing in the model is still refused."""
    from safetensors.torch import save_file

    config = transformers.AutoConfig.for_model("gpt_neo", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                                               attention_types=[[["global", "local"], 1]], window_size=8,
                                               max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.attn.attention.bias"] = hf.transformer.h[0].attn.attention.bias.clone()
    tensors |= {f"transformer.h.{i}.attn.attention.masked_bias": torch.tensor(-1e9) for i in range(2)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = load_any(tmp_path, quantize=None, compute_dtype=torch.float32)
    ids = tokens(6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **TOL)
    save_file({**tensors, "transformer.h.0.mlp.c_extra.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="1 tensors this gpt_neo config does not use, e.g. 'transformer.h.0.mlp.c_"):
        load_any(tmp_path, quantize=None, compute_dtype=torch.float32)


def test_native_checkpoints_never_import_transformers(tmp_path):
    model = write_tiny_model(tmp_path / "llama")
    code = ("import sys, torch; from nf4lora.models import load_any; "
            f"m = load_any({model!r}, compute_dtype=torch.float32); "
            "assert type(m).__name__ == 'LlamaForCausalLM'; "
            "print(sorted(k for k in sys.modules if k.partition('.')[0] in ('transformers', 'peft', 'accelerate')))")
    result = _run(code, [], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert "no native support" not in result.stderr


@pytest.mark.parametrize(
    "edit,field",
    [
        (dict(model_type="nosuchmodel"), "model_type 'nosuchmodel'"),
        (dict(model_type="nosuchmodel", auto_map={"AutoModelForCausalLM": "modeling.Model"}), "auto_map"),
        (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config 'gptq'"),
        (dict(model_type=None, architectures=["GPT2LMHeadModel"]), "model_type"),
    ],
)
def test_configs_we_cannot_honour_are_refused_in_one_line(tmp_path, capsys, edit, field):
    path = write_checkpoint(tmp_path, "gpt2")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(edit)
    config = {k: v for k, v in config.items() if v is not None}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    capsys.readouterr()
    assert main(["eval", "--model", path, "--data", write_jsonl(tmp_path / "d.jsonl", date_records(2, 1))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nf4lora: error: ") and field in err[0], err

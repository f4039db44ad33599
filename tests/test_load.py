"""load_model: sharded vs single-file checkpoints, quantize-on-load, HF + bitsandbytes 4-bit checkpoints."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_model_helpers import hf_4bit_model, hf_model, tiny_config
from torch import nn

from nf4lora.lora import Linear4bit
from nf4lora.models import LlamaForCausalLM, load_model
from nf4lora.nf4 import quantize_4bit

ATOL_FP32 = 1e-4
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
# Wider than the model tests' config so weights span several quantization blocks and several shards.
CONFIG = tiny_config(hidden_size=128, intermediate_size=192, attention_bias=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(hf_model, single-file dir, sharded dir) of the same float32 weights, written by transformers."""
    root = tmp_path_factory.mktemp("ckpt")
    hf = hf_model(CONFIG)
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="60KB")
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    return hf, root / "single", root / "sharded"


def test_sharded_equals_single_file_and_transformers(checkpoints):
    hf, single, sharded = checkpoints
    a = load_model(single, quantize=None, compute_dtype=torch.float32)
    b = load_model(sharded, quantize=None, compute_dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() == hf.state_dict().keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
        assert torch.equal(sa[key], hf.state_dict()[key]), key
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, hf(ids).logits, atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("quant_type, double_quant, blocksize", [("nf4", True, 64), ("fp4", False, 128), ("nf4", False, 32)])
def test_4bit_bytes_equal_quantize_4bit_of_the_original(checkpoints, quant_type, double_quant, blocksize):
    hf, _, sharded = checkpoints
    model = load_model(sharded, quantize=quant_type, double_quant=double_quant, blocksize=blocksize,
                       compute_dtype=torch.float32)  # fmt: skip
    ref = hf.state_dict()
    for i in range(CONFIG["num_hidden_layers"]):
        for name in LINEARS:
            full = f"model.layers.{i}.{name}"
            layer = model.get_submodule(full)
            assert isinstance(layer, Linear4bit), full
            packed, state = quantize_4bit(ref[full + ".weight"], blocksize, quant_type, double_quant)
            assert torch.equal(layer.weight.view(-1), packed.view(-1)), full
            assert torch.equal(layer.quant_state.absmax, state.absmax), full
            assert layer.quant_state.double_quant == double_quant and layer.quant_state.blocksize == blocksize
            if name.startswith("self_attn"):  # attention_bias=True, mlp_bias=False
                assert torch.equal(layer.bias, ref[full + ".bias"]), full
            else:
                assert layer.bias is None, full
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, ref["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, ref["model.embed_tokens.weight"])


def test_compute_dtype_applies_to_unquantized_parts(checkpoints):
    _, single, _ = checkpoints
    model = load_model(single, quantize="nf4", compute_dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 8))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


def test_tied_embeddings_stay_tied(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, quantize="nf4", compute_dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)


def test_hf_bitsandbytes_4bit_checkpoint_loads_without_requantizing(checkpoints, tmp_path):
    """transformers + bitsandbytes quantize and save; we load the saved bytes and match its 4-bit logits."""
    _, single, _ = checkpoints
    hf4 = hf_4bit_model(single, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    hf4.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")

    calls = []
    import nf4lora.models.loading as loading

    original = loading.quantize_4bit
    loading.quantize_4bit = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        ours = load_model(tmp_path, quantize="nf4", compute_dtype=torch.float32)
    finally:
        loading.quantize_4bit = original
    assert calls == []  # nothing was re-quantized
    for i in range(CONFIG["num_hidden_layers"]):
        for name in LINEARS:
            key = f"model.layers.{i}.{name}.weight"
            layer = ours.get_submodule(key[: -len(".weight")])
            assert torch.equal(layer.weight.view(-1), stored[key].view(-1)), key
            assert torch.equal(layer.quant_state.absmax, stored[key + ".absmax"]), key

    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf4(ids).logits
        out = ours(ids).logits
    # Both dequantize the same codes exactly and run fp32 matmuls: only summation order differs.
    torch.testing.assert_close(out, ref, atol=ATOL_FP32, rtol=0)

    dense = load_model(tmp_path, quantize=None, compute_dtype=torch.float32)  # dequantized on load
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, ref, atol=ATOL_FP32, rtol=0)
    with pytest.raises(ValueError, match="stored as nf4"):
        load_model(tmp_path, quantize="fp4", compute_dtype=torch.float32)


def test_hf_bitsandbytes_checkpoint_with_a_4bit_lm_head(checkpoints, tmp_path):
    """llm_int8_skip_modules without lm_head: transformers quantizes the head too; we load it dequantized."""
    _, single, _ = checkpoints
    hf4 = hf_4bit_model(single, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=[])
    hf4.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight.quant_state.bitsandbytes__nf4" in f.keys()
    ours = load_model(tmp_path, quantize="nf4", compute_dtype=torch.float32)
    assert type(ours.lm_head) is nn.Linear and ours.lm_head.weight.dtype == torch.float32
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf4(ids).logits, atol=ATOL_FP32, rtol=0)


def test_a_stale_index_beside_model_safetensors_is_ignored_as_in_transformers(checkpoints, tmp_path):
    # transformers' save_pretrained re-saving a sharded folder unsharded leaves the old index (and here its shards).
    hf, single, sharded = checkpoints
    folder = shutil.copytree(single, tmp_path / "m")
    shutil.copy(sharded / "model.safetensors.index.json", folder)
    ours = load_model(folder, quantize=None, compute_dtype=torch.float32)
    for key, value in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_float64_weights_quantize_like_their_float32_copy(checkpoints, tmp_path):
    _, single, _ = checkpoints
    folder = shutil.copytree(single, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v.double() for k, v in tensors.items()}, folder / "model.safetensors")
    a = load_model(single, quantize="nf4", compute_dtype=torch.float32).state_dict()
    b = load_model(folder, quantize="nf4", compute_dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_load_reads_no_pickle(checkpoints, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    _, _, sharded = checkpoints
    assert isinstance(load_model(sharded, quantize="nf4"), LlamaForCausalLM)


def test_load_imports_no_compiler_stack(checkpoints, tmp_path):
    """Building the model on the meta device skips random initialisation (models.llama.empty_init): drawing it
    there imports torch._dynamo, sympy and triton, about 140 MiB of RSS that a process loading a model on the CPU
    never needs. Checked in a fresh interpreter, as a user's process starts."""
    _, single, _ = checkpoints
    code = (
        "import sys, torch\n"
        "from nf4lora.models import load_model\n"
        f"load_model({str(single)!r}, quantize='nf4')\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_weights_to_quantize_are_read_into_one_reused_buffer(checkpoints, monkeypatch):
    """One 16-bit buffer for all the weights being quantized (fresh tensors fragmented malloc's heap: +93 MiB peak
    RSS for SmolLM2-135M); the 4-bit bytes are still those of each weight (test above)."""
    from nf4lora.models.safetensors_io import SafetensorsFile

    _, single, _ = checkpoints
    buffers = {}
    read = SafetensorsFile.read

    def recording(self, key, out=None):
        buffers[key] = None if out is None else out.data_ptr()
        return read(self, key, out=out)

    monkeypatch.setattr(SafetensorsFile, "read", recording)
    load_model(single, quantize="nf4", compute_dtype=torch.float32)
    linear = {v for k, v in buffers.items() if k.startswith("model.layers.") and k.endswith("_proj.weight")}
    assert len(linear) == 1 and None not in linear
    assert buffers["model.embed_tokens.weight"] is None  # a parameter keeps its own tensor

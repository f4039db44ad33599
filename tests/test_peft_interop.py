"""PEFT interop both ways on a tiny transformers LlamaForCausalLM built here:
(a) ours quantizes, adds LoRA, trains 3 steps and saves; PEFT loads the adapter onto the same base (the weights
    our layers dequantize to) and gives our logits;
(b) an adapter PEFT saved loads with load_adapter (onto a plain or a quantized base) and gives PEFT's logits.
"""

import copy
import json

import pytest
import torch
from reference_packages import require

transformers = require("transformers")
peft = require("peft")

from nf4lora.lora import Linear4bit, LoRALinear, add_lora, load_adapter, quantize_model, save_adapter  # noqa: E402

# Both sides compute in float32 over 2 layers; they differ only in summation order.
LOGITS_TOL = dict(rtol=1e-4, atol=1e-5)


def _tiny_llama(seed=0):
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "eager"
    return model


def _dequantized_twin(base, quantized):
    """A plain copy of `base` whose Linear weights are the ones `quantized`'s Linear4bit layers dequantize to."""
    twin = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Linear4bit):
                twin.get_submodule(name.removesuffix(".base_layer")).weight.copy_(module.dequantize(torch.float32))
    return twin


def _tokens(seed, shape=(2, 12)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def test_our_adapter_loads_in_peft(tmp_path):
    base = _tiny_llama()
    ours = copy.deepcopy(base)
    quantize_model(ours, compute_dtype=torch.float32)  # PEFT's twin below computes in float32
    names = add_lora(ours, r=8, alpha=16, dropout=0.05, target_modules="all-linear")
    assert len(names) == 2 * 7 and "lm_head" not in names
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        ids = _tokens(step)
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    ours.eval()
    save_adapter(ours, tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    ref = peft.PeftModel.from_pretrained(_dequantized_twin(base, ours), tmp_path / "adapter").eval()
    assert ref.peft_config["default"].r == 8
    ids = _tokens(10)
    with torch.no_grad():
        logits, ref_logits = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    base_logits = _dequantized_twin(base, ours)(input_ids=ids).logits.detach()
    assert not torch.allclose(logits, base_logits, **LOGITS_TOL)  # training moved the adapters
    assert torch.allclose(logits, ref_logits, **LOGITS_TOL)


@pytest.mark.parametrize("quantized", [False, True])
def test_peft_adapter_loads_in_ours(tmp_path, quantized):
    base = _tiny_llama(seed=1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    ours = copy.deepcopy(base)
    if quantized:
        quantize_model(ours, quant_type="fp4", compute_dtype=torch.float32)  # as PEFT's float32 twin
        base = _dequantized_twin(base, ours)
    ref = peft.get_peft_model(copy.deepcopy(base), config).eval()
    ref.save_pretrained(tmp_path / "peft")

    names = load_adapter(ours, tmp_path / "peft")
    assert len(names) == 2 * 3 and all(isinstance(ours.get_submodule(n), LoRALinear) for n in names)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}.weight" for n in names for ab in "AB"
    }
    ids = _tokens(20)
    with torch.no_grad():
        logits, ref_logits = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    assert not torch.allclose(logits, base(input_ids=ids).logits.detach(), **LOGITS_TOL)
    assert torch.allclose(logits, ref_logits, **LOGITS_TOL)


def test_peft_adapter_on_lm_head_with_its_base_copy_loads_in_ours(tmp_path):
    """PEFT saves an adapted lm_head's own weight beside its LoRA (save_embedding_layers="auto"): accepted when it
    is the model's weight, refused when it differs (an adapter saved from another base)."""
    base = _tiny_llama(seed=2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False,
                             task_type="CAUSAL_LM")  # fmt: skip
    ref = peft.get_peft_model(copy.deepcopy(base), config).eval()
    ref.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    assert "lm_head" in load_adapter(ours, tmp_path / "peft")
    ids = _tokens(21)
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, ref(input_ids=ids).logits, **LOGITS_TOL)

    other = _tiny_llama(seed=3)
    with pytest.raises(ValueError, match=r"lm_head\.base_layer\.weight: the adapter carries its own copy .* differs"):
        load_adapter(other, tmp_path / "peft")
    assert not any(isinstance(m, LoRALinear) for m in other.modules())


class _Mixer(torch.nn.Module):
    """Linear layers inside nn.Sequential next to other modules: their short names ("0", "1") also name a GELU."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
        self.mix = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(8, 8))

    def forward(self, x):
        return self.mix(self.head(x))


@pytest.mark.parametrize("target", ["head.0", "mix.1"])
def test_target_names_that_also_name_other_modules_load_in_peft(tmp_path, target):
    """PEFT matches target_modules against every module (and refuses a GELU), so a short name that also names a
    non-Linear module is written as the exact regex."""
    torch.manual_seed(0)
    base = _Mixer()
    ours = copy.deepcopy(base)
    add_lora(ours, r=2, alpha=4, target_modules=[target])
    with torch.no_grad():
        ours.get_submodule(target).lora_B.weight.normal_()
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == "^(?:" + target.replace(".", r"\.") + ")$"

    ref = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    wrapped = [n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "lora_A")]
    assert wrapped == [target]
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), **LOGITS_TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_whose_init_changed_the_base_are_refused(tmp_path, init):
    """PiSSA / OLoRA subtract the initial adapter from the base weights, so their adapter is right only on that
    modified base (PEFT reproduces it there); loaded onto the original base it would be silently wrong."""
    base = _tiny_llama(seed=2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init,
                             task_type="CAUSAL_LM")  # fmt: skip
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    with pytest.raises(ValueError, match=rf"init_lora_weights = '{init}' is not supported"):
        load_adapter(ours, tmp_path / "peft")
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())

"""Linear4bit's packed weight is a frozen uint8 Parameter (so FSDP2 can shard it), and nothing users see changed:
state-dict keys and bytes, checkpoints and adapters written when it was a buffer, dtype casts, LoRA surgery."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nf4lora.lora import Linear4bit, add_lora, load_adapter, quantize_model, save_adapter
from nf4lora.models import LlamaConfig, LlamaForCausalLM

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_dict(CONFIG))
    quantize_model(model, compute_dtype=torch.float32)
    return model.eval()


def _as_buffers(model: nn.Module) -> nn.Module:
    """The layout before the packed weight became a Parameter: a buffer of the same name and bytes."""
    for m in model.modules():
        if isinstance(m, Linear4bit):
            packed = m.weight.data
            del m.weight
            m.register_buffer("weight", packed)
    return model


def test_packed_weight_is_a_frozen_uint8_parameter():
    layer = Linear4bit(96, 40, compute_dtype=torch.float32)  # 3840 weights: packed (1920, 1)
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (1920, 1)
    assert "weight" in dict(layer.named_parameters()) and "weight" not in dict(layer.named_buffers())
    layer.to(torch.bfloat16)  # moves and casts the floating tensors only
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.dtype == torch.uint8
    assert layer.bias.dtype == torch.bfloat16 and layer.quant_state.absmax.dtype == torch.uint8

    model = _model(0)
    add_lora(model, r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    model(ids, labels=ids).loss.backward()
    packed = [m.weight for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(packed) == 14 and all(w.grad is None for w in packed)


@pytest.mark.parametrize("assign", [False, True])
def test_checkpoints_and_adapters_saved_with_the_buffer_layout_load(tmp_path, assign):
    old = _as_buffers(_model(1))
    add_lora(old, r=4, alpha=8)
    with torch.no_grad():
        for name, p in old.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    old_sd = {k: v.contiguous() for k, v in old.state_dict().items() if ".lora_" not in k}
    save_file(old_sd, tmp_path / "model.safetensors")
    save_adapter(old, tmp_path / "adapter")

    new = _model(2)  # other weights, overwritten by the load
    new_sd = new.state_dict()
    assert new_sd.keys() == {k.replace(".base_layer.", ".") for k in old_sd}
    new.load_state_dict({k.replace(".base_layer.", "."): v for k, v in load_file(tmp_path / "model.safetensors").items()},
                        strict=True, assign=assign)  # fmt: skip
    for k, v in new.state_dict().items():
        ref = old_sd[k] if k in old_sd else old_sd[k.replace("_proj.", "_proj.base_layer.")]
        assert v.dtype == ref.dtype and v.shape == ref.shape and torch.equal(v, ref), k
    assert all(isinstance(m.weight, nn.Parameter) for m in new.modules() if isinstance(m, Linear4bit))

    load_adapter(new, tmp_path / "adapter")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(new.eval()(ids).logits, old.eval()(ids).logits)

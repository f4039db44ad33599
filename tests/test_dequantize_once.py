"""One dequantization of a 4-bit weight per backward under activation checkpointing: the checkpointed rerun of a
forward keeps its dense W for the backward that follows (kernels/ops.py, lora/lora.py), where it used to be
dequantized once by the rerun and once more for dy @ W. Gradients stay the same bits; without checkpointing
nothing more is kept than before (a memory-free stand-in)."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from nf4lora.kernels import dequant, gemv, torch_path
from nf4lora.lora import Linear4bit, LoRALinear, add_lora, quantize_model
from nf4lora.models import LlamaConfig, LlamaForCausalLM


def count_dequantize(monkeypatch, backend: str) -> list:
    """Every dequantization of a 4-bit weight on `backend` appends to the returned list."""
    monkeypatch.setenv("NF4LORA_BACKEND", backend)
    module = torch_path if backend == "torch" else dequant
    calls, original = [], module.dequantize
    monkeypatch.setattr(module, "dequantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def make_layer(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(64, 40), compute_dtype=dtype)
    if kind == "linear4bit":
        return base
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.1 if kind == "lora+dropout" else 0.0)
    torch.nn.init.normal_(layer.lora_B.weight)  # B != 0: the adapter adds to both products
    return layer


def run(layer, x, how: str, calls: list):
    """(forward's dequantizations, backward's, x.grad, the parameters' grads) for one forward + backward."""
    torch.manual_seed(1)  # the same dropout mask on every run
    x = x.detach().requires_grad_()
    if how == "plain":
        y = layer(x)
    else:
        y = checkpoint(layer, x, use_reentrant=how == "reentrant")
    in_forward = len(calls)
    y.float().square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    layer.zero_grad(set_to_none=True)
    return in_forward, len(calls) - in_forward, x.grad, grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["linear4bit", "lora", "lora+dropout"])  # Matmul4bit, the fused and autograd LoRA
@pytest.mark.parametrize("how", ["non-reentrant", "reentrant"])
def test_checkpointed_backward_dequantizes_once_with_the_same_gradients(backend, kind, how, monkeypatch):
    calls = count_dequantize(monkeypatch, backend)
    layer = make_layer(kind, torch.float32).train()
    x = torch.randn(3, gemv.MAX_M + 3, 64, generator=torch.Generator().manual_seed(2))  # rows > the GEMV's
    plain = run(layer, x, "plain", calls)
    calls.clear()
    ckpt = run(layer, x, how, calls)
    assert plain[:2] == (1, 1)  # forward, and dy @ W in backward
    assert ckpt[:2] == (1, 1)  # the rerun's dequantization serves dy @ W too (it was (1, 2))
    assert torch.equal(ckpt[2], plain[2])
    assert len(ckpt[3]) == len(plain[3]) and all(torch.equal(a, b) for a, b in zip(ckpt[3], plain[3]))


@pytest.mark.parametrize("kind", ["linear4bit", "lora"])
def test_without_checkpointing_only_a_stand_in_is_saved(kind):
    """Outside a rerun the saved 'dense weight' is a 0-stride view of one element: no memory beyond before."""
    layer = make_layer(kind, torch.bfloat16)
    y = layer(torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True))
    node = y.grad_fn
    while not hasattr(node, "saved_tensors"):  # the custom Function's node (Matmul4bit or the LoRA's), past views
        node = node.next_functions[0][0]
    saved = [t for t in node.saved_tensors if t is not None and t.shape == (40, 64)]
    assert len(saved) == 1 and saved[0].stride() == (0, 0) and saved[0].untyped_storage().nbytes() <= 2


def test_checkpointed_model_dequantizes_each_layer_once_per_backward(monkeypatch):
    """A whole decoder with gradient checkpointing: backward dequantizes each 4-bit Linear once (it was twice)."""
    calls = count_dequantize(monkeypatch, "torch")
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    quantize_model(model, compute_dtype=torch.float32)
    add_lora(model, r=4, alpha=8)
    model.train()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    n_4bit = sum(isinstance(m, Linear4bit) for m in model.modules())
    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        calls.clear()
        loss = model(ids, labels=ids).loss
        in_forward = len(calls)
        loss.backward()
        results.append((len(calls) - in_forward, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        model.zero_grad(set_to_none=True)
        assert in_forward == n_4bit
    # Without checkpointing backward dequantizes for dy @ W, except in layer 0's q/k/v projections (their input, from
    # the frozen embedding, needs no gradient). With it, the reruns dequantize every layer and dy @ W takes their W
    # (it used to dequantize n_4bit + n_4bit - 3 times).
    assert (results[0][0], results[1][0]) == (n_4bit - 3, n_4bit)
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


"""GPU-only tests of the decoder's Triton kernels (kernels/model_ops.py) at TinyLlama-1.1B's sizes in bfloat16,
through the auto backend (Triton on CUDA), against the torch references run on the same tensors with
NF4LORA_BACKEND=torch. tests/test_kernels_model_ops.py covers the awkward shapes (in the interpreter on the CPU,
compiled here too, as gpu_check.sh runs it)."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from nf4lora.kernels import apply_rope, geglu, linear_cross_entropy, model_ops, rms_norm, swiglu  # noqa: E402

TOKENS, HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 4096, 2048, 32, 64, 5632, 32000
BF16 = 1.6e-2  # relative to the largest reference magnitude: two bf16 ulps (float32 sums against rounded ones)


def randn(*shape, seed, scale=1.0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=g, device="cuda") * scale).to(dtype)


def assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=BF16, atol=BF16 * want.float().abs().max().item())


def both(fn, inputs, seed, monkeypatch):
    """(output, input grads) of fn on the Triton backend and on the torch reference, same inputs and dy."""
    results = []
    for backend in ("auto", "torch"):
        monkeypatch.setenv("NF4LORA_BACKEND", backend)
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*leaves)
        dy = randn(*out.shape, seed=seed, dtype=out.dtype) if out.dim() else None
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dy)
        results.append((out, grads))
    return results


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_bf16(unit_offset, monkeypatch):
    x = randn(TOKENS, HIDDEN, seed=0, scale=3.0).requires_grad_()
    w = (randn(HIDDEN, seed=1, scale=0.2) + (0.0 if unit_offset else 1.0)).requires_grad_()
    (y, g), (ref, g_ref) = both(lambda x, w: rms_norm(x, w, 1e-5, unit_offset), (x, w), 2, monkeypatch)
    assert_close(y, ref)
    for a, b in zip(g, g_ref):
        assert_close(a, b)


def test_rope_bf16_bit_identical(monkeypatch):
    q = randn(2, 2048, HEADS * HEAD_DIM, seed=3).view(2, 2048, HEADS, HEAD_DIM).transpose(1, 2).requires_grad_()
    angles = torch.arange(2048, device="cuda")[:, None] * (1e4 ** (-torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM))
    emb = torch.cat((angles, angles), -1).expand(2, -1, -1)  # (B, T, hd)
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    (y, g), (ref, g_ref) = both(lambda q: apply_rope(q, cos, sin), (q,), 4, monkeypatch)
    assert torch.equal(y, ref) and torch.equal(g[0], g_ref[0])


@pytest.mark.parametrize("fn", [swiglu, geglu])
def test_gated_activations_bf16(fn, monkeypatch):
    gate = randn(TOKENS, INTERMEDIATE, seed=5, scale=3.0).requires_grad_()
    up = randn(TOKENS, INTERMEDIATE, seed=6).requires_grad_()
    (y, g), (ref, g_ref) = both(fn, (gate, up), 7, monkeypatch)
    assert_close(y, ref)
    for a, b in zip(g, g_ref):
        assert_close(a, b)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_linear_cross_entropy_bf16(softcap, trainable_head, monkeypatch):
    hidden = randn(TOKENS, HIDDEN, seed=8).requires_grad_()
    weight = randn(VOCAB, HIDDEN, seed=9, scale=0.02).requires_grad_(trainable_head)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=torch.Generator("cuda").manual_seed(10))
    labels[::7] = -100
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(hidden, weight, labels, softcap=softcap)
    peak = torch.cuda.max_memory_allocated() - before
    if not trainable_head:  # (a trainable head adds its float32 gradient, 250 MiB, whatever the logits)
        full_logits = TOKENS * VOCAB * 2  # bytes of the bf16 logits the kernel never holds at once
        assert peak < full_logits / 2, f"{peak / 2**20:.0f} MiB at peak, {full_logits / 2**20:.0f} MiB of logits"
    logits = F.linear(hidden, weight)  # bf16, soft-capped in bf16 as transformers' Gemma 2
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    ref = F.cross_entropy(logits.float(), labels, ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=0)
    inputs = (hidden, weight) if trainable_head else (hidden,)
    for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
        assert_close(a, b)
    assert model_ops.backend_for(hidden) == "triton"

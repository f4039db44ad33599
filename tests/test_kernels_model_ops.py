"""The decoder's Triton kernels (RMSNorm, RoPE, SwiGLU/GeGLU, linear + cross-entropy) against transformers' and
torch's own ops: values and gradients. In the interpreter on the CPU (TRITON_INTERPRET=1, NF4LORA_BACKEND=triton),
compiled on a GPU; none of these kernels calls tl.dot, so bfloat16 is tested here too (the interpreter's defect is
tl.dot on bfloat16). Shapes are small and awkward: odd hidden sizes, a last block or chunk that is partial, a
vocabulary that is not a multiple of the tile, ignored labels, strided q/k views."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig as HFLlamaConfig
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from nf4lora.kernels import apply_rope, geglu, linear_cross_entropy, model_ops, rms_norm, swiglu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Relative to the largest reference magnitude (atol = tol * max|ref|) and per element (rtol): a float32 result may
# differ from torch's by float32 reassociation of a row sum; 16-bit ones by one or two ulps where the kernel sums
# in float32 what torch rounds first (RMSNorm's weight gradient, the cross-entropy's 16-bit logits gradient).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("NF4LORA_BACKEND", "triton")


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def assert_close(got, want, dtype):
    tol = TOL[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())


def grads(out, inputs, seed):
    """d(sum(out * r))/d(inputs) for a seeded random r: every element of out weighs in."""
    return torch.autograd.grad(out, inputs, randn(*out.shape, dtype=out.dtype, seed=seed))


# -- RMSNorm --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["llama", "gemma"])
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 64)])  # odd hidden size; rows not a multiple of the programs
def test_rms_norm_matches_transformers(variant, dtype, shape):
    H = shape[-1]
    hf = (LlamaRMSNorm(H, eps=1e-6) if variant == "llama" else GemmaRMSNorm(H, eps=1e-6)).to(DEVICE, dtype)
    with torch.no_grad():
        hf.weight.copy_(randn(H, seed=1, scale=0.3) + (1.0 if variant == "llama" else 0.0))
    x = randn(*shape, dtype=dtype, seed=2, scale=3.0).requires_grad_()
    weight = hf.weight.detach().clone().requires_grad_()

    y = rms_norm(x, weight, 1e-6, unit_offset=variant == "gemma")
    ref = hf(x)
    assert_close(y, ref, dtype)
    for got, want in zip(grads(y, (x, weight), seed=3), grads(ref, (x, hf.weight), seed=3)):
        assert_close(got, want, dtype)
    # the torch reference (the CPU path) is transformers' module, bit for bit
    assert torch.equal(model_ops.rms_norm_torch(x, weight, 1e-6, variant == "gemma"), ref)


def test_rms_norm_float32_weight_gives_float32_like_llama():
    """LLaMA's order with a float32 weight and bf16 x: the result (and dweight) promote to float32, as in HF."""
    x = randn(4, 48, dtype=torch.bfloat16, seed=4).requires_grad_()
    weight = (randn(48, seed=5) + 1).requires_grad_()
    y, ref = rms_norm(x, weight, 1e-5), model_ops.rms_norm_torch(x, weight, 1e-5)
    assert y.dtype == torch.float32
    assert_close(y, ref, torch.float32)
    for got, want in zip(grads(y, (x, weight), seed=6), grads(ref, (x, weight), seed=6)):
        assert_close(got, want, torch.bfloat16 if got.dtype == torch.bfloat16 else torch.float32)


# -- RoPE -----------------------------------------------------------------------------------------------------------
ROPE_STYLES = {  # both styles differ only in their frequencies (transformers computes cos/sin here)
    "default": {},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}},
}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", list(ROPE_STYLES))
def test_rope_bit_identical_to_transformers(style, dtype):
    B, T, n_heads, n_kv, hd = 2, 11, 3, 1, 12
    config = HFLlamaConfig(hidden_size=n_heads * hd, num_attention_heads=n_heads, head_dim=hd,
                           max_position_embeddings=64, rope_theta=500.0, **ROPE_STYLES[style])  # fmt: skip
    positions = torch.arange(T, device=DEVICE).expand(B, T) + torch.tensor([[0], [5]], device=DEVICE)
    x = randn(B, T, n_heads * hd, dtype=dtype, seed=7)
    cos, sin = LlamaRotaryEmbedding(config).to(DEVICE)(x, positions)  # (B, T, hd) in x.dtype
    # q and k as the model makes them: views (B, heads, T, hd) of a (B, T, heads * hd) projection
    q = randn(B, T, n_heads * hd, dtype=dtype, seed=8).view(B, T, n_heads, hd).transpose(1, 2).requires_grad_()
    k = randn(B, T, n_kv * hd, dtype=dtype, seed=9).view(B, T, n_kv, hd).transpose(1, 2).requires_grad_()
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    for x, ref in ((q, ref_q), (k, ref_k)):
        y = apply_rope(x, cos, sin)
        assert torch.equal(y, ref)
        (gx,) = grads(y, (x,), seed=10)
        (want,) = grads(ref, (x,), seed=10)
        assert torch.equal(gx, want)


def test_rope_partial_rotary_matches_the_reference():
    """Phi-3's partial rotary: only the first rotary_dim dimensions of each head turn, the rest pass through."""
    q = randn(2, 8, 3, 16, seed=27, dtype=torch.float16).transpose(1, 2).requires_grad_()  # (B, heads, T, hd)
    cos, sin = randn(2, 8, 6, seed=28, dtype=torch.float16), randn(2, 8, 6, seed=29, dtype=torch.float16)
    y, ref = apply_rope(q, cos, sin), model_ops.apply_rope_torch(q, cos, sin)
    assert torch.equal(y, ref) and torch.equal(y[..., 6:], q[..., 6:])
    assert torch.equal(grads(y, (q,), seed=30)[0], grads(ref, (q,), seed=30)[0])


def test_rope_broadcasts_cos_over_the_batch():
    q = randn(3, 2, 5, 8, seed=11, dtype=torch.float16)
    cos, sin = randn(1, 5, 8, seed=12, dtype=torch.float16), randn(1, 5, 8, seed=13, dtype=torch.float16)
    assert torch.equal(apply_rope(q, cos, sin), model_ops.apply_rope_torch(q, cos, sin))


# -- SwiGLU / GeGLU -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_gated_activation_matches_transformers(activation, dtype):
    shape = (3, 701)  # 2103 elements: three programs of 1024, the last partial
    gate = randn(*shape, dtype=dtype, seed=14, scale=3.0).requires_grad_()
    up = randn(*shape, dtype=dtype, seed=15).requires_grad_()
    y = (swiglu if activation == "silu" else geglu)(gate, up)
    ref = ACT2FN[activation](gate) * up
    assert_close(y, ref, dtype)
    for got, want in zip(grads(y, (gate, up), seed=16), grads(ref, (gate, up), seed=16)):
        assert_close(got, want, dtype)


# -- linear + cross-entropy -----------------------------------------------------------------------------------------
def full_logits_loss(hidden, weight, labels, dtype, softcap):
    """The reference: the whole (N, V) logits in `dtype`, soft-capped there as transformers' Gemma 2 does, upcast,
    F.cross_entropy's mean."""
    logits = F.linear(hidden.to(dtype), weight.to(dtype))
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_linear_cross_entropy_matches_full_logits(dtype, softcap, trainable_head):
    N, H, V = 13, 24, 100  # vocab not a multiple of the tile, 13 rows in chunks of 5 (the last partial)
    hidden = randn(N, H, dtype=dtype, seed=17).requires_grad_()
    weight = randn(V, H, dtype=dtype, seed=18, scale=0.5).requires_grad_(trainable_head)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(19)).to(DEVICE)
    labels[[0, 6, 7]] = -100
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=5, softcap=softcap)
    ref = full_logits_loss(hidden, weight, labels, dtype, softcap)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=TOL[dtype], atol=0)
    inputs = (hidden, weight) if trainable_head else (hidden,)
    for got, want in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
        assert_close(got, want, dtype)


def test_cross_entropy_vocabulary_tiles_and_ignored_rows():
    """The row kernel over several vocabulary tiles (block_v 32 for V = 100: a partial last tile) with soft-capping:
    the losses, and the in-place gradient, zero on ignored rows."""
    from nf4lora.kernels import cross_entropy

    logits = randn(6, 100, seed=20, scale=4.0)
    labels = torch.tensor([3, -100, 99, 0, -100, 57], device=DEVICE)
    z = logits.clone().requires_grad_()
    capped = torch.tanh(z / 5.0) * 5.0
    ref = F.cross_entropy(capped, labels, ignore_index=-100, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), z)
    for block_v in (32, 128):
        grad = logits.clone()
        losses = cross_entropy.cross_entropy_rows(grad, labels, 5.0, -100, block_v=block_v)
        torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
        assert not grad[[1, 4]].any()


def test_linear_cross_entropy_edge_cases():
    hidden, weight = randn(4, 8, seed=21), randn(10, 8, seed=22)
    ignored = torch.full((4,), -100, device=DEVICE)
    assert linear_cross_entropy(hidden, weight, ignored).isnan()  # as F.cross_entropy's mean over nothing
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\) or -100, got \[10\]"):
        linear_cross_entropy(hidden, weight, torch.tensor([1, 10, 2, -100], device=DEVICE))
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int or None, got 0"):
        linear_cross_entropy(hidden, weight, ignored, chunk_tokens=0)
    with pytest.raises(ValueError, match="softcap must be None or a positive number, got -1"):
        linear_cross_entropy(hidden, weight, ignored, softcap=-1)
    with pytest.raises(ValueError, match=r"weight must be \(vocab, 8\)"):
        linear_cross_entropy(hidden, weight.T, ignored)


# -- the dispatch ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,expect_triton", [("triton", True), ("torch", False), ("auto", CUDA)])
def test_entries_pick_the_backend(backend, expect_triton, monkeypatch):
    """NF4LORA_BACKEND=triton runs the kernels on CPU tensors (in the interpreter), torch the references, auto
    the kernels exactly where the tensors are on CUDA."""
    monkeypatch.setenv("NF4LORA_BACKEND", backend)
    called = []
    for name in ("rms_norm_torch", "apply_rope_torch", "swiglu_torch", "geglu_torch", "linear_cross_entropy_torch"):
        original = getattr(model_ops, name)
        monkeypatch.setattr(model_ops, name, lambda *a, _f=original, _n=name, **k: called.append(_n) or _f(*a, **k))
    x = randn(2, 3, 4, 8, seed=23)
    rms_norm(x, randn(8, seed=24), 1e-6)
    apply_rope(x, randn(2, 4, 8, seed=25), randn(2, 4, 8, seed=26))
    swiglu(x, x)
    geglu(x, x)
    linear_cross_entropy(x.view(-1, 8), randn(5, 8, seed=27), torch.zeros(24, dtype=torch.long, device=DEVICE))
    assert called == ([] if expect_triton else ["rms_norm_torch", "apply_rope_torch", "swiglu_torch", "geglu_torch",
                                                "linear_cross_entropy_torch"])  # fmt: skip

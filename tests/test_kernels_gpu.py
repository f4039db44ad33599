"""GPU-only kernel tests: bfloat16 matmuls (the interpreter's tl.dot is wrong on bfloat16), the autotuned launch
path, LLaMA-sized shapes, the GEMV's lane lookup (the interpreter looks the table up with loads), CUDA-graph
capture of a decode-sized call, the auto backend on CUDA, torch.compile with inductor, and bit-identity with
bitsandbytes' CUDA dequantize_4bit. Run by benchmarks/gpu_check.sh; skipped where there is no CUDA device.
test_kernels_triton.py also runs compiled (not interpreted) on a GPU machine."""

import pytest
import torch
import torch.nn.functional as F
from test_kernels_helpers import assert_close_to_linear, assert_within, lora_model_bounds

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from nf4lora.kernels import backend_for, dequantize, matmul_4bit  # noqa: E402

if torch.cuda.is_available():
    # Only with a GPU: the kernel modules are not needed here without one (tests/conftest.py sets
    # TRITON_INTERPRET=1 on CPU machines before any of them is imported).
    from nf4lora.kernels import gemv, matmul, ops
from nf4lora.nf4 import QuantState, dequantize_4bit, quantize_4bit  # noqa: E402
from nf4lora.nf4.codebooks import NESTED_BLOCKSIZE  # noqa: E402

# float32 accumulation, one rounding to the output dtype (half an ulp, rtol) plus float32 summation error (atol).
# fp32 operands run in IEEE precision (torch's default "highest" matmul precision); their error is the summation's:
# with K = 4096 products of unit-variance values the partial sums reach |s| ~ 64-200, each add rounds by up to
# 2**-24 |s|, and 4096 such errors add up to ~2.5e-4 on average (4.6e-4 at most, seen on an H200): atol 2e-3.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=2e-3),
    torch.float16: dict(rtol=1e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-2),
}


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def quantized(shape, blocksize=64, quant_type="nf4", double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_4bit(torch.randn(shape, generator=g).cuda(), blocksize, quant_type, double_quant)


def state_args(packed, state):
    n = state.nested
    return (
        packed, state.absmax, state.code, state.offset, None if n is None else n.absmax,
        None if n is None else n.code, state.blocksize, NESTED_BLOCKSIZE, list(state.shape),
    )  # fmt: skip


def randn(*shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device="cuda", dtype=dtype)


def reference_linear(x, packed, state, bias):
    w = dequantize_4bit(packed, state, x.dtype)
    return F.linear(x.double(), w.double(), None if bias is None else bias.double())


# The fused kernels take K a multiple of the blocksize (matmul.supports): a partial last K step, N leaving partial
# tiles, blocksizes on both sides of every BLOCK_K.
FUSED_WEIGHTS = [(50, 192, 64, "nf4", True), (40, 96, 32, "fp4", False), (33, 160, 32, "nf4", False),
                 (70, 384, 128, "fp4", True)]  # fmt: skip


def assert_bf16_fused_products_match(packed, state, rows: int, **launch):
    """matmul.matmul (with a bias) and matmul_grad_input in bf16 against the dense products; launch: config=, split=."""
    n, k = state.shape
    x, bias = randn(rows, k, dtype=torch.bfloat16, seed=1), randn(n, dtype=torch.bfloat16, seed=2)
    dy = randn(rows, n, dtype=torch.bfloat16, seed=3)
    y = matmul.matmul(x, bias, *state_args(packed, state), **launch)
    torch.testing.assert_close(y.double(), reference_linear(x, packed, state, bias), **TOL[torch.bfloat16])
    dx = matmul.matmul_grad_input(dy, *state_args(packed, state), **launch)
    ref = dy.double() @ dequantize_4bit(packed, state, torch.bfloat16).double()
    torch.testing.assert_close(dx.double(), ref, **TOL[torch.bfloat16])


@pytest.mark.parametrize("m", [1, 17, 128, 300])  # BLOCK_M 16, 32, 128 (300: three row tiles, the last partial)
@pytest.mark.parametrize("weight", FUSED_WEIGHTS)
def test_bf16_fused_forward_and_grad_input(m, weight):
    n, k, blocksize, quant_type, double_quant = weight
    packed, state = quantized((n, k), blocksize, quant_type, double_quant, seed=m)
    for config in (None, *matmul.CONFIGS):  # the autotuned launch and every candidate (all fit in shared memory)
        assert_bf16_fused_products_match(packed, state, m, config=config)


@pytest.mark.parametrize("split", [1, 2, 4, 8])
def test_bf16_fused_split_k_llama_shape(split):
    """Every split-K the launcher may pick, at a LLaMA-7B shape and M = 16."""
    packed, state = quantized((4096, 4096), 64, "nf4", True)
    assert_bf16_fused_products_match(packed, state, 16, split=split)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 64, 2048])
def test_llama_sized_autotuned_matmul(dtype, m):
    packed, state = quantized((1024, 4096), 64, "nf4", True)
    x = randn(m, 4096, dtype=dtype, seed=4)
    y = matmul_4bit(x, packed, state)  # auto backend: Triton on CUDA, by ops.FUSED_MAX_M's rule
    if m <= gemv.MAX_M:  # the GEMV: its own per-element bound (test_kernels_helpers)
        assert_close_to_linear(y, x, packed, state, None)
    else:
        torch.testing.assert_close(y.double(), reference_linear(x, packed, state, None), **TOL[dtype])
    if m > gemv.MAX_M:  # the fused kernel too, whatever the dispatch picks
        y = matmul.matmul(x, None, *state_args(packed, state))
        torch.testing.assert_close(y.double(), reference_linear(x, packed, state, None), **TOL[dtype])
    dy = randn(m, 1024, dtype=dtype, seed=5)
    ref = dy.double() @ dequantize_4bit(packed, state, dtype).double()
    for dx in (matmul.matmul_grad_input(dy, *state_args(packed, state)), ops.grad_input_impl(dy, *state_args(packed, state))):
        torch.testing.assert_close(dx.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("m", range(1, 9))  # 1 .. gemv.MAX_M
def test_bf16_gemv_llama_shape(m):
    """The lane lookup runs only here (the interpreter looks the table up with loads): every M, LLaMA's row
    lengths (K = 11008: a last step that overlaps the one before), with bias."""
    for n, k in ((4096, 4096), (1000, 11008)):
        packed, state = quantized((n, k), 64, "nf4", True)
        x = randn(m, k, dtype=torch.bfloat16, seed=6)
        bias = randn(n, dtype=torch.bfloat16, seed=7)
        assert_close_to_linear(gemv.gemv(x, bias, *state_args(packed, state)), x, packed, state, bias)


@pytest.mark.parametrize("m", [1, 4])
def test_every_gemv_candidate_in_bf16(m):
    """Each launch kernel_versions.py times, as the compiler builds it, on a LLaMA row length and on K = 4160 (65
    blocks: a partial last step), and K = 200 (a row shorter than a step)."""
    for n, k in ((4096, 4096), (37, 4160), (37, 200)):
        packed, state = quantized((n, k), 64, "nf4", True)
        x = randn(m, k, dtype=torch.bfloat16, seed=6)
        for config in gemv.CANDIDATES:
            assert_close_to_linear(gemv.gemv(x, None, *state_args(packed, state), config=config), x, packed, state, None)


def test_decode_step_replays_in_a_cuda_graph():
    """matmul_4bit at M = 1 (the GEMV) and dequantize are capturable: no host sync, no allocation outside the
    graph's pool; a replay with new x gives what an eager call gives, through the cached launch."""
    packed, state = quantized((512, 1024), 64, "nf4", True)
    x = randn(1, 1024, dtype=torch.bfloat16, seed=11)
    with torch.no_grad():
        for _ in range(2):  # compile, then the cached launch
            matmul_4bit(x, packed, state), dequantize(packed, state, torch.bfloat16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = matmul_4bit(x, packed, state)
            w = dequantize(packed, state, torch.bfloat16)
        x.copy_(randn(1, 1024, dtype=torch.bfloat16, seed=12))
        graph.replay()
        assert torch.equal(y, matmul_4bit(x, packed, state))
        assert torch.equal(w, dequantize_4bit(packed, state, torch.bfloat16))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_large_bit_identical(quant_type, double_quant, dtype):
    packed, state = quantized((4096, 11008 + 3), 64, quant_type, double_quant)
    assert backend_for(packed) == "triton"
    assert torch.equal(bits(dequantize(packed, state, dtype)), bits(dequantize_4bit(packed, state, dtype)))


def test_dequantize_bit_identical_to_bitsandbytes_cuda():
    import bitsandbytes.functional as bnb_f

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(7)).to("cuda", torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            packed, bnb_state = bnb_f.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
            expected = bnb_f.dequantize_4bit(packed, bnb_state)
            # bitsandbytes' own codes and constants, read through the Hugging Face state-dict format.
            state = QuantState.from_state_dict(bnb_state.as_dict(packed=True), device="cuda")
            got = dequantize(packed, state)
            differ = bits(got) != bits(expected)
            if quant_type == "fp4":
                # bitsandbytes' CUDA kernel decodes FP4 as sign * |value| * absmax, so code 0b1000 gives -0.0; its
                # own quant_map (which the checkpoint stores and we decode with, as its CPU path does) holds +0.0
                # there. Only the sign of those zeros may differ: equal values, every other bit identical.
                codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)[: w.numel()]
                zero_8 = ((codes == 8) & (got.view(-1) == 0) & (expected.view(-1) == 0)).view(w.shape)
                differ &= ~zero_8
            assert not differ.any(), (
                f"{quant_type} dq={double_quant}: {int(differ.sum())} of {w.numel()} elements differ, e.g. ours "
                f"{got[differ][:4].tolist()} vs bitsandbytes {expected[differ][:4].tolist()}"
            )


def test_autograd_and_inductor_compile_on_cuda():
    torch._dynamo.reset()
    packed, state = quantized((256, 512), 64, "nf4", True)
    lora_a = torch.nn.Parameter(randn(8, 512, dtype=torch.float32, seed=8) * 0.05)
    lora_b = torch.nn.Parameter(randn(256, 8, dtype=torch.float32, seed=9) * 0.05)

    def model(x):
        h = matmul_4bit(x, packed, state) + (x @ lora_a.to(x.dtype).T) @ lora_b.to(x.dtype).T
        return F.silu(h)

    x = randn(4, 33, 512, dtype=torch.bfloat16, seed=10)

    def run(fn):
        lora_a.grad = lora_b.grad = None
        xg = x.clone().requires_grad_()
        y = fn(xg)
        y.float().square().sum().backward()
        return y.detach(), xg.grad, lora_a.grad.clone(), lora_b.grad.clone()

    eager = run(model)
    compiled = run(torch.compile(model, fullgraph=True))
    # inductor fuses the LoRA/SiLU part in float32 where eager rounds to bfloat16 between ops: each element may
    # differ by what those roundings spread into it (test_kernels_helpers.lora_model_bounds, from the magnitudes
    # that element adds up). One bound for the whole tensor (2**-6 of its largest entry, 39 for x.grad) let small
    # elements be anything; on the CPU torch path the same comparison stays within 0.2x of these bounds.
    names = ["y", "x.grad", "lora_a.grad", "lora_b.grad"]
    w = dequantize_4bit(packed, state, torch.bfloat16).double()
    bounds = lora_model_bounds(x, w, lora_a.detach(), lora_b.detach(), dict(zip(names, eager)))
    for name, got, want in zip(names, compiled, eager):
        assert_within(got, want, bounds[name], name)

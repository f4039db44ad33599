"""The Triton kernels against the nf4/ reference: in the interpreter on the CPU (TRITON_INTERPRET=1), compiled on
CUDA where a GPU exists. Shapes are small (the interpreter runs each program in numpy) and awkward: odd sizes,
partial blocks and tiles, K and N not multiples of the tile sizes. bfloat16 matmuls are tested only on a GPU
(test_kernels_gpu.py): triton 3.9's interpreter returns garbage for tl.dot on bfloat16 operands."""

import pytest
import torch
import torch.nn.functional as F
from test_kernels_helpers import assert_close_to_linear

from nf4lora.kernels import dequant, dequantize, gemv, matmul, matmul_4bit, ops
from nf4lora.nf4 import dequantize_4bit, quantize_4bit
from nf4lora.nf4.codebooks import NESTED_BLOCKSIZE

# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before any kernel module was imported.
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# The kernels accumulate in float32 and round once to the output dtype: up to half an ulp of the dtype relative
# (rtol), plus float32 summation error over K <= 128 terms of size ~1 (atol).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("NF4LORA_BACKEND", "triton")


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def quantized(shape, blocksize=64, quant_type="nf4", double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_4bit(torch.randn(shape, generator=g).to(DEVICE), blocksize, quant_type, double_quant)


def state_args(packed, state):
    """The launchers' state arguments (ops.STATE_ARGS order)."""
    n = state.nested
    return (
        packed, state.absmax, state.code, state.offset, None if n is None else n.absmax,
        None if n is None else n.code, state.blocksize, NESTED_BLOCKSIZE, list(state.shape),
    )  # fmt: skip


def randn(*shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


# -- dequantize ---------------------------------------------------------------------------------------------------
SHAPES_AND_BLOCKSIZES = [
    ((1,), 64), ((7,), 32), ((33, 65), 128), ((300, 77), 256), ((1023,), 512), ((130, 130), 1024),
    ((5, 2049), 2048), ((3, 4097), 4096), ((2, 4096), 4096), ((64, 64), 64),
]  # fmt: skip


@pytest.mark.parametrize("shape,blocksize", SHAPES_AND_BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_kernel_bit_identical(shape, blocksize, quant_type, double_quant):
    packed, state = quantized(shape, blocksize, quant_type, double_quant)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ours = dequantize(packed, state, dtype)  # through the custom op, NF4LORA_BACKEND=triton
        ref = dequantize_4bit(packed, state, dtype)
        assert ours.shape == ref.shape and ours.dtype == dtype
        assert torch.equal(bits(ours), bits(ref)), (shape, blocksize, quant_type, double_quant, dtype)


@pytest.mark.parametrize("elements_per_program,num_warps", [(64, 4), (2048, 8), (16384, 8)])
def test_dequantize_launch_settings_change_no_bits(elements_per_program, num_warps):
    """The tuning keywords bench_kernels.py sweeps: fewer or more blocks per program write the same bits, with a
    partial last program and a partial last block."""
    packed, state = quantized((37, 300), 64, "nf4", True)
    ours = dequant.dequantize(*state_args(packed, state), torch.bfloat16, elements_per_program=elements_per_program,
                              num_warps=num_warps)  # fmt: skip
    assert torch.equal(bits(ours), bits(dequantize_4bit(packed, state, torch.bfloat16)))


def test_unaligned_packed_views_are_read_as_their_values():
    """The kernels read codes as int32 words: a packed view starting at an odd byte (a slice of a larger buffer)
    must give the codes it shows."""
    packed, state = quantized((24, 64), 64, "nf4", True)
    buffer = torch.zeros(packed.numel() + 1, dtype=torch.uint8, device=DEVICE)
    buffer[1:] = packed.view(-1)
    view = buffer[1:]
    assert view.data_ptr() % 4
    assert torch.equal(bits(dequantize(view, state, torch.bfloat16)), bits(dequantize_4bit(packed, state, torch.bfloat16)))
    x = randn(2, 64, dtype=torch.float32, seed=17)
    assert torch.equal(gemv.gemv(x, None, *state_args(view, state)), gemv.gemv(x, None, *state_args(packed, state)))


def test_dequantize_launch_settings_are_checked():
    packed, state = quantized((8, 64))
    with pytest.raises(ValueError, match="elements_per_program must be a power of two, got 3000"):
        dequant.dequantize(*state_args(packed, state), torch.float32, elements_per_program=3000)
    with pytest.raises(ValueError, match="num_warps must be a power of two from 1 to 32, got 6"):
        dequant.dequantize(*state_args(packed, state), torch.float32, num_warps=6)


# -- fused forward and grad-input -----------------------------------------------------------------------------------
# (N, K, blocksize, quant_type, double_quant): K not a multiple of the tile (general scale path), K a multiple of
# the blocksize (one scale per row and tile), odd K (rows start mid-byte), N leaving partial tiles.
WEIGHTS = [(50, 72, 64, "nf4", True), (40, 96, 32, "fp4", False), (33, 65, 64, "nf4", False), (70, 128, 128, "fp4", True)]
# The fused kernels take K a multiple of the blocksize (matmul.supports): K not a multiple of the tile (a partial
# last step), N leaving partial tiles, blocksizes on both sides of BLOCK_K.
FUSED_WEIGHTS = [(50, 192, 64, "nf4", True), (40, 96, 32, "fp4", False), (33, 160, 32, "nf4", False),
                 (70, 128, 128, "fp4", True)]  # fmt: skip
MS = [1, 2, 3, 7, 16, 17, 33, 128]


def reference_linear(x, packed, state, bias):
    """F.linear(x, dequantize_4bit(...), bias) with the operands in x.dtype, evaluated in float64."""
    w = dequantize_4bit(packed, state, x.dtype)
    b = None if bias is None else bias.double()
    return F.linear(x.double(), w.double(), b)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_forward_matches_dense(m, dtype, with_bias):
    n, k, blocksize, quant_type, double_quant = FUSED_WEIGHTS[MS.index(m) % len(FUSED_WEIGHTS)]
    packed, state = quantized((n, k), blocksize, quant_type, double_quant, seed=m)
    x = randn(m, k, dtype=dtype, seed=1)
    bias = randn(n, dtype=dtype, seed=2) if with_bias else None
    y = matmul.matmul(x, bias, *state_args(packed, state))
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.double(), reference_linear(x, packed, state, bias), **TOL[dtype])


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_grad_input_matches_dense(m, dtype):
    n, k, blocksize, quant_type, double_quant = FUSED_WEIGHTS[MS.index(m) % len(FUSED_WEIGHTS)]
    packed, state = quantized((n, k), blocksize, quant_type, double_quant, seed=m)
    dy = randn(m, n, dtype=dtype, seed=3)
    dx = matmul.matmul_grad_input(dy, *state_args(packed, state))
    assert dx.shape == (m, k) and dx.dtype == dtype
    ref = dy.double() @ dequantize_4bit(packed, state, dtype).double()
    torch.testing.assert_close(dx.double(), ref, **TOL[dtype])


def assert_fused_products_match(packed, state, rows: int, dtype=torch.float16, seed=0, **launch):
    """matmul.matmul (with a bias) and matmul.matmul_grad_input for `rows` rows against the dense products;
    launch: the launchers' config= or split=."""
    n, k = state.shape
    x, bias = randn(rows, k, dtype=dtype, seed=seed), randn(n, dtype=dtype, seed=seed + 1)
    dy = randn(rows, n, dtype=dtype, seed=seed + 2)
    y = matmul.matmul(x, bias, *state_args(packed, state), **launch)
    torch.testing.assert_close(y.double(), reference_linear(x, packed, state, bias), **TOL[dtype])
    dx = matmul.matmul_grad_input(dy, *state_args(packed, state), **launch)
    ref = dy.double() @ dequantize_4bit(packed, state, dtype).double()
    torch.testing.assert_close(dx.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("split", [2, 3])
def test_fused_split_k_matches_dense(split):
    """Programs sharing the reduction (K for the forward, N for grad-input) in ranges of matmul.K_TILE_ALIGN,
    the last one shorter; their float32 partials summed by the second kernel, with the bias."""
    packed, state = quantized((200, 384), 64, "nf4", True, seed=split)
    assert matmul.split_ranges(384, split) == {2: (256, 2), 3: (128, 3)}[split]
    assert matmul.split_ranges(200, split) == (128, 2)
    assert_fused_products_match(packed, state, 20, seed=17, split=split)


def test_fused_kernels_refuse_unaligned_k_and_the_dispatch_routes_around_them(monkeypatch):
    packed, state = quantized((8, 72), 64, "nf4", True)
    rows = gemv.MAX_M + 2  # past the GEMV
    x = randn(rows, 72, dtype=torch.float32, seed=20)
    with pytest.raises(ValueError, match=r"K \(in_features\) a multiple of the blocksize 64, got weight \(8, 72\)"):
        matmul.matmul(x, None, *state_args(packed, state))
    monkeypatch.setattr(ops, "FUSED_MAX_M", rows)
    assert ops.matmul_path(rows, [8, 72], 64) == "dequant + cuBLAS" and ops.matmul_path(rows, [8, 128], 64) == "fused"
    y = matmul_4bit(x, packed, state)
    torch.testing.assert_close(y.double(), reference_linear(x, packed, state, None), **TOL[torch.float32])


@pytest.mark.parametrize("config", matmul.CONFIGS, ids=lambda c: "x".join(str(v) for v in c.kwargs.values()))
def test_every_autotune_config_is_correct(config):
    """Each candidate the autotuner may pick on a GPU, run explicitly, on a shape with partial tiles."""
    packed, state = quantized((70, 96), 32, "nf4", True)
    assert_fused_products_match(packed, state, 20, seed=4, config=config)


# -- decode GEMV (M <= 8) ---------------------------------------------------------------------------------------------
# (N, K, blocksize, quant_type, double_quant): blocks straddling rows (72), K a multiple of the blocksize (96, 128,
# 640), odd K (65: rows start mid-byte, the dequantize + F.linear path), N leaving partial programs.
GEMV_WEIGHTS = [(50, 72, 64, "nf4", True), (40, 96, 32, "fp4", False), (33, 65, 64, "nf4", False),
                (70, 128, 128, "fp4", True), (37, 640, 64, "nf4", True)]  # fmt: skip


@pytest.mark.parametrize("m", range(1, gemv.MAX_M + 1))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemv_matches_dense(m, dtype):
    n, k, blocksize, quant_type, double_quant = GEMV_WEIGHTS[m % len(GEMV_WEIGHTS)]
    packed, state = quantized((n, k), blocksize, quant_type, double_quant, seed=m)
    x = randn(m, k, dtype=dtype, seed=7)
    bias = randn(n, dtype=dtype, seed=8) if m % 2 else None
    y = gemv.gemv(x, bias, *state_args(packed, state))
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close_to_linear(y, x, packed, state, bias)


@pytest.mark.parametrize("config", gemv.CANDIDATES, ids=str)
def test_every_gemv_candidate_is_correct(config):
    """Each launch a GPU run may pick, on K = 4160 (65 blocks: a partial last step for every BLOCK_KW), with rows
    left over in the last program, at M = 3 (x rows padded to 4)."""
    packed, state = quantized((37, 4160), 64, "nf4", True)
    x = randn(3, 4160, dtype=torch.float16, seed=9)
    y = gemv.gemv(x, None, *state_args(packed, state), config=config)
    assert_close_to_linear(y, x, packed, state, None)


def test_gemv_bound_catches_a_wrong_column():
    """The tolerance is tight enough to see one pair of columns swapped in one row of W."""
    packed, state = quantized((16, 128), 64, "nf4", True)
    x = randn(1, 128, dtype=torch.bfloat16, seed=10)
    y = gemv.gemv(x, None, *state_args(packed, state))
    swapped = x.clone()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    with pytest.raises(AssertionError, match="error up to"):
        assert_close_to_linear(y, swapped, packed, state, None)


def test_gemv_refuses_large_batches():
    packed, state = quantized((8, 16))
    with pytest.raises(ValueError, match=f"at most MAX_M={gemv.MAX_M} rows of x, got {gemv.MAX_M + 1}"):
        gemv.gemv(randn(gemv.MAX_M + 1, 16, dtype=torch.float32, seed=0), None, *state_args(packed, state))


# -- the public entry point on the Triton backend ---------------------------------------------------------------------
@pytest.mark.parametrize("m,fused_max_m,kernels", [
    (2, 0, ["gemv", "dequantize"]),  # GEMV forward; backward dequantizes for the dense product dy @ W
    (9, 0, ["dequantize", "dequantize"]),  # dequantize + F.linear forward and backward
    (9, 16, ["matmul", "matmul_grad_input"]),  # the fused kernels, where ops.FUSED_MAX_M takes them
])  # fmt: skip
def test_matmul_4bit_routes_and_differentiates(m, fused_max_m, kernels, monkeypatch):
    """ops.matmul_impl's rule picks the kernel by rows; gradients match dense autograd in float64 on every path."""
    calls = []
    for module, name in ((gemv, "gemv"), (matmul, "matmul"), (matmul, "matmul_grad_input"), (dequant, "dequantize")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    monkeypatch.setattr(ops, "FUSED_MAX_M", fused_max_m)
    packed, state = quantized((24, 64), 32, "nf4", True)
    x = randn(m, 64, dtype=torch.float32, seed=10).requires_grad_()
    bias = randn(24, dtype=torch.float32, seed=11).requires_grad_()
    y = matmul_4bit(x, packed, state, bias)

    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y64 = F.linear(x64, dequantize_4bit(packed, state, torch.float32).double(), b64)
    torch.testing.assert_close(y.double(), y64, **TOL[torch.float32])
    dy = randn(m, 24, dtype=torch.float32, seed=12)
    y.backward(dy)
    y64.backward(dy.double())
    assert calls == kernels
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[torch.float32])
    torch.testing.assert_close(bias.grad.double(), b64.grad, **TOL[torch.float32])


@pytest.mark.parametrize("rows", [0, 5])
def test_empty_and_batched_leading_shapes(rows):
    """x of shape (..., K), including no rows at all, through the public entry point and its backward."""
    packed, state = quantized((24, 40), 64, "fp4", False)
    x = randn(2, rows, 40, dtype=torch.float32, seed=13).requires_grad_()
    y = matmul_4bit(x, packed, state)
    assert y.shape == (2, rows, 24)
    y.sum().backward()
    assert x.grad.shape == x.shape
    w = dequantize_4bit(packed, state, torch.float32).double()
    torch.testing.assert_close(y.double(), x.detach().double() @ w.T, **TOL[torch.float32])
    torch.testing.assert_close(x.grad.double(), torch.ones(2, rows, 24, dtype=torch.float64, device=DEVICE) @ w,
                               **TOL[torch.float32])  # fmt: skip


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    packed, state = quantized((8, 16))
    monkeypatch.setattr(dequant, "INTERPRETED", False)
    with pytest.raises(ValueError, match="packed is on cpu: the Triton kernels need CUDA tensors, or .*TRITON_INTERPRET=1"):
        dequant.dequantize(*state_args(packed.cpu(), state.to("cpu")), torch.float32)


@pytest.mark.parametrize("m", [1, 9])  # GEMV, and dequantize + F.linear
def test_strided_bias_and_block_constants_are_read_as_their_values(m):
    """The kernels index the bias and the block constants with stride 1: strided views (a slice of a larger
    tensor) must give the values they show, not the memory next to them."""
    from dataclasses import replace

    packed, state = quantized((16, 64), 32, "nf4", True)
    x = randn(m, 64, dtype=torch.float32, seed=14)
    wide_bias = randn(32, dtype=torch.float32, seed=15)
    bias = wide_bias[::2]  # (16,), stride 2
    wide = torch.stack([state.absmax, torch.zeros_like(state.absmax)], 1)  # every other byte a wrong code
    strided = replace(state, absmax=wide[:, 0])
    assert not bias.is_contiguous() and not strided.absmax.is_contiguous()
    w = dequantize_4bit(packed, state, torch.float32).double()
    expected = x.double() @ w.T + bias.double()
    torch.testing.assert_close(matmul_4bit(x, packed, strided, bias).double(), expected, **TOL[torch.float32])


@pytest.mark.parametrize("m", [1, 9])
def test_autocast_gives_the_autocast_dtype_on_every_path(m):
    """As F.linear under autocast: float32 x comes out in the autocast dtype, whichever kernel serves the rows."""
    packed, state = quantized((16, 64), 64, "nf4", True)
    x = randn(m, 64, dtype=torch.float32, seed=16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = matmul_4bit(x, packed, state)
    assert y.dtype == torch.bfloat16
    w = dequantize_4bit(packed, state, torch.bfloat16)
    torch.testing.assert_close(y, F.linear(x.to(torch.bfloat16), w), **TOL[torch.bfloat16])

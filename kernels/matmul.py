"""Fused dequantize-matmul kernels for few rows of activations (M = 16..512: LoRA fine-tuning with short sequences,
batched decode): y = x @ W.T (+ bias) and the grad-input product dx = dy @ W, with W (N, K) read packed (0.5 B per
weight) and never written out in 16 bits. Each weight is decoded as float32(code[c] * scale[block]) and rounded
to the activation dtype, exactly what F.linear(x, dequantize_4bit(...)) multiplies with.

How the loop is built, against what the first version's sm_90 code showed (docs/benchmarking.md):
- Block scales are decoded once per call, before the matmul: with double quantization a small kernel writes the
  float32 scale of every block (n_blocks floats, i.e. (N, K / blocksize)); without it absmax already is that array.
  The loop then loads one float per row and block at an address that depends on nothing loaded (the nested
  absmax code used to feed the next load's address: one memory latency per K step).
- Codes are looked up in registers: each lane holds one of the 16 code values (read once per program) and a warp
  shuffle reads the one a code names (gemv._lookup, shared with the GEMV), one instruction per weight instead of
  the table gather in the loop, which Triton staged through shared memory as 4-byte async copies (64 KB of shared
  memory for 8 KB of codes at 128x256x64). The interpreter cannot run the shuffle (inline PTX): there the codes
  are loaded.
- Weight rows are the MMA's wide operand: each program computes acc (BLOCK_N, BLOCK_M) = W_tile @ x_tile.T, so the
  64-row side of the sm_90 wgmma is filled by BLOCK_N = 64 or 128 weight rows and the few rows of x are its narrow
  side (16..128), instead of padding 16 rows of x up to 64.
- No interleave: a byte holds the codes of columns 2j (high nibble) and 2j + 1 (low nibble). The high nibbles
  multiply x's even columns and the low nibbles its odd columns (two dots of BLOCK_K / 2), with x permuted once
  per call so that both halves load contiguously; the decoded tile needs no register shuffle.
- Split-K for M <= 64: N / BLOCK_N output tiles (64 for N = 4096) leave most of 132 SMs idle, so SPLIT_K programs
  share each tile's K range and write float32 partials, which a second kernel sums in a fixed order
  (deterministic), adding the bias and rounding once.

Supported layout: K a multiple of the blocksize (every row starts a block: the scale array is (N, K / blocksize)),
which every model's Linear has; `supports` says so and ops.py sends other layouts to dequantize + cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import INTERPRETED, check_triton_device, load_scales, round_to
from .gemv import _load_table, _lookup

# Autotune candidates: few, and printed by benchmarks/bench_kernels.py (its "autotune choices" table) so the GPU
# run shows which one each shape takes. BLOCK_N is the wgmma's 64-row side (64 or 128 weight rows); BLOCK_K 64 or
# 128 columns per step (32 or 64 packed bytes per row, one scale per row and step at blocksize 64 and BLOCK_K 64).
# The rows of x (BLOCK_M) are not a candidate: the launcher sets them from M (ROWS_FOR_M). Not measured on a GPU
# yet: the candidates follow the budget of docs/benchmarking.md (registers for a 128x128 float32 accumulator at 8
# warps; 2-4 pipeline stages of x within 227 KB).
CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
]
GRAD_INPUT_CONFIGS = CONFIGS
# The interpreter runs one config, small enough to be quick and to leave partial tiles in the test shapes.
INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 32})

MIN_BLOCK_M, MAX_BLOCK_M = 16, 128  # tl.dot's smallest side; the widest x tile (a 128x128 float32 accumulator)
SPLIT_K_MAX_M = 64  # split-K serves M up to this
MAX_SPLIT_K = 8
# Every candidate's BLOCK_K and BLOCK_N divide it: K a multiple of it needs no column mask (EVEN_K), and split-K
# ranges are multiples of it, so each program's range is whole steps.
K_TILE_ALIGN = 128
M_BUCKET_CAP = 4096  # autotuning is keyed on M rounded up to a power of two (capped), not on every M
_KEY = ["M_BUCKET", "N", "K", "BLOCKSIZE", "BLOCK_M", "SPLIT_K"]
SCALES_PER_PROGRAM = 1024  # the scale-decoding kernel: blocks per program


def supports(shape: list[int], blocksize: int) -> bool:
    """Whether the fused kernels take a weight of `shape` (N, K): K a multiple of the blocksize."""
    return len(shape) == 2 and shape[1] % blocksize == 0


def rows_for_m(m: int) -> int:
    """BLOCK_M for M rows of x: the next power of two, between tl.dot's minimum and MAX_BLOCK_M."""
    return min(max(triton.next_power_of_2(m), MIN_BLOCK_M), MAX_BLOCK_M)


# -- decoding -------------------------------------------------------------------------------------------------------
@triton.jit
def _block_scales_kernel(
    absmax_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, scales_ptr, n_blocks,
    NESTED_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """scales[b] = float32 scale of 4-bit block b, decoded from its 8-bit code (double quantization)."""
    block = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = block < n_blocks
    scales = load_scales(
        absmax_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, block, mask, True, NESTED_BLOCKSIZE
    )
    tl.store(scales_ptr + block, scales, mask=mask)


@triton.jit
def _decode_pair(packed_ptr, scales_ptr, code_ptr, table, rn, k0, k_end, N, K, BLOCKSIZE: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, LANES: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
    """W[rn, k0 + 2j] and W[rn, k0 + 2j + 1] for j < BLOCK_K / 2, as two (BLOCK_N, BLOCK_K / 2) tiles in DTYPE;
    0 outside rows < N and columns < k_end (EVEN_K: k_end - k0 is a multiple of BLOCK_K, no column mask, so the
    mask is constant along a row and its bytes load 16 at a time). The codes are looked up through the lanes
    (gemv._lookup: each lane holds one of the 16 values, a shuffle reads the one a code names; LANES) or, in the
    interpreter, loaded; table: gemv._load_table's."""
    HALF: tl.constexpr = BLOCK_K // 2
    j = tl.arange(0, HALF)
    row = rn[:, None].to(tl.int64)
    if EVEN_K:
        mask = (rn[:, None] < N) & (j[None, :] < HALF)
    else:
        mask = (rn[:, None] < N) & (k0 + 2 * j[None, :] < k_end)
    byte = tl.load(packed_ptr + row * (K // 2) + k0 // 2 + j[None, :], mask=mask, other=0).to(tl.int32)
    if BLOCK_K <= BLOCKSIZE:  # the step lies inside one block of each row: one scale per row
        scale = tl.load(scales_ptr + row * (K // BLOCKSIZE) + k0 // BLOCKSIZE, mask=rn[:, None] < N, other=0.0)
    else:
        scale = tl.load(scales_ptr + row * (K // BLOCKSIZE) + (k0 + 2 * j[None, :]) // BLOCKSIZE, mask=mask, other=0.0)
    high, low = _lookup(code_ptr, table, byte, 4, LANES), _lookup(code_ptr, table, byte, 0, LANES)
    return round_to(high * scale, DTYPE), round_to(low * scale, DTYPE)


# -- the two products -----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M_BUCKET"])
def _matmul_kernel(
    xp_ptr, packed_ptr, scales_ptr, code_ptr, bias_ptr, out_ptr, M, N, K, M_BUCKET, k_per_split, stride_xm, stride_om,
    stride_os, HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    LANES: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[m, n] (+ bias) for a (BLOCK_N, BLOCK_M) tile of y.T over one K range. xp is x with each row's even
    columns first, then its odd ones (the launcher's permutation). With SPLIT_K > 1, out is the float32 partial
    sums (SPLIT_K, M, N) and the split's index is program_id(2). EVEN_K: every K range is whole BLOCK_K steps."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    j = tl.arange(0, BLOCK_K // 2)
    x_rows = xp_ptr + rm[None, :].to(tl.int64) * stride_xm  # (1, BLOCK_M)
    DTYPE: tl.constexpr = xp_ptr.dtype.element_ty
    table = _load_table(code_ptr, LANES)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w_even, w_odd = _decode_pair(packed_ptr, scales_ptr, code_ptr, table, rn, k0, k_end, N, K, BLOCKSIZE, BLOCK_K,
                                     EVEN_K, LANES, DTYPE)  # fmt: skip
        if EVEN_K:
            x_mask = (rm[None, :] < M) & (j[:, None] < BLOCK_K // 2)  # (BLOCK_K / 2, BLOCK_M)
        else:
            x_mask = (rm[None, :] < M) & (k0 + 2 * j[:, None] < k_end)
        x_even = tl.load(x_rows + (k0 // 2 + j[:, None]), mask=x_mask, other=0.0)
        x_odd = tl.load(x_rows + (K // 2 + k0 // 2 + j[:, None]), mask=x_mask, other=0.0)
        acc = tl.dot(w_even, x_even, acc, input_precision=INPUT_PRECISION)
        acc = tl.dot(w_odd, x_odd, acc, input_precision=INPUT_PRECISION)
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    out = out_ptr + tl.program_id(2).to(tl.int64) * stride_os + rm[None, :].to(tl.int64) * stride_om + rn[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out, round_to(acc, out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out, acc, mask=mask)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _grad_input_kernel(
    dy_ptr, packed_ptr, scales_ptr, code_ptr, out_ptr, M, N, K, M_BUCKET, n_per_split, stride_dym, stride_om,
    stride_os, BLOCKSIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, LANES: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dx[m, k] for the (BLOCK_K, BLOCK_M) tile of dx.T at columns k0.. over one range of N (the reduction):
    dx.T (K, M) = W.T (K, N) @ dy.T (N, M), the even and odd columns of the tile accumulated apart and stored
    interleaved. With SPLIT_K > 1, out is the float32 partial sums (SPLIT_K, M, K). EVEN_K: K is whole steps."""
    k0 = tl.program_id(0) * BLOCK_K
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = tl.program_id(2) * n_per_split
    n_end = tl.minimum(N, n_start + n_per_split)
    j = tl.arange(0, BLOCK_K // 2)
    DTYPE: tl.constexpr = dy_ptr.dtype.element_ty
    acc_even = tl.zeros((BLOCK_K // 2, BLOCK_M), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_K // 2, BLOCK_M), dtype=tl.float32)
    table = _load_table(code_ptr, LANES)
    for n0 in range(n_start, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        w_even, w_odd = _decode_pair(packed_ptr, scales_ptr, code_ptr, table, rn, k0, K, n_end, K, BLOCKSIZE, BLOCK_K,
                                     EVEN_K, LANES, DTYPE)  # fmt: skip
        dy = tl.load(dy_ptr + rm[None, :].to(tl.int64) * stride_dym + rn[:, None],
                     mask=(rm[None, :] < M) & (rn[:, None] < n_end), other=0.0)  # (BLOCK_N, BLOCK_M)  # fmt: skip
        acc_even = tl.dot(tl.trans(w_even), dy, acc_even, input_precision=INPUT_PRECISION)
        acc_odd = tl.dot(tl.trans(w_odd), dy, acc_odd, input_precision=INPUT_PRECISION)
    cols = k0 + 2 * j[:, None]  # (BLOCK_K / 2, 1): the even columns; the odd ones follow each
    mask = (cols < K) & (rm[None, :] < M)
    out = out_ptr + tl.program_id(2).to(tl.int64) * stride_os + rm[None, :].to(tl.int64) * stride_om + cols
    OUT_DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out, round_to(acc_even, OUT_DTYPE), mask=mask)
    tl.store(out + 1, round_to(acc_odd, OUT_DTYPE), mask=mask)


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, n, width, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    """out (rows, width) = sum over the SPLIT_K float32 partials (SPLIT_K, rows, width), in split order, + bias."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    total = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        total += tl.load(partial_ptr + s * n + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs % width, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, round_to(total, out_ptr.dtype.element_ty), mask=mask)


_matmul_tuned = triton.autotune(configs=CONFIGS, key=_KEY)(_matmul_kernel)
_grad_input_tuned = triton.autotune(configs=GRAD_INPUT_CONFIGS, key=_KEY)(_grad_input_kernel)
SUM_BLOCK = 1024


# -- launchers --------------------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    """fp32 operands follow torch's matmul precision setting (TF32 only when torch would use it too)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def block_scales(absmax, offset, nested_absmax, nested_code, nested_blocksize: int) -> torch.Tensor:
    """The float32 scale of every 4-bit block, (n_blocks,): absmax itself without double quantization, else
    decoded by _block_scales_kernel (bit-identical to torch_path.block_scales)."""
    if nested_absmax is None:
        return absmax
    scales = torch.empty(absmax.numel(), dtype=torch.float32, device=absmax.device)
    _block_scales_kernel[(triton.cdiv(absmax.numel(), SCALES_PER_PROGRAM),)](
        absmax, offset, nested_absmax, nested_code, scales, absmax.numel(),
        NESTED_BLOCKSIZE=nested_blocksize, BLOCK=SCALES_PER_PROGRAM, enable_fp_fusion=False,
    )  # fmt: skip
    return scales


def split_ranges(reduction: int, split: int) -> tuple[int, int]:
    """(length of each program's range, number of ranges) when `split` programs share `reduction`: ranges are
    multiples of K_TILE_ALIGN, so there may be fewer than asked for."""
    if split <= 1:
        return reduction, 1
    per = triton.cdiv(triton.cdiv(reduction, split), K_TILE_ALIGN) * K_TILE_ALIGN
    return per, triton.cdiv(reduction, per)


def split_k(t: torch.Tensor, m: int, tiles: int, reduction: int) -> int:
    """Programs per output tile along the reduction for M = m rows: for m <= SPLIT_K_MAX_M, the power of two (up
    to MAX_SPLIT_K) that brings `tiles` output tiles (counted at 64-row weight tiles) closest to one wave of the
    SMs without falling under K_TILE_ALIGN of reduction per program; 1 otherwise and in the interpreter."""
    if m > SPLIT_K_MAX_M or not t.is_cuda or INTERPRETED:
        return 1
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count
    split = 1
    while split < MAX_SPLIT_K and tiles * split * 2 <= sms and reduction // (split * 2) >= K_TILE_ALIGN:
        split *= 2
    return split


def _check(t: torch.Tensor, name: str, shape: list[int], blocksize: int) -> None:
    check_triton_device(t, name)
    if not supports(shape, blocksize):
        raise ValueError(f"the fused kernels need K (in_features) a multiple of the blocksize {blocksize}, got weight "
                         f"{tuple(shape)}: use dequantize + F.linear for this layout")  # fmt: skip


def _launch(tuned, plain, grid_fn, args: tuple, meta: dict, config: triton.Config | None) -> None:
    """Autotuned on a GPU; one fixed config in the interpreter (it cannot time candidates) or when given."""
    if config is None and not INTERPRETED:
        tuned[lambda m: grid_fn(m["BLOCK_N"], m["BLOCK_K"])](*args, **meta, enable_fp_fusion=False)
        return
    kw = (config or INTERPRETER_CONFIG).all_kwargs()
    plain[grid_fn(kw["BLOCK_N"], kw["BLOCK_K"])](*args, **meta, **kw, enable_fp_fusion=False)


def _finish(partial: torch.Tensor, bias, out: torch.Tensor, split: int) -> None:
    n = out.numel()
    _sum_splits_kernel[(triton.cdiv(n, SUM_BLOCK),)](
        partial, bias if bias is not None else out, out, n, out.shape[-1], SPLIT_K=split, HAS_BIAS=bias is not None,
        BLOCK=SUM_BLOCK,
    )  # fmt: skip


def matmul(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    packed, absmax, code, offset, nested_absmax, nested_code, blocksize: int, nested_blocksize: int,
    shape: list[int],
    config: triton.Config | None = None,
    split: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launcher: x (..., K) @ W.T + bias -> (..., N) in x.dtype. State arguments as torch_path.dequantize;
    split: programs along K (default: split_k's rule)."""
    _check(x, "x", shape, blocksize)
    N, K = shape
    M = x.numel() // K
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    # (M, K) with each row's even columns first, then its odd ones: both halves of a step load contiguously
    xp = x.reshape(M, K // 2, 2).transpose(1, 2).reshape(M, K)
    scales = block_scales(absmax, offset, nested_absmax, nested_code, nested_blocksize)
    block_m = rows_for_m(M)
    k_per_split, split = split_ranges(K, split or split_k(x, M, triton.cdiv(N, 64) * triton.cdiv(M, block_m), K))
    out = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    args = (xp, packed, scales, code, bias if bias is not None else y, out, M, N, K,
            min(triton.next_power_of_2(M), M_BUCKET_CAP), k_per_split, xp.stride(0), N, M * N)  # fmt: skip
    meta = dict(HAS_BIAS=bias is not None, BLOCKSIZE=blocksize, INPUT_PRECISION=_input_precision(x.dtype),
                EVEN_K=K % K_TILE_ALIGN == 0, LANES=not INTERPRETED, SPLIT_K=split, BLOCK_M=block_m)  # fmt: skip

    def grid(block_n, block_k):
        return (triton.cdiv(N, block_n), triton.cdiv(M, block_m), split)

    _launch(_matmul_tuned, _matmul_kernel, grid, args, meta, config)
    if split > 1:
        _finish(out, bias, y, split)
    return y.view(*x.shape[:-1], N)


def matmul_grad_input(
    dy: torch.Tensor,
    packed, absmax, code, offset, nested_absmax, nested_code, blocksize: int, nested_blocksize: int,
    shape: list[int],
    config: triton.Config | None = None,
    split: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launcher: dy (..., N) @ W -> (..., K) in dy.dtype. State arguments as torch_path.dequantize; split:
    programs along N (default: split_k's rule)."""
    _check(dy, "dy", shape, blocksize)
    N, K = shape
    M = dy.numel() // N
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0:
        return dx.view(*dy.shape[:-1], K)
    dy2 = dy.reshape(M, N)
    if dy2.stride(1) != 1:
        dy2 = dy2.contiguous()
    scales = block_scales(absmax, offset, nested_absmax, nested_code, nested_blocksize)
    block_m = rows_for_m(M)
    n_per_split, split = split_ranges(N, split or split_k(dy, M, triton.cdiv(K, 64) * triton.cdiv(M, block_m), N))
    out = dx if split == 1 else torch.empty((split, M, K), dtype=torch.float32, device=dy.device)
    args = (dy2, packed, scales, code, out, M, N, K, min(triton.next_power_of_2(M), M_BUCKET_CAP), n_per_split,
            dy2.stride(0), K, M * K)  # fmt: skip
    meta = dict(BLOCKSIZE=blocksize, INPUT_PRECISION=_input_precision(dy.dtype), EVEN_K=K % K_TILE_ALIGN == 0,
                LANES=not INTERPRETED, SPLIT_K=split, BLOCK_M=block_m)  # fmt: skip

    def grid(block_n, block_k):
        return (triton.cdiv(K, block_k), triton.cdiv(M, block_m), split)

    _launch(_grad_input_tuned, _grad_input_kernel, grid, args, meta, config)
    if split > 1:
        _finish(out, None, dx, split)
    return dx.view(*dy.shape[:-1], K)

"""Decode kernel: y (M, N) = x (M, K) @ W.T + bias for M <= MAX_M rows of x, W (N, K) packed 4-bit.

At decode sizes the product is memory-bound: W is read once for all M rows, 0.52 bytes per weight with NF4 and
double quantization, and the kernel is as fast as the instructions it spends per weight let it stream. On an H200
an SM must take in about 30-40 weights per cycle to reach 80% of HBM bandwidth while it issues 128
thread-instructions per cycle: about 4 instructions per weight in all (docs/benchmarking.md).

A program covers BLOCK_N rows of W and all of K, BLOCK_KW int32 words (8 codes each) of every row per step. Each
thread holds one word per row and step: lanes hold adjacent words of a row, so a warp reads 128 contiguous bytes
of each row, and the BLOCK_N rows sit in every thread's registers, so the 8 values of x a word needs are loaded
(16 bytes) and converted once for all rows. Per weight, on the GPU: a shift, a lookup in the 16-entry float32
table and one FMA per row of x. The lookup is a shfl.sync from the lane that holds the value (lane l holds
table[l % 16]), whose source lane is bits 0-4 of its index: `word >> shift` needs no mask, since the bit above
the code only picks the table's second copy. Per word, one FMA applies the block scale to the word's 8-term
partial sum. The loop loads nothing masked (see _start), and with double quantization the 8-bit absmax codes are
loaded a step ahead, so no load in it waits for another to know its address. Every tensor of the loop is laid out
as the words (checked on the sm_90 code by tests/compile_kernels.py: no shared memory, no barrier in the loop).

Under the interpreter (TRITON_INTERPRET=1) there are no lanes: the lookups are loads from the table. The
arithmetic is otherwise the same, so the CPU tests check the indexing; the GPU tests check the lane lookup.

Not bit-identical to F.linear(x, dequantize(W, x.dtype)): W is not rounded to x's dtype and the sums run in
another order (bitsandbytes' GEMV is not either). Tests state the tolerance.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dequant import check_triton_device, dequantize, round_to
from .launch import INTERPRETED, Launcher

MAX_M = 8  # larger batches take dequantize + cuBLAS (ops.py)


# The lane lookup, in one asm block so that no layout conversion can move a lane's table entry to another lane:
# each lane picks table[laneid % 16] out of the 16 values ($2..$17, the same for every lane), then shfl.sync.idx
# reads it from the lane named by bits 0-4 of $1. The pick depends on the lane alone: ptxas computes it about once
# per loop iteration, not per lookup (sm_90 code: 64 SHFL and about 10 SEL per step of 64 weights).
_SHFL_LOOKUP = tl.constexpr("""{
.reg .u32 l;
.reg .pred p;
.reg .b32 a<8>, b<4>, c<2>, v;
mov.u32 l, %laneid;
and.b32 l, l, 1;
setp.ne.u32 p, l, 0;
selp.b32 a0, $3, $2, p; selp.b32 a1, $5, $4, p; selp.b32 a2, $7, $6, p; selp.b32 a3, $9, $8, p;
selp.b32 a4, $11, $10, p; selp.b32 a5, $13, $12, p; selp.b32 a6, $15, $14, p; selp.b32 a7, $17, $16, p;
mov.u32 l, %laneid;
and.b32 l, l, 2;
setp.ne.u32 p, l, 0;
selp.b32 b0, a1, a0, p; selp.b32 b1, a3, a2, p; selp.b32 b2, a5, a4, p; selp.b32 b3, a7, a6, p;
mov.u32 l, %laneid;
and.b32 l, l, 4;
setp.ne.u32 p, l, 0;
selp.b32 c0, b1, b0, p; selp.b32 c1, b3, b2, p;
mov.u32 l, %laneid;
and.b32 l, l, 8;
setp.ne.u32 p, l, 0;
selp.b32 v, c1, c0, p;
shfl.sync.idx.b32 $0, v, $1, 0x1f, 0xffffffff;
}""")


@triton.jit
def _gather(ptrs, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """tl.load(ptrs) for a (BLOCK_N, BLOCK_KW) gather, laid out as the words (a row's words on adjacent lanes).
    Loaded as one flat tensor: for a 2-D gather Triton 3.6 would put the lanes along the rows (it orders axes of
    equal contiguity by index, 3.9 the other way), and its values would cross threads through shared memory."""
    return tl.reshape(tl.load(tl.reshape(ptrs, (BLOCK_N * BLOCK_KW,))), (BLOCK_N, BLOCK_KW))


@triton.jit
def _lookup(code_ptr, table, words, SHIFT: tl.constexpr, LANES: tl.constexpr):
    """code[(words >> SHIFT) & 15] as float32: through the lanes (LANES; table is the 16 values), or loaded."""
    if LANES:
        value = tl.inline_asm_elementwise(
            _SHFL_LOOKUP, "=r,r" + ",r" * 16,
            [words >> SHIFT, table[0], table[1], table[2], table[3], table[4], table[5], table[6], table[7], table[8],
             table[9], table[10], table[11], table[12], table[13], table[14], table[15]],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        value = _gather(code_ptr + ((words >> SHIFT) & 15), words.shape[0], words.shape[1])
    return value


@triton.jit
def _split4(xs, BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr):
    """(BLOCK_M, BLOCK_KW, 4) -> its 4 columns in order, each (BLOCK_M, BLOCK_KW). Column j = 2a + b is
    split off b first: the inverse of a tl.join tree, so every column stays in the thread that loaded it."""
    even, odd = tl.split(tl.reshape(xs, (BLOCK_M, BLOCK_KW, 2, 2)))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _load_x(x_ptr, kw0, start, M, stride_xm, KW: tl.constexpr, FIRST: tl.constexpr, WIDTH: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr):  # fmt: skip
    """x[m, 8 (start + kw) + FIRST + j] for j < WIDTH as (BLOCK_M, BLOCK_KW, WIDTH) float32; 0 past M rows and
    for the words this step does not add (before kw0 or past the row's end). Loaded as (BLOCK_M * BLOCK_KW,
    WIDTH), WIDTH values (16 bytes) of a word per access: loaded as 3-D, the M and kw axes have equal contiguity,
    which Triton 3.6 and 3.9 order differently, and in 3.6 a word's x would then sit on another thread."""
    f = tl.arange(0, BLOCK_M * BLOCK_KW)[:, None]  # (BLOCK_M * BLOCK_KW, 1): row m, word kw
    m = f // BLOCK_KW
    kw = start + f % BLOCK_KW
    live = (m < M) & (kw >= kw0) & (kw < KW)
    xs = tl.load(x_ptr + m * stride_xm + 8 * kw + FIRST + tl.arange(0, WIDTH)[None, :], mask=live, other=0.0)
    return tl.reshape(xs.to(tl.float32), (BLOCK_M, BLOCK_KW, WIDTH))


@triton.jit
def _x_columns(x_ptr, kw0, start, M, stride_xm, KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr):
    """The 8 columns of x a step's words multiply, each (BLOCK_M, BLOCK_KW) float32 (see _load_x): one 16-byte
    access per word, two for float32 (8 float32 in one flat load would be laid out 4 per thread, a word's x on
    two threads)."""
    if x_ptr.dtype.element_ty == tl.float32:
        x0, x1, x2, x3 = _split4(_load_x(x_ptr, kw0, start, M, stride_xm, KW, 0, 4, BLOCK_M, BLOCK_KW), BLOCK_M, BLOCK_KW)
        x4, x5, x6, x7 = _split4(_load_x(x_ptr, kw0, start, M, stride_xm, KW, 4, 4, BLOCK_M, BLOCK_KW), BLOCK_M, BLOCK_KW)
    else:
        xs = _load_x(x_ptr, kw0, start, M, stride_xm, KW, 0, 8, BLOCK_M, BLOCK_KW)  # (BLOCK_M, BLOCK_KW, 8)
        low, high = tl.split(tl.reshape(xs, (BLOCK_M, BLOCK_KW, 4, 2)))  # columns 2i and 2i + 1
        x0, x2, x4, x6 = _split4(low, BLOCK_M, BLOCK_KW)
        x1, x3, x5, x7 = _split4(high, BLOCK_M, BLOCK_KW)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _load_table(code_ptr, LANES: tl.constexpr):
    """The 16 table values as scalars, for the lane lookup (nothing without LANES)."""
    if LANES:
        table = (
            tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3),
            tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7),
            tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
            tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15),
        )  # fmt: skip
    else:
        table = ()
    return table


@triton.jit
def _start(kw0, KW: tl.constexpr, BLOCK_KW: tl.constexpr):
    """The first word column of the step at kw0: kw0, but at most KW - BLOCK_KW, so that the last step of a row
    whose length is not a multiple of BLOCK_KW reads the row's last BLOCK_KW words (and a prefetch past the end
    reads the last step again). Rows shorter than BLOCK_KW start at 0."""
    if KW < BLOCK_KW:
        start = 0
    else:
        start = tl.minimum(kw0, KW - BLOCK_KW)
    return start


@triton.jit
def _flat_words(rows, kw0, KW: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Flat indices (uint32) of the words (rows, step at kw0): (BLOCK_N, BLOCK_KW), contiguous along a row; a row
    shorter than BLOCK_KW repeats its last word."""
    kw = _start(kw0, KW, BLOCK_KW) + tl.arange(0, BLOCK_KW)
    if KW < BLOCK_KW:
        kw = tl.minimum(kw, KW - 1)
    return (rows[:, None] * KW + kw[None, :]).to(tl.uint32)


@triton.jit
def _absmax_codes(absmax_ptr, word, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """With double quantization the 8-bit absmax codes (int32) of the blocks holding `word` (flat word indices,
    uint32), else 0."""
    if DOUBLE_QUANT:
        codes = _gather(absmax_ptr + word // (BLOCKSIZE // 8), word.shape[0], word.shape[1]).to(tl.int32)
    else:
        codes = 0
    return codes


# Only x and y are accessed in vectors: the other pointers carry no alignment hint (fewer variants, and fewer
# checks per launch: launch.Launcher). packed_ptr must not (see _gemv_kernel).
_UNALIGNED = ["packed_ptr", "absmax_ptr", "code_ptr", "offset_ptr", "nested_absmax_ptr", "nested_code_ptr", "bias_ptr"]


@triton.jit(do_not_specialize_on_alignment=_UNALIGNED)
def _gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, bias_ptr, y_ptr,
    M, N, stride_xm, stride_ym,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, LANES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):  # fmt: skip
    """BLOCK_N outputs of every row of x; K % 8 == 0 (rows start on a word). K is a constexpr: row offsets fold.

    The words load is contiguous along a row, so Triton puts a row's words on adjacent lanes, and every other
    tensor of the loop takes that layout (no load in the loop is masked, see _start). packed_ptr's alignment is
    not hinted: with the hint Triton would give each thread 4 adjacent words (one 16-byte load), and x's columns
    would no longer sit in the thread that holds their words.
    """
    KW: tl.constexpr = K // 8  # words per row
    SHORT: tl.constexpr = KW < BLOCK_KW
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rows = tl.minimum(pid * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)  # (BLOCK_N,) clamped: read, never stored
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    table = _load_table(code_ptr, LANES)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.float32)
    # With double quantization a scale is nested_code[q]: the codes q of each step are loaded one step ahead, so
    # no load in the loop waits for another load to know its address.
    q = _absmax_codes(absmax_ptr, _flat_words(rows, 0, KW, BLOCK_KW), BLOCKSIZE, DOUBLE_QUANT)
    for kw0 in range(0, KW, BLOCK_KW):
        word = _flat_words(rows, kw0, KW, BLOCK_KW)  # (BLOCK_N, BLOCK_KW)
        words = tl.load(words_ptr + word)
        block = word // (BLOCKSIZE // 8)
        if DOUBLE_QUANT:
            scales = _gather(nested_code_ptr + q, BLOCK_N, BLOCK_KW)
            scales *= _gather(nested_absmax_ptr + block // NESTED_BLOCKSIZE, BLOCK_N, BLOCK_KW)
            scales += tl.load(offset_ptr)
            q = _absmax_codes(absmax_ptr, _flat_words(rows, kw0 + BLOCK_KW, KW, BLOCK_KW), BLOCKSIZE, DOUBLE_QUANT)
        else:
            scales = _gather(absmax_ptr + block, BLOCK_N, BLOCK_KW)
        start = _start(kw0, KW, BLOCK_KW)
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_columns(x_ptr, kw0, start, M, stride_xm, KW, BLOCK_M, BLOCK_KW)
        # element 8i + 2b of word i is its byte b's high nibble, 8i + 2b + 1 the low one
        p = _lookup(code_ptr, table, words, 4, LANES)[None, :, :] * x0[:, None, :]
        p += _lookup(code_ptr, table, words, 0, LANES)[None, :, :] * x1[:, None, :]
        p += _lookup(code_ptr, table, words, 12, LANES)[None, :, :] * x2[:, None, :]
        p += _lookup(code_ptr, table, words, 8, LANES)[None, :, :] * x3[:, None, :]
        p += _lookup(code_ptr, table, words, 20, LANES)[None, :, :] * x4[:, None, :]
        p += _lookup(code_ptr, table, words, 16, LANES)[None, :, :] * x5[:, None, :]
        p += _lookup(code_ptr, table, words, 28, LANES)[None, :, :] * x6[:, None, :]
        p += _lookup(code_ptr, table, words, 24, LANES)[None, :, :] * x7[:, None, :]
        acc += p * scales[None, :, :]  # (BLOCK_M, BLOCK_N, BLOCK_KW)
    y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], round_to(y, y_ptr.dtype.element_ty), mask=mask)


_launch = Launcher(_gemv_kernel)


@dataclass(frozen=True)
class Config:
    """A launch of _gemv_kernel: rows per program, words per thread and row in each step, warps, and whether the
    table lookups and block scales go through lanes (shfl.sync; GPU only) or loads."""

    block_n: int
    words: int
    num_warps: int
    lanes: bool = True


# The launch each batch size takes (rows of x, a power of two -> Config). Registers per thread grow with
# M x BLOCK_N (an accumulator and a partial sum per pair), so larger batches take fewer rows per program: at most
# 128 registers, for two programs of 8 warps per SM. Chosen from the sm_90 compile (tests/compile_kernels.py: SASS
# per weight in the K loop 4.66, 5.92, 10.09, 21.19 at M = 1, 2, 4, 8; 111, 127, 80, 70 registers), not yet timed:
# CANDIDATES are what benchmarks/kernel_versions.py times on a GPU to settle them (the last looks the table up
# with loads, should the lane lookup misbehave on some GPU).
DEFAULT_CONFIGS = {1: Config(8, 1, 8), 2: Config(8, 1, 8), 4: Config(4, 1, 8), 8: Config(2, 1, 8)}
CANDIDATES = [Config(8, 1, 8), Config(8, 1, 4), Config(8, 2, 4), Config(4, 1, 8), Config(4, 2, 8), Config(2, 1, 8),
              Config(8, 1, 8, lanes=False)]  # fmt: skip


def _pow2(m: int) -> int:
    """The smallest power of two >= m (triton.next_power_of_2 costs microseconds per call from Python)."""
    return 1 << (m - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _constexprs(M: int, K: int, blocksize: int, nested_blocksize: int, double_quant: bool, has_bias: bool,
                config: Config) -> dict:  # fmt: skip
    """The kernel's constexprs and launch options for one kind of call (cached: the launcher runs per call). Rows
    shorter than a step of the config take fewer warps, down to one (a step of 32 words: K = 256)."""
    warps = config.num_warps
    while warps > 1 and config.words * 32 * warps > K // 8:
        warps //= 2
    return dict(
        K=K, HAS_BIAS=has_bias, BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=nested_blocksize,
        LANES=config.lanes and not INTERPRETED, BLOCK_M=_pow2(M), BLOCK_N=config.block_n,
        BLOCK_KW=config.words * 32 * warps, num_warps=warps,
        enable_fp_fusion=True,  # multiply-adds fused (Triton's default until 3.10): this kernel need not match bits
    )  # fmt: skip


def gemv(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    packed, absmax, code, offset, nested_absmax, nested_code, blocksize: int, nested_blocksize: int,
    shape: list[int],
    config: Config | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launcher: x (..., K) with at most MAX_M rows @ W.T + bias -> (..., N) in x.dtype. Weights whose rows do not
    start on a word (K % 8 != 0) take dequantize + F.linear."""
    check_triton_device(x, "x")
    N, K = shape
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    if M > MAX_M:
        raise ValueError(f"gemv takes at most MAX_M={MAX_M} rows of x, got {M}: use dequantize + F.linear")
    if K % 8:
        w = dequantize(packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize, shape,
                       x.dtype)  # fmt: skip
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    if N * K >= 2**34:
        raise ValueError(f"gemv indexes words with int32: a {N}x{K} weight is too large")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if packed.data_ptr() % 4:  # a view into a larger buffer: the kernel reads whole int32 words
        packed = packed.clone()
    config = config or DEFAULT_CONFIGS[_pow2(M)]
    dq = nested_absmax is not None
    _launch(
        (-(-N // config.block_n),),
        (x2, packed, absmax, code, offset if dq else absmax, nested_absmax if dq else absmax,
         nested_code if dq else absmax, y if bias is None else bias, y, M, N, x2.stride(0), y.stride(0)),
        _constexprs(M, K, blocksize, nested_blocksize, dq, bias is not None, config),
    )  # fmt: skip
    return y.view(*x.shape[:-1], N)

"""Triton dequantization of blockwise 4-bit weights (NF4/FP4, with or without double quantization).

Also home of the two @triton.jit helpers every 4-bit kernel shares (matmul.py, gemv.py), so the decode arithmetic
of docs/formats.md sections 2-3 is written once for the GPU:
- `load_scales`: the float32 scale of a 4-bit block, decoding the nested (8-bit) absmax in the kernel;
- `load_weight_tile`: a (BLOCK_N, BLOCK_K) float32 tile of the dequantized weight W (N, K).

The launches that must match nf4/ bit for bit (this one, matmul.py's) pass enable_fp_fusion=False: with double
quantization the scale is map[code] * nested_absmax, then + offset as a separate float32 add; a fused multiply-add
rounds once and would differ from nf4/ (and from bitsandbytes) in the last bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import INTERPRETED, Launcher

# Launch settings of the dequantization kernel: elements per program and warps, i.e. words of 8 codes per thread
# (ELEMENTS_PER_PROGRAM / (8 * 32 * NUM_WARPS)): each is an independent 4-byte load in flight, and at more words
# the per-word work (index, scale) is shared by more outputs. sm_90 code (tests/compile_kernels.py), bf16 output
# with double quantization: 4 words per thread (4096 x 4) 10.75 SASS per output, 39 registers; 8 words (8192 x
# 4) 9.75, 64 registers; 16 words (16384 x 4) 10.1 and 176 registers (a quarter of the threads fit). LAUNCH_SETTINGS
# are the candidates bench_kernels.py times on a GPU, to pick the default from; unmeasured so far.
ELEMENTS_PER_PROGRAM = 8192
NUM_WARPS = 4
LAUNCH_SETTINGS = [(2048, 4), (4096, 4), (8192, 4), (8192, 8), (16384, 8)]


# Casts to bfloat16 round on the GPU (cvt.rn, round to nearest even, as torch does); triton 3.9's interpreter
# truncates them instead, so there, and only there, round_to rounds with integer ops on the float32 bits.
NATIVE_CASTS = tl.constexpr(not INTERPRETED)


@triton.jit
def round_to(values, dtype: tl.constexpr):
    """float32 `values` rounded to nearest even in `dtype` (float32, float16 or bfloat16), bit for bit as torch.

    Under the interpreter bfloat16 is rounded with integer ops: overflow rounds to inf, and infinities and the
    quiet NaNs arithmetic produces come through unchanged.
    """
    if dtype == tl.bfloat16 and not NATIVE_CASTS:
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        rounded = values.to(dtype)
    return rounded


@triton.jit
def load_scales(
    absmax_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, block, mask,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
):  # fmt: skip
    """float32 scale of 4-bit block number `block` (an int tensor of any shape); 0 where mask is False. mask=None:
    every block exists (block must be unsigned, so that the compiler folds `block >= 0` and drops the masks)."""
    if mask is None:
        mask = block >= 0  # constant true: folded away, so the loads are unmasked
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)  # uint8 code into the dynamic map
        value = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        # Two float32 roundings, product then sum (docs/formats.md 3.4) where the launch forbids contracting them
        # to an FMA (enable_fp_fusion=False: the kernels that must match nf4/ bit for bit).
        scales = tl.where(mask, value * nested + tl.load(offset_ptr), 0.0)
    else:
        scales = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scales


@triton.jit
def load_weight_tile(
    packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr,
    rn, rk, k0, N, K,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """W[rn, rk] as float32 (BLOCK_N, BLOCK_K), 0 outside N x K: float32(code[c] * scale[block]).

    W (N, K) is stored row-major: element (n, k) is flat index n*K + k, its code sits in byte idx // 2 (high
    nibble for even idx) and its scale is that of block idx // BLOCKSIZE. rk must be k0 + arange(BLOCK_K), k0 a
    multiple of BLOCK_K. Fast cases, chosen at compile time:
    - EVEN_K (K % 2 == 0): every row starts on a byte boundary, so the tile is (BLOCK_N, BLOCK_K // 2) bytes,
      each loaded once and split into its two nibbles, instead of a byte load and a nibble select per element;
    - K_ALIGNED (K % BLOCKSIZE == 0): blocks start at row starts, so one scale per row and block of the tile
      (BLOCK_K within a block, or whole blocks within BLOCK_K) instead of one scale per element.
    """
    row = rn[:, None].to(tl.int64) * K  # (BLOCK_N, 1) flat index of each row's first element
    if EVEN_K:
        rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte column within the row
        byte_mask = (rn[:, None] < N) & (rb[None, :] < K // 2)
        byte = tl.load(packed_ptr + row // 2 + rb[None, :], mask=byte_mask, other=0).to(tl.int32)
        high = tl.load(code_ptr + (byte >> 4), mask=byte_mask, other=0.0)
        low = tl.load(code_ptr + (byte & 15), mask=byte_mask, other=0.0)
        values = tl.interleave(high, low)  # (BLOCK_N, BLOCK_K): columns k0, k0 + 1, ...
    else:
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        idx = row + rk[None, :]
        byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        values = tl.load(code_ptr + tl.where(idx % 2 == 0, byte >> 4, byte & 15), mask=mask, other=0.0)
    if K_ALIGNED and BLOCKSIZE % BLOCK_K == 0:  # the tile lies in one block of each row
        scales = load_scales(
            absmax_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, (row + k0) // BLOCKSIZE, rn[:, None] < N,
            DOUBLE_QUANT, NESTED_BLOCKSIZE,
        )  # fmt: skip
        tile = values * scales  # (BLOCK_N, BLOCK_K) * (BLOCK_N, 1)
    elif K_ALIGNED and BLOCK_K % BLOCKSIZE == 0:  # the tile holds BLOCKS whole blocks of each row
        BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE
        rblock = tl.arange(0, BLOCKS)[None, :]
        scales = load_scales(
            absmax_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, (row + k0) // BLOCKSIZE + rblock,
            (rn[:, None] < N) & (k0 + rblock * BLOCKSIZE < K), DOUBLE_QUANT, NESTED_BLOCKSIZE,
        )  # fmt: skip
        tile = tl.reshape(tl.reshape(values, (rn.shape[0], BLOCKS, BLOCKSIZE)) * scales[:, :, None], values.shape)
    else:  # blocks straddle rows or tiles: one scale per element
        scales = load_scales(
            absmax_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, (row + rk[None, :]) // BLOCKSIZE,
            (rn[:, None] < N) & (rk[None, :] < K), DOUBLE_QUANT, NESTED_BLOCKSIZE,
        )  # fmt: skip
        tile = values * scales
    return tile


# Shift of each element's nibble in the little-endian int32 word holding elements 8i .. 8i + 7: byte b holds
# element 8i + 2b in its high nibble and 8i + 2b + 1 in its low one.
@triton.jit
def _word_values(words, scales, code_ptr, SHIFT: tl.constexpr, dtype: tl.constexpr):
    """One element of each word: code_ptr[(words >> SHIFT) & 15] * scales, in `dtype`."""
    return round_to(tl.load(code_ptr + ((words >> SHIFT) & 15)) * scales, dtype)


@triton.jit(
    do_not_specialize=["n_words"],
    do_not_specialize_on_alignment=["packed_ptr", "absmax_ptr", "code_ptr", "offset_ptr", "nested_absmax_ptr",
                                    "nested_code_ptr"],
)  # fmt: skip
def _dequantize_kernel(
    packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr, n, n_bytes, n_words,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, WORDS: tl.constexpr,
    WHOLE_WORDS: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """Each program writes WORDS * 8 elements from WORDS little-endian int32 words of 8 codes each.

    Word i holds elements 8i .. 8i + 7, byte b of it element 8i + 2b in its high nibble and 8i + 2b + 1 in its low
    one. A thread decodes whole words, each with a shift and a mask per code, a lookup in the 16-entry float32
    table (64 bytes: one L1 line, so a warp's lookups are one access) and one scale per word (a word lies in one
    block: blocksizes are multiples of 8). A tree of tl.join keeps a word's 8 values side by side in its thread's
    registers, ready for one 16-byte store of bfloat16 or float16; join appends its new axis last, so the leaves
    go in bit-reversed order. Adjacent threads hold adjacent words: a warp loads 128 contiguous bytes of codes and
    stores 512 contiguous bytes (bf16), with no shared memory. That is why n_words is not specialized and
    packed_ptr's alignment not hinted: with a hint Triton gives each thread 4 adjacent words (one 16-byte load),
    and their 32 outputs then cross threads through shared memory to be stored coalesced (tests/sass_gates.py).
    n_words = n_bytes // 4 whole words load as int32 (packed must be 4-byte aligned); without WHOLE_WORDS
    (n_bytes % 4 != 0) the last bytes make one more word, read byte by byte. WIDE: int64 offsets, for n >= 2**31.
    """
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    word = pid * WORDS + tl.arange(0, WORDS)  # (WORDS,)
    words = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + word, mask=word < n_words, other=0)
    if not WHOLE_WORDS:  # the last n_bytes % 4 bytes form a partial word, assembled byte by byte
        tail = tl.zeros((), tl.int32)
        for i in tl.static_range(3):
            at = n_words * 4 + i
            tail |= tl.load(packed_ptr + at, mask=at < n_bytes, other=0).to(tl.int32) << (8 * i)
        words = tl.where(word == n_words, tail, words)
    scales = load_scales(
        absmax_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, word.to(tl.uint32) // (BLOCKSIZE // 8), word * 8 < n,
        DOUBLE_QUANT, NESTED_BLOCKSIZE,
    )  # (WORDS,)  # fmt: skip
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    # A join tree's leaf p is element bitreverse(p) of its span. float32: two (WORDS, 4) halves of 16 bytes each
    # (one (WORDS, 8) store would be laid out 4 per thread, and the words would cross threads to get there).
    if dtype == tl.float32:
        low = tl.join(
            tl.join(_word_values(words, scales, code_ptr, 4, dtype), _word_values(words, scales, code_ptr, 12, dtype)),
            tl.join(_word_values(words, scales, code_ptr, 0, dtype), _word_values(words, scales, code_ptr, 8, dtype)),
        )  # fmt: skip
        high = tl.join(
            tl.join(_word_values(words, scales, code_ptr, 20, dtype), _word_values(words, scales, code_ptr, 28, dtype)),
            tl.join(_word_values(words, scales, code_ptr, 16, dtype), _word_values(words, scales, code_ptr, 24, dtype)),
        )  # fmt: skip
        elem = word[:, None] * 8 + tl.arange(0, 4)[None, :]  # (WORDS, 4)
        tl.store(out_ptr + elem, tl.reshape(low, (WORDS, 4)), mask=elem < n)
        tl.store(out_ptr + elem + 4, tl.reshape(high, (WORDS, 4)), mask=elem + 4 < n)
    else:
        values = tl.join(
            tl.join(
                tl.join(_word_values(words, scales, code_ptr, 4, dtype), _word_values(words, scales, code_ptr, 20, dtype)),
                tl.join(_word_values(words, scales, code_ptr, 12, dtype), _word_values(words, scales, code_ptr, 28, dtype)),
            ),
            tl.join(
                tl.join(_word_values(words, scales, code_ptr, 0, dtype), _word_values(words, scales, code_ptr, 16, dtype)),
                tl.join(_word_values(words, scales, code_ptr, 8, dtype), _word_values(words, scales, code_ptr, 24, dtype)),
            ),
        )  # (WORDS, 2, 2, 2)  # fmt: skip
        elem = word[:, None] * 8 + tl.arange(0, 8)[None, :]  # (WORDS, 8)
        tl.store(out_ptr + elem, tl.reshape(values, (WORDS, 8)), mask=elem < n)


_launch_dequantize = Launcher(_dequantize_kernel)


def tile_launch_args(absmax, offset, nested_absmax, nested_code, blocksize: int, nested_blocksize: int, K: int):
    """For kernels that call load_weight_tile: the block-constant pointers (offset, nested absmax, nested map;
    dummies without double quantization) and the constexprs that describe the weight's layout."""
    double_quant = nested_absmax is not None
    pointers = (offset, nested_absmax, nested_code) if double_quant else (absmax, absmax, absmax)
    meta = dict(
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=nested_blocksize,
        EVEN_K=K % 2 == 0, K_ALIGNED=K % blocksize == 0,
    )  # fmt: skip
    return pointers, meta


def check_triton_device(t: torch.Tensor, name: str) -> None:
    """The Triton kernels run on CUDA tensors, or on CPU tensors when the interpreter is on."""
    if t.is_cuda or (t.device.type == "cpu" and INTERPRETED):
        return
    raise ValueError(
        f"{name} is on {t.device}: the Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
        "set before the first Triton call (use NF4LORA_BACKEND=torch or auto for CPU tensors)"
    )


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    *,
    elements_per_program: int = ELEMENTS_PER_PROGRAM,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """Launcher: the weight of `shape` in `dtype` from its packed codes; arguments as torch_path.dequantize (the
    keywords are launch settings, for tuning: a power of two of elements per program, 8 at least (one word of
    codes), and a power of two of warps up to 32)."""
    check_triton_device(packed, "packed")
    if elements_per_program < 1 or elements_per_program & (elements_per_program - 1):
        raise ValueError(f"elements_per_program must be a power of two, got {elements_per_program}")
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
    n = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    n_bytes = (n + 1) // 2
    if packed.data_ptr() % 4:  # a view into a larger buffer: the kernel reads whole int32 words
        packed = packed.clone()
    words = max(1, elements_per_program // 8)
    double_quant = nested_absmax is not None
    programs = -(-n // (words * 8))
    _launch_dequantize(
        (programs,),
        (packed, absmax, code, offset if double_quant else absmax, nested_absmax if double_quant else absmax,
         nested_code if double_quant else absmax, out, n, n_bytes, n_bytes // 4),
        dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=nested_blocksize, WORDS=words,
             WHOLE_WORDS=n_bytes % 4 == 0, WIDE=programs * words * 8 >= 2**31, num_warps=num_warps,
             enable_fp_fusion=False),
    )  # fmt: skip
    return out

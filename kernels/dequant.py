"""Triton dequantization of blockwise 4-bit weights (NF4/FP4, with or without double quantization).

Also home of the two @triton.jit helpers every 4-bit kernel shares (matmul.py, gemv.py), so the decode arithmetic
of docs/formats.md sections 2-3 is written once for the GPU:
- `load_scales`: the float32 scale of a 4-bit block, decoding the nested (8-bit) absmax in the kernel;
- `load_weight_tile`: a (BLOCK_N, BLOCK_K) float32 tile of the dequantized weight W (N, K).

Every launch passes enable_fp_fusion=False: with double quantization the scale is map[code] * nested_absmax,
then + offset as a separate float32 add; a fused multiply-add rounds once and would differ from nf4/ (and from
bitsandbytes) in the last bit.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# The interpreter decides at decoration time (triton.jit reads TRITON_INTERPRET when this module is imported).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements per program of the dequantization kernel (4096 outputs = 2048 bytes of codes, 8 KiB of bf16 out) and
# its warps. Not tuned yet: on an H200 this launch moved 2.0-2.2 TB/s (42-45% of peak); bench_kernels.py sweeps
# both (the launcher takes them as keywords) so a GPU run can pick better ones.
ELEMENTS_PER_PROGRAM = 4096
NUM_WARPS = 4


@triton.jit
def round_to(values, dtype: tl.constexpr):
    """float32 `values` rounded to nearest even in `dtype` (float32, float16 or bfloat16).

    bfloat16 is rounded with integer ops on the float32 bits: triton 3.9's interpreter truncates float32 ->
    bfloat16 casts (the GPU rounds to nearest even), and both must match torch's rounding bit for bit. Overflow
    rounds to inf, and infinities and the quiet NaNs arithmetic produces come through unchanged.
    """
    if dtype == tl.bfloat16:
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
    """float32 scale of 4-bit block number `block` (an int tensor of any shape); 0 where mask is False."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)  # uint8 code into the dynamic map
        value = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        # Two float32 roundings, product then sum (docs/formats.md 3.4); the launch forbids contracting them to an FMA.
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


@triton.jit
def _dequantize_kernel(
    packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr, n, n_bytes,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """Each program writes ROWS whole 4-bit blocks: a (ROWS, BLOCKSIZE // 2) tile of bytes, one scale per row.

    Byte j holds elements 2j (high nibble) and 2j + 1 (low nibble); tl.interleave puts them back in order.
    n_bytes = (n + 1) // 2 comes from the launcher, not from n in here: passed in, Triton sees when it is a
    multiple of 16, so the byte mask is constant over 16 bytes and each thread's 16 codes load as one 16-byte
    access. Computed here from n, the mask forces 16 one-byte loads per thread (sm_90 PTX of both versions,
    compiled with tests/compile_kernels.py).
    """
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    byte_idx = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
    byte_mask = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4), mask=byte_mask, other=0.0)
    low = tl.load(code_ptr + (byte & 15), mask=byte_mask, other=0.0)
    scales = load_scales(
        absmax_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, block, block * BLOCKSIZE < n,
        DOUBLE_QUANT, NESTED_BLOCKSIZE,
    )[:, None]  # fmt: skip
    values = tl.interleave(high * scales, low * scales)  # (ROWS, BLOCKSIZE)
    elem = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, round_to(values, out_ptr.dtype.element_ty), mask=elem < n)


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
    keywords are launch settings, for tuning: a power of two of elements per program, at least one block each,
    and a power of two of warps up to 32)."""
    check_triton_device(packed, "packed")
    if elements_per_program < 1 or elements_per_program & (elements_per_program - 1):
        raise ValueError(f"elements_per_program must be a power of two, got {elements_per_program}")
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
    n = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    rows = max(1, elements_per_program // blocksize)
    double_quant = nested_absmax is not None
    grid = (triton.cdiv(triton.cdiv(n, blocksize), rows),)
    _dequantize_kernel[grid](
        packed, absmax, code,
        offset if double_quant else absmax, nested_absmax if double_quant else absmax,
        nested_code if double_quant else absmax,
        out, n, (n + 1) // 2,
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, NESTED_BLOCKSIZE=nested_blocksize, ROWS=rows,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out

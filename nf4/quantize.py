"""Blockwise 4-bit quantization (NF4 / FP4) with optional double quantization: the plain-torch specification.

The algorithm is docs/formats.md sections 2-3, written for clarity first and for speed second: work is done
in chunks of whole blocks, so quantizing a large matrix needs the packed output plus a few float32 chunk
buffers (CHUNK_ELEMENTS elements each), never a float32 copy of the whole tensor.
"""

from __future__ import annotations

import torch

from .codebooks import (
    DYNAMIC_MAP,
    NESTED_BLOCKSIZE,
    check_blocksize,
    check_quant_type,
    code_table,
    quantize_bounds,
    zero_code,
)
from .state import NestedState, QuantState

# 1M elements: 4 MiB of float32 per buffer, which keeps each chunk's passes in L2/L3 cache. Measured on the
# 2-core CI machine (benchmarks/bench_quant_cpu.py): 2**18..2**22 are within a few percent; smaller chunks pay
# per-op overhead, larger ones fall out of cache. Must be a multiple of every blocksize (4096).
CHUNK_ELEMENTS = 1 << 20

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weight(w, name: str = "w") -> None:
    """Raise TypeError/ValueError for input that cannot be quantized (before any work is done)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}): nothing to quantize")


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| per block of a flat float32 tensor; the last block may be partial. (n_blocks,) float32."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().view(1)])
    return absmax


def _scale_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """s = clamp(x * (1 / absmax[block]), -1, 1) in float32, written over `flat` (which the caller owns).

    An all-zero block has absmax 0; its reciprocal is taken of 1e-38 instead, so s = 0 there. A partial last
    block is divided by its absmax instead, as bitsandbytes does: x / a and x * (1 / a) round differently, and
    next to FP4's exactly representable midpoints that changes codes.
    """
    inv = 1.0 / absmax.clamp(min=1e-38)
    n = flat.numel()
    full = n - n % blocksize
    flat[:full].view(-1, blocksize).mul_(inv[: full // blocksize, None])
    if full < n:
        flat[full:].div_(absmax[-1].clamp(min=1e-38))
    return flat.clamp_(-1, 1)


def _nearest_codes_4bit(s: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit code of the nearest table value to each scaled value, ties to the lower value. uint8, same shape."""
    midpoints, order = quantize_bounds(quant_type)
    if quant_type == "nf4":
        # The NF4 table is sorted, so the code is the number of midpoints strictly below s: 15 vectorised compares
        # beat torch.bucketize's scalar binary search ~3x on the CPU (measured: benchmarks/bench_quant_cpu.py).
        codes = torch.zeros(s.shape, dtype=torch.uint8, device=s.device)
        for m in midpoints.tolist():
            codes += s > m
        return codes
    idx = torch.bucketize(s, midpoints.to(s.device), right=False, out_int32=True)
    return order.to(s.device)[idx]


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte: element 2j in the high nibble, 2j+1 in the low nibble. len(codes) must be even."""
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize `w` blockwise to 4-bit NF4/FP4 codes.

    Returns (packed, state): packed is uint8 of shape ((numel + 1) // 2, 1), bitsandbytes' layout; state holds
    the per-block absmax (8-bit double-quantized when double_quant=True), blocksize, quant_type, shape and dtype.
    Bit-identical to bitsandbytes.functional.quantize_4bit(w, blocksize=..., quant_type=...,
    compress_statistics=double_quant) for the packed bytes and float32 absmax; see tests/test_quantize_bnb.py.
    """
    check_weight(w)
    check_blocksize(blocksize)
    check_quant_type(quant_type)

    flat = w.detach().reshape(-1)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    for start in range(0, n, CHUNK_ELEMENTS):
        chunk = flat[start : start + CHUNK_ELEMENTS].to(torch.float32, copy=True)  # (c,) owned float32 copy
        chunk_absmax = _blockwise_absmax(chunk, blocksize)
        if chunk.numel() % blocksize:  # bitsandbytes stores a partial last block's absmax clamped to >= 1e-38
            chunk_absmax[-1:].clamp_(min=1e-38)  # (full blocks keep a raw 0; its 8-bit nested quantizer too)
        absmax[start // blocksize : start // blocksize + chunk_absmax.numel()] = chunk_absmax
        codes = _nearest_codes_4bit(_scale_blocks(chunk, chunk_absmax, blocksize), quant_type)
        if codes.numel() % 2:  # only the last chunk can be odd: pad with the code of 0.0
            codes = torch.cat([codes, codes.new_full((1,), zero_code(quant_type))])
        packed[start // 2 : start // 2 + codes.numel() // 2] = _pack(codes)

    if not torch.isfinite(absmax).all():  # max |x| propagates NaN and Inf, so this checks every element
        bad = torch.nonzero(~torch.isfinite(absmax))[0].item()
        raise ValueError(
            f"w contains NaN or Inf (first in elements {bad * blocksize}..{min(n, (bad + 1) * blocksize) - 1} "
            f"of the flattened tensor): cannot quantize"
        )

    code = code_table(quant_type).to(w.device)
    if not double_quant:
        return packed.view(-1, 1), QuantState(absmax, w.shape, w.dtype, blocksize, quant_type, code)
    offset = absmax.mean()
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
    nested = NestedState(absmax=nested_absmax, code=DYNAMIC_MAP.to(w.device), blocksize=NESTED_BLOCKSIZE)
    state = QuantState(qabsmax, w.shape, w.dtype, blocksize, quant_type, code, offset=offset, nested=nested)
    return packed.view(-1, 1), state


def quantize_blockwise_8bit(v: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a float32 vector with the signed dynamic map (double quantization).

    Per block: a = max |v|, s = v / a (float32), code = index of the exactly nearest map value to s. Tie rule:
    when s is exactly halfway between two map values, the LOWER index wins (bitsandbytes' CUDA kernel picks the
    even index; its 0.50 CPU path uses a lookup table that is not always the nearest code). Returns
    (codes uint8 (n,), absmax float32 (n_blocks,)).
    """
    n = v.numel()
    absmax = _blockwise_absmax(v, blocksize)
    scale = absmax.clamp(min=1e-38).repeat_interleave(blocksize)[:n]
    s = v / scale  # (n,) float32
    table = DYNAMIC_MAP.to(v.device)
    # Candidate from the float32 midpoints, then an exact float64 comparison with both neighbours: the float32
    # midpoint itself may be rounded, so bucketize alone can be off by one code right next to it.
    idx = torch.bucketize(s, (table[:-1] + table[1:]) / 2, right=False).clamp_(1, 254)
    s64, t64 = s.double(), table.double()

    def dist(i):
        return (t64[i] - s64).abs()

    best = torch.where(dist(idx - 1) <= dist(idx), idx - 1, idx)  # ties go to the lower index
    best = torch.where(dist(idx + 1) < dist(best), idx + 1, best)
    return best.to(torch.uint8), absmax


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes of a packed uint8 tensor, in element order (high nibble first). (n,) uint8."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n]


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo quantize_4bit: y = float32(code[c] * absmax[block]) cast to `dtype` (default: the original dtype).

    Returns a tensor of state.shape. This is the specification, written for reading: it makes float32 copies of
    the whole tensor. nf4lora.kernels.dequantize computes the same bits fast (Triton on CUDA, a chunked byte-LUT
    path on the CPU). Bit-identical to bitsandbytes.functional.dequantize_4bit on the same data.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    state.check_packed(packed)
    dtype = state.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")

    n, bs = state.numel, state.blocksize
    values = state.code[unpack_codes(packed, n).long()]  # (n,) float32
    scales = state.absmax_float32().repeat_interleave(bs)[:n]  # (n,) float32, each block's absmax
    return (values * scales).to(dtype).view(state.shape)

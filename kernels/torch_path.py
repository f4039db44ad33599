"""The torch path: 4-bit dequantization and the two matmuls of a 4-bit linear layer, in plain torch (CPU tensors).

Results are bit-identical to nf4.dequantize_4bit (tests/test_kernels_torch.py checks it); the work is organised
for speed instead of clarity:

- one gather per packed byte from a 256-entry table whose entries are the byte's two float32 values viewed as
  one int64, instead of a gather per element;
- the per-block scale is applied in place to a chunk of CHUNK_ELEMENTS float32 values that stays in L2 cache,
  and the chunk is then cast into the output, so nothing of the size of the whole weight is ever float32.

Arguments are the fields of a QuantState as plain tensors and ints (see ops.py): the custom ops cannot take the
dataclass itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# 1M elements per chunk (4 MiB of float32, in L3). Measured on the 2-core CI VM, 4096x4096 NF4+DQ -> bf16, one
# thread, CPU time: 2**15 -> 33.6 ms, 2**18 -> 25.8 ms, 2**20 -> 25.8 ms (bitsandbytes' AVX-512 kernel: 15.7 ms, of
# which ~14 ms are first-touch page faults of the fresh 32 MiB output that every implementation pays). Fewer,
# larger chunks mean fewer parallel regions (thread barriers), which cost most when the cores are shared.
# Must be a multiple of every blocksize (4096).
CHUNK_ELEMENTS = 1 << 20


def block_scales(
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    """The float32 scale of every 4-bit block (n_blocks,), decoding double quantization when nested_absmax is set.

    With double quantization absmax holds uint8 codes: scale = float32(map[code] * nested_absmax[b // 256]),
    then + offset as a separate float32 add (FORMATS.md 3.4).
    """
    if nested_absmax is None:
        return absmax
    n = absmax.numel()
    values = nested_code[absmax.long()]  # (n_blocks,) float32
    return values * nested_absmax.repeat_interleave(nested_blocksize)[:n] + offset


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: entry b holds the float32 values of byte b's high and low nibble, in that order."""
    b = torch.arange(256, device=code.device)
    pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1)  # (256, 2) float32
    return pairs.contiguous().view(torch.int64).view(256)


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
) -> torch.Tensor:
    """y = float32(code[c] * scale[block]) cast to `dtype`, of `shape`. packed: uint8, (numel + 1) // 2 bytes."""
    n = math.prod(shape)
    scales = block_scales(absmax, offset, nested_absmax, nested_code, nested_blocksize)
    table = _pair_table(code)
    src = packed.reshape(-1)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    # One chunk buffer reused by every chunk: a fresh allocation per chunk pays page faults again each time.
    pairs_buf = torch.empty(min(CHUNK_ELEMENTS, n + 1) // 2 + 1, dtype=torch.int64, device=packed.device)
    for start in range(0, n, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, n)
        idx = src[start // 2 : (stop + 1) // 2].to(torch.int32)
        pairs = torch.index_select(table, 0, idx, out=pairs_buf[: idx.numel()])  # (c/2,) int64
        values = pairs.view(torch.float32)[: stop - start]  # (c,) float32, element order preserved
        first = start // blocksize  # chunks start on a block boundary
        full = (stop - start) - (stop - start) % blocksize
        values[:full].view(-1, blocksize).mul_(scales[first : first + full // blocksize, None])
        if full < stop - start:  # the tensor's last, partial block
            values[full:].mul_(scales[first + full // blocksize])
        out[start:stop] = values
    return out.view(shape)


def matmul(x: torch.Tensor, bias: torch.Tensor | None, *state) -> torch.Tensor:
    """x (..., K) @ W.T + bias -> (..., N); W (N, K) dequantized to x.dtype, bias cast to x.dtype.

    `state` is dequantize's arguments from packed to shape (the order ops.py passes them in).
    """
    return F.linear(x, dequantize(*state, x.dtype), None if bias is None else bias.to(x.dtype))


def matmul_grad_input(dy: torch.Tensor, *state) -> torch.Tensor:
    """dy (..., N) @ W -> (..., K); W (N, K) dequantized to dy.dtype."""
    return dy @ dequantize(*state, dy.dtype)

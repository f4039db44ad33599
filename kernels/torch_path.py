"""The torch path: 4-bit dequantization and the two matmuls of a 4-bit linear layer, in plain torch (CPU tensors).

Results are bit-identical to nf4.dequantize_4bit (tests/test_kernels_torch.py checks it); the work is organised
for speed instead of clarity:

- one gather per packed byte from a 256-entry table whose entries are the byte's two float32 values viewed as
  one int64, instead of a gather per element;
- the weight is decoded in chunks of CHUNK_ELEMENTS: gather, scale in place, cast into the output, all in cache,
  so nothing of the size of the whole weight is ever float32;
- every op works on less than torch's parallel grain (32768 elements), so none opens an OpenMP parallel region.
  On the shared 2-core CI VM each region cost ~10 ms (a worker thread waiting for a core; profiled: copy_ and
  mul_ at ~11 ms per call whatever their size), i.e. 0.3-0.6 s for a 4096x4096 weight. The chunks are spread
  over torch.get_num_threads() Python threads instead (torch ops release the GIL): one wake-up per call.

Arguments are the fields of a QuantState as plain tensors and ints (see ops.py): the custom ops cannot take the
dataclass itself.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

# Elements per chunk: below torch's parallel grain (2**15) so that no op forks threads, a multiple of every
# blocksize (4096). Measured one-threaded on the CI VM, 4096x4096 NF4+DQ -> bf16, CPU time: 2**13 -> 61 ms,
# 2**14 -> 45 ms, 28672 -> ~37 ms, 2**18 -> 30 ms (per-op overhead dominates small chunks).
CHUNK_ELEMENTS = 7 * 4096

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="nf4lora-dequant")
        return _pools[workers]


def _forget_pools_after_fork() -> None:
    # A forked child has none of the parent's threads: its copies of the pools would never run a task.
    global _pools, _pools_lock
    _pools, _pools_lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def block_scales(
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    """The float32 scale of every 4-bit block (n_blocks,), decoding double quantization when nested_absmax is set.

    With double quantization absmax holds uint8 codes: scale = float32(map[code] * nested_absmax[b // 256]),
    then + offset as a separate float32 add (FORMATS.md 3.4). Computed CHUNK_ELEMENTS blocks at a time.
    """
    if nested_absmax is None:
        return absmax
    n = absmax.numel()
    scales = torch.empty(n, dtype=torch.float32, device=absmax.device)
    for first in range(0, n, CHUNK_ELEMENTS):
        count = min(CHUNK_ELEMENTS, n - first)
        values = nested_code.index_select(0, absmax[first : first + count].to(torch.int32))  # (count,) float32
        nested_first = first // nested_blocksize
        nested = nested_absmax[nested_first : (first + count - 1) // nested_blocksize + 1]
        skip = first - nested_first * nested_blocksize
        chunk = torch.mul(values, nested.repeat_interleave(nested_blocksize)[skip : skip + count], out=scales[first : first + count])
        chunk.add_(offset)
    return scales


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: entry b holds the float32 values of byte b's high and low nibble, in that order."""
    b = torch.arange(256, device=code.device)
    pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1)  # (256, 2) float32
    return pairs.contiguous().view(torch.int64).view(256)


def _dequantize_span(src, table, scales, blocksize, out, lo, hi) -> None:
    """out[lo:hi] from the packed bytes src (flat), chunk by chunk; lo is a multiple of CHUNK_ELEMENTS."""
    pairs_buf = torch.empty(min(CHUNK_ELEMENTS, hi - lo + 1) // 2 + 1, dtype=torch.int64, device=src.device)
    for start in range(lo, hi, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, hi)
        idx = src[start // 2 : (stop + 1) // 2].to(torch.int32)
        pairs = torch.index_select(table, 0, idx, out=pairs_buf[: idx.numel()])  # (c/2,) int64
        values = pairs.view(torch.float32)[: stop - start]  # (c,) float32, element order preserved
        first = start // blocksize  # chunks start on a block boundary
        full = (stop - start) - (stop - start) % blocksize
        values[:full].view(-1, blocksize).mul_(scales[first : first + full // blocksize, None])
        if full < stop - start:  # the tensor's last, partial block
            values[full:].mul_(scales[first + full // blocksize])
        out[start:stop] = values


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
    out = torch.empty(n, dtype=dtype, device=packed.device)
    args = (
        packed.reshape(-1), _pair_table(code), block_scales(absmax, offset, nested_absmax, nested_code, nested_blocksize),
        blocksize, out,
    )  # fmt: skip
    chunks = -(-n // CHUNK_ELEMENTS)
    workers = min(torch.get_num_threads(), chunks)
    if workers <= 1:
        _dequantize_span(*args, 0, n)
    else:  # contiguous spans of whole chunks, one per thread
        per = -(-chunks // workers) * CHUNK_ELEMENTS
        futures = [_pool(workers).submit(_dequantize_span, *args, lo, min(lo + per, n)) for lo in range(0, n, per)]
        for f in futures:
            f.result()
    return out.view(shape)


def matmul(x: torch.Tensor, bias: torch.Tensor | None, *state) -> torch.Tensor:
    """x (..., K) @ W.T + bias -> (..., N); W (N, K) dequantized to x.dtype, bias cast to x.dtype.

    `state` is dequantize's arguments from packed to shape (the order ops.py passes them in).
    """
    return F.linear(x, dequantize(*state, x.dtype), None if bias is None else bias.to(x.dtype))


def matmul_grad_input(dy: torch.Tensor, *state) -> torch.Tensor:
    """dy (..., N) @ W -> (..., K); W (N, K) dequantized to dy.dtype."""
    return dy @ dequantize(*state, dy.dtype)

"""The torch path: 4-bit dequantization and the two matmuls of a 4-bit linear layer, in plain torch (CPU tensors).

Results are bit-identical to nf4.dequantize_4bit (tests/test_kernels_torch.py checks it); the work is organised
for speed instead of clarity:

- one gather per packed byte from a 256-entry table whose entries are the byte's two float32 values viewed as
  one int64, instead of a gather per element;
- the weight is decoded in chunks of CHUNK_ELEMENTS: gather, scale in place, cast into the output, all in cache,
  so nothing of the size of the whole weight is ever float32;
- every op works on less than torch's parallel grain (32768 elements), so none opens an OpenMP parallel region.
  On the shared 2-core CI VM each region cost ~10 ms (a worker thread waiting for a core; profiled: copy_ and
  mul_ at ~11 ms per call whatever their size): 0.3-0.6 s for a 4096x4096 weight. Instead the chunks are split
  into torch.get_num_threads() contiguous spans decoded by Python threads (torch ops release the GIL): one
  thread wake-up per call. 4096x4096 NF4+DQ -> bf16, 2 cores: 30 ms on one thread, 19 ms on two when the
  cores are free; bitsandbytes' AVX-512 kernel: 11 ms (quiet) to 35-60 ms (cores shared with other jobs),
  where this path measured 28-49 ms (benchmarks/results/kernels-cpu.md).

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

# Elements per chunk: below torch's parallel grain (2**15) so that no op forks threads, and a multiple of every
# blocksize (4096). About half of the one-threaded time above is first-touch page faults of the fresh output
# (14 ms for 32 MiB on the CI VM), which every implementation pays.
CHUNK_ELEMENTS = 7 * 4096

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="nf4lora-dequant")
        return _pools[workers]


def _forget_pools_after_fork() -> None:
    # A forked child has none of the parent's threads: its copies of the pools would never run a task. Nor may
    # it start new ones for torch work: once the parent has used OpenMP, a torch op in a new thread of the child can
    # fail torch's "Invalid thread pool" assertion (seen with index_select). The child decodes on its own thread.
    global _pools, _pools_lock, _single_threaded
    _pools, _pools_lock, _single_threaded = {}, threading.Lock(), True


_single_threaded = False  # set in forked children (see above)
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


def _decode_into(out: torch.Tensor, src: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, blocksize: int):
    """out (n,) from the packed bytes src ((n + 1) // 2,), chunk by chunk.

    Whole chunks go through fixed views of reused buffers, four torch calls each: at ~10 us of work per call,
    Python-side slicing and allocation would otherwise cost as much as the work (measured 37 -> 28 ms).
    """
    n, c, per_chunk = out.numel(), CHUNK_ELEMENTS, CHUNK_ELEMENTS // blocksize
    idx_buf = torch.empty(c // 2, dtype=torch.int32, device=src.device)
    pairs_buf = torch.empty(c // 2, dtype=torch.int64, device=src.device)
    values = pairs_buf.view(torch.float32)  # (c,) float32: the two values of byte j at 2j, 2j + 1
    values_by_block = values.view(per_chunk, blocksize)
    whole = n // c
    src_chunks = src[: whole * c // 2].view(whole, c // 2)
    out_chunks = out[: whole * c].view(whole, c)
    scale_chunks = scales[: whole * per_chunk].view(whole, per_chunk, 1)
    for i in range(whole):
        idx_buf.copy_(src_chunks[i])
        torch.index_select(table, 0, idx_buf, out=pairs_buf)
        values_by_block.mul_(scale_chunks[i])
        out_chunks[i].copy_(values)

    start = whole * c
    if start < n:  # the last, partial chunk (odd length and a partial last block allowed)
        idx = src[start // 2 :].to(torch.int32)
        tail = torch.index_select(table, 0, idx, out=pairs_buf[: idx.numel()]).view(torch.float32)[: n - start]
        first, full = start // blocksize, (n - start) - (n - start) % blocksize
        tail[:full].view(-1, blocksize).mul_(scales[first : first + full // blocksize, None])
        if full < n - start:
            tail[full:].mul_(scales[first + full // blocksize])
        out[start:] = tail


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
    src, table = packed.reshape(-1), _pair_table(code)
    scales = block_scales(absmax, offset, nested_absmax, nested_code, nested_blocksize)
    workers = 1 if _single_threaded else min(torch.get_num_threads(), n // CHUNK_ELEMENTS)
    if workers <= 1:
        _decode_into(out, src, table, scales, blocksize)
        return out.view(shape)
    per = -(-(n // CHUNK_ELEMENTS) // workers) * CHUNK_ELEMENTS  # whole chunks per span; the last takes the tail
    spans = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
    pool = _pool(len(spans))
    futures = [
        pool.submit(_decode_into, out[lo:hi], src[lo // 2 : (hi + 1) // 2], table, scales[lo // blocksize :], blocksize)
        for lo, hi in spans
    ]
    for future in futures:
        future.result()
    return out.view(shape)


def matmul(x: torch.Tensor, bias: torch.Tensor | None, *state) -> torch.Tensor:
    """x (..., K) @ W.T + bias -> (..., N); W (N, K) dequantized to x.dtype, bias cast to x.dtype.

    `state` is dequantize's arguments from packed to shape (the order ops.py passes them in).
    """
    return F.linear(x, dequantize(*state, x.dtype), None if bias is None else bias.to(x.dtype))


def matmul_grad_input(dy: torch.Tensor, *state) -> torch.Tensor:
    """dy (..., N) @ W -> (..., K); W (N, K) dequantized to dy.dtype."""
    return dy @ dequantize(*state, dy.dtype)

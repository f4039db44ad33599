"""The torch path: 4-bit dequantization and the two matmuls of a 4-bit linear layer, in plain torch (CPU tensors).

Results are bit-identical to nf4.dequantize_4bit (tests/test_kernels_torch.py checks it); the work is organised
for speed instead of clarity. Per span of SPAN_ELEMENTS elements, through per-thread scratch buffers (reused,
so they never page-fault again):

1. the packed bytes copied to int32 (index_select's index type);
2. one gather per *byte* from a 256-entry table whose entries are the byte's two float32 code values viewed as
   one int64 (half the gathers of one per element);
3. a piece (PIECE_ELEMENTS) at a time, the multiply by the block scales, in float32, in place,
4. and one copy into the output dtype, which rounds each float32 product once: exactly the specification's
   float32(code * scale).to(dtype). A float32 output takes the product directly.

No call opens an OpenMP region: each elementwise call is below torch's parallel grain (2**15 elements), so it
runs inline on the thread that makes it, and index_select over a 1-D table is one serial loop at any size.
torch.get_num_threads() Python threads share the work instead (the caller and a pool, a contiguous range of
spans each; torch calls release the GIL). An OpenMP region ends in a barrier that waits for its slowest
thread, and on a busy machine (more runnable threads than cores) that thread is often off its core: the
earlier design, which let torch's threads split every call over chunks of 2**20 elements (~50 regions per
4096x4096 call), took 0.45-1.4 s for 4096x4096 NF4+DQ -> bf16 on the 2-core VM at load 7-9, against 34-82 ms
for this one and 43-126 ms for bitsandbytes (whose C kernel opens one region), alternating in one process.
Small calls cost ~2 us each more than large ones: on one thread this design spends ~40% more CPU time than
the earlier one.

Where the time goes: the gather (~0.7 ns a byte) about half, the rounding copy (it writes the output to
DRAM) a quarter. Two more things keep page faults out:

- Every scratch buffer and output of at least 4 MiB is advised to use transparent huge pages (Linux): a fresh
  tensor otherwise page-faults on every 4 KiB page at first write, and those faults cost more than the
  dequantization (32 MiB, the bf16 4096x4096 weight: 14-28 ms of faults against 3.6 ms with 2 MiB pages).
- The block scales of double quantization are decoded into scratch the same way (a fresh n_blocks float32
  tensor faulted ~1 ms of a 4096x4096 call).

A forked child of a process that has used OpenMP threads hangs in its first parallel region (a GNU OpenMP
limitation; DataLoader workers set one thread for that reason); none opens here, and a child works on its own
thread alone (the pool's threads do not exist in it).

Arguments are the fields of a QuantState as plain tensors and ints (see ops.py): the custom ops cannot take the
dataclass itself.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

# Elements per elementwise torch call: below torch's parallel grain (2**15) a call runs inline on the thread that
# makes it, and no OpenMP region opens (see above). A multiple of every blocksize (4096).
PIECE_ELEMENTS = 7 * 4096
# Elements per gather: index_select is one serial loop at any size, so it takes eight pieces at once.
SPAN_ELEMENTS = 8 * PIECE_ELEMENTS

_forked = False
_pool: ThreadPoolExecutor | None = None


def _note_fork() -> None:
    global _forked, _pool
    _forked, _pool = True, None  # the pool's threads do not exist in the child


os.register_at_fork(after_in_child=_note_fork)


def _on_threads(n: int, align: int, fn) -> None:
    """fn(lo, hi) over [0, n) cut into contiguous ranges at multiples of `align`, one per thread: the caller and
    torch.get_num_threads() - 1 threads of a pool (the caller alone in a forked child)."""
    units = -(-n // align)
    threads = 1 if _forked else max(1, min(torch.get_num_threads(), units))
    bounds = [min(n, units * i // threads * align) for i in range(threads + 1)]
    global _pool
    if threads > 1 and _pool is None:  # a pool starts a thread only when none of its threads is idle
        _pool = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="nf4lora-dequantize")
    others = [_pool.submit(fn, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    try:
        fn(0, bounds[1])
    finally:
        for other in others:
            other.result()


def block_scales(
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    """The float32 scale of every 4-bit block (n_blocks,), decoding double quantization when nested_absmax is set.

    With double quantization absmax holds uint8 codes: scale = float32(map[code] * nested_absmax[b // 256]),
    then + offset as a separate float32 add (docs/formats.md 3.4), into the calling thread's "scales" scratch
    buffer (valid until its next call).
    """
    if nested_absmax is None:
        return absmax
    n = absmax.numel()
    scales = _scratch("scales", n * 4, absmax.device).view(torch.float32)
    decode = functools.partial(_decode_scales, absmax, offset, nested_absmax, nested_code, nested_blocksize, scales)
    _on_threads(n, PIECE_ELEMENTS, decode)
    return scales


def _decode_scales(absmax, offset, nested_absmax, nested_code, nested_blocksize, scales, lo: int, hi: int) -> None:
    """scales[lo:hi], a piece at a time; lo is a multiple of PIECE_ELEMENTS, so of nested_blocksize."""
    codes = _scratch("scale_codes", PIECE_ELEMENTS * 4, absmax.device).view(torch.int32)
    for first in range(lo, hi, PIECE_ELEMENTS):
        count = min(PIECE_ELEMENTS, hi - first)
        part, nested = scales[first : first + count], nested_absmax[first // nested_blocksize :]
        codes[:count].copy_(absmax[first : first + count])
        torch.index_select(nested_code, 0, codes[:count], out=part)
        full = count // nested_blocksize * nested_blocksize  # only the last nested block can be partial
        part[:full].view(-1, nested_blocksize).mul_(nested[: full // nested_blocksize, None])
        if full < count:
            part[full:].mul_(nested[full // nested_blocksize])
        part.add_(offset)


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: entry b holds the float32 values of byte b's high and low nibble, in that order.

    Built once per code table and device (17 us a build; the key, the table's bits, takes 0.5 us): a 576x576
    weight dequantizes in ~160 us. Meta tensors have no values to key on."""
    if code.is_meta:
        return _build_pair_table(code)
    return _cached_pair_table(tuple(code.view(torch.int32).tolist()), code.device)


@functools.lru_cache(maxsize=16)
def _cached_pair_table(code_bits: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return _build_pair_table(torch.tensor(code_bits, dtype=torch.int32, device=device).view(torch.float32))


def _build_pair_table(code: torch.Tensor) -> torch.Tensor:
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = float32(code[c] * scale[block]) cast to `dtype`, of `shape`. packed: uint8, (numel + 1) // 2 bytes.

    `out`, if given, is a contiguous tensor of numel(shape) elements of `dtype` to write into (the matmuls below
    pass their workspace)."""
    n = math.prod(shape)
    if out is None:
        out = _advise_huge_pages(torch.empty(n, dtype=dtype, device=packed.device))
    scales = block_scales(absmax, offset, nested_absmax, nested_code, nested_blocksize)
    src, table = packed.reshape(-1), _pair_table(code)
    _on_threads(n, SPAN_ELEMENTS, functools.partial(_dequantize_range, src, table, scales, blocksize, out.view(-1)))
    return out.view(shape)


def _dequantize_range(src, table, scales, blocksize: int, out, lo: int, hi: int) -> None:
    """out[lo:hi] from the packed bytes src, a span at a time through this thread's scratch; lo is a multiple of
    SPAN_ELEMENTS, so only the range that ends the tensor can end in a partial span, piece or block."""
    codes = _scratch("codes", SPAN_ELEMENTS // 2 * 4, src.device).view(torch.int32)
    pairs = _scratch("pairs", SPAN_ELEMENTS // 2 * 8, src.device).view(torch.int64)
    for start in range(lo, hi, SPAN_ELEMENTS):
        end = min(hi, start + SPAN_ELEMENTS)
        count = (end - start + 1) // 2  # packed bytes
        for first in range(0, count, PIECE_ELEMENTS):  # PIECE_ELEMENTS bytes: two pieces' worth
            last = min(count, first + PIECE_ELEMENTS)
            codes[first:last].copy_(src[start // 2 + first : start // 2 + last])
        torch.index_select(table, 0, codes[:count], out=pairs[:count])
        values = pairs.view(torch.float32)[: end - start]  # an odd n leaves the pad nibble out
        _scale_into(values, scales[start // blocksize :], blocksize, out[start:end])


def _scale_into(values, scales, blocksize: int, out) -> None:
    """out = float32(values * scales[block]) rounded once to out.dtype, a piece per call. values (m,) float32
    starts at a block boundary; scales[0] is its first block's scale."""
    full = values.numel() // blocksize * blocksize
    rows = PIECE_ELEMENTS // blocksize
    pieces = zip(
        values[:full].view(-1, blocksize).split(rows),
        scales[: full // blocksize, None].split(rows),
        out[:full].view(-1, blocksize).split(rows),
    )
    to_float32 = out.dtype == torch.float32
    for v, s, o in pieces:  # (rows, blocksize), (rows, 1), (rows, blocksize)
        if to_float32:
            torch.mul(v, s, out=o)
        else:  # the float32 product in place, then rounded to nearest even into bf16/fp16 (the specification's
            o.copy_(v.mul_(s))  # .to(dtype); torch.mul with a 16-bit out= allocates a float32 temporary for it)
    if full < values.numel():  # the tensor's last, partial block
        tail, scale, tail_out = values[full:], scales[full // blocksize], out[full:]
        if to_float32:
            torch.mul(tail, scale, out=tail_out)
        else:
            tail_out.copy_(tail.mul_(scale))


# madvise(2) advice value (Linux) and the x86-64 / arm64 transparent huge page size.
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _advise_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask Linux to back the 2 MiB-aligned part of t's (untouched) memory with transparent huge pages; returns t.

    A no-op elsewhere, for tensors under two huge pages, or where THP is off (madvise then fails, and that is
    fine). It changes no value and nothing outside t's own pages."""
    if _libc is None or t.device.type != "cpu" or t.nbytes < 2 * _HUGE_PAGE:
        return t
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    return t


_workspace = threading.local()


def _scratch(name: str, nbytes: int, device: torch.device) -> torch.Tensor:
    """At least `nbytes` bytes (uint8) of this thread's buffer `name`, kept for reuse by later calls.

    A fresh 32 MiB or larger tensor is a new mmap for glibc malloc, and smaller ones come back from the OS too
    once malloc trims its heap: writing them first page-faults every 4 KiB page. Reused buffers never fault
    again. Each buffer keeps the largest size asked for, for the thread's lifetime."""
    buf = getattr(_workspace, name, None)
    if buf is None or buf.numel() < nbytes or buf.device != device:
        buf = _advise_huge_pages(torch.empty(nbytes, dtype=torch.uint8, device=device))
        setattr(_workspace, name, buf)
    return buf[:nbytes]


def _scratch_weight(state: tuple, dtype: torch.dtype) -> torch.Tensor:
    """W dequantized into this thread's "weight" scratch, reused by every matmul below, for a weight that lives
    only inside one call: about one layer's 16-bit weight kept for the thread's lifetime. NF4+DQ -> bf16 took
    19.5-19.9 ms into a new tensor and 9.4 ms into the reused one for 4096x4096, 49-54 ms and 24 ms for 11008x4096
    (2-core VM, same process)."""
    shape, device = state[-1], state[0].device
    return dequantize(*state, dtype, out=_scratch("weight", math.prod(shape) * dtype.itemsize, device).view(dtype))


def matmul(x: torch.Tensor, bias: torch.Tensor | None, *state) -> torch.Tensor:
    """x (..., K) @ W.T + bias -> (..., N); W (N, K) dequantized to x.dtype, bias cast to x.dtype.

    `state` is dequantize's arguments from packed to shape (the order ops.py passes them in).
    """
    return F.linear(x, _scratch_weight(state, x.dtype), None if bias is None else bias.to(x.dtype))


def matmul_grad_input(dy: torch.Tensor, *state) -> torch.Tensor:
    """dy (..., N) @ W -> (..., K); W (N, K) dequantized to dy.dtype."""
    return dy @ _scratch_weight(state, dy.dtype)

"""The torch path: 4-bit dequantization and the two matmuls of a 4-bit linear layer, in plain torch (CPU tensors).

Results are bit-identical to nf4.dequantize_4bit (tests/test_kernels_torch.py checks it); the work is organised
for speed instead of clarity. torch.get_num_threads() Python threads share a call, a contiguous range of blocks
each (the caller and a pool; torch calls release the GIL), and each works through its range a span at a time,
through per-thread scratch buffers (reused, so they never page-fault again):

1. the packed bytes copied to int32 (index_select's index type);
2. one gather per *byte* from a 256-entry table whose entries are the byte's two float32 code values viewed as
   one int64 (half the gathers of one per element);
3. the multiply by the block scales, in float32, in place,
4. and one copy into the output dtype, which rounds each float32 product once: exactly the specification's
   float32(code * scale).to(dtype). A float32 output takes the product directly.

No call opens an OpenMP region: each thread runs its range with its own OpenMP thread count set to 1
(`_serial_torch`: omp_set_num_threads sets the calling thread's count only, and is restored after), so every torch
call in it runs inline, and a span is one piece of up to 2**20 elements (a few dozen calls for a 4096x4096 weight).
An OpenMP region ends in a barrier that waits for its slowest thread, and on a busy machine (more runnable
threads than cores) that thread is often off its core: a design that let torch's threads split three calls per
2**20-element chunk (~50 regions for 4096x4096) paid 7-20 ms per region at load average 4-10 on the 2-core VM
(0.79-1.08 s for that weight, against 92-104 ms for bitsandbytes, whose C kernel opens one region). On the idle
VM, 4096x4096 NF4+DQ -> bf16 into a reused buffer: 5.9-6.2 ms on two threads, 10.6 ms on one; bitsandbytes
10.3-12.8 ms into its fresh output (benchmarks/results/quant-cpu.md times both with fresh outputs).
Where torch's OpenMP runtime cannot be reached (`_openmp_runtime`: not Linux, or a torch build without
OpenMP), the threads keep every elementwise call below torch's parallel grain (2**15 elements) instead, 8 pieces
per gather: the same values, at about twice the time on two threads (~1600 short calls for 4096x4096).

Where the time goes on one thread: the gather (~0.7 ns a byte) ~40%, the rounding copy (it writes the output
to DRAM) ~20%, the multiply ~12%. Two more things keep page faults out:

- Every scratch buffer and output of at least 4 MiB is advised to use transparent huge pages (Linux): a fresh
  tensor otherwise page-faults on every 4 KiB page at first write, and those faults cost more than the
  dequantization (32 MiB, the bf16 4096x4096 weight: 14-28 ms of faults against 3.6 ms with 2 MiB pages).
- The block scales of double quantization are decoded into scratch the same way (a fresh n_blocks float32
  tensor faulted ~1 ms of a 4096x4096 call).

A forked child of a process that has used OpenMP threads hangs in its first parallel region (a GNU OpenMP
limitation; DataLoader workers set one thread for that reason): none opens here, and a child works on its own
thread alone (the pool's threads do not exist in it).

Arguments are the fields of a QuantState as plain tensors and ints (see ops.py): the custom ops cannot take the
dataclass itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

# Without _serial_torch (no OpenMP runtime found): an elementwise torch call with fewer elements than this (torch's
# at::internal::GRAIN_SIZE) runs inline on the calling thread; from this many on, torch's OpenMP threads split it.
PARALLEL_GRAIN = 1 << 15
# Pieces per gather: index_select is one serial loop at any size, so one call gathers several pieces.
PIECES_PER_SPAN = 8
# Where the thread's torch calls run inline at any size (one OpenMP thread): elements per piece there, one piece
# per gather.
ONE_THREAD_PIECE = 1 << 20
# The least work worth another thread, in elements (~0.6 ms on one thread): handing a range to the pool and
# waiting for it cost 0.15-0.4 ms on the idle 2-core VM (1536x576 NF4+DQ -> bf16: 0.53 ms on one thread, 0.93 ms
# split over two), while 4096x4096 took 6-9 ms on two threads against 10.6-11.9 ms on one.
MIN_RANGE = 1 << 20

# Threads start on first use, one per range beyond the caller's (a pool starts one only when none is idle).
_pool = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="nf4lora-dequantize")
_forked = False


def _note_fork() -> None:
    global _forked
    _forked = True  # the pool's threads do not exist in the child: it works alone


os.register_at_fork(after_in_child=_note_fork)


def _on_threads(n: int, align: int, fn) -> None:
    """fn(lo, hi) over [0, n) cut into contiguous ranges of about equal length (MIN_RANGE or more) at multiples
    of `align`: one per thread, the caller's and up to torch.get_num_threads() - 1 of the pool's (the caller
    alone in a forked child)."""
    units = -(-n // align)
    threads = 1 if _forked else max(1, min(torch.get_num_threads(), n // MIN_RANGE, units))
    bounds = [min(n, units * i // threads * align) for i in range(threads + 1)]
    # A pool thread starts outside inference mode, where torch refuses writes into tensors made inside it (the
    # caller's output and scratch, when the caller runs under torch.inference_mode()): it enters the caller's mode.
    pooled = functools.partial(_in_inference_mode, fn) if threads > 1 and torch.is_inference_mode_enabled() else fn
    others = [_pool.submit(_serially, pooled, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    try:
        _serially(fn, 0, bounds[1])
    finally:
        for other in others:
            other.result()


def _serially(fn, lo: int, hi: int) -> None:
    with _serial_torch():
        fn(lo, hi)


@contextlib.contextmanager
def _serial_torch():
    """Inside, torch calls made by this thread run on it alone (torch.get_num_threads() reads 1 here); other
    threads keep their settings. A no-op where _openmp_runtime finds nothing."""
    omp = _openmp_runtime()
    if omp is None:
        yield
        return
    torch.get_num_threads()  # torch sets a thread's OpenMP count at its first call: let that happen before ours
    before = omp.omp_get_max_threads()
    omp.omp_set_num_threads(1)
    try:
        yield
    finally:
        omp.omp_set_num_threads(before)


@functools.cache
def _openmp_runtime():
    """The OpenMP runtime torch's CPU kernels use (ctypes), or None: the omp_* functions as libtorch_cpu resolves
    them (dlsym through a library's handle searches its dependencies; another libgomp may be loaded too), kept
    only if setting this thread's count there changes what torch.get_num_threads() reads."""
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not sys.platform.startswith("linux") or not os.path.exists(library):
        return None
    try:
        omp = ctypes.CDLL(library)
        omp.omp_set_num_threads.argtypes, omp.omp_get_max_threads.restype = (ctypes.c_int,), ctypes.c_int
    except (OSError, AttributeError):
        return None
    before = torch.get_num_threads()
    omp.omp_set_num_threads(before + 1)
    works = torch.get_num_threads() == before + 1
    omp.omp_set_num_threads(before)
    return omp if works else None


def _in_inference_mode(fn, lo: int, hi: int) -> None:
    with torch.inference_mode():
        fn(lo, hi)


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
    _on_threads(n, nested_blocksize, decode)
    return scales


def _decode_scales(absmax, offset, nested_absmax, nested_code, nested_blocksize, scales, lo: int, hi: int) -> None:
    """scales[lo:hi], a piece at a time; lo is a multiple of nested_blocksize."""
    piece, _ = _pieces(nested_blocksize)
    codes = _scratch("scale_codes", piece * 4, absmax.device).view(torch.int32)
    for first in range(lo, hi, piece):
        count = min(piece, hi - first)
        part, nested = scales[first : first + count], nested_absmax[first // nested_blocksize :]
        codes[:count].copy_(absmax[first : first + count])
        torch.index_select(nested_code, 0, codes[:count], out=part)
        full = count // nested_blocksize * nested_blocksize  # only the last nested block can be partial
        part[:full].view(-1, nested_blocksize).mul_(nested[: full // nested_blocksize, None])
        if full < count:
            part[full:].mul_(nested[full // nested_blocksize])
        part.add_(offset)


def _piece_elements(blocksize: int) -> int:
    """Elements per elementwise call: the most whole blocks below the parallel grain (28672 to 32736)."""
    return (PARALLEL_GRAIN - 1) // blocksize * blocksize


def _pieces(blocksize: int) -> tuple[int, int]:
    """(elements per elementwise call, pieces per gather) on this thread: the most whole blocks below
    ONE_THREAD_PIECE, one per gather, where its torch calls run inline (one thread: inside _serial_torch, or
    torch set to one thread), else _piece_elements and PIECES_PER_SPAN."""
    if torch.get_num_threads() > 1:
        return _piece_elements(blocksize), PIECES_PER_SPAN
    return (ONE_THREAD_PIECE - 1) // blocksize * blocksize, 1


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
    _on_threads(n, blocksize, functools.partial(_dequantize_range, src, table, scales, blocksize, out.view(-1)))
    return out.view(shape)


def _dequantize_range(src, table, scales, blocksize: int, out, lo: int, hi: int) -> None:
    """out[lo:hi] from the packed bytes src, a span at a time through this thread's scratch. lo is a multiple of
    the blocksize (so even): only the range that ends the tensor can end inside a block."""
    piece, per_span = _pieces(blocksize)
    rows, span = piece // blocksize, per_span * piece
    codes = _scratch("codes", span // 2 * 4, src.device).view(torch.int32)  # one per packed byte
    pairs = _scratch("pairs", span // 2 * 8, src.device).view(torch.int64)  # two float32 values per packed byte
    full = lo + (hi - lo) // blocksize * blocksize  # where the whole blocks end
    # This range's views, made once: packed bytes a span each, block scales (rows, 1) and output blocks
    # (rows, blocksize) a piece each
    byte_spans = src[lo // 2 : full // 2].split(span // 2)
    scale_pieces = scales[lo // blocksize : full // blocksize, None].split(rows)
    out_pieces = out[lo:full].view(-1, blocksize).split(rows)
    for i, packed in enumerate(byte_spans):
        count = packed.numel()
        for codes_piece, packed_piece in zip(codes[:count].split(piece), packed.split(piece)):
            codes_piece.copy_(packed_piece)
        torch.index_select(table, 0, codes[:count], out=pairs[:count])
        value_pieces = pairs[:count].view(torch.float32).view(-1, blocksize).split(rows)
        first, last = i * per_span, (i + 1) * per_span
        for values, scale, out_piece in zip(value_pieces, scale_pieces[first:last], out_pieces[first:last]):
            _scale(values, scale, out_piece)
    if full < hi:  # the tensor's last, partial block; an odd n leaves the pad nibble out
        count = (hi - full + 1) // 2
        codes[:count].copy_(src[full // 2 : full // 2 + count])
        torch.index_select(table, 0, codes[:count], out=pairs[:count])
        _scale(pairs.view(torch.float32)[: hi - full], scales[full // blocksize], out[full:hi])


def _scale(values, scale, out) -> None:
    """out = float32(values * scale), rounded once to out.dtype; values is float32 scratch."""
    if out.dtype == torch.float32:
        torch.mul(values, scale, out=out)
    else:  # the product in place, then rounded to nearest even into bf16/fp16 (the specification's .to(dtype);
        out.copy_(values.mul_(scale))  # torch.mul with a 16-bit out= allocates a float32 temporary for it)


# madvise(2) advice value (Linux) and the x86-64 / arm64 transparent huge page size.
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
_HUGE_PAGE = 2 << 20
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _advise_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask Linux to back the 2 MiB-aligned part of t's (untouched) memory with transparent huge pages, and fault
    that part in at once (MADV_POPULATE_WRITE, Linux 5.14+); returns t.

    Faulted in on first write instead, by two threads at once, a fresh 32 MiB output took 8-46 ms (bimodal, the
    huge-page faults stalling each other) for 4096x4096 NF4+DQ -> bf16 on the idle 2-core VM; populated first,
    9.0-10.9 ms (bitsandbytes 9.3-13.3 ms, on 4 KiB pages). A no-op elsewhere, for tensors under two huge pages,
    where THP is off, or on kernels without MADV_POPULATE_WRITE (madvise then fails, and that is fine: the pages
    fault on first write as before). It changes no value and nothing outside t's own pages."""
    if _libc is None or t.device.type != "cpu" or t.nbytes < 2 * _HUGE_PAGE:
        return t
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    for advice in (_MADV_HUGEPAGE, _MADV_POPULATE_WRITE):
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)
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
    only inside one call: about one layer's 16-bit weight kept for the thread's lifetime. A fresh tensor pays its
    first-touch faults even on huge pages: NF4+DQ -> bf16 on one thread took 18.7 ms of CPU time into a new
    tensor and 15.5 ms into the reused one for 4096x4096, 49.8 and 41.0 ms for 11008x4096 (2-core VM)."""
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

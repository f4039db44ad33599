"""The torch path: 4-bit dequantization and the two matmuls of a 4-bit linear layer, in plain torch (CPU tensors).

Results are bit-identical to nf4.dequantize_4bit (tests/test_kernels_torch.py checks it); the work is organised
for speed instead of clarity. Per chunk of CHUNK_ELEMENTS elements, four torch calls into per-thread scratch
buffers (no fresh tensor, so no page faults):

1. the packed bytes copied to int32 (index_select's index type);
2. one gather per *byte* from a 256-entry table whose entries are the byte's two float32 code values viewed as
   one int64 (half the gathers of one per element);
3. the multiply by the block scales, in float32, in place;
4. one copy into the output dtype, which rounds each float32 product once: exactly the specification's
   float32(code * scale).to(dtype). (torch.mul with a bf16 `out=` does the same through a hidden float32
   temporary of its own.)

Chunks bound the float32 temporaries (4 MiB) and are large enough for torch's own intra-op threads to split
each call. Measured on the 2-core CI VM (idle), NF4+DQ -> bf16: 576x576 in 0.16-0.25 ms, 1536x576 in 0.38-0.48
ms, 4096x4096 in 11-19 ms; the earlier design (28672-element chunks spread over Python threads, to keep every op
below torch's parallel grain) took 0.85, 1.34 and 18-28 ms, and bitsandbytes' AVX-512 kernel 0.54, 1.27 and
22-34 ms through its Python entry point. In the QLoRA training step (SmolLM2-135M, 417 dequantizations per
step), 0.37 s per step against 0.46 s for the earlier design, alternating in one process. The cost of waking
OpenMP's worker thread varies on a shared VM, and for minutes at a time 4096x4096 took 34-51 ms here against a
steady 28 ms for the earlier design, which opened no OpenMP region.

A forked child of a process that has used OpenMP threads hangs in its first parallel region (a GNU OpenMP
limitation; DataLoader workers set one thread for that reason). A child that dequantizes with more than one
thread therefore uses chunks below torch's parallel grain, which run inline on its own thread.

Arguments are the fields of a QuantState as plain tensors and ints (see ops.py): the custom ops cannot take the
dataclass itself.
"""

from __future__ import annotations

import math
import os
import threading

import torch
import torch.nn.functional as F

# Elements per chunk: a multiple of every blocksize (4096).
CHUNK_ELEMENTS = 1 << 20
# Below torch's parallel grain (2**15): what a forked child uses (see above).
INLINE_CHUNK_ELEMENTS = 7 * 4096

_forked = False


def _note_fork() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_note_fork)


def block_scales(
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    """The float32 scale of every 4-bit block (n_blocks,), decoding double quantization when nested_absmax is set.

    With double quantization absmax holds uint8 codes: scale = float32(map[code] * nested_absmax[b // 256]),
    then + offset as a separate float32 add (docs/formats.md 3.4). Computed _chunk_elements() blocks at a time.
    """
    if nested_absmax is None:
        return absmax
    n, chunk = absmax.numel(), _chunk_elements()
    scales = torch.empty(n, dtype=torch.float32, device=absmax.device)
    for first in range(0, n, chunk):
        count = min(chunk, n - first)
        values = nested_code.index_select(0, absmax[first : first + count].to(torch.int32))  # (count,) float32
        nested_first = first // nested_blocksize
        nested = nested_absmax[nested_first : (first + count - 1) // nested_blocksize + 1]
        skip = first - nested_first * nested_blocksize
        per_block = nested.repeat_interleave(nested_blocksize)[skip : skip + count]
        torch.mul(values, per_block, out=scales[first : first + count]).add_(offset)
    return scales


def _chunk_elements() -> int:
    return INLINE_CHUNK_ELEMENTS if _forked and torch.get_num_threads() > 1 else CHUNK_ELEMENTS


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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = float32(code[c] * scale[block]) cast to `dtype`, of `shape`. packed: uint8, (numel + 1) // 2 bytes.

    `out`, if given, is a contiguous tensor of numel(shape) elements of `dtype` to write into (the matmuls below
    pass their workspace)."""
    n, chunk = math.prod(shape), _chunk_elements()
    if out is None:
        out = torch.empty(n, dtype=dtype, device=packed.device)
    out = out.view(-1)
    src, table = packed.reshape(-1), _pair_table(code)
    scales = block_scales(absmax, offset, nested_absmax, nested_code, nested_blocksize)
    # The chunk's temporaries live in this thread's scratch: fresh multi-MiB tensors page-fault on first write
    # whenever malloc has handed their memory back to the OS (see _scratch).
    n_bytes = (min(n, chunk) + 1) // 2
    codes = _scratch("codes", n_bytes * 4, packed.device).view(torch.int32)
    pairs = _scratch("pairs", n_bytes * 8, packed.device).view(torch.int64)
    for start in range(0, n, chunk):  # chunk is a multiple of blocksize: only the last block can be partial
        end = min(n, start + chunk)
        count = (end - start + 1) // 2
        codes[:count].copy_(src[start // 2 : start // 2 + count])
        torch.index_select(table, 0, codes[:count], out=pairs[:count])
        values = pairs[:count].view(torch.float32)[: end - start]  # an odd n leaves the pad nibble out
        full = (end - start) // blocksize * blocksize
        first = start // blocksize
        # float32 output takes the product directly; a 16-bit one gets the float32 product (in place, in the
        # scratch) rounded once into it
        target = out[start:end] if dtype == torch.float32 else values
        torch.mul(
            values[:full].view(-1, blocksize),
            scales[first : first + full // blocksize, None],
            out=target[:full].view(-1, blocksize),
        )
        if full < end - start:
            torch.mul(values[full:], scales[first + full // blocksize], out=target[full:])
        if target is values:
            out[start:end].copy_(values)  # float32 -> bf16/fp16, round to nearest even
    return out.view(shape)


_workspace = threading.local()


def _scratch(name: str, nbytes: int, device: torch.device) -> torch.Tensor:
    """At least `nbytes` bytes (uint8) of this thread's buffer `name`, kept for reuse by later calls.

    A fresh 32 MiB or larger tensor is a new mmap for glibc malloc, and smaller ones come back from the OS too
    once malloc trims its heap: writing them first page-faults every 4 KiB page. Reused buffers never fault
    again. Each buffer keeps the largest size asked for, for the thread's lifetime."""
    buf = getattr(_workspace, name, None)
    if buf is None or buf.numel() < nbytes or buf.device != device:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
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

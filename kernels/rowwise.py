"""Launch settings shared by the row-wise Triton kernels of the decoder (rmsnorm.py, rope.py, glu.py,
cross_entropy.py): each program owns whole rows of a (rows, width) tensor, so the block covers a row (or a
tile of it) and the warps follow the block size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import INTERPRETED

# Programs that reduce a weight gradient over rows (RMSNorm's dweight): each writes one float32 partial row, the
# launcher sums them. On a GPU a few per SM keep every SM busy with few partials; the interpreter runs programs
# one after another, so fewer are faster there.
PROGRAMS_PER_SM = 2
INTERPRETER_PROGRAMS = 4


def warps_for(block: int) -> int:
    """Warps for a program whose tile has `block` elements: 4 up to 2K, then 8, 16 and 32 (as the Triton
    layer-norm tutorial and Liger-Kernel size them; one row of 2048-8192 bf16 values per program)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def reduction_programs(t: torch.Tensor, rows: int) -> int:
    """How many programs share `rows` rows when each writes one partial sum (at least one, at most rows)."""
    if t.is_cuda and not INTERPRETED:
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(t.device).multi_processor_count
    else:
        target = INTERPRETER_PROGRAMS
    return max(1, min(rows, target))


def rows_of(t: torch.Tensor, width: int) -> torch.Tensor:
    """t (..., width) as a (rows, width) view with unit stride along the row (a copy only if needed)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(1) == 1 or width == 1 else t2.contiguous()


def next_block(width: int) -> int:
    return triton.next_power_of_2(max(width, 1))


@triton.jit
def tanh(z):
    """float32 tanh from exp (triton.language has none on every version). |z| is clamped to 15, where tanh is
    1.0 in float32, so exp never overflows."""
    return 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(tl.maximum(z, -15.0), 15.0)) + 1.0)

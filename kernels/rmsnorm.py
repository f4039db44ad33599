"""RMSNorm in Triton, forward and backward, in the two orders of operations the model families use:

    LLaMA:  y = weight * (x * rstd).to(x.dtype)          in the promoted dtype of weight and x
    Gemma:  y = (x * rstd * (1 + weight)).to(x.dtype)    everything in float32, rounded once (unit_offset=True)

with rstd = 1 / sqrt(mean(x^2) + eps) in float32 over the last dimension. model_ops.rms_norm_torch is the torch
reference (and the CPU path); the tests compare both with transformers' LlamaRMSNorm and GemmaRMSNorm.

The forward keeps rstd (one float32 per row) for the backward, which recomputes the normalised row from x
instead of storing it. The weight gradient is a sum over rows: each backward program accumulates its rows into
one float32 partial row and the launcher adds the partials (Liger-Kernel's scheme).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import check_triton_device, round_to
from .rowwise import next_block, reduction_programs, rows_of, warps_for


@triton.jit
def _rmsnorm_forward_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, H, eps,
    UNIT_OFFSET: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """One row per program: y[row] and rstd[row]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    if UNIT_OFFSET:
        y = x * rstd * (1.0 + w)
    else:
        # The normalised row is rounded to x's dtype first; its product with a 16-bit weight is exact in float32,
        # so the one rounding below gives torch's weight * normed bit for bit.
        y = w * round_to(x * rstd, x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, round_to(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_backward_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, stride_dy, stride_x, stride_dx, n_rows, rows_per_program, H,
    UNIT_OFFSET: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """dx for rows_per_program consecutive rows, and their float32 partial sum of dweight (one row of dw_ptr).

    With n = x * rstd and g the gradient reaching n (dy * weight, or dy * (1 + weight)):
    dx = rstd * (g - n * mean(g * n)).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        # the last program's range may end past the last row; the row test is broadcast by hand (triton 3.9's
        # interpreter rejects a scalar mask combined with a vector one)
        row_mask = mask & (tl.zeros_like(cols) + row < n_rows)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=row_mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=row_mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
        n = x * rstd
        if UNIT_OFFSET:
            g = dy * (1.0 + w)
            dw += dy * n
        else:
            # torch hands the float32 part of the graph dy * weight rounded to x's dtype (the normalised row's)
            g = round_to(dy * w, x_ptr.dtype.element_ty).to(tl.float32)
            dw += dy * round_to(n, x_ptr.dtype.element_ty).to(tl.float32)
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / H))
        tl.store(dx_ptr + row * stride_dx + cols, round_to(dx, dx_ptr.dtype.element_ty), mask=row_mask)
    tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    check_triton_device(x, "x")
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must have shape ({x.shape[-1] if x.dim() else '?'},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")  # fmt: skip
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}: move both to one device")
    return x.shape[-1]


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool):
    """Launcher: (y shaped like x, rstd (rows,) float32). y's dtype is x's for Gemma, else promote(weight, x)."""
    H = _check(x, weight)
    x2 = rows_of(x, H)
    out_dtype = x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        block = next_block(H)
        _rmsnorm_forward_kernel[(x2.shape[0],)](
            x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), H, eps,
            UNIT_OFFSET=unit_offset, BLOCK_H=block, num_warps=warps_for(block),
        )  # fmt: skip
    return y.view(*x.shape[:-1], H), rstd


def rms_norm_backward(dy, x, weight, rstd, unit_offset: bool, weight_grad: bool = True):
    """Launcher: (dx like x, dweight like weight, or None without weight_grad)."""
    H = _check(x, weight)
    x2, dy2 = rows_of(x, H), rows_of(dy, H)
    rows = x2.shape[0]
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    programs = reduction_programs(x, rows)
    partial = torch.zeros((programs, H), dtype=torch.float32, device=x.device)  # (programs, H)
    if rows:
        block = next_block(H)
        _rmsnorm_backward_kernel[(programs,)](
            dy2, x2, weight.contiguous(), rstd, dx, partial, dy2.stride(0), x2.stride(0), dx.stride(0),
            rows, triton.cdiv(rows, programs), H, UNIT_OFFSET=unit_offset, BLOCK_H=block, num_warps=warps_for(block),
        )  # fmt: skip
    dw = partial.sum(0).to(weight.dtype) if weight_grad else None
    return dx.view(x.shape), dw


class RMSNorm(torch.autograd.Function):
    """rms_norm_forward / rms_norm_backward under autograd: x (..., H) and weight (H,) get gradients."""

    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        y, rstd = rms_norm_forward(x, weight, eps, unit_offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.unit_offset = unit_offset
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd, ctx.unit_offset, weight_grad=ctx.needs_input_grad[1])
        return dx if ctx.needs_input_grad[0] else None, dw, None, None

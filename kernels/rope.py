"""Rotary position embeddings in Triton, forward and backward, in Hugging Face's rotate_half layout: dimension i
of a head pairs with i + head_dim/2.

    y = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[half:], x[:half])

cos and sin (B, T, head_dim) come from the caller (models/rope.py computes them in float32 for every rope style
the model supports: the styles differ only in their frequencies); model_ops.apply_rope_torch is the reference.
Each product is rounded to the output dtype before the sum, as torch's two multiplies and add do, and products
of 16-bit values are exact in float32: the kernel's output is torch's bit for bit. The backward is the same
rotation by the opposite angle (for each half, its own sin half):

    dx[:half] = dy[:half] * cos[:half] + dy[half:] * sin[half:]
    dx[half:] = dy[half:] * cos[half:] - dy[:half] * sin[:half]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import check_triton_device, round_to
from .rowwise import next_block, warps_for


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, T, n_heads, half,
    sxb, sxh, sxt, sxd, syb, syh, syt, syd, scb, sct, scd,
    BACKWARD: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """One (batch, position) per program: every head of x[b, :, t, :] rotated by that position's cos/sin."""
    pid = tl.program_id(0)
    b, t = (pid // T).to(tl.int64), (pid % T).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS).to(tl.int64)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (d < half)
    c_row = cos_ptr + b * scb + t * sct  # cos and sin share their strides (the launcher checks)
    s_row = sin_ptr + b * scb + t * sct
    c1 = tl.load(c_row + d * scd, mask=d < half, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + (d + half) * scd, mask=d < half, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + d * scd, mask=d < half, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + (d + half) * scd, mask=d < half, other=0.0).to(tl.float32)
    x_row = x_ptr + b * sxb + t * sxt + heads * sxh
    x1 = tl.load(x_row + d * sxd, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_HEADS, BLOCK_HALF)
    x2 = tl.load(x_row + (d + half) * sxd, mask=mask, other=0.0).to(tl.float32)
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    if BACKWARD:
        y1 = round_to(x1 * c1, DTYPE).to(tl.float32) + round_to(x2 * s2, DTYPE).to(tl.float32)
        y2 = round_to(x2 * c2, DTYPE).to(tl.float32) - round_to(x1 * s1, DTYPE).to(tl.float32)
    else:
        y1 = round_to(x1 * c1, DTYPE).to(tl.float32) - round_to(x2 * s1, DTYPE).to(tl.float32)
        y2 = round_to(x2 * c2, DTYPE).to(tl.float32) + round_to(x1 * s2, DTYPE).to(tl.float32)
    y_row = y_ptr + b * syb + t * syt + heads * syh
    tl.store(y_row + d * syd, round_to(y1, DTYPE), mask=mask)
    tl.store(y_row + (d + half) * syd, round_to(y2, DTYPE), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_triton_device(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (batch, heads, seq, head_dim), got {tuple(x.shape)}")
    B, _, T, hd = x.shape
    if hd % 2:
        raise ValueError(f"head_dim must be even for rotate_half, got {hd}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (T, hd):
            raise ValueError(
                f"{name} must have shape ({B} or 1, {T}, {hd}) for x {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move both to one device")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """Launcher: x (B, heads, T, hd), any strides, rotated by cos/sin (B or 1, T, hd); backward=True applies the
    transposed rotation (the gradient). The output has x's layout and the promoted dtype of x and cos/sin."""
    _check(x, cos, sin)
    B, n_heads, T, hd = x.shape
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    dtype = torch.promote_types(x.dtype, cos.dtype)
    y = torch.empty_like(x, dtype=dtype)  # keeps x's layout (q/k come as transposed views of a projection)
    if x.numel():
        block_heads, block_half = next_block(n_heads), next_block(hd // 2)
        cb = cos.stride(0) if cos.shape[0] == B else 0  # broadcast over the batch
        _rope_kernel[(B * T,)](
            x, cos, sin, y, T, n_heads, hd // 2, *x.stride(), *y.stride(), cb, cos.stride(1), cos.stride(2),
            BACKWARD=backward, BLOCK_HEADS=block_heads, BLOCK_HALF=block_half,
            num_warps=warps_for(block_heads * block_half), enable_fp_fusion=False,
        )  # fmt: skip
    return y


class RoPE(torch.autograd.Function):
    """rope() under autograd: x gets the rotated-back gradient; cos and sin, functions of positions, get none."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return rope(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope(dy, cos, sin, backward=True).to(ctx.x_dtype), None, None

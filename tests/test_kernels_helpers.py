"""Tolerances the kernel tests share (not a test module: pytest collects no test from it).

The decode GEMV does not round W to x's dtype and sums in float32 in its own order, so it is not bit-identical to
F.linear(x, dequantize_4bit(W, x.dtype)). Per element, with u the unit roundoff of x's dtype and S = |x| @ |W|.T
(the sum of the magnitudes the output adds up): y may differ by u * |y| (its own rounding) + u * S (W unrounded,
half an ulp per product at most) + K * 2**-24 * S (float32 accumulation in any order: K times float32's unit
roundoff). A wrong index shows as an error of the order of S itself.
"""

import torch
import torch.nn.functional as F

from nf4lora.nf4 import dequantize_4bit

UNIT_ROUNDOFF = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """|got - want| <= bound elementwise (float64), naming the worst element and its excess."""
    excess = ((got.double() - want.double()).abs() / bound).nan_to_num(posinf=float("inf"))
    at = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
    assert excess.max() <= 1, f"{what} error up to {excess.max():.2f}x the bound, at {at}"


def assert_close_to_linear(y, x, packed, state, bias) -> None:
    """y against F.linear(x, dequantize_4bit(W, x.dtype), bias) within the per-element bound above."""
    w = dequantize_4bit(packed, state, x.dtype).double()
    ref = F.linear(x.double(), w, None if bias is None else bias.double())
    u = UNIT_ROUNDOFF[x.dtype]
    bound = u * ref.abs() + (u + x.shape[-1] * 2**-24) * F.linear(x.double().abs(), w.abs())
    assert_within(y, ref, bound)


def lora_model_bounds(x, w, lora_a, lora_b, want: dict, factor: float = 8.0) -> dict[str, torch.Tensor]:
    """Per-element bounds on how far two valid bfloat16 evaluations (eager, and inductor fusing in float32) of
    h = x @ W.T + (x @ A.T) @ B.T, y = silu(h), loss = sum(y**2) may differ in y, x.grad, A.grad and B.grad.

    Both run the same 4-bit matmul (an opaque custom op), so they differ where eager rounds to bfloat16 and the
    fused code does not: t = x @ A.T, the LoRA output and h (a rounding u |.| each, u = 2**-8), y, dh = dloss/dh
    and the LoRA backward's products. Each spread is carried through silu (its first and second derivatives at
    h) and through every sum as a root sum of squares (independent roundings), then the bound is `factor` times
    the spread (a spread as a standard deviation: 8 of them, with margin for 10**5 elements), plus two roundings
    of the element itself. x: (..., K); w: the dequantized weight (float64); want: the eager results by name.
    """
    u = UNIT_ROUNDOFF[torch.bfloat16]
    x64 = x.double().reshape(-1, x.shape[-1])  # (T, K): the gradients of A and B sum over every row
    a64, b64 = lora_a.double(), lora_b.double()
    t = x64 @ a64.T  # (T, r)
    lora = t @ b64.T
    h = x64 @ w.T + lora  # (T, N)
    s = torch.sigmoid(h)
    d1 = s * (1 + h * (1 - s))  # silu'(h)
    d2 = s * (1 - s) * (2 + h * (1 - 2 * s))  # silu''(h)
    y = want["y"].double().reshape(h.shape)
    dh = 2 * y * d1
    spread_h = u * (h.abs() + (t.abs() @ b64.abs().T) + lora.abs())
    spread_y = d1.abs() * spread_h + u * y.abs()
    spread_dh = 2 * d1.abs() * spread_y + 2 * y.abs() * d2.abs() * spread_h + u * dh.abs()
    dh_b = dh @ b64
    spread_dh_b = (spread_dh**2 @ b64**2).sqrt() + u * dh_b.abs()
    spread = {
        "y": spread_y,
        "x.grad": (spread_dh**2 @ w**2).sqrt() + (spread_dh_b**2 @ a64**2).sqrt(),
        "lora_a.grad": (spread_dh_b.T**2 @ x64**2).sqrt(),
        "lora_b.grad": (spread_dh.T**2 @ t**2).sqrt() + (dh.T**2 @ (u * t) ** 2).sqrt(),
    }
    return {name: factor * spread[name].reshape(want[name].shape) + 2 * u * want[name].double().abs()
            for name in spread}  # fmt: skip

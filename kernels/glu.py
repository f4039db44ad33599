"""Gated MLP activations in Triton, forward and backward: y = act(gate) * up, with act one of

    "silu"       SwiGLU (LLaMA, Mistral, Qwen): silu(g) = g * sigmoid(g)
    "gelu_tanh"  GeGLU (Gemma): 0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3)))

as torch computes `F.silu(gate) * up` / `F.gelu(gate, approximate="tanh") * up`: the activation in float32,
rounded to the input dtype, then the product rounded once. model_ops.swiglu_torch / geglu_torch are the
references. The backward recomputes act(gate) from gate (nothing but gate and up is kept) and rounds where
torch's autograd rounds: d_up = dy * act(g), d_gate = act'(g) * (dy * up), each product in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import check_triton_device, round_to
from .rowwise import tanh

ACTIVATIONS = ("silu", "gelu_tanh")
# Elements per program: an elementwise pass over (tokens, intermediate); 8 per thread with 4 warps.
BLOCK = 1024
GELU_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _act_and_grad(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) in float32 (the forward kernel leaves act' unused: the compiler drops it)."""
    if ACTIVATION == "silu":
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        inner = GELU_BETA * (g + GELU_KAPPA * g * g * g)
        t = tanh(inner)
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * GELU_BETA * (1.0 + 3.0 * GELU_KAPPA * g * g)
    return a, da


@triton.jit
def _glu_forward_kernel(gate_ptr, up_ptr, y_ptr, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    a, _ = _act_and_grad(g, ACTIVATION)
    tl.store(y_ptr + offs, round_to(round_to(a, DTYPE).to(tl.float32) * u, DTYPE), mask=mask)


@triton.jit
def _glu_backward_kernel(
    dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    DTYPE: tl.constexpr = dgate_ptr.dtype.element_ty
    a, da = _act_and_grad(g, ACTIVATION)
    tl.store(dup_ptr + offs, round_to(dy * round_to(a, DTYPE).to(tl.float32), DTYPE), mask=mask)
    tl.store(dgate_ptr + offs, round_to(da * round_to(dy * u, DTYPE).to(tl.float32), DTYPE), mask=mask)


def _check(gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    check_triton_device(gate, "gate")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(
            f"up must match gate: got up {tuple(up.shape)} {up.dtype} on {up.device}, gate {tuple(gate.shape)} "
            f"{gate.dtype} on {gate.device}"
        )


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Launcher: act(gate) * up, same shape and dtype as gate."""
    _check(gate, up, activation)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    if gate.numel():
        _glu_forward_kernel[_grid(gate.numel())](gate, up, y, gate.numel(), ACTIVATION=activation, BLOCK=BLOCK)
    return y


def glu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str):
    """Launcher: (d_gate, d_up) for the gradient dy of act(gate) * up."""
    _check(gate, up, activation)
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel():
        _glu_backward_kernel[_grid(gate.numel())](dy, gate, up, dgate, dup, gate.numel(), ACTIVATION=activation,
                                                  BLOCK=BLOCK)  # fmt: skip
    return dgate, dup


class GatedActivation(torch.autograd.Function):
    """act(gate) * up under autograd; keeps gate and up, recomputes the activation in backward."""

    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return glu_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = glu_backward(dy.to(gate.dtype), gate, up, ctx.activation)
        return dgate, dup, None

"""The one dispatch point between the Triton kernels and the plain-torch path.

CUDA tensors run the Triton kernels; CPU tensors run torch code with results identical to nf4/. The environment
variable NF4LORA_BACKEND=auto|triton|torch forces a backend; with TRITON_INTERPRET=1 and NF4LORA_BACKEND=triton,
CPU tensors run the real Triton kernels in the interpreter (how CI tests them).
"""

from __future__ import annotations

import os

import torch

from nf4lora.nf4 import QuantState
from nf4lora.nf4 import dequantize_4bit as _reference_dequantize

BACKENDS = ("auto", "triton", "torch")


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'torch' for work on tensor `t`, honouring NF4LORA_BACKEND."""
    choice = os.environ.get("NF4LORA_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"NF4LORA_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if t.is_cuda else "torch"
    return choice


def dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize packed 4-bit codes to `dtype` (default: the state's dtype), on the backend for `packed`."""
    return _reference_dequantize(packed, state, dtype)


class _MatMul4bit(torch.autograd.Function):
    """y = x @ dequant(W).T + bias. Saves the packed weight (not x): the frozen weight needs no gradient."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        w = dequantize(packed, state, x.dtype)  # (N, K)
        ctx.state = state
        ctx.save_for_backward(packed)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = dy @ dequantize(packed, ctx.state, dy.dtype)  # (..., N) @ (N, K)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W (N, K)).T + bias -> (..., N), differentiable in x and bias."""
    return _MatMul4bit.apply(x, packed, state, bias)

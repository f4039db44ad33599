"""The 4-bit entry points as torch custom ops (namespace "nf4lora"), and the one place they meet autograd.

Custom ops are opaque to torch.compile: a model holding Linear4bit layers compiles without graph breaks in them,
with the fake implementations below giving output shapes. The ops take a QuantState's fields, never the
dataclass, in this order (STATE_ARGS): packed, absmax, code, offset, nested_absmax, nested_code, blocksize,
nested_blocksize, shape; without double quantization offset/nested_absmax/nested_code are None.

Each op picks its backend when it runs (dispatch.backend_for): Triton kernels (dequant.py, matmul.py, gemv.py,
imported on first use so that CPU-only users never import Triton and so that TRITON_INTERPRET is read when the
first kernel is needed) or the torch path (torch_path.py).
"""

from __future__ import annotations

import importlib

import torch

from . import torch_path
from .backend import backend_for

STATE_ARGS = (
    "packed", "absmax", "code", "offset", "nested_absmax", "nested_code", "blocksize", "nested_blocksize", "shape",
)  # fmt: skip


def _triton(module: str):
    return importlib.import_module(f"nf4lora.kernels.{module}")


# -- dequantize ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("nf4lora::dequantize_4bit", mutates_args=())
def dequantize_4bit(
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
    """The dense weight of `shape` in `dtype`."""
    state = (packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize, shape)
    if backend_for(packed) == "triton":
        return _triton("dequant").dequantize(*state, dtype)
    return torch_path.dequantize(*state, dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


# -- grad-input matmul ---------------------------------------------------------------------------------------------
@torch.library.custom_op("nf4lora::matmul_4bit_grad_input", mutates_args=())
def matmul_4bit_grad_input(
    dy: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
) -> torch.Tensor:
    """dy (..., N) @ W -> (..., K) in dy.dtype."""
    state = (packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize, shape)
    if backend_for(dy) == "triton":
        return _triton("matmul").matmul_grad_input(dy, *state)
    return torch_path.matmul_grad_input(dy, *state)


@matmul_4bit_grad_input.register_fake
def _(dy, packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize, shape):
    return dy.new_empty((*dy.shape[:-1], shape[1]))


# -- forward matmul ------------------------------------------------------------------------------------------------
@torch.library.custom_op("nf4lora::matmul_4bit", mutates_args=())
def matmul_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x (..., K) @ W.T + bias -> (..., N) in x.dtype: the batch-1 kernel for a few rows, else the fused one."""
    state = (packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize, shape)
    if backend_for(x) == "triton":
        gemv = _triton("gemv")
        if x.numel() // shape[1] <= gemv.MAX_M:
            return gemv.gemv(x, bias, *state)
        return _triton("matmul").matmul(x, bias, *state)
    return torch_path.matmul(x, bias, *state)


@matmul_4bit.register_fake
def _(x, packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize, shape, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _setup_context(ctx, inputs, output):
    # Only the packed weight and its block constants are kept: the frozen weight needs no gradient, so x is not.
    x, *state, bias = inputs
    ctx.tensor_slots = [i for i, a in enumerate(state) if isinstance(a, torch.Tensor)]
    ctx.others = [None if isinstance(a, torch.Tensor) else a for a in state]
    ctx.save_for_backward(*(state[i] for i in ctx.tensor_slots))
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    state = list(ctx.others)
    for i, t in zip(ctx.tensor_slots, ctx.saved_tensors):
        state[i] = t
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = matmul_4bit_grad_input(dy, *state)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[-1]:
        grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, *([None] * len(STATE_ARGS)), grad_bias


matmul_4bit.register_autograd(_backward, setup_context=_setup_context)

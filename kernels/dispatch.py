"""The public 4-bit entry points: argument checks, then the custom ops of ops.py.

`dequantize` and `matmul_4bit` take a packed weight and its QuantState (nf4/), check them against the input, and
hand the state's fields to ops.py (its custom ops while torch.compile traces, its direct path otherwise), which
picks Triton or the torch path when it runs (backend.py). matmul_4bit is
differentiable in x and bias; its backward keeps only the packed weight (never x) and dequantizes again.
"""

from __future__ import annotations

import torch

from nf4lora.nf4 import QuantState
from nf4lora.nf4.codebooks import NESTED_BLOCKSIZE

from . import ops
from .backend import BACKENDS, backend_for

__all__ = ["dequantize", "matmul_4bit", "matmul_4bit_grad_input", "backend_for", "BACKENDS"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def state_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """The QuantState as the ops and the launchers take it (ops.STATE_ARGS order). The kernels index the block
    constants as contiguous arrays, so a strided view (a slice of a larger tensor) is copied first."""
    nested = state.nested
    return (
        packed, state.absmax.contiguous(), state.code.contiguous(), state.offset,
        None if nested is None else nested.absmax.contiguous(), None if nested is None else nested.code.contiguous(),
        state.blocksize, NESTED_BLOCKSIZE if nested is None else nested.blocksize, list(state.shape),
    )  # fmt: skip


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on `device_type`, or None when it is off there (or the device has no autocast,
    as the meta device has not): the one rule matmul_4bit and Linear4bit both follow."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _check_state(packed: torch.Tensor, state: QuantState) -> None:
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a nf4lora.nf4.QuantState, got {type(state).__name__}")
    state.check_packed(packed)
    if not packed.is_contiguous():
        raise ValueError(
            f"packed must be contiguous (codes in row-major order), got strides {packed.stride()} for shape "
            f"{tuple(packed.shape)}: pass the tensor quantize_4bit returned, or .contiguous() of it"
        )


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (state.shape) in `dtype` (default: the state's dtype); bit-identical to
    nf4.dequantize_4bit on every backend."""
    _check_state(packed, state)
    dtype = state.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if torch.compiler.is_compiling():
        return ops.dequantize_4bit(*state_args(packed, state), dtype)
    return ops.dequantize_impl(*state_args(packed, state), dtype)


def _check_operand(t: torch.Tensor, name: str, packed: torch.Tensor, state: QuantState, features: str) -> tuple:
    """Check a matmul operand against a 2-D state: its last dimension is the weight's `features` ("in_features"
    for x, "out_features" for dy), on packed's device. Returns (N, K)."""
    _check_float(t, name)
    _check_state(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"state must describe a 2-D weight (out_features, in_features), got shape {tuple(state.shape)}")
    N, K = state.shape
    size = K if features == "in_features" else N
    if t.dim() == 0 or t.shape[-1] != size:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but the weight is {N}x{K}: {name}'s last dimension must be "
            f"{features}={size}"
        )
    if t.device != packed.device:
        raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}: move both to one device")
    return N, K


def matmul_4bit(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) @ dequant(W (N, K)).T + bias -> (..., N) in x.dtype, differentiable in x and bias.

    W is used in x.dtype, as F.linear(x, dequantize(packed, state, x.dtype), bias) would; bias may be any float
    dtype (the GEMV and fused kernels add it in float32, the other paths cast it to x.dtype first). Under autocast,
    x is first cast to the autocast dtype, as F.linear's inputs are: every backend, row count and torch.compile
    then give the same dtype.
    """
    N, K = _check_operand(x, "x", packed, state, features="in_features")
    if bias is not None:
        _check_float(bias, "bias")
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},) for a {N}x{K} weight, got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}: move both to one device")
        bias = bias.contiguous()  # the kernels read it with stride 1
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        x = x.to(cast)
    args = state_args(packed, state)
    if torch.compiler.is_compiling():  # the custom op: opaque to torch.compile, no graph break
        return ops.matmul_4bit(x, *args, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return ops.Matmul4bit.apply(x, bias, *args)
    return ops.matmul_impl(x, bias, *args)  # nothing to differentiate: no autograd.Function (decode calls)


def matmul_4bit_grad_input(dy: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """dy (..., N) @ dequant(W (N, K)) -> (..., K) in dy.dtype: matmul_4bit's input gradient, for code that writes
    its own backward around a 4-bit layer (lora/lora.py fuses the adapter's gradient into it). Not differentiable."""
    _check_operand(dy, "dy", packed, state, features="out_features")
    if torch.compiler.is_compiling():
        return ops.matmul_4bit_grad_input(dy, *state_args(packed, state))
    return ops.grad_input_impl(dy, *state_args(packed, state))

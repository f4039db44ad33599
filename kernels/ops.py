"""The 4-bit entry points as torch custom ops (namespace "nf4lora"), the eager autograd path, and the one place
they meet autograd.

Two doors to the same implementations (`dequantize_impl`, `matmul_impl`, `grad_input_impl`):
- torch custom ops, for torch.compile: opaque to it, so a model holding Linear4bit layers compiles without graph
  breaks in them, with the fake implementations below giving output shapes;
- `Matmul4bit`, a plain autograd.Function for eager calls. A custom op costs 5-12 us more per call in Python,
  45 us when its autograd runs (measured on the CPU VM): as much as a decode-sized kernel takes on a GPU.
dispatch.py takes the custom ops while torch.compile traces and the direct path otherwise. Both take a
QuantState's fields, never the dataclass, in this order (STATE_ARGS): packed, absmax, code, offset, nested_absmax,
nested_code, blocksize, nested_blocksize, shape; without double quantization offset/nested_absmax/nested_code
are None.

Each implementation picks its backend when it runs (backend.backend_for): Triton kernels (dequant.py, matmul.py,
gemv.py, imported on first use so that CPU-only users never import Triton and so that TRITON_INTERPRET is read
when the first kernel is needed) or the torch path (torch_path.py).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from . import torch_path
from .backend import backend_for

STATE_ARGS = (
    "packed", "absmax", "code", "offset", "nested_absmax", "nested_code", "blocksize", "nested_blocksize", "shape",
)  # fmt: skip

# Which Triton kernel serves a product with M rows of x (measured on an H200: benchmarks/results/kernels-cuda.md):
# up to gemv.MAX_M rows the batch-1 GEMV kernel; up to FUSED_MAX_M rows the fused dequantize-matmul kernel
# (matmul.py); above, the dequantize kernel writes W in x.dtype and cuBLAS multiplies (F.linear), as bitsandbytes
# does. The fused kernel was 6-25x slower than that at every M measured (16..4096), so it serves no M for now;
# raise FUSED_MAX_M once it wins somewhere. The same rule picks the grad-input product.
FUSED_MAX_M = 0


_MODULES: dict = {}


def _triton(module: str):
    """The Triton kernel module `module`, imported on first use (then a dictionary hit: this runs per call)."""
    found = _MODULES.get(module)
    if found is None:
        found = _MODULES[module] = importlib.import_module(f"nf4lora.kernels.{module}")
    return found


def _rows(t: torch.Tensor, features: int) -> int:
    return t.numel() // features if features else 0


def dequantize_impl(*state_and_dtype) -> torch.Tensor:
    """The dense weight: dequantize's arguments (STATE_ARGS, then dtype)."""
    packed = state_and_dtype[0]
    if backend_for(packed) == "triton":
        return _triton("dequant").dequantize(*state_and_dtype)
    return torch_path.dequantize(*state_and_dtype)


def matmul_path(rows: int, shape: list[int] | None = None, blocksize: int | None = None) -> str:
    """The Triton path of x @ W.T for `rows` rows of x, by the rule above: "gemv", "fused" or "dequant + cuBLAS"
    (given the weight's shape and blocksize, "fused" only for a layout matmul.supports)."""
    if rows <= _triton("gemv").MAX_M:
        return "gemv"
    if rows <= FUSED_MAX_M and (shape is None or _triton("matmul").supports(shape, blocksize)):
        return "fused"
    return "dequant + cuBLAS"


def matmul_impl(x: torch.Tensor, bias: torch.Tensor | None, *state) -> torch.Tensor:
    """x (..., K) @ W.T + bias -> (..., N) in x.dtype on x's backend (on Triton, the path matmul_path names)."""
    if backend_for(x) == "triton":
        path = matmul_path(_rows(x, state[-1][1]), state[-1], state[6])
        if path == "gemv":
            return _triton("gemv").gemv(x, bias, *state)
        if path == "fused":
            return _triton("matmul").matmul(x, bias, *state)
        w = _triton("dequant").dequantize(*state, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return torch_path.matmul(x, bias, *state)


# -- one dequantize per backward under activation checkpointing ------------------------------------------------------
# With checkpointing, a layer's backward first reruns its forward (which dequantizes W for the product x @ W.T) and
# then needs W again for dy @ W: two dequantizations where one suffices. The rerun keeps its dense W for the
# backward that follows it. Checkpointing matches what the rerun saves to what the first forward saved by shape,
# dtype and device, and the first forward cannot know whether it is checkpointed, so it saves a stand-in of W's
# shape that holds no memory (a 0-stride view of one element): without checkpointing, backward finds the stand-in
# and dequantizes as before. Only the rerun, which runs inside the backward pass, keeps a real W, and only until
# the backward of the same op takes it: at most one checkpointed block's weights at a time.
def keeps_dense_weight(x: torch.Tensor, *state) -> bool:
    """Whether a forward of x through W keeps the dense W for its backward: it is a checkpointed block's rerun
    (the autograd engine is running a backward pass: torch's graph-task id is set) and its product dequantizes W in
    x.dtype anyway (the torch path, or Triton's dequantize + cuBLAS path)."""
    if torch._C._current_graph_task_id() == -1:
        return False
    return backend_for(x) == "torch" or matmul_path(_rows(x, state[-1][1]), state[-1], state[6]) == "dequant + cuBLAS"


def dense_linear(x: torch.Tensor, bias: torch.Tensor | None, *state) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ W.T + bias, W in x.dtype): matmul_impl's result on its dequantizing paths, bit for bit, and the W it
    multiplied with, in a tensor of its own (the torch path's scratch weight is reused by the next layer)."""
    w = dequantize_impl(*state, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype)), w


def dense_stand_in(x: torch.Tensor, shape: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """What a forward that keeps no dense W saves in its place: W's shape, dtype (default x's), no memory."""
    return x.new_empty((), dtype=dtype).expand(shape)


def kept_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The dense W a checkpointed rerun saved (None for a stand-in, or a W in another dtype than dy's)."""
    return w if w.stride() != (0, 0) and w.dtype == dtype else None


def grad_input_impl(dy: torch.Tensor, *state) -> torch.Tensor:
    """dy (..., N) @ W -> (..., K) in dy.dtype on dy's backend."""
    if backend_for(dy) == "triton":
        if _rows(dy, state[-1][0]) <= FUSED_MAX_M and _triton("matmul").supports(state[-1], state[6]):
            return _triton("matmul").matmul_grad_input(dy, *state)
        return dy @ _triton("dequant").dequantize(*state, dy.dtype)
    return torch_path.matmul_grad_input(dy, *state)


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
    return dequantize_impl(packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize,
                           shape, dtype)  # fmt: skip


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
    return grad_input_impl(dy, packed, absmax, code, offset, nested_absmax, nested_code, blocksize,
                           nested_blocksize, shape)  # fmt: skip


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
    """x (..., K) @ W.T + bias -> (..., N) in x.dtype."""
    return matmul_impl(x, bias, packed, absmax, code, offset, nested_absmax, nested_code, blocksize,
                       nested_blocksize, shape)  # fmt: skip


@matmul_4bit.register_fake
def _(x, packed, absmax, code, offset, nested_absmax, nested_code, blocksize, nested_blocksize, shape, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _save_state(ctx, state, bias) -> None:
    # Only the packed weight and its block constants are kept: the frozen weight needs no gradient, so x is not.
    ctx.tensor_slots = [i for i, a in enumerate(state) if isinstance(a, torch.Tensor)]
    ctx.others = [None if isinstance(a, torch.Tensor) else a for a in state]
    ctx.save_for_backward(*(state[i] for i in ctx.tensor_slots))
    ctx.bias_dtype = None if bias is None else bias.dtype


def _saved_state(ctx) -> list:
    state = list(ctx.others)
    for i, t in zip(ctx.tensor_slots, ctx.saved_tensors):
        state[i] = t
    return state


def _input_grads(ctx, dy, grad_input, x_index: int, bias_index: int, state=None):
    """(grad_x, grad_bias) where needed: dy @ W by `grad_input` (the custom op or its implementation), the bias'
    row sum. The indices are x's and bias' places among the inputs; state: the saved state, if already read."""
    grad_x = grad_input(dy, *(state or _saved_state(ctx))) if ctx.needs_input_grad[x_index] else None
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[bias_index]:
        grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, grad_bias


def _setup_context(ctx, inputs, output):
    x, *state, bias = inputs
    _save_state(ctx, state, bias)


def _backward(ctx, dy):
    grad_x, grad_bias = _input_grads(ctx, dy, matmul_4bit_grad_input, 0, -1)
    return grad_x, *([None] * len(STATE_ARGS)), grad_bias


matmul_4bit.register_autograd(_backward, setup_context=_setup_context)


class Matmul4bit(torch.autograd.Function):
    """The eager door: matmul_4bit's forward and backward without the custom-op machinery; it also saves the dense
    W (or its stand-in) last, so that a checkpointed rerun's backward does not dequantize again (see above)."""

    @staticmethod
    def forward(ctx, x, bias, *state):
        if ctx.needs_input_grad[0] and keeps_dense_weight(x, *state):
            y, w = dense_linear(x, bias, *state)
        else:
            y, w = matmul_impl(x, bias, *state), dense_stand_in(x, state[-1])
        _save_state(ctx, (*state, w), bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        *state, w = _saved_state(ctx)
        kept = kept_weight(w, dy.dtype)

        def grad_input(dy, *state):
            return grad_input_impl(dy, *state) if kept is None else dy @ kept

        grad_x, grad_bias = _input_grads(ctx, dy, grad_input, 0, 1, state)
        return grad_x, grad_bias, *([None] * len(STATE_ARGS))

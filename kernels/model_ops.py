"""The decoder's other ops, one entry each: RMSNorm, RoPE, the gated MLP activations and the linear +
cross-entropy of the head. Each runs its Triton kernel (rmsnorm.py, rope.py, glu.py, cross_entropy.py: forward
and backward under one autograd.Function) where backend.backend_for picks Triton (CUDA tensors, or
NF4LORA_BACKEND=triton), and its torch reference below otherwise: the CPU keeps torch ops, and so does
torch.compile (inductor fuses these itself). The references are the specification the kernels are tested
against; the tests check both against transformers' own modules.

The Triton modules are imported on first use, as in ops.py: CPU-only users never import Triton.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .backend import backend_for

IGNORE_INDEX = -100  # label value that takes no part in the loss (HF / PyTorch convention)


def _triton(module: str):
    return importlib.import_module(f"nf4lora.kernels.{module}")


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the entries below run their Triton kernel for tensor t (not under torch.compile)."""
    return backend_for(t) == "triton" and not torch.compiler.is_compiling()


# -- RMSNorm --------------------------------------------------------------------------------------------------------
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """x (..., H) normalised by its float32 root mean square, then scaled: LLaMA's weight * normed.to(x.dtype)
    (in the promoted dtype of weight and x), or with unit_offset Gemma's (normed * (1 + weight)) in float32,
    rounded once to x.dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """rms_norm_torch's result, by the Triton kernel where it serves; differentiable in x and weight."""
    if uses_triton(x):
        return _triton("rmsnorm").RMSNorm.apply(x, weight, eps, unit_offset)
    return rms_norm_torch(x, weight, eps, unit_offset)


# -- RoPE -----------------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dimensions of x (B, heads, T, hd) by the angles in cos/sin (B, T, rotary_dim),
    rotate_half layout; the rest pass through (partial rotary, Phi-3)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope_torch's result (bit for bit), by the Triton kernel where it serves; differentiable in x."""
    if not uses_triton(x):
        return apply_rope_torch(x, cos, sin)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return _triton("rope").RoPE.apply(x, cos, sin)
    return torch.cat((_triton("rope").RoPE.apply(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)  # a strided view


# -- gated MLP activations ------------------------------------------------------------------------------------------
def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (LLaMA's MLP), by the Triton kernel where it serves; differentiable in both."""
    if uses_triton(gate):
        return _triton("glu").GatedActivation.apply(gate, up, "silu")
    return swiglu_torch(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up (Gemma's MLP), by the Triton kernel where it serves; differentiable in both."""
    if uses_triton(gate):
        return _triton("glu").GatedActivation.apply(gate, up, "gelu_tanh")
    return geglu_torch(gate, up)


# -- linear + cross-entropy -----------------------------------------------------------------------------------------
def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: the autocast dtype under autocast (as F.linear would), else hidden's."""
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def softcap_torch(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma 2's final-logit soft-capping, cap * tanh(logits / cap), in the logits' dtype and transformers' order."""
    return torch.tanh(logits / cap) * cap


def linear_cross_entropy_torch(hidden, weight, labels, chunk_tokens: int, softcap=None, ignore_index=IGNORE_INDEX):
    """Mean cross-entropy of softcap(hidden @ weight.T) against labels over the rows whose label is not
    ignore_index: logits in the compute dtype, soft-capped there, log-softmax in float32 (the model's full-logits
    path). Each chunk of rows is checkpointed, so its logits are recomputed in backward."""
    dtype = _compute_dtype(hidden)

    def chunk_loss_sum(h, y):
        logits = F.linear(h.to(dtype), weight.to(dtype))  # (chunk, V)
        if softcap is not None:
            logits = softcap_torch(logits, softcap)
        return F.cross_entropy(logits.float(), y, ignore_index=ignore_index, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(chunk_loss_sum, hidden[start:stop], labels[start:stop], use_reentrant=False)
    return total / (labels != ignore_index).sum()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross-entropy of a bias-free head: hidden (..., H) @ weight (V, H).T against labels (...), over
    labels != ignore_index (NaN when there are none, as F.cross_entropy's mean), never holding more than
    chunk_tokens rows of logits (default on Triton: a chunk of logits no larger than hidden; on torch: 1024 rows).
    softcap: Gemma 2's final-logit soft-capping (softcap_torch). Differentiable in hidden and weight."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[-1]}) for hidden {tuple(hidden.shape)}, "
                         f"got {tuple(weight.shape)}")  # fmt: skip
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    bad_chunk = isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1
    if chunk_tokens is not None and bad_chunk:
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    out_of_range = (y != ignore_index) & ((y < 0) | (y >= weight.shape[0]))
    if bool(out_of_range.any()):  # one device sync per call (not per chunk)
        bad = y[out_of_range][:4].tolist()
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or {ignore_index}, got {bad}")
    if uses_triton(h):
        module = _triton("cross_entropy")
        chunk = chunk_tokens or module.default_chunk(h.shape[0], h.shape[1], weight.shape[0])
        total = module.LinearCrossEntropy.apply(h, weight, y, chunk, softcap, _compute_dtype(h), ignore_index)
        return total / (y != ignore_index).sum()
    return linear_cross_entropy_torch(h, weight, y, chunk_tokens or 1024, softcap, ignore_index)

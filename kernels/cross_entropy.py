"""Linear + cross-entropy without the (tokens, vocab) logits: the loss of a language-model head, fused in chunks.

    loss_sum = sum_i CE(softcap(h_i @ W.T), y_i)   over rows with y_i != ignore_index
    softcap(z) = tanh(z / cap) * cap               (Gemma 2's final-logit soft-capping, in the logits' dtype as
                                                    transformers computes it; off when cap is None)

The hidden states go through the head `chunk` rows at a time (cuBLAS, in the compute dtype). A Triton kernel
then reads each row of the chunk's logits twice (an online logsumexp over vocabulary tiles, then the softmax)
and overwrites the logits in place with their gradient, softmax - one_hot(y) (times the soft-cap's derivative),
zero on ignored rows. Two more products turn that into the gradients of the hidden states (grad @ W) and, when
the head trains, of the weight (grad.T @ h, accumulated in float32). All of it happens in forward (Liger-Kernel's
fused linear cross-entropy): backward only scales the saved gradients by the incoming one, and at no time is
more than one chunk of logits alive. model_ops.linear_cross_entropy_torch is the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .dequant import check_triton_device, round_to
from .rowwise import next_block, tanh, warps_for

# Vocabulary tile of the row kernel: a 32K vocabulary (LLaMA 2, TinyLlama) is one tile, 32 float32 per thread
# at 32 warps; larger vocabularies (128K-256K) loop over tiles.
MAX_BLOCK_V = 32768


@triton.jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr, DTYPE: tl.constexpr):
    """(softcap(z), tanh(z / cap)) in float32, rounded where torch rounds tanh(z / cap) * cap in the logits' DTYPE
    (model_ops.softcap_torch); without soft-capping (z, 0)."""
    t = tl.zeros_like(z)
    if HAS_SOFTCAP:
        t = round_to(tanh(round_to(z / softcap, DTYPE).to(tl.float32)), DTYPE).to(tl.float32)
        z = round_to(t * softcap, DTYPE).to(tl.float32)
    return z, t


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, labels_ptr, loss_ptr, stride_row, V, softcap, ignore_index,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One row per program: loss[row] = logsumexp(z) - z[y] (0 if ignored); the row becomes d loss / d logits."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    target = tl.where(valid, label, 0)
    DTYPE: tl.constexpr = logits_ptr.dtype.element_ty
    # pass 1: running max m and sum of exp(z - m) over the vocabulary tiles
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z, _ = _capped(tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP, DTYPE)
        z = tl.where(cols < V, z, float("-inf"))  # after the cap, which would map -inf to -softcap
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_target, _ = _capped(tl.load(row_ptr + target).to(tl.float32), softcap, HAS_SOFTCAP, DTYPE)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))
    # pass 2: the gradient, in place
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z, t = _capped(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP, DTYPE)
        grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)  # d(cap * tanh(z / cap)) / dz
        grad = tl.where(valid, grad, 0.0)
        tl.store(row_ptr + cols, round_to(grad, DTYPE), mask=mask)


def cross_entropy_rows(
    logits: torch.Tensor, labels: torch.Tensor, softcap: float | None, ignore_index: int, block_v: int | None = None
) -> torch.Tensor:
    """Launcher: the per-row losses (rows,) float32 of logits (rows, V); logits is overwritten with
    d(sum of losses)/d(logits). block_v: the vocabulary tile (a power of two; default up to MAX_BLOCK_V)."""
    check_triton_device(logits, "logits")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a (rows, vocab) tensor with unit stride along vocab, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")  # fmt: skip
    rows, V = logits.shape
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    block_v = block_v or min(next_block(V), MAX_BLOCK_V)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _cross_entropy_kernel[(rows,)](
            logits, labels, losses, logits.stride(0), V, 1.0 if softcap is None else float(softcap), ignore_index,
            HAS_SOFTCAP=softcap is not None, BLOCK_V=block_v, num_warps=warps_for(block_v),
        )  # fmt: skip
    return losses


def default_chunk(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk when the caller gives none: a chunk's logits no larger than the hidden states (Liger's
    rule, a power of two), at least 1."""
    return max(1, triton.next_power_of_2(math.ceil(n_rows / math.ceil(vocab_size / hidden_size))))


class LinearCrossEntropy(torch.autograd.Function):
    """sum of CE(softcap(hidden @ weight.T), labels) over non-ignored rows, chunk by chunk; the gradients of
    hidden (N, H) and, when it requires one, weight (V, H) are computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, softcap, compute_dtype, ignore_index, block_v=None):
        N, V = hidden.shape[0], weight.shape[0]
        w = weight.to(compute_dtype)  # (V, H)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        logits_buffer = torch.empty((min(chunk, N), V), dtype=compute_dtype, device=hidden.device)
        losses = []
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, N, chunk):
                hc = hidden[start : start + chunk].to(compute_dtype)  # (c, H)
                logits = torch.mm(hc, w.T, out=logits_buffer[: hc.shape[0]])  # (c, V)
                losses.append(cross_entropy_rows(logits, labels[start : start + chunk], softcap, ignore_index, block_v))
                if want_h:
                    grad_h[start : start + chunk] = logits @ w  # logits now holds d loss / d logits
                if want_w:
                    grad_w += logits.T @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return torch.cat(losses).sum() if losses else hidden.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_total
        dw = None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None, None

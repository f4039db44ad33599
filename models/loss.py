"""The causal-LM loss without the (tokens, vocab) logits: lm_head + cross-entropy over chunks of positions.

With a 49K vocabulary, 1,024 tokens of float32 logits and their gradient take ~0.8 GB, more than a 135M model's
4-bit weights and activations together. Two ways to avoid holding them, picked by `chunked_lm_loss`:

- a frozen, bias-free nn.Linear head (the QLoRA case): `_FrozenHeadCrossEntropy` computes each chunk's loss and
  its gradient with respect to the hidden states in one pass, and keeps only that (N, H) gradient for backward
  (the idea of Liger-Kernel's fused linear cross-entropy). No logits are recomputed.
- on CUDA, the same frozen head goes to the Triton linear + cross-entropy (kernels/model_ops.py), which also
  computes dL/dh in its forward pass, one tile of logits at a time;
- any other head (trainable, with bias, LoRA-wrapped): each chunk runs inside a non-reentrant checkpoint and is
  recomputed in backward (lm_head's forward runs twice: ~4% of a SmolLM2-135M step, measured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nf4lora.kernels import model_ops

IGNORE_INDEX = -100  # label value that takes no part in the loss (HF / PyTorch convention)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma 2's soft-capping, cap * tanh(x / cap), in x's dtype and transformers' order of operations."""
    return torch.tanh(x / cap) * cap


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W.T, y_i) over rows with y_i != -100, chunk by chunk; dL/dh is computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk_tokens, compute_dtype, cap):
        # h (N, H) hidden states, weight (V, H) frozen, y (N,) labels, cap the final-logit soft-cap or None. Under
        # autocast the head would run in the autocast dtype; compute_dtype reproduces that explicitly (logits are
        # then upcast to float32).
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        ignored = torch.nonzero(y == IGNORE_INDEX).flatten()  # usually none: rows are zeroed, not masked
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_tokens):
                hc, yc = h[start : start + chunk_tokens].to(compute_dtype), y[start : start + chunk_tokens]
                target = yc.clamp(min=0)
                skip = ignored[(ignored >= start) & (ignored < start + len(yc))] - start
                logits = hc @ w.T  # (c, V)
                if cap is not None:
                    tanh = torch.tanh(logits / cap)
                    logits = tanh * cap  # softcap(), keeping tanh for the gradient
                # one fused kernel reads the compute-dtype logits and writes float32 log-probabilities (c, V)
                logp = torch.log_softmax(logits, dim=1, dtype=torch.float32)
                total -= logp.gather(1, target[:, None])[:, 0].index_fill_(0, skip, 0).sum()
                # d CE / d logits = softmax - one_hot(target); zero on ignored rows. Reuses the logp buffer.
                grad = logp.exp_()
                grad[torch.arange(len(yc), device=h.device), target] -= 1
                grad.index_fill_(0, skip, 0)
                if cap is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
                    grad *= 1 - tanh.float().square()
                grad_h[start : start + chunk_tokens] = grad.to(compute_dtype) @ w
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_total, None, None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk_tokens: int,
                    cap: float | None = None) -> torch.Tensor:  # fmt: skip
    """Mean shifted cross-entropy of lm_head(hidden) against labels, `chunk_tokens` positions at a time; with `cap`
    the logits are soft-capped first (Gemma 2's final_logit_softcapping), as in the full-logits path.

    hidden (B, T, H), labels (B, T); position t predicts labels[t + 1]. Never holds more than (chunk_tokens, V)
    logits. Equals F.cross_entropy (mean over labels != -100) of the full logits up to float32 summation order;
    NaN when nothing is labelled, as F.cross_entropy's mean.
    """
    h = hidden[:, :-1].flatten(0, 1)  # (N, H), N = B * (T - 1)
    y = labels[:, 1:].flatten()  # (N,)
    n_valid = (y != IGNORE_INDEX).sum()
    frozen_plain = type(lm_head) is nn.Linear and lm_head.bias is None and not lm_head.weight.requires_grad
    if frozen_plain and model_ops.uses_triton(h):  # CUDA: the Triton linear + cross-entropy, logits tile by tile
        return model_ops.linear_cross_entropy(h, lm_head.weight, y, chunk_tokens, cap)
    if frozen_plain:
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        return _FrozenHeadCrossEntropy.apply(h, lm_head.weight, y, chunk_tokens, dtype, cap) / n_valid

    def chunk_loss_sum(h_chunk, y_chunk):
        logits = lm_head(h_chunk)  # (chunk, V)
        logits = (logits if cap is None else softcap(logits, cap)).float()
        return F.cross_entropy(logits, y_chunk, ignore_index=IGNORE_INDEX, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(chunk_loss_sum, h[start:stop], y[start:stop], use_reentrant=False)
    return total / n_valid

"""LoRALinear: a frozen linear layer (Linear4bit or nn.Linear) plus a trainable low-rank update (PEFT conventions,
docs/formats.md section 5):

    y = base(x) + lora_B(lora_A(dropout(x))) * scaling,   scaling = alpha / r   (rsLoRA: alpha / sqrt(r))

lora_A is (r, in_features), lora_B is (out_features, r); both are kept in float32 (the optimizer's precision) and
cast to the activation dtype for the matmuls, so a bf16 model runs bf16 matmuls and gets float32 gradients.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from nf4lora.kernels import matmul_4bit_grad_input, ops
from nf4lora.kernels.dispatch import state_args
from nf4lora.nf4 import max_abs_error, quantize_4bit, relative_error

from .linear4bit import Linear4bit

INITS = ("kaiming", "gaussian")


def check_lora_args(r, alpha, dropout, use_rslora=False, init="kaiming") -> None:
    """Raise ValueError/TypeError for LoRA hyper-parameters outside their domain (before any surgery)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {use_rslora!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _dense_dtype(base: Linear4bit) -> torch.dtype:
    """The floating dtype a dense copy of `base` takes: its bias' (the bias follows the model's dtype casts, which the
    packed weight ignores), else the dtype the weight was quantized from."""
    return base.quant_state.dtype if base.bias is None else base.bias.dtype


def _base_forward(base: nn.Module, x: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(base(x), the dense 4-bit weight for backward): for a Linear4bit base the weight a checkpointed rerun
    dequantized (kept, as Matmul4bit keeps it: kernels/ops.py) or its memory-free stand-in; None for nn.Linear."""
    if not isinstance(base, Linear4bit):
        return base(x), None
    dtype = base.dtypes_for(x)[0]  # == the output dtype (LoRALinear._fusable)
    state = state_args(base.weight, base.quant_state)
    if keep and ops.keeps_dense_weight(x, *state):
        bias = None if base.bias is None else base.bias.contiguous()
        return ops.dense_linear(x.to(dtype), bias, *state)
    return base(x), ops.dense_stand_in(x, state[-1], dtype)


class _FrozenBaseLoRA(torch.autograd.Function):
    """y = base(x) + (x @ A.T) @ (scaling * B).T for a frozen base without dropout, with the adapter's products
    added into tensors the base makes anyway: into its output in forward (y.addmm_) and into its input gradient
    in backward (dx.addmm_). Autograd's path gives the adapter its own (tokens, in_features) input gradient and
    adds it to the base's in a separate pass. At x [4096, 4096] bf16 on the 2-core CPU VM the adapter cost
    53 ms over the frozen layer's 702 ms; the fresh tensors and the passes over them were 22 ms of it (a fresh
    32 MiB tensor is a new mmap for glibc, every page of which faults on first write). Gradients are the same
    products autograd computes (PEFT's order of operations), so results agree to rounding."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, base):
        y, w = _base_forward(base, x, keep=ctx.needs_input_grad[0])
        dtype = y.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), (lora_b * scaling).to(dtype)  # (r, in), (out, r)
        h = x2 @ a.t()  # (tokens, r)
        y.view(-1, y.shape[-1]).addmm_(h, b.t())
        ctx.save_for_backward(x2, a, b, h, w)
        ctx.base, ctx.scaling, ctx.dtypes = base, scaling, (x.dtype, lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, a, b, h, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(a.dtype)
        dh = dy2 @ b  # (tokens, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            base = ctx.base
            kept = None if w is None else ops.kept_weight(w, dy2.dtype)
            if kept is not None:  # a checkpointed rerun's dense W: no second dequantization
                grad_x = dy2 @ kept
            elif isinstance(base, Linear4bit):
                grad_x = matmul_4bit_grad_input(dy2, base.weight, base.quant_state)
            else:
                grad_x = dy2 @ base.weight.to(dy2.dtype)
            grad_x = grad_x.addmm_(dh, a).view(*dy.shape[:-1], a.shape[1]).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_a = (dh.t() @ x2).to(ctx.dtypes[1])
        if ctx.needs_input_grad[2]:  # b = (B * scaling).to(dtype): cast back, then the product rule's * scaling
            grad_b = (h.t() @ dy2).t().to(ctx.dtypes[2]) * ctx.scaling
        return grad_x, grad_a, grad_b, None, None


class LoRALinear(nn.Module):
    """A LoRA adapter around `base` (a Linear4bit or nn.Linear), which it holds as `base_layer` as PEFT does.

    merge() folds the update into the base weight (forward then skips the adapter); unmerge() restores the base
    exactly, because merge() keeps the original weight aside: for a 4-bit base that is the packed bytes and state
    (0.5 bytes per weight), for a 16-bit base a copy of the weight.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ):
        super().__init__()
        if not isinstance(base, (Linear4bit, nn.Linear)):
            raise TypeError(f"base must be a Linear4bit or torch.nn.Linear, got {type(base).__name__}")
        check_lora_args(r, alpha, dropout, use_rslora, init)
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora, self.init = r, alpha, use_rslora, init
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._unmerged_base: nn.Module | None = None  # the base as it was before merge()
        self.reset_lora_parameters()

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def reset_lora_parameters(self) -> None:
        """A as PEFT initializes it (kaiming-uniform with a = sqrt(5), or N(0, 1/r) for "gaussian"); B = 0, so a
        fresh adapter leaves the base output unchanged."""
        with torch.no_grad():
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, use_rslora={self.use_rslora}, "
            f"merged={self.merged}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable(x):
            return _FrozenBaseLoRA.apply(x, self.lora_A.weight, self.lora_B.weight, self.scaling, self.base_layer)
        y = self.base_layer(x)
        if self.merged:
            return y
        dtype = y.dtype  # the activation dtype (under autocast, the autocast dtype)
        h = F.linear(self.lora_dropout(x).to(dtype), self.lora_A.weight.to(dtype))  # (..., r)
        # scaling is folded into the small (out, r) weight and the sum into the GEMM (addmm: y + h @ B.T), so the
        # adapter adds no elementwise pass over the (tokens, out) activations.
        b = (self.lora_B.weight * self.scaling).to(dtype)  # (out, r)
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, self.r), b.t())
        return out.view(y.shape)

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether _FrozenBaseLoRA can serve this call: an unmerged adapter, no active dropout, a frozen Linear4bit
        or nn.Linear base that computes in its output dtype, and eager mode (under torch.compile the plain path is
        traced and fused by the compiler)."""
        base = self.base_layer
        if self.merged or (self.training and self.dropout > 0) or torch.compiler.is_compiling():
            return False
        if type(base) not in (Linear4bit, nn.Linear) or any(p.requires_grad for p in base.parameters()):
            return False
        if type(base) is Linear4bit:
            compute, out = base.dtypes_for(x)
            return compute == out
        return True

    # -- merging -------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32, (out_features, in_features)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self, dequantize: bool = False) -> float | None:
        """Fold the adapter into the base weight; forward then runs the base alone.

        A 16-bit base gets W + delta rounded once to its dtype. A 4-bit base is dequantized, updated and
        requantized with its own settings (lossy: a warning gives the measured error), or with dequantize=True
        replaced by an nn.Linear holding the float32 sum rounded once to the layer's current floating dtype (that
        of its bias, else the dtype the weight was quantized from), lossless with respect to the dequantized base.
        Returns the relative error of the requantized weight (4-bit merge only), else None. Merging a merged layer
        raises ValueError.
        """
        errors = self._merge(dequantize)
        if errors is not None:
            warnings.warn(
                f"merging LoRA into a 4-bit base requantizes the weight: relative error {errors[0]:.3g}, max abs "
                f"error {errors[1]:.3g} against the exact merged weight; merge(dequantize=True) is lossless",
                stacklevel=2,
            )
        return None if errors is None else errors[0]

    def _merge(self, dequantize: bool) -> tuple[float, float] | None:
        """merge() without the warning; returns (relative error, max abs error) of a 4-bit requantization."""
        if self.merged:
            raise ValueError("this LoRALinear is already merged; call unmerge() before merging again")
        base, delta = self.base_layer, self.delta_weight().detach()
        errors = None
        with torch.no_grad():
            if isinstance(base, Linear4bit) and not dequantize:
                exact = base.dequantize(torch.float32) + delta  # (out, in) float32
                dtype = base.quant_state.dtype
                packed, state = quantize_4bit(exact.to(dtype), base.blocksize, base.quant_type, base.double_quant)
                merged = Linear4bit.from_quantized(packed, state, base.bias, base.compute_dtype)
                if base.bias is not None:  # from_quantized makes a trainable bias; a frozen one stays frozen
                    merged.bias.requires_grad_(base.bias.requires_grad)
                requantized = merged.dequantize(torch.float32)
                errors = relative_error(exact, requantized), max_abs_error(exact, requantized)
            else:
                dense = base.dequantize(torch.float32) if isinstance(base, Linear4bit) else base.weight.float()
                dtype = _dense_dtype(base) if isinstance(base, Linear4bit) else base.weight.dtype
                merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                                   device=dense.device, dtype=dtype)  # fmt: skip
                merged.weight.copy_(dense + delta)
                merged.weight.requires_grad_(isinstance(base, nn.Linear) and base.weight.requires_grad)
                if base.bias is not None:
                    merged.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=base.bias.requires_grad)
        self.base_layer, self.merged = merged, True
        # Kept outside the module tree (not a submodule): it must not appear in state_dict or named_modules.
        object.__setattr__(self, "_unmerged_base", base)
        return errors

    def unmerge(self) -> None:
        """Undo merge() exactly: the original base layer was kept aside (and followed the module's conversions)."""
        if not self.merged:
            raise ValueError("this LoRALinear is not merged; nothing to unmerge")
        self.base_layer, self.merged = self._unmerged_base, False
        object.__setattr__(self, "_unmerged_base", None)

    def _apply(self, fn, recurse=True):
        # The base kept aside by merge() is outside the module tree, so nn.Module's conversions (.to(dtype/device),
        # .half(), ...) would miss it; they reach it here, first, so a conversion it refuses changes nothing.
        if recurse and self._unmerged_base is not None:
            self._unmerged_base._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def merged_base(self) -> nn.Module:
        """The merged base layer (Linear4bit or nn.Linear), to replace this wrapper when unloading."""
        if not self.merged:
            raise ValueError("this LoRALinear is not merged; call merge() first")
        return self.base_layer

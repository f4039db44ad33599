"""Linear4bit: a frozen nn.Linear whose weight is stored as packed 4-bit NF4/FP4 codes plus a QuantState.

Storage and state dict follow bitsandbytes' Linear4bit (docs/formats.md section 4): `weight` is the packed
uint8 tensor of shape ((out * in + 1) // 2, 1) and the quantization state is written next to it as
`weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map` and
`weight.quant_state.bitsandbytes__<nf4|fp4>`, so state dicts move between the two libraries unchanged.

Quantization happens only in explicit calls (the constructor, `from_linear`); `.to()` moves bytes; forward only
reads. The packed weight is a frozen uint8 Parameter (never trained; FSDP2 can shard it), as bitsandbytes'
Params4bit is: model.parameters() lists it (grad None, so optimizers pass over it), and requires_grad_(True) on it
or on a whole model raises, since integer tensors cannot require gradients. The QuantState is a plain attribute
rather than buffers or parameters because module dtype casts (`model.to(bf16)`, `.half()`) and FSDP2's mixed
precision must never touch the float32 block scales: `_apply` lets the cast reach the uint8 weight (which ignores
dtype casts) and then moves the state to wherever the weight went. Under FSDP2 the state (about 3% of the packed
bytes with double quantization) is therefore replicated on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from nf4lora.kernels import dequantize, matmul_4bit
from nf4lora.kernels.dispatch import autocast_dtype
from nf4lora.kernels.precision import AUTO, auto_dtype
from nf4lora.nf4 import QuantState, quantize_4bit

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The tensors QuantState.to_state_dict writes under "<prefix>weight.", besides the JSON blob.
_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_BLOB = "quant_state.bitsandbytes__"


def _check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_compute_dtype(compute_dtype) -> None:
    if compute_dtype is not None and compute_dtype != AUTO and compute_dtype not in _COMPUTE_DTYPES:
        raise TypeError(
            f"compute_dtype must be 'auto', None, torch.float32, torch.float16 or torch.bfloat16, got {compute_dtype!r}"
        )


class Linear4bit(nn.Module):
    """y = x @ dequant(W).T + bias with W frozen in 4 bits; differentiable in x (and bias).

    compute_dtype: the dtype the matmul runs in: "auto" (default) the fastest one of the device the input is on
    (nf4lora.kernels.precision: bf16 on GPUs and on CPUs with native bf16, else float32 / float16), None the
    input's dtype, or a torch dtype. As in bitsandbytes, the output is cast back to the input dtype, except under
    autocast, where it is the autocast dtype like any autocast linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | str | None = AUTO,
        device=None,
    ):
        super().__init__()
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        _check_compute_dtype(compute_dtype)
        # A fresh layer is the quantized twin of a fresh nn.Linear (same kaiming-uniform init), so swapping one for
        # the other in a model definition keeps its initial statistics.
        init = nn.Linear(in_features, out_features, bias=bias, device=device)
        packed, state = quantize_4bit(init.weight.detach(), blocksize, quant_type, double_quant)
        self._setup(packed, state, init.bias, compute_dtype)

    def _setup(self, packed: torch.Tensor, state: QuantState, bias, compute_dtype, bias_requires_grad=True) -> None:
        self.out_features, self.in_features = state.shape
        self.compute_dtype = compute_dtype
        # ((out * in + 1) // 2, 1) uint8, bitsandbytes' layout. A frozen Parameter rather than a buffer: FSDP2
        # (fully_shard) shards parameters only, on dim 0, so each rank holds 1/world of the packed bytes and the
        # whole weight is all-gathered before forward; buffers would stay whole on every rank.
        self.weight = nn.Parameter(packed.view(-1, 1), requires_grad=False)
        self.quant_state = state
        # The bias is an ordinary parameter, trainable unless frozen, as in nn.Linear and bitsandbytes.
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias_requires_grad)

    # -- explicit constructors -----------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | str | None = AUTO,
        device=None,
    ) -> Linear4bit:
        """Quantize an nn.Linear's weight (on `device` if given, else where it lies); the bias is copied as is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        _check_compute_dtype(compute_dtype)
        weight = linear.weight.detach()
        if device is not None:
            weight = weight.to(device)  # quantize where the layer will live (the GPU kernels are far faster)
        packed, state = quantize_4bit(weight, blocksize, quant_type, double_quant)
        bias = None if linear.bias is None else linear.bias.detach().to(weight.device)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(packed, state, bias, compute_dtype, linear.bias is not None and linear.bias.requires_grad)
        return layer

    @classmethod
    def from_quantized(
        cls,
        packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | str | None = AUTO,
    ) -> Linear4bit:
        """Wrap already-quantized tensors (e.g. read from a checkpoint): the packed weight and state are used as
        they are (no copy, no re-quantization); the bias is copied into a parameter."""
        if not isinstance(state, QuantState):
            raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
        if len(state.shape) != 2:
            raise ValueError(f"state.shape must be 2-D (out_features, in_features), got {tuple(state.shape)}")
        state.check_packed(packed)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (state.shape[0],):
                got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"bias must be a tensor of shape ({state.shape[0]},), got {got}")
            if bias.device != packed.device:
                raise ValueError(f"bias is on {bias.device} but packed is on {packed.device}")
        _check_compute_dtype(compute_dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(packed, state, bias, compute_dtype)
        return layer

    # -- properties ----------------------------------------------------------------------------------------
    @property
    def blocksize(self) -> int:
        return self.quant_state.blocksize

    @property
    def quant_type(self) -> str:
        return self.quant_state.quant_type

    @property
    def double_quant(self) -> bool:
        return self.quant_state.double_quant

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out_features, in_features), in `dtype` (default: the dtype it was quantized from)."""
        return dequantize(self.weight, self.quant_state, dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        if x.dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
        dtype, out_dtype = self.dtypes_for(x)
        y = matmul_4bit(x.to(dtype), self.weight, self.quant_state, self.bias)
        return y.to(out_dtype)

    def dtypes_for(self, x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
        """(compute dtype, output dtype) of forward(x): the autocast dtype for both under autocast, else
        compute_dtype ("auto": the device's, None: x.dtype) and x.dtype."""
        cast = autocast_dtype(x.device.type)
        if cast is not None:
            return cast, cast
        if self.compute_dtype == AUTO:
            return auto_dtype(x.device.type, x.device.index), x.dtype
        return self.compute_dtype or x.dtype, x.dtype

    # -- moving ----------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # A conversion that casts every tensor (Module.type) would turn the packed codes into numbers; trying it on
        # an empty uint8 tensor first refuses it before anything changed.
        probe = fn(torch.empty(0, dtype=torch.uint8, device=self.weight.device))
        if probe.dtype != torch.uint8:
            raise TypeError(
                f"a conversion would turn the packed 4-bit weight into {probe.dtype}: Linear4bit weights are uint8 "
                "codes; use dequantize() for a dense weight"
            )
        super()._apply(fn, recurse)
        if self.quant_state.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    # -- Hugging Face / bitsandbytes state dict ---------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed) and bias
        for key, value in self.quant_state.to_state_dict(prefix + "weight.").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        quant_keys = [k for k in state_dict if k.startswith(wkey + ".")]
        known = {k for k in quant_keys if k[len(wkey) + 1 :] in _STATE_SUFFIXES or k[len(wkey) + 1 :].startswith(_BLOB)}

        def load_weight_and_bias():
            # nn.Module's loader copies `weight` and `bias`; it takes the "weight.*" quantization keys for unknown
            # children, so the ones this layer reads are taken back off its unexpected list.
            n_unexpected, n_errors = len(unexpected_keys), len(error_msgs)
            super(Linear4bit, self)._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            unexpected_keys[n_unexpected:] = [k for k in unexpected_keys[n_unexpected:] if k not in known]
            return len(error_msgs) == n_errors

        if wkey not in state_dict:  # reported missing by nn.Module's loader
            load_weight_and_bias()
            return
        weight = state_dict[wkey]
        if weight.dtype != torch.uint8:
            error_msgs.append(
                f"{wkey} is {weight.dtype} {tuple(weight.shape)}, not packed uint8 4-bit codes (the only quant_storage "
                "supported): a 16-bit weight must be quantized explicitly (Linear4bit.from_linear or quantize_model)"
            )
            return
        if not any(k[len(wkey) + 1 :].startswith(_BLOB) for k in quant_keys):
            missing_keys.append(f"{wkey}.{_BLOB}{self.quant_type}")
            return
        # load_state_dict(assign=True) takes the tensors as they are; otherwise they are copied, like parameters
        # are, onto this module's device, sharing no storage with the source.
        assign = local_metadata.get("assign_to_params_buffers", False)
        tensors = {k: state_dict[k] if assign else state_dict[k].to(self.weight.device, copy=True) for k in quant_keys}
        try:
            state = QuantState.from_state_dict(tensors, wkey + ".")
            if state.shape != (self.out_features, self.in_features):
                raise ValueError(
                    f"its shape is {tuple(state.shape)} but this layer is ({self.out_features}, {self.in_features})"
                )
            if weight.numel() != state.packed_numel:
                raise ValueError(f"it has {weight.numel()} bytes but its state describes {state.packed_numel}")
        except (ValueError, TypeError) as e:
            error_msgs.append(f"cannot load the 4-bit weight {wkey}: {e}")
            return
        if load_weight_and_bias():
            self.quant_state = state

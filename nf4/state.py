"""QuantState: everything needed to undo a blockwise 4-bit quantization, and its Hugging Face / bitsandbytes
state-dict format (docs/formats.md section 4)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

from .codebooks import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, code_table

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, eq=False)  # tensor fields: no field-wise ==, which raises on tensors
class NestedState:
    """Double quantization of the block constants: absmax - offset, 8-bit, in blocks of 256."""

    absmax: torch.Tensor  # float32 (ceil(n_blocks / 256),): max |absmax - offset| per nested block
    code: torch.Tensor  # float32 (256,): the signed dynamic map
    blocksize: int = NESTED_BLOCKSIZE


@dataclass(frozen=True, eq=False)
class QuantState:
    """How a tensor of `shape` and `dtype` was quantized to packed 4-bit codes.

    absmax holds one float32 scale per block of `blocksize` elements, or, with double quantization (`nested` set),
    one uint8 code per block: scale = float32(nested.code[absmax[b]] * nested.absmax[b // 256]) + offset.
    """

    absmax: torch.Tensor  # (n_blocks,) float32, or uint8 when nested
    shape: torch.Size
    dtype: torch.dtype  # the original dtype: what dequantization returns by default
    blocksize: int = 64
    quant_type: str = "nf4"
    code: torch.Tensor | None = None  # float32 (16,) the 4-bit table; filled from quant_type when None
    offset: torch.Tensor | None = None  # float32 scalar, mean of the float32 absmax (double quantization only)
    nested: NestedState | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", torch.Size(self.shape))
        if self.code is None:
            object.__setattr__(self, "code", code_table(self.quant_type).to(self.absmax.device))
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def packed_numel(self) -> int:
        return (self.numel + 1) // 2

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def bits_per_parameter(self) -> float:
        """Storage cost per weight: 4 bits plus the block constants (4.5 for NF4/64, 4.127 with DQ)."""
        bits = 4 * 2 * self.packed_numel + 8 * self.absmax.numel() * self.absmax.element_size()
        if self.nested is not None:
            bits += 8 * self.nested.absmax.numel() * 4 + 32
        return bits / self.numel

    # -- conversions ---------------------------------------------------------------------------------------
    def to(self, device) -> QuantState:
        """A copy on `device`. Moves bytes only: nothing is re-quantized."""
        nested = None
        if self.nested is not None:
            nested = replace(self.nested, absmax=self.nested.absmax.to(device), code=self.nested.code.to(device))
        return replace(
            self,
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            offset=None if self.offset is None else self.offset.to(device),
            nested=nested,
        )

    def absmax_float32(self) -> torch.Tensor:
        """The per-block float32 scales, decoding double quantization if present (n_blocks,)."""
        nested = self.nested
        if nested is None:
            return self.absmax
        return decode_absmax(self.absmax, self.offset, nested.absmax, nested.code, nested.blocksize)

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError/TypeError if the fields do not describe a consistent quantization."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantState.quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if not isinstance(self.blocksize, int) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"QuantState.blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.dtype not in _FLOAT_DTYPES.values():
            raise TypeError(f"QuantState.dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.numel == 0:
            raise ValueError(f"QuantState.shape {tuple(self.shape)} is empty")
        if self.code.shape != (16,) or self.code.dtype != torch.float32:
            raise ValueError(f"QuantState.code must be float32 of shape (16,), got {self.code.dtype} {tuple(self.code.shape)}")
        if self.absmax.dim() != 1 or self.absmax.numel() != self.n_blocks:
            raise ValueError(
                f"QuantState.absmax has shape {tuple(self.absmax.shape)}, expected ({self.n_blocks},) for shape "
                f"{tuple(self.shape)} in blocks of {self.blocksize}"
            )
        if self.nested is None:
            if self.absmax.dtype != torch.float32:
                raise TypeError(f"QuantState.absmax must be float32 without double quantization, got {self.absmax.dtype}")
            if self.offset is not None:
                raise ValueError("QuantState.offset is set but there is no nested state (double quantization)")
            return
        if self.absmax.dtype != torch.uint8:
            raise TypeError(f"QuantState.absmax must be uint8 codes with double quantization, got {self.absmax.dtype}")
        if self.offset is None or self.offset.numel() != 1:
            raise ValueError("QuantState.offset must be a float32 scalar with double quantization")
        nb = self.nested
        n_nested = -(-self.n_blocks // nb.blocksize)
        if nb.absmax.shape != (n_nested,) or nb.absmax.dtype != torch.float32:
            raise ValueError(
                f"nested absmax has {nb.absmax.dtype} {tuple(nb.absmax.shape)}, expected float32 ({n_nested},)"
            )
        if nb.code.shape != (256,) or nb.code.dtype != torch.float32:
            raise ValueError(f"nested code must be float32 of shape (256,), got {nb.code.dtype} {tuple(nb.code.shape)}")

    def check_packed(self, packed: torch.Tensor, name: str = "packed") -> None:
        """Raise if `packed` cannot hold the codes this state describes."""
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
        if packed.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8 (two 4-bit codes per byte), got {packed.dtype}")
        if packed.shape not in ((self.packed_numel, 1), (self.packed_numel,)):
            raise ValueError(
                f"{name} has shape {tuple(packed.shape)} but the state describes shape {tuple(self.shape)} "
                f"({self.numel} codes -> packed shape ({self.packed_numel}, 1)): packed data and state do not match"
            )
        if packed.device != self.device:
            raise ValueError(f"{name} is on {packed.device} but the state is on {self.device}")

    # -- Hugging Face / bitsandbytes state dict ------------------------------------------------------------
    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' Linear4bit writes next to `<module>.weight`.

        `prefix` is prepended as is: pass "model.layers.0.self_attn.q_proj.weight." to get
        "...q_proj.weight.absmax" etc. The packed weight itself is stored by the caller under "...weight".
        """
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        out = {prefix + "absmax": self.absmax, prefix + "quant_map": self.code}
        if self.nested is not None:
            out[prefix + "nested_absmax"] = self.nested.absmax
            out[prefix + "nested_quant_map"] = self.nested.code.clone()
            meta.update(nested_blocksize=self.nested.blocksize, nested_dtype="float32", nested_offset=self.offset.item())
        packed_meta = json.dumps(meta).encode("utf-8")
        out[prefix + f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(packed_meta), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "", device=None) -> QuantState:
        """Read the keys `to_state_dict(prefix)` writes (or bitsandbytes' `as_dict(packed=True)`)."""
        meta_keys = [k for k in tensors if k.startswith(prefix + "quant_state.bitsandbytes__")]
        if len(meta_keys) != 1:
            raise ValueError(
                f"expected exactly one '{prefix}quant_state.bitsandbytes__nf4|fp4' tensor, found {meta_keys or 'none'}"
            )
        try:
            meta = json.loads(bytes(tensors[meta_keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_keys[0]} does not hold a JSON object: {e}") from None
        for key in ("quant_type", "blocksize", "dtype", "shape"):
            if key not in meta:
                raise ValueError(f"{meta_keys[0]} lacks {key!r}: found {sorted(meta)}")
        if meta_keys[0].rsplit("__", 1)[1] != meta["quant_type"]:
            raise ValueError(f"{meta_keys[0]} says quant_type {meta['quant_type']!r}")
        if meta["dtype"] not in _FLOAT_DTYPES:
            raise ValueError(f"{meta_keys[0]}: dtype must be one of {list(_FLOAT_DTYPES)}, got {meta['dtype']!r}")

        def get(name):
            if prefix + name not in tensors:
                raise ValueError(f"missing tensor {prefix + name!r} in the quantization state")
            return tensors[prefix + name].to(device) if device is not None else tensors[prefix + name]

        nested, offset = None, None
        if "nested_offset" in meta or prefix + "nested_absmax" in tensors:
            if "nested_offset" not in meta:
                raise ValueError(f"{meta_keys[0]} lacks 'nested_offset' but {prefix}nested_absmax is present")
            nested = NestedState(
                absmax=get("nested_absmax"),
                code=get("nested_quant_map"),
                blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
            )
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=nested.absmax.device)
        return cls(
            absmax=get("absmax"),
            shape=torch.Size(meta["shape"]),
            dtype=_FLOAT_DTYPES[meta["dtype"]],
            blocksize=int(meta["blocksize"]),
            quant_type=meta["quant_type"],
            code=_canonical_code(get("quant_map"), meta["quant_type"], meta_keys[0]),
            offset=offset,
            nested=nested,
        )


def _canonical_code(quant_map: torch.Tensor, quant_type: str, where: str) -> torch.Tensor:
    """The code table to decode a stored state with: the built-in one for `quant_type`, once the file's quant_map
    is checked to hold the same values (a -0.0 for +0.0 is let through). bitsandbytes' kernels decode with their
    built-in tables whatever the file holds, so a different map would be decoded differently by it: refused."""
    canonical = code_table(quant_type).to(quant_map.device)
    if quant_map.shape != (16,) or quant_map.dtype != torch.float32 or not torch.equal(quant_map, canonical):
        raise ValueError(
            f"{where}: its quant_map is not bitsandbytes' {quant_type} table ({quant_map.dtype} "
            f"{tuple(quant_map.shape)}: {quant_map.flatten()[:4].tolist()}...); only the standard tables are read"
        )
    return canonical


def decode_absmax(
    codes: torch.Tensor, offset: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, nested_blocksize: int
) -> torch.Tensor:
    """Double quantization undone: scale[b] = float32(map[codes[b]] * nested_absmax[b // 256]) + offset.

    Two separate float32 roundings, product then sum, as bitsandbytes does (docs/formats.md 3.4). (n_blocks,) float32.
    """
    values = nested_code[codes.long()]  # (n_blocks,) float32
    return values * nested_absmax.repeat_interleave(nested_blocksize)[: codes.numel()] + offset


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

"""Reading safetensors checkpoints tensor by tensor, with errors that name the file and the key.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the header), then raw bytes.
We parse the header ourselves and `readinto` one tensor at a time instead of memory-mapping the file: a mapping
keeps every touched page resident (counted in RSS) until it is closed, while this keeps the loader's peak at one
tensor. Only JSON and raw tensor bytes are ever read; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from safetensors.torch import save_file

from .output_dir import write_file_atomic

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit on the JSON header


class SafetensorsFile:
    """The header of one .safetensors file; `read(key)` loads a single tensor from disk."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError(f"{path}: not a safetensors file (only {len(head)} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise ValueError(f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size})")
                raw = f.read(n)
        except OSError as e:
            raise ValueError(f"{path}: cannot read safetensors file: {e}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header (not JSON): {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            self.entries[key] = _check_entry(path, key, info, data_size)

    def keys(self):
        return self.entries.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self.entries[key]
        return end - begin

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key` on the CPU in its stored dtype: freshly allocated, or a view of `out` (a contiguous
        uint8 CPU tensor of at least nbytes(key) bytes) read into."""
        if key not in self.entries:
            raise KeyError(f"{self.path}: no tensor named {key!r}")
        dtype, shape, begin, end = self.entries[key]
        buf = torch.empty(end - begin, dtype=torch.uint8) if out is None else out[: end - begin]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(buf.numpy()) if end > begin else 0
        if got != end - begin:
            raise ValueError(f"{self.path}: tensor {key!r} is truncated ({got} of {end - begin} bytes)")
        return buf.view(dtype).reshape(shape)


def _check_entry(path: str, key: str, info, data_size: int):
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ValueError(f"{path}: corrupt header entry for tensor {key!r}: {info!r}")
    if info["dtype"] not in DTYPES:
        raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']!r}; supported: {list(DTYPES)}")
    dtype = DTYPES[info["dtype"]]
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise ValueError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"{path}: tensor {key!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not 0 <= begin <= end or end - begin != numel * itemsize:
        raise ValueError(
            f"{path}: tensor {key!r} has data_offsets {offsets} that do not match its shape {shape} and dtype "
            f"{info['dtype']} ({numel * itemsize} bytes)"
        )
    if end > data_size:
        raise ValueError(
            f"{path}: tensor {key!r} lies past the end of the file (needs byte {end}, the data section has "
            f"{data_size}): the file is truncated"
        )
    return dtype, tuple(shape), begin, end


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], file: str, metadata: dict | None = None) -> None:
    """Write `tensors` to `file` through a temporary file and os.replace, so a crash never leaves half a file;
    the file gets the ordinary mode (save_file alone creates 0600)."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    write_file_atomic(file, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))

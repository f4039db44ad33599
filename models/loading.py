"""load_model: a Hugging Face checkpoint directory of a native family -> LlamaForCausalLM, quantized to 4 bits as it
is read.

The model is built on the meta device (no weight memory), then filled tensor by tensor: each decoder Linear weight
is read in its stored dtype, quantized with nf4lora.nf4.quantize_4bit and wrapped in a Linear4bit, so the peak is
the 4-bit model plus one 16-bit tensor (plus quantize_4bit's chunk buffers). Embeddings, norms and lm_head stay in
`compute_dtype`. A checkpoint that transformers + bitsandbytes saved in 4 bits (docs/formats.md section 4) is loaded
as stored, without re-quantizing (a 4-bit lm_head is dequantized to `compute_dtype`).
"""

from __future__ import annotations

import glob
import json
import os

import torch
from torch import nn

from nf4lora.kernels.precision import resolve_compute_dtype
from nf4lora.nf4 import BLOCKSIZES, QuantState, dequantize_4bit, quantize_4bit

from .config import LlamaConfig
from .llama import LlamaForCausalLM, empty_init
from .rope import RotaryEmbedding
from .safetensors_io import SafetensorsFile

QUANTIZE = ("nf4", "fp4", None)
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_BNB_BLOB = "quant_state.bitsandbytes__"
# Keys some checkpoints carry that hold nothing the model needs (old LLaMA exports saved RoPE's buffer).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Checkpoint:
    """The tensors of a checkpoint directory: one model.safetensors, or shards listed by the index file."""

    def __init__(self, path: str):
        self.path = path
        # model.safetensors first, as transformers does: its save_pretrained re-saving a sharded folder unsharded
        # deletes the shards but leaves the old index behind.
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(os.path.join(path, SINGLE_FILE)):
            single = SafetensorsFile(os.path.join(path, SINGLE_FILE))
            self.files = {key: single for key in single.keys()}
        elif os.path.isfile(index):
            self.files = self._read_index(index)
        else:
            others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt")))
            hint = (
                f" (found {others}: only safetensors are read, never pickled .bin/.pt files; convert them with "
                "transformers' save_pretrained(safe_serialization=True))"
                if others
                else ""
            )
            raise FileNotFoundError(f"no weights in {path!r}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def _read_index(self, index: str) -> dict[str, SafetensorsFile]:
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index}: not valid JSON: {e}") from None
        except (KeyError, TypeError):
            raise ValueError(f"{index}: lacks a 'weight_map' object") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard files")
        shards: dict[str, SafetensorsFile] = {}
        files = {}
        for key, name in weight_map.items():
            if not isinstance(name, str) or os.path.basename(name) != name:
                raise ValueError(f"{index}: tensor {key!r} maps to {name!r}, which is not a file in {self.path!r}")
            if name not in shards:
                shard = os.path.join(self.path, name)
                if not os.path.isfile(shard):
                    raise FileNotFoundError(f"{index}: shard {name!r} (for tensor {key!r}) does not exist")
                shards[name] = SafetensorsFile(shard)
            if key not in shards[name]:
                raise ValueError(f"{index}: tensor {key!r} is listed in shard {name!r}, but {shards[name].path} lacks it")
            files[key] = shards[name]
        return files

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def keys(self):
        return self.files.keys()

    def nbytes(self, key: str) -> int:
        return self.files[key].nbytes(key)

    def read(self, key: str, shape: tuple[int, ...] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor `key`, checking its shape against the one the config implies (into `out`: see
        SafetensorsFile.read)."""
        if key not in self.files:
            where = ", ".join(sorted({os.path.basename(f.path) for f in self.files.values()})) or "no files"
            expected = f" (expected shape {tuple(shape)})" if shape is not None else ""
            raise ValueError(f"checkpoint {self.path!r} ({where}) is missing tensor {key!r}{expected}")
        file = self.files[key]
        if shape is not None and tuple(file.shape(key)) != tuple(shape):
            raise ValueError(
                f"{file.path}: tensor {key!r} has shape {tuple(file.shape(key))}, but config.json implies {tuple(shape)}"
            )
        return file.read(key, out=out)

    def file_of(self, key: str) -> str:
        return self.files[key].path


def resolve_device(name: str) -> torch.device:
    """torch.device for a --device value: "auto" is CUDA when available, else the CPU; CUDA without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name!r}, but CUDA is not available on this machine")
    return device


def load_model(
    path: str | os.PathLike,
    quantize: str | None = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
) -> LlamaForCausalLM:
    """Load a Hugging Face checkpoint directory (config.json + safetensors, single or sharded) of any family
    LlamaConfig reads (LLaMA, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 text, Phi-3).

    quantize: "nf4" or "fp4" to hold every decoder Linear (q/k/v/o or qkv, gate/up/down or gate_up) as a
        Linear4bit quantized with `blocksize` and `double_quant`; None for a plain model in `compute_dtype`.
        lm_head, embeddings and norms (q/k norms included) are never quantized.
    A checkpoint saved by transformers + bitsandbytes in 4 bits is read as stored (its own blocksize and double
    quantization win); with quantize=None its weights are dequantized to `compute_dtype`.
    Returns the model in eval mode on `device`.
    """
    path, device, compute_dtype = check_load_args(path, quantize, double_quant, blocksize, compute_dtype, device)
    config = LlamaConfig.from_pretrained(path)
    check_quantization_config(config.quantization_config, path)
    ckpt = Checkpoint(path)
    with empty_init():
        model = LlamaForCausalLM(config)
    linears = {n: False for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    tied = config.tie_word_embeddings
    consumed = fill_weights(model, ckpt, linears, "lm_head", tied, quantize, double_quant, blocksize, compute_dtype,
                            device)  # fmt: skip
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        consumed.add("lm_head.weight")  # some tied checkpoints still store a copy; it is the same matrix
    model.model.rotary_emb = RotaryEmbedding(config, device=device)  # its buffers were built on the meta device
    check_all_used(ckpt, consumed, lambda k: k.endswith(_IGNORED_SUFFIXES), f"this {config.model_type} config")
    return model.eval()


def check_load_args(path, quantize, double_quant, blocksize, compute_dtype, device):
    """load_model's arguments checked: (path as a str, torch.device, the compute dtype "auto" resolves to)."""
    path = os.fspath(path)
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    if compute_dtype != "auto" and compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be 'auto' or one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a directory")
    device = torch.device(device)
    return path, device, resolve_compute_dtype(compute_dtype, device).dtype


def fill_weights(model: nn.Module, ckpt: Checkpoint, linears: dict[str, bool], head: str | None,
                 tied: bool, quantize, double_quant, blocksize, compute_dtype, device,
                 key=lambda name: name) -> set[str]:  # fmt: skip
    """Replace the meta parameters of `model` by the checkpoint's, tensor by tensor; returns the keys read.

    linears: {module name: transposed} of the layers to hold as Linear4bit (nn.Linear when quantize is None);
        transposed marks a weight stored (in, out), as GPT-2's Conv1D stores it. Every other parameter is read in
        `compute_dtype`, except the output layer `head`'s weight when `tied` (the caller ties it).
    key: the checkpoint's name of a parameter (transformers renames some on loading; see models/generic.py).
    """
    # The 16-bit weights to quantize are read one after another into this one buffer: a fresh tensor per weight
    # left the freed ones as holes in malloc's heap, which grew by twice the 4-bit model (SmolLM2-135M: peak RSS
    # 455 MiB, and 379 MiB with this buffer).
    weights = [key(f"{name}.weight") for name in linears]
    to_quantize = [k for k in weights if k in ckpt and not _stored_4bit(ckpt, k)] if quantize else []
    scratch = torch.empty(max(map(ckpt.nbytes, to_quantize), default=0), dtype=torch.uint8)

    consumed: set[str] = set()
    for name, module in list(model.named_modules()):
        if name in linears:
            new = _load_linear(ckpt, key(f"{name}.weight"), key(f"{name}.bias"), module, linears[name], quantize,
                               double_quant, blocksize, compute_dtype, device, consumed, scratch)  # fmt: skip
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        elif name == head and _stored_4bit(ckpt, key(f"{name}.weight")):  # bitsandbytes quantized it; we do not
            packed, state = _read_bnb_weight(ckpt, key(f"{name}.weight"), tuple(module.weight.shape), consumed)
            weight = dequantize_4bit(packed.to(device), state.to(device), compute_dtype)
            module._parameters["weight"] = nn.Parameter(weight)
        else:
            for pname, p in list(module.named_parameters(recurse=False)):
                if name == head and tied and pname == "weight":
                    continue
                k = key(f"{name}.{pname}" if name else pname)
                t = _read_float(ckpt, k, p.shape).to(device=device, dtype=compute_dtype)
                module._parameters[pname] = nn.Parameter(t)
                consumed.add(k)
    return consumed


def check_all_used(ckpt: Checkpoint, consumed: set[str], ignored, what: str) -> None:
    """Raise ValueError if the checkpoint holds tensors that were not read (and `ignored(key)` does not excuse):
    the architecture does not match config.json."""
    unexpected = [k for k in ckpt.keys() if k not in consumed and not ignored(k)]
    if unexpected:
        shown = ", ".join(f"{k!r} (in {os.path.basename(ckpt.file_of(k))})" for k in sorted(unexpected)[:5])
        raise ValueError(
            f"checkpoint {ckpt.path!r} has {len(unexpected)} tensors {what} does not use, e.g. {shown}: the "
            "architecture does not match config.json"
        )


def check_quantization_config(qc: dict | None, path: str) -> None:
    """config.json's quantization_config: none, or bitsandbytes 4-bit with uint8 storage (read as stored)."""
    if qc is None:
        return
    where = os.path.join(path, "config.json")
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit", False):
        raise ValueError(
            f"{where}: quantization_config {qc.get('quant_method')!r} (load_in_4bit={qc.get('load_in_4bit')}) is "
            "not supported; only bitsandbytes 4-bit checkpoints are read"
        )
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise ValueError(f"{where}: bnb_4bit_quant_storage {storage!r} is not supported; only 'uint8'")


def _load_linear(ckpt, wkey, bkey, linear, transposed, quantize, double_quant, blocksize, compute_dtype, device,
                 consumed, scratch):  # fmt: skip
    """The module that replaces the meta layer `linear` (weight and bias stored as `wkey`, `bkey`): a Linear4bit, or
    an nn.Linear when quantize is None. transposed: the weight is stored (in, out) (GPT-2's Conv1D); bitsandbytes
    stores such a layer quantized from (out, in), like any other. A weight to quantize is read into `scratch`
    (fill_weights' reused buffer)."""
    from nf4lora.lora import Linear4bit  # lora imports kernels; keep models importable on its own

    stored = tuple(linear.weight.shape)
    shape = stored[::-1] if transposed else stored  # (out, in)
    bias = None
    if linear.bias is not None:
        bias = _read_float(ckpt, bkey, (shape[0],)).to(device=device, dtype=compute_dtype)
        consumed.add(bkey)

    if _stored_4bit(ckpt, wkey):
        packed, state = _read_bnb_weight(ckpt, wkey, shape, consumed)
        packed, state = packed.to(device), state.to(device)
        if quantize is None:
            return _dense_linear(dequantize_4bit(packed, state, compute_dtype), bias)
        if state.quant_type != quantize:
            raise ValueError(
                f"{ckpt.file_of(wkey)}: {wkey!r} is stored as {state.quant_type}, but quantize={quantize!r} was asked "
                f"for: pass quantize={state.quant_type!r} (or None to dequantize)"
            )
        return Linear4bit.from_quantized(packed, state, bias=bias, compute_dtype=compute_dtype)

    consumed.add(wkey)
    weight = _read_float(ckpt, wkey, stored, out=None if quantize is None else scratch)
    if transposed:  # a copy outside the scratch buffer: one more 16-bit tensor, for this layer only
        weight = weight.t().contiguous()
    if quantize is None:
        return _dense_linear(weight.to(device=device, dtype=compute_dtype), bias)
    weight = weight.to(device)
    if weight.dtype not in COMPUTE_DTYPES:  # float64 or 8-bit floats: quantize_4bit takes these three
        weight = weight.float()
    packed, state = quantize_4bit(weight, blocksize=blocksize, quant_type=quantize, double_quant=double_quant)
    return Linear4bit.from_quantized(packed, state, bias=bias, compute_dtype=compute_dtype)


def _read_float(ckpt: Checkpoint, key: str, shape, out: torch.Tensor | None = None) -> torch.Tensor:
    """A parameter as stored: any float dtype (cast by the caller); an integer or bool tensor is an error, not a
    silent cast of its values."""
    t = ckpt.read(key, shape, out=out)
    if not t.is_floating_point():
        raise TypeError(f"{ckpt.file_of(key)}: {key!r} is stored as {t.dtype}; a parameter must be a float tensor")
    return t


def _stored_4bit(ckpt: Checkpoint, wkey: str) -> bool:
    """Whether weight `wkey` was saved by transformers + bitsandbytes in 4 bits (its quant_state blob is there)."""
    return any(k.startswith(f"{wkey}.{_BNB_BLOB}") for k in ckpt.keys())


def _read_bnb_weight(ckpt: Checkpoint, wkey: str, shape, consumed) -> tuple[torch.Tensor, QuantState]:
    prefix = wkey + "."
    keys = [k for k in ckpt.keys() if k.startswith(prefix)]
    tensors = {k: ckpt.read(k) for k in keys}
    try:
        state = QuantState.from_state_dict(tensors, prefix=prefix)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt.file_of(keys[0])}: bad 4-bit quantization state for {wkey!r}: {e}") from None
    if tuple(state.shape) != tuple(shape):
        raise ValueError(
            f"{ckpt.file_of(keys[0])}: {wkey!r} was quantized from shape {tuple(state.shape)}, but config.json "
            f"implies {tuple(shape)}"
        )
    packed = ckpt.read(wkey)
    if packed.dtype != torch.uint8 or packed.numel() != state.packed_numel:
        raise ValueError(
            f"{ckpt.file_of(wkey)}: {wkey!r} is {packed.dtype} with {packed.numel()} elements; the quantization state "
            f"needs {state.packed_numel} packed uint8 bytes"
        )
    consumed.update(keys)
    consumed.add(wkey)
    return packed.view(-1, 1), state


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every Linear4bit of `model` (in place) by an nn.Linear in `dtype` holding its dequantized weight: the
    layers no adapter covered, when a merged checkpoint is written dense."""
    from nf4lora.lora import Linear4bit

    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            bias = None if module.bias is None else module.bias.detach().to(dtype)
            dense = _dense_linear(module.dequantize().to(dtype), bias)  # its original dtype, then this one
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    with empty_init():
        layer = nn.Linear(in_features, out_features, bias=bias is not None)
    layer.weight = nn.Parameter(weight)
    if bias is not None:
        layer.bias = nn.Parameter(bias)
    return layer

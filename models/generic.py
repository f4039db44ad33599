"""Causal LMs without native support: transformers' own modules, with nf4lora's Linear4bit and LoRA swapped in.

`load_any` is the one loader the commands call. A checkpoint of a native family (models/families.py) goes to
load_model and never imports transformers. Any other model_type that the installed transformers knows (the `hf`
extra: pip install 'nf4lora[hf]') is built from its config.json with its parameters on the meta device (buffers
such as rotary inv_freq are computed by the modules' own constructors, as transformers does: checkpoints do not
hold them), then filled tensor by tensor as load_model does (fill_weights: one 16-bit tensor at a time, quantized
and dropped). Every nn.Linear of the model except the output layer becomes a Linear4bit, and so does every
Conv1D (GPT-2), whose (in, out) weight is transposed to (out, in) first, as PEFT's fan_in_fan_out treats it.

The model is an instance of a subclass of transformers' class (same name, same module paths), so LoRA adapter keys
come out as PEFT writes them for the transformers model (base_model.model.<module path>). The subclass adds what
nf4lora's training loop expects of a model:
- forward(input_ids, attention_mask=, labels=, doc_ids=) returns .loss (mean shifted cross-entropy over labels !=
  -100, computed here exactly as the native decoder does) and .logits. Packed rows (doc_ids) are cut into one
  right-padded row per document, run, and put back: every model then sees each document alone, from position 0,
  whatever its kind of position encoding (learned, rotary, ALiBi), at the cost of the padding. Without labels and
  doc_ids, forward is transformers' own (generation passes its cache through it).
- `model.gradient_checkpointing = True` switches on transformers' own checkpointing (non-reentrant).
- generation is transformers' generate() with its own cache (models/generate.py hands over).
`model.loss_chunk_tokens` is accepted and ignored: the logits are always materialised.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nf4lora.kernels.precision import DTYPE_NAMES

from . import loading
from .config import LlamaConfig
from .families import ARCHITECTURES, FAMILIES, MODEL_TYPES
from .llama import CausalLMOutput, LlamaForCausalLM, empty_init
from .loading import Checkpoint, check_all_used, check_load_args, check_quantization_config, fill_weights
from .loss import IGNORE_INDEX
from .output_dir import write_text_atomic

HF_EXTRA = "pip install 'nf4lora[hf]'"
# Context-length names of configs that have no max_position_embeddings (MPT: max_seq_len), which nf4lora reads.
_CONTEXT_KEYS = ("n_positions", "max_seq_len", "seq_length", "n_ctx")
# Buffers that checkpoints saved by older transformers versions hold and today's modules no longer have: rotary
# inv_freq, and the masked_bias scalar of GPT-2-style attention (EleutherAI/gpt-neo-* store one per layer).
# transformers skips them on loading; so does nf4lora.
_STALE_BUFFERS = ("inv_freq", ".masked_bias")


def read_config_json(path: str) -> dict:
    where = os.path.join(path, "config.json")
    try:
        with open(where, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} does not exist: not a Hugging Face checkpoint directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return d


def is_native(d: dict) -> bool:
    """Whether config dict `d` is a native family's (as families.family_of decides, without raising)."""
    if d.get("model_type") is not None:
        return d["model_type"] in FAMILIES
    return all(a in ARCHITECTURES for a in d.get("architectures") or [])


def is_generic(model: nn.Module) -> bool:
    return getattr(type(model), "nf4lora_generic", False)


def load_any(path, quantize="nf4", double_quant=True, blocksize=64, compute_dtype="auto", device="cpu") -> nn.Module:
    """load_model's arguments and result for any causal LM: the native decoder for the families it runs, else
    transformers' model with nf4lora's layers (saying so in one line on stderr)."""
    path = os.fspath(path)
    d = read_config_json(path)
    if is_native(d):
        return loading.load_model(path, quantize, double_quant, blocksize, compute_dtype, device)
    model = load_generic(path, quantize, double_quant, blocksize, compute_dtype, device)
    layers = "with nf4lora's 4-bit layers" if quantize else "with a 16-bit base"
    print(f"model_type {d.get('model_type')!r} has no native support: using transformers' {type(model).__name__} "
          f"{layers}", file=sys.stderr)  # fmt: skip
    return model


@dataclass(frozen=True)
class GenericConfig:
    """What the commands read of a generic checkpoint's config.json before loading it (LlamaConfig's part for a
    native one): its context, the record `nf4lora merge` leaves, and transformers' config."""

    model_type: str
    max_position_embeddings: int
    nf4lora_merged: dict | None
    hf: object  # transformers' config


def read_model_config(path) -> LlamaConfig | GenericConfig:
    """config.json of the checkpoint at `path`, checked without loading weights: LlamaConfig for a native family,
    else GenericConfig (refusing what transformers' model cannot honour here, naming the field)."""
    path = os.fspath(path)
    if is_native(read_config_json(path)):
        return LlamaConfig.from_pretrained(path)
    config, _ = _transformers_config(path, os.path.join(path, "config.json"))
    return GenericConfig(config.model_type, _context(config, path), getattr(config, "nf4lora_merged", None), config)


def skeleton(config: LlamaConfig | GenericConfig) -> nn.Module:
    """The model of `config` on the meta device (no memory, no weights), with the layer names and shapes the
    loaded one has (a Conv1D becomes the Linear it is loaded as): what an adapter is checked against."""
    if isinstance(config, LlamaConfig):
        with empty_init():
            return LlamaForCausalLM(config)
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.pytorch_utils import Conv1D

    with _empty_parameters():
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.hf)]._from_config(copy.deepcopy(config.hf))
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


# -- loading ---------------------------------------------------------------------------------------------------------
def load_generic(path, quantize="nf4", double_quant=True, blocksize=64, compute_dtype="auto", device="cpu"):
    """Build transformers' causal LM for the checkpoint at `path` and fill it as load_model does (see the module
    docstring). Returns the model in eval mode on `device`."""
    path, device, compute_dtype = check_load_args(path, quantize, double_quant, blocksize, compute_dtype, device)
    where = os.path.join(path, "config.json")
    config, hf_class = _transformers_config(path, where)
    ckpt = Checkpoint(path)
    with _empty_parameters():
        model = generic_class(hf_class)._from_config(config, dtype=compute_dtype)

    from transformers.pytorch_utils import Conv1D

    from nf4lora.lora.surgery import _read_without_call

    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    read_only = _read_without_call(model)  # their owner reads .weight: they stay dense
    linears = {name: isinstance(m, Conv1D) for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, Conv1D)) and name != head and name not in read_only}  # fmt: skip
    model.nf4lora_transposed = frozenset(n for n, t in linears.items() if t)  # what merge transposes back
    tied = bool(getattr(config, "tie_word_embeddings", False)) and head is not None
    key = _checkpoint_names(model, ckpt, where)
    consumed = fill_weights(model, ckpt, linears, head, tied, quantize, double_quant, blocksize, compute_dtype, device,
                            key)  # fmt: skip
    consumed |= _fill_persistent_buffers(model, ckpt, key, device)
    if tied:
        model.tie_weights()
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise ValueError(f"{where}: tie_word_embeddings is true, but transformers did not tie {head}")
        consumed.add(key(f"{head}.weight"))  # a tied checkpoint may still store a copy; it is the same matrix
    # Tensors transformers skips too: its own list, and a checkpoint's copy of a buffer the modules compute (GPT-Neo's
    # causal-mask `bias`) or of one they no longer have. They are stale, not a sign of another architecture.
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    buffers = {key(name) for name, _ in model.named_buffers()}

    def stale(k: str) -> bool:
        return k in buffers or k.endswith(_STALE_BUFFERS) or any(p.search(k) for p in ignore)

    check_all_used(ckpt, consumed, stale, f"this {config.model_type} config")
    return model.eval()


def _context(config, path: str) -> int:
    """The context length of transformers' `config`: max_position_embeddings, or what the family calls it (MPT:
    max_seq_len)."""
    for key in ("max_position_embeddings", *_CONTEXT_KEYS):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"{os.path.join(path, 'config.json')}: no context length (max_position_embeddings or one of "
                     f"{_CONTEXT_KEYS})")  # fmt: skip


def _transformers_config(path: str, where: str):
    """(transformers config, causal-LM class) for the checkpoint at `path`; a config.json that only remote code or
    another quantization method could honour is refused, naming the field."""
    d = read_config_json(path)
    model_type = d.get("model_type")
    if model_type is None:
        raise ValueError(f"{where}: architectures {d.get('architectures')} are not native ({ARCHITECTURES}) and "
                         "model_type, which transformers needs to build any other, is absent")  # fmt: skip
    try:
        import transformers
    except ImportError:
        raise ValueError(f"model_type {model_type!r} has no native support, and running it through transformers "
                         f"needs the hf extra: {HF_EXTRA}") from None  # fmt: skip
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        why = ("its auto_map names remote code, which nf4lora does not run" if "auto_map" in d else
               f"transformers {transformers.__version__} does not know it either")  # fmt: skip
        raise ValueError(f"{where}: model_type {model_type!r} is not native ({MODEL_TYPES}) and {why}")
    check_quantization_config(d.get("quantization_config"), path)
    config = transformers.AutoConfig.from_pretrained(path)
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{where}: model_type {model_type!r} has no causal-LM class in transformers")
    return config, transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


@contextlib.contextmanager
def _empty_parameters():
    """Parameters are created on the meta device and not initialised; buffers are real (their constructors compute
    them: rotary frequencies, causal masks). transformers' own no_init_weights skips the initialisation."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise ValueError(f"loading a model through transformers needs accelerate: {HF_EXTRA}") from None
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with init_empty_weights(include_buffers=False), no_init_weights():
        yield


def _checkpoint_names(model, ckpt: Checkpoint, where: str):
    """Model tensor name -> checkpoint name, the inverse of what transformers does on loading: strip or add the base
    model's prefix (the original GPT-2 files lack "transformer.") and, in transformers 5, apply the model's
    renamings (GPT-NeoX's embed_out -> lm_head, old LayerNorm gamma/beta). Conversions that merge or split tensors
    (some MoE checkpoints) are refused: streaming reads each tensor as it is stored."""
    expected = dict.fromkeys(model.state_dict(), True)
    prefix = model.base_model_prefix
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.x: names as stored, up to the prefix
        def rename(k):
            return f"{prefix}.{k}" if k not in expected and f"{prefix}.{k}" in expected else k
    else:
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

        def rename(k):
            new, converter = rename_source_key(k, renamings, converters, prefix, expected)
            if converter is not None:
                raise ValueError(f"{where}: checkpoint tensor {k!r} needs transformers' conversion {converter!r} "
                                 "(tensors merged or split on loading), which nf4lora's streaming loader does not "
                                 "run")  # fmt: skip
            return new

    stored = {rename(k): k for k in ckpt.keys()}
    return lambda name: stored.get(name, name)


def _fill_persistent_buffers(model, ckpt: Checkpoint, key, device) -> set[str]:
    """Persistent buffers the checkpoint holds are read (in the buffer's dtype); the others keep the value their
    module computed. Every buffer moves to `device`."""
    from nf4lora.lora import Linear4bit

    read = set()
    for name, module in model.named_modules():
        for bname, buf in list(module._buffers.items()):
            if buf is None or isinstance(module, Linear4bit):  # its packed weight is filled already
                continue
            k = key(f"{name}.{bname}" if name else bname)
            if bname not in module._non_persistent_buffers_set and k in ckpt:
                buf = ckpt.read(k, tuple(buf.shape)).to(buf.dtype)
                read.add(k)
            module._buffers[bname] = buf.to(device)
    return read


# -- the model class -------------------------------------------------------------------------------------------------
_CLASSES: dict[type, type] = {}


def generic_class(hf_class: type) -> type:
    """The subclass of transformers' `hf_class` that nf4lora trains (same name; forward also takes doc_ids, with
    transformers' signature otherwise, which its generate() inspects)."""
    if hf_class not in _CLASSES:
        sig = inspect.signature(hf_class.forward)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        var_kw = [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
        doc_ids = inspect.Parameter("doc_ids", inspect.Parameter.KEYWORD_ONLY, default=None)

        def forward(self, input_ids=None, *args, doc_ids=None, **kwargs):
            return GenericCausalLM.forward(self, input_ids, *args, doc_ids=doc_ids, **kwargs)

        forward.__signature__ = sig.replace(parameters=[*params, doc_ids, *var_kw])
        forward.__doc__ = GenericCausalLM.forward.__doc__
        # Name and module are the parent's: transformers treats a class defined outside its package as remote code,
        # whose checkpoints it does not rename (GPT-NeoX's embed_out), and PEFT keys on names like *ForCausalLM.
        _CLASSES[hf_class] = type(hf_class.__name__, (GenericCausalLM, hf_class),
                                  {"forward": forward, "hf_class": hf_class, "__module__": hf_class.__module__})
    return _CLASSES[hf_class]


class GenericCausalLM:
    """What nf4lora adds to a transformers causal LM (mixed in before its class by generic_class)."""

    nf4lora_generic = True
    loss_chunk_tokens = 0  # accepted for the loop's sake; the logits are always materialised

    def forward(self, input_ids=None, *args, doc_ids=None, **kwargs):
        """With labels and/or doc_ids (the training loop): input_ids (B, T), attention_mask (B, T) or doc_ids
        (B, T) (packed documents numbered from 0, padding -1), labels (B, T) -> .loss (mean cross-entropy of
        position t predicting labels[t + 1] over labels != -100) and .logits (B, T, V); packed padding positions
        get zero logits. Otherwise transformers' forward, unchanged."""
        labels = kwargs.pop("labels", None)
        if labels is None and doc_ids is None:
            return super().forward(input_ids, *args, **kwargs)
        if args:
            raise TypeError("with labels or doc_ids, pass every argument but input_ids by keyword")
        if doc_ids is None:
            logits = super().forward(input_ids, **{**kwargs, "use_cache": False}).logits
        else:
            for name in ("attention_mask", "position_ids"):
                if kwargs.get(name) is not None:
                    raise ValueError(f"doc_ids (packed documents) cannot be combined with {name}")
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected {tuple(input_ids.shape)}")
            # Each document as a row of its own, right-padded to the longest: (N, L) ids, mask and labels.
            seg, off, n, length = _documents(doc_ids)
            real = doc_ids >= 0
            ids = input_ids.new_zeros(n, length)
            ids[seg, off] = input_ids[real]
            mask = torch.zeros_like(ids)
            mask[seg, off] = 1
            logits = super().forward(ids, attention_mask=mask, **{**kwargs, "use_cache": False}).logits  # (N, L, V)
            if labels is not None:
                labels, packed_labels = torch.full_like(ids, IGNORE_INDEX), labels
                labels[seg, off] = packed_labels[real]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)  # fmt: skip
        if doc_ids is not None:  # back to the packed rows (B, T, V)
            logits, unpacked = logits.new_zeros(*doc_ids.shape, logits.shape[-1]), logits
            logits[real] = unpacked[seg, off]
        return CausalLMOutput(logits=logits, loss=loss)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.__dict__.get("_nf4lora_checkpointing", False)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        # transformers sets this flag on every module that has one, this one included: only a change acts.
        if bool(on) == self.gradient_checkpointing:
            return
        self.__dict__["_nf4lora_checkpointing"] = bool(on)
        # transformers 5 names them activation_checkpointing_*; 4.x gradient_checkpointing_*
        enable = getattr(self, "activation_checkpointing_enable", None) or self.gradient_checkpointing_enable
        disable = getattr(self, "activation_checkpointing_disable", None) or self.gradient_checkpointing_disable
        # non-reentrant: the frozen embeddings give the checkpointed blocks no input that requires grad
        enable({"use_reentrant": False}) if on else disable()


def _documents(doc_ids: torch.Tensor):
    """(segment, offset, n_segments, longest) of the real tokens of packed rows, in row-major order: segment k is
    the k-th run of equal doc_ids >= 0, offset the position within it."""
    real = doc_ids >= 0
    starts = real.clone()
    starts[:, 1:] &= doc_ids[:, 1:] != doc_ids[:, :-1]
    flat = starts.flatten()
    if not bool(flat.any()):
        raise ValueError("doc_ids marks no token as part of a document (all are -1)")
    pos = torch.arange(flat.numel(), device=doc_ids.device)
    seg = flat.cumsum(0) - 1
    off = pos - torch.where(flat, pos, torch.zeros_like(pos)).cummax(0).values
    seg, off = seg[real.flatten()], off[real.flatten()]
    return seg, off, int(flat.sum()), int(off.max()) + 1


# -- generation ------------------------------------------------------------------------------------------------------
def generate(model, ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k, top_p, seed, eos: list[int],
             stream, use_cache: bool) -> torch.Tensor:  # fmt: skip
    """models.generate for a generic model (arguments checked there; ids (B, T) on the model's device): transformers'
    generate() with its own KV cache. Returns the (B, n) new ids, rows that stopped early filled with eos[0].
    As on the native path, only these arguments decide: the checkpoint's generation_config.json (a repetition
    penalty, a default temperature) is set aside for the call."""
    from transformers import GenerationConfig

    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else 1.0,
        top_k=(top_k or 0) if sampling else None, top_p=(top_p or 1.0) if sampling else None,
        eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0, use_cache=use_cache,
    )  # fmt: skip
    streamer = _Streamer(stream) if stream is not None else None
    was_training, saved = model.training, model.generation_config
    model.eval()
    model.generation_config = GenerationConfig()  # transformers fills what `config` leaves unset from it
    try:
        with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 streamer=streamer)  # fmt: skip
    finally:
        model.train(was_training)
        model.generation_config = saved
    return out[:, ids.shape[1] :]


class _Streamer:
    """transformers' streamer protocol (put the prompt, then each new token; end) -> our callback per new token."""

    def __init__(self, callback):
        self.callback, self.prompt_seen = callback, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.callback(int(value.flatten()[0]))
        self.prompt_seen = True

    def end(self) -> None:
        pass


# -- merging ---------------------------------------------------------------------------------------------------------
def merged_checkpoint(model, dtype_name: str):
    """(state dict, config) of a generic model whose adapters are merged and unloaded: every weight dense in
    `dtype_name` under transformers' names and layouts (Conv1D weights transposed back to (in, out)), checked
    against the transformers model its config builds; config.json as transformers writes it."""
    dtype = DTYPE_NAMES[dtype_name]
    loading.dequantize_linears(model, dtype)  # the layers the adapter does not cover are still packed
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and torch.equal(head.weight, embed.weight)
    transposed = {f"{n}.weight" for n in getattr(model, "nf4lora_transposed", ())}
    tensors = {k: (v.t() if k in transposed else v).detach().to(dtype).contiguous()
               for k, v in model.state_dict().items() if not (tied and k == f"{head_name}.weight")}  # fmt: skip

    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = tied
    config.dtype = dtype  # written as torch_dtype (4.x) or dtype (5.x)
    for attr in ("quantization_config", "nf4lora_merged"):  # the weights are dense; the caller records the merge
        if getattr(config, attr, None) is not None:
            delattr(config, attr)
    with _empty_parameters():
        reference = model.hf_class._from_config(copy.deepcopy(config))
    expected = {k: tuple(v.shape) for k, v in _stored_names(reference, reference.state_dict()).items()
                if not (tied and k == f"{head_name}.weight")}  # fmt: skip
    tensors = _stored_names(model, tensors)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    wrong = [f"{k}: {got.get(k, 'missing')} (config: {expected.get(k, 'none')})"
             for k in sorted(got.keys() | expected.keys()) if got.get(k) != expected.get(k)]  # fmt: skip
    if wrong:
        raise ValueError(f"the merged model does not match its config ({', '.join(wrong[:3])}); nothing was written")
    return tensors, MergedConfig(config)


@dataclass(frozen=True)
class MergedConfig:
    """config.json of a merged generic checkpoint: transformers' config as its save_pretrained writes it, plus the
    record of the merge (a dataclass, as LlamaConfig, so `merge` fills nf4lora_merged the same way for both)."""

    hf: object
    nf4lora_merged: dict | None = None

    def save_pretrained(self, directory) -> None:
        d = json.loads(self.hf.to_json_string(use_diff=True))
        if self.nf4lora_merged is not None:
            d["nf4lora_merged"] = self.nf4lora_merged
        write_text_atomic(os.path.join(directory, "config.json"), json.dumps(d, indent=2, sort_keys=True) + "\n")


def _stored_names(model, tensors: dict) -> dict:
    """`tensors` under the names transformers' save_pretrained writes (transformers 5 reverts its load-time
    renamings: GPT-NeoX's lm_head is stored as embed_out; 4.x stores module paths)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return tensors
    return revert_weight_conversion(model, tensors)

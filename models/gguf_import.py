"""convert_gguf: a LLaMA, Qwen2/2.5 or Qwen3 GGUF file (llama.cpp) -> a Hugging Face model directory.

Reads metadata and tensors with the `gguf` package (GGUFReader, gguf.quants.dequantize) and writes
model.safetensors (sharded if large), config.json, generation_config.json, tokenizer.json and
tokenizer_config.json. Two format differences are undone:
- llama.cpp stores LLaMA's q/k projection rows in interleaved RoPE order (pairs 2i, 2i+1 of each head); Hugging
  Face pairs i with i + head_dim/2 (docs/formats.md section 6), so each head's rows are de-interleaved. Qwen's
  files keep Hugging Face's order (llama.cpp runs them with NEOX-style RoPE).
- the tokenizer lives in metadata (tokens, merges or piece types); it is rebuilt as a `tokenizers` pipeline.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from nf4lora.kernels.precision import DTYPE_NAMES

from .config import LlamaConfig, write_json_atomic
from .output_dir import atomic_output_dir
from .rope import rope_inv_freq
from .safetensors_io import save_safetensors_atomic

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Refused, with the reason: their GGUF metadata lacks what config.json needs, or their tensors are stored
# transformed. Convert the Hugging Face checkpoint of these families instead.
_NOT_IMPORTED = {
    "gemma2": "llama.cpp stores Gemma's norm weights plus one and keeps no query_pre_attn_scalar",
    "gemma3": "llama.cpp stores Gemma's norm weights plus one and hard-codes its layer pattern and local RoPE base",
    "phi3": "not implemented (fused tensors and longrope factor tensors)",
}
_SHARD_BYTES = 2 * 1024**3  # shard the output above 2 GiB, as transformers does by default (5 GB) but smaller
# GGUF tensor name (per block `{bid}`) -> Hugging Face name
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}  # fmt: skip
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp pre-tokenizer ids -> how its regex splits text (llama-vocab.cpp). "digits": each digit alone, then
# the GPT-2 regex; "gpt2": the GPT-2 regex; "llama3": the Llama-3 regex, numbers in groups of up to three;
# "qwen2": the Llama-3 regex with each digit alone.
_PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits", "command-r": "digits",
    "llama-bpe": "llama3", "llama3": "llama3", "dbrx": "llama3", "smaug-bpe": "llama3", "qwen2": "qwen2",
}  # fmt: skip
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEXES = {"llama3": _LLAMA3_REGEX, "qwen2": _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | torch.dtype = "bfloat16",
                 *, overwrite: bool = False) -> str:  # fmt: skip
    """Convert `gguf_path` into a Hugging Face directory `out_dir`; returns out_dir.

    dtype: the dtype of the written weights ("bfloat16", "float16" or "float32"). Quantized GGUF tensors are
    dequantized exactly to float32 first, so "float32" keeps every value the file encodes.
    out_dir must be new or empty; overwrite=True lets it replace an existing checkpoint directory (one with
    config.json). The directory is built beside out_dir and swapped into place when complete (output_dir.py).
    """
    from gguf import GGUFReader, Keys

    gguf_path, out_dir = os.fspath(gguf_path), os.fspath(out_dir)
    torch_dtype = DTYPE_NAMES.get(dtype) if isinstance(dtype, str) else dtype
    if torch_dtype not in DTYPE_NAMES.values():
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {dtype!r}")
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file {gguf_path!r} does not exist")
    with atomic_output_dir(out_dir, "out_dir", overwrite=overwrite, inputs=[("gguf", gguf_path)]) as tmp:
        try:
            reader = GGUFReader(gguf_path)
        except Exception as e:  # GGUFReader raises ValueError/struct errors/IndexError on bad files
            raise ValueError(f"{gguf_path}: not a readable GGUF file: {e}") from None
        meta = _Metadata(reader, gguf_path)
        tensors = {t.name: t for t in reader.tensors}
        config = _config(meta, tensors, torch_dtype)
        _write_weights(tensors, config, meta, tmp, torch_dtype)
        config.save_pretrained(tmp)
        # llama.cpp ends generation at the end-of-turn and end-of-message tokens too (Llama-3's <|eot_id|>):
        # generation_config.json lists them with EOS, where transformers' generate and ours stop.
        stops = [config.eos_token_id, meta.get(Keys.Tokenizer.EOT_ID, None), meta.get(Keys.Tokenizer.EOM_ID, None)]
        stops = list(dict.fromkeys(i for i in stops if i is not None))
        eos = stops[0] if len(stops) == 1 else stops or None
        generation = {k: v for k, v in (("bos_token_id", config.bos_token_id), ("eos_token_id", eos),
                                        ("pad_token_id", config.pad_token_id)) if v is not None}  # fmt: skip
        write_json_atomic(os.path.join(tmp, "generation_config.json"), generation)
        _tokenizer(meta).save_pretrained(tmp)
    return out_dir


class _Metadata:
    """Typed access to GGUF key/values with errors naming the file and the key."""

    def __init__(self, reader, path: str):
        self.fields, self.path = reader.fields, path
        self.arch = self.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            why = _NOT_IMPORTED.get(self.arch)
            why = f" ({why}; load its Hugging Face checkpoint instead)" if why else ""
            raise ValueError(
                f"{path}: general.architecture {self.arch!r} is not supported{why}; supported: {ARCHITECTURES}"
            )

    def get(self, key: str, default=..., arch: bool = False):
        key = key.format(arch=self.arch) if arch else key
        if key not in self.fields:
            if default is ...:
                raise ValueError(f"{self.path}: missing metadata key {key!r}")
            return default
        return self.fields[key].contents()


def _config(meta: _Metadata, tensors: dict, dtype: torch.dtype) -> LlamaConfig:
    from gguf import Keys

    get = meta.get
    if get(Keys.LLM.EXPERT_COUNT, 0, arch=True):
        raise ValueError(f"{meta.path}: mixture-of-experts models ({Keys.LLM.EXPERT_COUNT.format(arch=meta.arch)}) are not supported")
    hidden = get(Keys.LLM.EMBEDDING_LENGTH, arch=True)
    heads = get(Keys.Attention.HEAD_COUNT, arch=True)
    head_dim = get(Keys.Attention.KEY_LENGTH, hidden // heads, arch=True)
    rope_dim = get(Keys.Rope.DIMENSION_COUNT, head_dim, arch=True)
    if rope_dim != head_dim:
        raise ValueError(f"{meta.path}: partial rotary embeddings (rope.dimension_count {rope_dim} != head dim {head_dim}) are not supported")
    tokens = get(Keys.Tokenizer.LIST)
    # config.json as the family's Hugging Face checkpoint would have it, read by LlamaConfig like any other
    d = dict(
        model_type=meta.arch,
        vocab_size=get(Keys.LLM.VOCAB_SIZE, len(tokens), arch=True),
        hidden_size=hidden,
        intermediate_size=get(Keys.LLM.FEED_FORWARD_LENGTH, arch=True),
        num_hidden_layers=get(Keys.LLM.BLOCK_COUNT, arch=True),
        num_attention_heads=heads,
        num_key_value_heads=get(Keys.Attention.HEAD_COUNT_KV, heads, arch=True),
        head_dim=head_dim,
        rms_norm_eps=float(get(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5, arch=True)),
        max_position_embeddings=get(Keys.LLM.CONTEXT_LENGTH, 4096, arch=True),
        rope_theta=float(get(Keys.Rope.FREQ_BASE, 10000.0, arch=True)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=get(Keys.Tokenizer.BOS_ID, None),
        eos_token_id=get(Keys.Tokenizer.EOS_ID, None),
        pad_token_id=get(Keys.Tokenizer.PAD_ID, None),
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if meta.arch in ("llama", "qwen3"):  # Qwen2's q/k/v always carry biases, its o_proj never (families.py)
        d["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if meta.arch == "llama":
        d["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    scaling = get(Keys.Rope.SCALING_TYPE, "none", arch=True)
    if scaling == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(get(Keys.Rope.SCALING_FACTOR, arch=True))}
    elif scaling not in ("none", ""):
        raise ValueError(f"{meta.path}: RoPE scaling type {scaling!r} is not supported; supported: linear")
    config = LlamaConfig.from_dict(d, source=meta.path)
    if "rope_freqs.weight" in tensors:
        config.rope_scaling = _llama3_scaling(meta, config, _dequantize(tensors["rope_freqs.weight"], meta.path))
    return config


def _llama3_scaling(meta: _Metadata, config: LlamaConfig, freq_factors: torch.Tensor) -> dict:
    """Recover Llama-3.1 RoPE parameters from llama.cpp's per-frequency divisors (the `rope_freqs` tensor).

    llama.cpp stores inv_freq / scaled_inv_freq; every released Llama-3.x model uses low/high factors 1 and 4 and
    an original context of 8192, with `factor` = the largest divisor. The candidate is checked, not assumed.
    """
    candidate = {"rope_type": "llama3", "factor": float(freq_factors.max()), "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    plain = rope_inv_freq(config)
    config.rope_scaling = candidate
    divisors = plain / rope_inv_freq(config)
    config.rope_scaling = None
    if divisors.shape != freq_factors.shape or not torch.allclose(divisors, freq_factors.float(), rtol=1e-4):
        raise ValueError(f"{meta.path}: rope_freqs does not match Llama-3.1 RoPE scaling; it cannot be expressed in config.json")
    return candidate


def _dequantize(tensor, path: str) -> torch.Tensor:
    """A GGUF tensor as float32 torch, in PyTorch (row-major, outermost first) shape."""
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"{path}: tensor {tensor.name!r} has type {kind}; supported: {SUPPORTED_TYPES}")
    shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path}: tensor {tensor.name!r} holds {values.size} values, its shape {shape} needs {int(np.prod(shape))}")
    return torch.from_numpy(values.reshape(shape).copy())


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's RoPE row order: within each head, rows (2i, 2i+1) go back to (i, i + head_dim/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
    return None


def _expected_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of `c` holds, with their shapes: those of the model built on the meta device."""
    from .llama import LlamaForCausalLM, empty_init

    with empty_init():
        model = LlamaForCausalLM(c)
    tied_head = "lm_head.weight" if c.tie_word_embeddings else None
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != tied_head}


def _write_weights(tensors: dict, config: LlamaConfig, meta: _Metadata, out_dir: str, dtype: torch.dtype) -> None:
    """Dequantize tensor by tensor and write shards of at most _SHARD_BYTES (memory: one shard + one tensor)."""
    expected = _expected_shapes(config)
    by_hf = {}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":
            continue
        hf = _hf_name(name)
        if hf is None or hf not in expected:
            raise ValueError(f"{meta.path}: tensor {name!r} has no place in a {meta.arch} model with this metadata")
        by_hf[hf] = tensor
    missing = [k for k in expected if k not in by_hf]
    if missing:
        raise ValueError(f"{meta.path}: missing tensors for {missing[:5]} ({len(missing)} in all)")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names = []
    for hf, tensor in by_hf.items():
        w = _dequantize(tensor, meta.path)
        if tuple(w.shape) != expected[hf]:
            raise ValueError(f"{meta.path}: tensor {tensor.name!r} has shape {tuple(w.shape)}, the metadata implies {expected[hf]}")
        if meta.arch == "llama" and ".q_proj." in hf:
            w = _unpermute(w, config.num_attention_heads)
        elif meta.arch == "llama" and ".k_proj." in hf:
            w = _unpermute(w, config.num_key_value_heads)
        w = w.to(dtype)
        if size and size + w.numel() * w.element_size() > _SHARD_BYTES:
            names.append(_flush(shards[-1], out_dir, len(names)))
            shards.append({})
            size = 0
        shards[-1][hf] = w
        size += w.numel() * w.element_size()
    names.append(_flush(shards[-1], out_dir, len(names)))
    if len(names) == 1:
        os.replace(os.path.join(out_dir, names[0]), os.path.join(out_dir, "model.safetensors"))
        return
    final = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))]
    weight_map = {}
    for tmp, name, shard in zip(names, final, shards):
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for s in shards for v in s.values())
    write_json_atomic(os.path.join(out_dir, "model.safetensors.index.json"),
                      {"metadata": {"total_size": total}, "weight_map": weight_map})  # fmt: skip


def _flush(shard: dict, out_dir: str, index: int) -> str:
    name = f"shard-{index}.safetensors.partial"
    save_safetensors_atomic(shard, os.path.join(out_dir, name))
    for key in shard:  # keep only the names: the shard's memory is released
        shard[key] = torch.empty(0)
    return name


def _tokenizer(meta: _Metadata):
    """Rebuild the tokenizer from tokenizer.ggml.* metadata."""
    from gguf import Keys
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from .sentencepiece_bpe import tokenizer_from_pieces
    from .tokenizer import Tokenizer

    kind = meta.get(Keys.Tokenizer.MODEL)
    tokens = list(meta.get(Keys.Tokenizer.LIST))
    types = list(meta.get(Keys.Tokenizer.TOKEN_TYPE, [1] * len(tokens)))
    if kind == "llama":
        scheme = "first" if meta.get(Keys.Tokenizer.ADD_PREFIX, True) else "never"
        backend = tokenizer_from_pieces(list(zip(tokens, types)), scheme)
        add_bos_default = True
    elif kind == "gpt2":
        pre = meta.get(Keys.Tokenizer.PRE, "default")
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"{meta.path}: tokenizer.ggml.pre {pre!r} is not supported; supported: {sorted(_PRE_TOKENIZERS)}")
        style = _PRE_TOKENIZERS[pre]
        merges = [tuple(m.split(" ", 1)) for m in meta.get(Keys.Tokenizer.MERGES)]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=style == "llama3"))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style not in _REGEXES)
        if style == "digits":
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif style in _REGEXES:
            split = pre_tokenizers.Split(Regex(_REGEXES[style]), behavior="isolated", invert=False)
            backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        added = [AddedToken(t, special=k == _TOKEN_CONTROL, normalized=False)
                 for t, k in zip(tokens, types) if k in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]  # fmt: skip
        if any(t.special for t in added):
            backend.add_special_tokens([t for t in added if t.special])
        if any(not t.special for t in added):
            backend.add_tokens([t for t in added if not t.special])
        add_bos_default = False
    else:
        raise ValueError(f"{meta.path}: tokenizer.ggml.model {kind!r} is not supported; supported: 'llama', 'gpt2'")

    def token(key):
        i = meta.get(key, None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    specials = {"bos_token": token(Keys.Tokenizer.BOS_ID), "eos_token": token(Keys.Tokenizer.EOS_ID),
                "unk_token": token(Keys.Tokenizer.UNK_ID), "pad_token": token(Keys.Tokenizer.PAD_ID)}  # fmt: skip
    add_bos = bool(meta.get(Keys.Tokenizer.ADD_BOS, add_bos_default))
    add_eos = bool(meta.get(Keys.Tokenizer.ADD_EOS, False))
    tok = Tokenizer(backend, {k: v for k, v in specials.items() if v is not None}, meta.get(Keys.Tokenizer.CHAT_TEMPLATE, None))
    tok.set_bos_eos(add_bos, add_eos)
    return tok

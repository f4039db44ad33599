"""LlamaConfig: the hyper-parameters of the one decoder, read from a Hugging Face config.json of any supported family.

LLaMA, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 are one LLaMA-style decoder with a few
switches (biases, q/k norms, GeGLU, Gemma's norms and embedding scale, soft-capping, sliding windows, fused
projections, RoPE variants). Each switch is a field below whose default reproduces LLaMA; families.py says how
each family's config.json sets them, as transformers reads it. A value the decoder cannot run is refused here,
once, with a ValueError naming the field, rather than silently computing something the checkpoint was not
trained for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

from nf4lora.kernels import model_ops

from .families import (FAMILIES, FULL, MODEL_TYPES, SLIDING, family_keys, family_of, normalise_rope_scaling,
                       read_switches)
from .output_dir import write_text_atomic

# The gated MLP's activations, by their transformers (ACT2FN) names: SwiGLU and Gemma's GeGLU.
# hidden_act -> the gated MLP activation act(gate) * up: SwiGLU, or Gemma's GeGLU (kernels/model_ops.py: Triton on
# CUDA, torch on the CPU)
GATED_ACTIVATIONS = {"silu": model_ops.swiglu, "gelu_pytorch_tanh": model_ops.geglu}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Keys every family reads the same way (the rest come from families.read_switches).
_SHARED = _REQUIRED + ("num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                       "tie_word_embeddings", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
                       "torch_dtype", "quantization_config", "nf4lora_merged")  # fmt: skip
_WRITTEN_WHEN_SET = ("torch_dtype", "quantization_config", "nf4lora_merged")


@dataclass
class LlamaConfig:
    model_type: str = "llama"  # the family (families.FAMILIES): which config.json to_dict writes
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: plain multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Mistral-Nemo, Qwen3, Gemma differ)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # True: lm_head shares embed_tokens.weight (SmolLM, Llama-3.2-1B, Gemma)
    attention_bias: bool = False  # biases on q/k/v/o_proj
    qkv_bias: bool = False  # biases on q/k/v_proj only (Qwen2: its o_proj has none)
    mlp_bias: bool = False
    hidden_act: str = "silu"  # the gated MLP's activation (GATED_ACTIVATIONS): SwiGLU, or Gemma's GeGLU
    fused_projections: bool = False  # Phi-3: one qkv_proj and one gate_up_proj Linear instead of three and two
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim of each query and key head, before RoPE
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight), computed in float32
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size), rounded to their dtype
    sandwich_norms: bool = False  # Gemma 2/3: a norm on the attention output and norms before and after the MLP
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by its -1/2 power; None: head_dim's
    attn_logit_softcapping: float | None = None  # Gemma 2: attention scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    # A sliding-window layer's query sees only the newest sliding_window positions, itself included (None: all).
    sliding_window: int | None = None
    # Per layer "full_attention" or "sliding_attention" (Qwen2, Gemma); None: every layer slides when
    # sliding_window is set (Mistral, Phi-3).
    layer_types: list[str] | None = None
    attention_dropout: float = 0.0  # dropout on the attention probabilities, in training only
    resid_pdrop: float = 0.0  # Phi-3: dropout on each block's attention and MLP outputs, in training only
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3"|"longrope", ...}; None = plain RoPE
    rope_local_base_freq: float | None = None  # Gemma 3: sliding layers' plain-RoPE base; None: as the others
    partial_rotary_factor: float = 1.0  # Phi-3 variants: RoPE rotates the first int(head_dim * this) dimensions
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, informational
    quantization_config: dict | None = field(default=None, repr=False)  # HF bitsandbytes block, if any
    # What `nf4lora merge` records (train/merged.py): a merged model, from which base and adapter; transformers
    # keeps unknown config.json keys as attributes and otherwise ignores them.
    nf4lora_merged: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "llama" and self.sliding_window is not None:
            self.model_type = "mistral"  # LLaMA has no window; Mistral is LLaMA with one
        self.rope_scaling = normalise_rope_scaling(self.rope_scaling)
        if self.layer_types is not None:  # one form per meaning: None when every layer is of one kind
            self._validate_layer_types()
            kinds = set(self.layer_types)
            self.layer_types = list(self.layer_types) if len(kinds) == 2 else None
            if kinds == {FULL}:
                self.sliding_window = None  # no layer uses it
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.model_type not in FAMILIES:
            raise ValueError(f"LlamaConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in GATED_ACTIVATIONS:
            raise ValueError(f"LlamaConfig.hidden_act (config.json: hidden_act; Gemma: hidden_activation) must be one "
                             f"of {tuple(GATED_ACTIVATIONS)}, got {self.hidden_act!r}")  # fmt: skip
        for name in ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
                     "attn_logit_softcapping", "final_logit_softcapping"):  # fmt: skip
            value = getattr(self, name)
            optional = name != "rms_norm_eps" and name != "rope_theta"
            if not (optional and value is None) and not (_is_number(value) and value > 0):
                raise ValueError(f"LlamaConfig.{name} must be > 0{' or null' if optional else ''}, got {value!r}")
        if not (_is_number(self.partial_rotary_factor) and 0 < self.partial_rotary_factor <= 1):
            raise ValueError(f"LlamaConfig.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_dim == 0 or self.rotary_dim % 2:
            raise ValueError(
                f"LlamaConfig: rotary embeddings need an even, positive number of rotated dimensions, got "
                f"{self.rotary_dim} (head_dim {self.head_dim} x partial_rotary_factor {self.partial_rotary_factor})"
            )
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise ValueError(f"LlamaConfig.sliding_window must be a positive integer or null, got {window!r}")
        self._validate_layer_types()
        for name in ("attention_dropout", "resid_pdrop"):
            if not (_is_number(getattr(self, name)) and 0 <= getattr(self, name) < 1):
                raise ValueError(f"LlamaConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(self.rope_scaling[key]) != self.rotary_dim // 2:
                    raise ValueError(f"LlamaConfig.rope_scaling {key} must have rotary_dim / 2 = "
                                     f"{self.rotary_dim // 2} entries, got {len(self.rope_scaling[key])}")  # fmt: skip

    def _validate_layer_types(self) -> None:
        kinds = self.layer_types
        if kinds is None:
            return
        if len(kinds) != self.num_hidden_layers or not set(kinds) <= {FULL, SLIDING}:
            raise ValueError(f"LlamaConfig.layer_types must list {FULL!r} or {SLIDING!r} for each of the "
                             f"{self.num_hidden_layers} layers, got {kinds!r}")  # fmt: skip
        if SLIDING in kinds and self.sliding_window is None:
            raise ValueError(f"LlamaConfig.layer_types has {SLIDING!r} layers, but sliding_window is null")

    def is_sliding(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer_idx] == SLIDING

    def layer_kinds(self) -> list[str]:
        """layer_types spelled out: "sliding_attention" or "full_attention" for every layer."""
        return [SLIDING if self.is_sliding(i) else FULL for i in range(self.num_hidden_layers)]

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def rotary_dim(self) -> int:
        """How many leading dimensions of each head RoPE rotates (transformers: int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> list[int]:
        """eos_token_id as a list (config.json allows an int or a list: Llama-3 instruct has several)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # -- config.json ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> LlamaConfig:
        """Build from a Hugging Face config dict; `source` names the file in error messages."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        try:
            family = family_of(d)
            defaults = {f.name: f.default for f in fields(cls)} | family.defaults
            kwargs = {k: d.get(k, defaults[k]) for k in _SHARED}
            if "torch_dtype" not in d and "dtype" in d:  # transformers 5 renamed torch_dtype -> dtype
                kwargs["torch_dtype"] = d["dtype"]
            kwargs |= read_switches(family, d)
            return cls(model_type=family.model_type, **kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LlamaConfig:
        """Read `<path>/config.json` (or `path` itself if it is a .json file)."""
        path = os.fspath(path)
        file = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json found at {file!r}: a Hugging Face model directory is required")
        try:
            with open(file, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON: {e}") from None
        return cls.from_dict(d, source=file)

    def to_dict(self) -> dict:
        """A config.json of this model's family that transformers 4.x and 5.x both read (old-style rope keys, which
        5.x converts). Raises ValueError when a switch cannot be expressed in that family's config.json (say
        qk_norm on a LLaMA): what is written always reads back as this config."""
        family = FAMILIES[self.model_type]
        shared = {k: getattr(self, k) for k in _SHARED if k not in _WRITTEN_WHEN_SET}
        d = {"architectures": [family.architecture], "model_type": self.model_type, **shared,
             "rope_theta": self.rope_theta, **family_keys(self)}  # fmt: skip
        if self.rope_scaling is not None:
            d["rope_scaling"] = {**self.rope_scaling, "type": self.rope_type}
        for key in _WRITTEN_WHEN_SET:
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        again = type(self).from_dict(json.loads(json.dumps(d)), source="to_dict")
        lost = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                if getattr(again, f.name) != getattr(self, f.name)]  # fmt: skip
        if lost:
            raise ValueError(f"LlamaConfig: a {self.model_type} config.json cannot express {', '.join(lost)}")
        return d

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write `<out_dir>/config.json` atomically."""
        write_json_atomic(os.path.join(out_dir, "config.json"), self.to_dict())


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def write_json_atomic(file: str, obj) -> None:
    write_text_atomic(file, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

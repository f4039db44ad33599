"""LlamaConfig: the hyper-parameters of a LLaMA-family model, read from a Hugging Face config.json.

Both RoPE styles are read (docs/formats.md section 6): older files carry `rope_theta` + `rope_scaling`,
transformers 5 writes `rope_parameters: {"rope_theta": ..., "rope_type": ...}`. The config is normalised to one
`rope_theta` plus an optional `rope_scaling` dict whose "rope_type" is "linear" or "llama3"; any other scaling
is refused here, once, rather than silently computing different frequencies than the checkpoint was trained with.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MODEL_TYPES = ("llama", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
MISTRAL_SLIDING_WINDOW = 4096  # transformers' MistralConfig default, for a config.json without the key
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: plain multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Mistral-Nemo, Gemma-style differ)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # True: lm_head shares embed_tokens.weight (SmolLM, Llama-3.2-1B)
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # the only activation of the LLaMA family (SwiGLU MLP)
    # Mistral: a query sees only the newest sliding_window positions, itself included (None: all of them).
    sliding_window: int | None = None
    attention_dropout: float = 0.0  # dropout on the attention probabilities, in training only
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", ...}; None = plain RoPE
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, informational
    quantization_config: dict | None = field(default=None, repr=False)  # HF bitsandbytes block, if any

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"LlamaConfig.hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise ValueError(f"LlamaConfig.sliding_window must be a positive integer or null, got {window!r}")
        if not 0 <= self.attention_dropout < 1:
            raise ValueError(f"LlamaConfig.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

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
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type is not None and model_type not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {MODEL_TYPES}")
        unsupported = [a for a in archs if a not in ARCHITECTURES]
        if unsupported:
            raise ValueError(f"{source}: architectures {unsupported} are not supported; supported: {ARCHITECTURES}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]  # fmt: skip
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")

        rope_theta, rope_scaling = _read_rope(d, source)
        known = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling", "sliding_window"}
        kwargs = {k: v for k, v in d.items() if k in known}
        # transformers' Mistral reads sliding_window (default 4096 when absent); its Llama ignores the key.
        if model_type == "mistral" or (model_type is None and "MistralForCausalLM" in archs):
            kwargs["sliding_window"] = d.get("sliding_window", MISTRAL_SLIDING_WINDOW)
        if kwargs.get("torch_dtype") is None and "dtype" in d:  # transformers 5 renamed torch_dtype -> dtype
            kwargs["torch_dtype"] = d["dtype"]
        try:
            return cls(**kwargs, rope_theta=rope_theta, rope_scaling=rope_scaling)
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
        """A config.json that transformers 4.x and 5.x both read (old-style rope keys, which 5.x converts): a
        Mistral one when the model has a sliding window, else a Llama one."""
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "quantization_config"}
        if self.quantization_config is not None:
            d["quantization_config"] = self.quantization_config
        if self.rope_scaling is None:
            d.pop("rope_scaling", None)
        else:
            d["rope_scaling"] = {**self.rope_scaling, "type": self.rope_scaling["rope_type"]}
        if self.sliding_window is not None:  # only Mistral's attention has the window
            return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **d}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **d}

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write `<out_dir>/config.json` atomically."""
        write_json_atomic(os.path.join(out_dir, "config.json"), self.to_dict())


def write_json_atomic(file: str, obj) -> None:
    tmp = f"{file}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, file)


def _read_rope(d: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config style."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: per-layer-type rope_parameters are not supported")
    scaling = params if params is not None else d.get("rope_scaling")
    theta = d.get("rope_theta")
    if isinstance(scaling, dict) and "rope_theta" in scaling:
        theta = scaling["rope_theta"]
    if isinstance(scaling, dict) and scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={scaling['partial_rotary_factor']} is not supported")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={d['partial_rotary_factor']} is not supported")
    try:
        scaling = _normalise_rope_scaling(scaling)
        old_style = _normalise_rope_scaling(d.get("rope_scaling"))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if params is not None and d.get("rope_scaling") is not None and old_style != scaling:
        raise ValueError(f"{source}: rope_parameters {params} and rope_scaling {d['rope_scaling']} disagree")
    return float(theta if theta is not None else 10000.0), scaling


def _normalise_rope_scaling(scaling: dict | None) -> dict | None:
    """None for plain RoPE, else {"rope_type": ..., <its parameters>}; raises for unsupported types."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if rope_type == "default":
        return None
    if rope_type == "linear":
        keys = ("factor",)
    else:
        keys = _LLAMA3_KEYS
    missing = [k for k in keys if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
    out = {"rope_type": rope_type, **{k: scaling[k] for k in keys}}
    if not float(out["factor"]) > 0:
        raise ValueError(f"rope_scaling factor must be > 0, got {out['factor']!r}")
    if rope_type == "llama3" and not float(out["high_freq_factor"]) > float(out["low_freq_factor"]):
        raise ValueError(
            f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, got {out['high_freq_factor']} "
            f"and {out['low_freq_factor']}"
        )
    return out

"""The model families the decoder runs natively, and how each one's config.json maps onto LlamaConfig, both ways.

Each family is read exactly as transformers' own configuration class reads it (transformers 5.x,
configuration_<family>.py): its defaults for omitted keys, the values it derives (Qwen2's layer types from
max_window_layers, Gemma 3's from sliding_window_pattern), and nothing its modeling file ignores (Qwen2 has no
attention_bias key: its q/k/v projections always carry biases, its o_proj never). A value the decoder cannot run
is refused with a ValueError naming the key and the value, never dropped.

Writing goes the other way: `family_keys` gives the keys transformers reads for a family; LlamaConfig.to_dict
checks that reading them back yields the same config, so a switch a family cannot express is an error there.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types values
LONGROPE_ALIASES = ("su", "yarn")  # what early Phi-3 configs call longrope; transformers' Phi3Config renames them
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# rope type -> (required keys, optional keys) of its rope_scaling dict
_ROPE_KEYS = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    # Phi-3 (docs/formats.md section 6): per-frequency divisors for short and long contexts; factor defaults to
    # max_position_embeddings / original_max_position_embeddings, attention_factor to sqrt(1 + ln f / ln orig).
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("factor", "attention_factor")),
}


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class a config.json of this family names in "architectures"
    defaults: dict  # transformers' defaults for omitted keys, where they differ from LlamaConfig's


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", {"max_position_embeddings": 2048}),
    Family("mistral", "MistralForCausalLM", {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8}),
    Family("qwen2", "Qwen2ForCausalLM", {"max_position_embeddings": 32768, "num_key_value_heads": 32,
                                         "bos_token_id": None, "eos_token_id": None}),
    Family("qwen3", "Qwen3ForCausalLM", {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128,
                                         "bos_token_id": None, "eos_token_id": None}),
    Family("gemma2", "Gemma2ForCausalLM", {"max_position_embeddings": 8192, "num_key_value_heads": 4, "head_dim": 256,
                                           "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1,
                                           "bos_token_id": 2}),
    Family("gemma3_text", "Gemma3ForCausalLM", {"max_position_embeddings": 131072, "num_key_value_heads": 4,
                                                "head_dim": 256, "tie_word_embeddings": True, "pad_token_id": 0,
                                                "eos_token_id": 1, "bos_token_id": 2}),
    Family("phi3", "Phi3ForCausalLM", {"rms_norm_eps": 1e-5, "eos_token_id": 32000, "pad_token_id": 32000}),
)}  # fmt: skip
ARCHITECTURES = tuple(f.architecture for f in FAMILIES.values())
MODEL_TYPES = tuple(FAMILIES)


def family_of(d: dict) -> Family:
    """The family of config dict `d`: its model_type, which decides as in transformers' AutoModelForCausalLM, else
    the one its architectures name, else LLaMA. Architectures we do not run are refused either way."""
    model_type, archs = d.get("model_type"), d.get("architectures") or []
    if model_type is not None and model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {MODEL_TYPES}")
    unsupported = [a for a in archs if a not in ARCHITECTURES]
    if unsupported:
        raise ValueError(f"architectures {unsupported} are not supported; supported: {ARCHITECTURES}")
    if model_type is None:
        named = [f.model_type for f in FAMILIES.values() if f.architecture in archs]
        if len(named) > 1:
            raise ValueError(f"architectures {archs} name more than one model family and model_type is absent")
        model_type = named[0] if named else "llama"
    return FAMILIES[model_type]


# -- reading: config.json -> LlamaConfig fields ------------------------------------------------------------------------
def read_switches(family: Family, d: dict) -> dict:
    """The LlamaConfig fields particular to `family`, read from config dict `d` as transformers reads them.
    Raises ValueError naming the key (the caller adds the file's name)."""
    return _READERS[family.model_type](d)


def _read_llama(d):
    return dict(attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
                hidden_act=d.get("hidden_act", "silu"), **_flat_rope(d))  # fmt: skip


def _read_mistral(d):
    # MistralAttention has no biases; the window covers every layer (MistralConfig's default 4096 when absent).
    return dict(hidden_act=d.get("hidden_act", "silu"), sliding_window=d.get("sliding_window", 4096),
                **_flat_rope(d))  # fmt: skip


def _read_qwen(d, qwen3: bool):
    # Qwen2Config.__post_init__: the window exists only with use_sliding_window, and then covers layers from
    # max_window_layers on, unless layer_types says otherwise.
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    layers = d.get("layer_types") or [SLIDING if window is not None and i >= d.get("max_window_layers", 28) else FULL
                                      for i in range(d["num_hidden_layers"])]  # fmt: skip
    out = dict(hidden_act=d.get("hidden_act", "silu"), sliding_window=window, layer_types=layers, **_flat_rope(d))
    if qwen3:  # q_norm / k_norm over head_dim; attention_bias covers q/k/v/o
        return dict(out, qk_norm=True, attention_bias=d.get("attention_bias", False))
    return dict(out, qkv_bias=True)


def _read_gemma(d, version: int):
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"use_bidirectional_attention={d['use_bidirectional_attention']!r} (an "
                         "embedding encoder) is not supported; only causal attention")  # fmt: skip
    # Gemma 2 alternates sliding and global layers; Gemma 3 makes every sliding_window_pattern-th layer global.
    pattern = 2 if version == 2 else d.get("sliding_window_pattern", 6)
    layers = d.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(d["num_hidden_layers"])]
    out = dict(
        hidden_act=d.get("hidden_activation", "gelu_pytorch_tanh"),  # Gemma's MLP reads hidden_activation only
        norm_unit_offset=True, scale_embeddings=True, sandwich_norms=True,
        attention_bias=d.get("attention_bias", False), query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        sliding_window=d.get("sliding_window", 4096), layer_types=layers,
        final_logit_softcapping=d.get("final_logit_softcapping", 30.0 if version == 2 else None),
    )  # fmt: skip
    if version == 2:
        return dict(out, attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0), **_flat_rope(d))
    # Gemma 3's attention does not apply attn_logit_softcapping (its modeling file never passes it on): not read.
    return dict(out, qk_norm=True, **_gemma3_rope(d))


def _read_phi3(d):
    # Phi3Config reads rope_scaling before rope_parameters, renames su/yarn to longrope, and takes
    # original_max_position_embeddings from the top level (default 4096) over the one inside the dict.
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_scaling must be an object or null, got {params!r}")
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in LONGROPE_ALIASES:
        params["rope_type"] = rope_type = "longrope"
    if rope_type not in ("default", "longrope"):  # Phi3Config.validate_rope refuses the others
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported for phi3; supported: longrope")
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    factor = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if rope_type == "longrope":
        params["original_max_position_embeddings"] = d.get("original_max_position_embeddings", 4096)
    return dict(fused_projections=True, hidden_act=d.get("hidden_act", "silu"), resid_pdrop=d.get("resid_pdrop", 0.0),
                sliding_window=d.get("sliding_window"), rope_theta=theta, rope_scaling=params or None,
                partial_rotary_factor=factor)  # fmt: skip


def _flat_rope(d: dict) -> dict:
    """rope_theta / rope_scaling from either config style (docs/formats.md section 6): older files carry
    `rope_theta` + `rope_scaling`, transformers 5 writes `rope_parameters: {"rope_theta": ..., "rope_type": ...}`;
    both must agree when both are present. Only Phi-3's rotary embedding reads partial_rotary_factor."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are not supported for {d.get('model_type')!r}")
    scaling = params if params is not None else d.get("rope_scaling")
    theta = d.get("rope_theta", 10000.0)
    if isinstance(scaling, dict) and "rope_theta" in scaling:
        theta = scaling["rope_theta"]
    for where in (scaling if isinstance(scaling, dict) else {}, d):
        if where.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial_rotary_factor={where['partial_rotary_factor']} is not supported "
                             f"for model_type {d.get('model_type', 'llama')!r}")  # fmt: skip
    if params is not None and d.get("rope_scaling") is not None:
        if normalise_rope_scaling(params) != normalise_rope_scaling(d["rope_scaling"]):
            raise ValueError(f"rope_parameters {params} and rope_scaling {d['rope_scaling']} disagree")
    return dict(rope_theta=theta, rope_scaling=scaling)


def normalise_rope_scaling(scaling: dict | None) -> dict | None:
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
    required, optional = _ROPE_KEYS[rope_type]
    missing = [k for k in required if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
    out = {"rope_type": rope_type, **{k: scaling[k] for k in required},
           **{k: scaling[k] for k in optional if scaling.get(k) is not None}}  # fmt: skip
    if "factor" in out and not float(out["factor"]) > 0:
        raise ValueError(f"rope_scaling factor must be > 0, got {out['factor']!r}")
    if rope_type == "llama3" and not float(out["high_freq_factor"]) > float(out["low_freq_factor"]):
        raise ValueError(
            f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, got {out['high_freq_factor']} "
            f"and {out['low_freq_factor']}"
        )
    for key in ("short_factor", "long_factor"):
        if key in out and not (isinstance(out[key], list) and all(_positive_number(x) for x in out[key])):
            raise ValueError(f"longrope rope_scaling {key} must be a list of positive numbers, got {out[key]!r}")
    return out


def _positive_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def _gemma3_rope(d):
    """Gemma 3: global layers use rope_theta (default 1e6) and rope_scaling; sliding layers plain RoPE with
    rope_local_base_freq (default 1e4). transformers 5 writes both as rope_parameters nested by layer type."""
    params = d.get("rope_parameters")
    if params is not None and not (isinstance(params, dict) and set(params) <= {FULL, SLIDING}):
        raise ValueError(f"rope_parameters of a gemma3_text config must be nested by layer type "
                         f"({FULL!r}, {SLIDING!r}), got {params!r}")  # fmt: skip
    params = params or {}
    full = dict(params.get(FULL) or {"rope_type": "default"})
    full.update(d.get("rope_scaling") or {})
    local = dict(params.get(SLIDING) or {"rope_type": "default"})
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"rope_parameters.{SLIDING} of type {local.get('rope_type', local.get('type'))!r} "
                         "is not supported; the sliding layers take plain RoPE")  # fmt: skip
    return dict(rope_theta=full.pop("rope_theta", d.get("rope_theta", 1_000_000.0)), rope_scaling=full,
                rope_local_base_freq=local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0)))  # fmt: skip


_READERS = {
    "llama": _read_llama, "mistral": _read_mistral,
    "qwen2": lambda d: _read_qwen(d, qwen3=False), "qwen3": lambda d: _read_qwen(d, qwen3=True),
    "gemma2": lambda d: _read_gemma(d, 2), "gemma3_text": lambda d: _read_gemma(d, 3),
    "phi3": _read_phi3,
}  # fmt: skip


# -- writing: LlamaConfig fields -> config.json ------------------------------------------------------------------------
def family_keys(c) -> dict:
    """The config.json keys particular to `c.model_type` (LlamaConfig.to_dict adds the shared ones)."""
    t = c.model_type
    if t == "llama":
        return {"hidden_act": c.hidden_act, "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias}
    if t == "mistral":
        return {"hidden_act": c.hidden_act, "sliding_window": c.sliding_window}
    if t in ("qwen2", "qwen3"):
        layers = c.layer_kinds()
        leading_full = next((i for i, kind in enumerate(layers) if kind == SLIDING), len(layers))
        out = {"hidden_act": c.hidden_act, "use_sliding_window": c.sliding_window is not None,
               "sliding_window": c.sliding_window, "max_window_layers": leading_full,
               "layer_types": layers}  # fmt: skip
        return out | ({"attention_bias": c.attention_bias} if t == "qwen3" else {})
    if t in ("gemma2", "gemma3_text"):
        # Gemma builds a sliding-window mask even when no layer uses it, so the window is never written as null.
        out = {"hidden_activation": c.hidden_act, "attention_bias": c.attention_bias,
               "query_pre_attn_scalar": c.query_pre_attn_scalar, "layer_types": c.layer_kinds(),
               "sliding_window": c.sliding_window if c.sliding_window is not None else 4096,
               "final_logit_softcapping": c.final_logit_softcapping}  # fmt: skip
        if t == "gemma2":
            return out | {"attn_logit_softcapping": c.attn_logit_softcapping}
        return out | {"rope_local_base_freq": c.rope_local_base_freq}
    if t == "phi3":
        out = {"hidden_act": c.hidden_act, "resid_pdrop": c.resid_pdrop, "sliding_window": c.sliding_window,
               "partial_rotary_factor": c.partial_rotary_factor}  # fmt: skip
        if c.rope_type == "longrope":
            out["original_max_position_embeddings"] = c.rope_scaling["original_max_position_embeddings"]
        return out
    raise ValueError(f"LlamaConfig.model_type {t!r} is not supported; supported: {MODEL_TYPES}")

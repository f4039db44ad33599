"""Rotary position embeddings in the Hugging Face layout (rotate_half: dimension i pairs with i + rotary_dim/2).

The inverse frequencies follow docs/formats.md section 6: plain RoPE, "linear" scaling (every frequency divided
by the factor), Llama-3.1 "llama3" scaling (low frequencies divided, high kept, a blend between) and Phi-3's
"longrope" (per-frequency divisors, one set up to the pretraining length and one beyond, and cos/sin scaled by an
attention factor). Phi-3 variants rotate only the first rotary_dim dimensions of a head (partial_rotary_factor);
Gemma 3 gives its sliding-window layers a plain RoPE of their own base (rope_local_base_freq). The rotation
itself is kernels/model_ops.apply_rope (Triton on CUDA, torch on the CPU).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LlamaConfig


def rope_inv_freq(config: LlamaConfig, device=None, local: bool = False, long: bool = False) -> torch.Tensor:
    """(rotary_dim // 2,) float32 inverse frequencies of `config`'s global layers, or with local=True of Gemma 3's
    sliding-window layers. For longrope: the short-context ones, or with long=True those past the pretraining
    length."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    if local and config.rope_local_base_freq is not None:
        return 1.0 / (config.rope_local_base_freq**exponents)
    scaling = config.rope_scaling
    if scaling is not None and scaling["rope_type"] == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        return 1.0 / (factors * config.rope_theta**exponents)  # transformers' order of operations
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    orig = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, blended, scaled)


def longrope_attention_factor(config: LlamaConfig) -> float:
    """The factor longrope multiplies cos and sin by: sqrt(1 + ln(factor) / ln(orig)), where factor defaults to
    max_position_embeddings / original_max_position_embeddings (transformers' _compute_longrope_parameters)."""
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    orig = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor", config.max_position_embeddings / orig)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


class RotaryEmbedding(nn.Module):
    """The inverse-frequency tables of a model, as non-persistent buffers (checkpoints do not carry them)."""

    def __init__(self, config: LlamaConfig, device=None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config, device), persistent=False)
        local = rope_inv_freq(config, device, local=True) if config.rope_local_base_freq is not None else None
        self.register_buffer("local_inv_freq", local, persistent=False)
        self.attention_scaling, self.long_after = 1.0, None
        long = None
        if config.rope_type == "longrope":
            long = rope_inv_freq(config, device, long=True)
            self.attention_scaling = longrope_attention_factor(config)
            self.long_after = config.rope_scaling["original_max_position_embeddings"]
        self.register_buffer("long_inv_freq", long, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype, local: bool = False):
        """cos, sin of shape (B, T, rotary_dim) for integer positions (B, T); computed in float32, then cast.
        local: for a sliding-window layer (its own table where the config gives one, else the global one)."""
        local = local and self.local_inv_freq is not None
        inv_freq = self.local_inv_freq if local else self.inv_freq
        if self.long_inv_freq is not None and not local:
            # longrope, as transformers: the long factors for the whole call once any position passes the
            # pretraining length (chosen on the device, no host sync).
            inv_freq = torch.where(position_ids.max() + 1 > self.long_after, self.long_inv_freq, inv_freq)
        freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rd): both halves share a frequency (rotate_half layout)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

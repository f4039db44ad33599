"""A minimal LLaMA-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Module and parameter names mirror Hugging Face's LlamaForCausalLM (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, `model.layers.N.mlp.gate_proj`, `model.norm`, `lm_head`), so checkpoints load
one-to-one and LoRA adapter keys come out PEFT-compatible. Any Linear may be swapped for nf4lora's Linear4bit or
LoRA wrapper: the model only calls the modules.

Shapes: B batch, T new tokens, S = past + T key positions, H hidden, nh query heads, nkv key/value heads, hd head dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig
from .kv_cache import KVCache
from .loss import IGNORE_INDEX, chunked_lm_loss
from .rope import apply_rope, rope_cos_sin, rope_inv_freq



# What module constructors draw initial weights with (nn.Linear, nn.Embedding, our _init_weights).
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")  # fmt: skip


@contextlib.contextmanager
def empty_init() -> Iterator[None]:
    """Modules built inside live on the meta device (no memory) and skip their random initialisation.

    A checkpoint overwrites every weight anyway, and drawing random numbers for meta tensors is not free: the first
    normal_ on a meta tensor runs a Python meta kernel whose first use imports torch._dynamo, sympy and triton,
    about 900 modules and 140 MiB of RSS for the rest of the process (measured: load_model of a tiny checkpoint).
    The torch.nn.init functions return their tensor untouched inside (transformers' no_init_weights does the same).
    """
    with contextlib.ExitStack() as stack:
        for name in _INIT_FUNCTIONS:
            stack.enter_context(mock.patch.object(nn.init, name, lambda tensor, *args, **kwargs: tensor))
        stack.enter_context(torch.device("meta"))
        yield


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # (B, T, V), or (B, logits_to_keep, V); None when the loss was computed in chunks
    loss: torch.Tensor | None = None  # scalar float32: mean shifted cross-entropy over labels != -100


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (bf16 squares lose too much), cast back, then scale: the HF order of operations.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.dropout = config.attention_dropout
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)

    def forward(self, x, cos, sin, mask, is_causal: bool, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_heads,
        )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, is_causal: bool, kv_cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Not persistent: HF checkpoints do not carry it (old ones do, under another name, and it is ignored).
        # Computed on the CPU, then moved: on the meta device (empty_init) arange runs a Python kernel whose first
        # use imports torch._dynamo and more (see empty_init).
        inv_freq = rope_inv_freq(config, device="cpu").to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class LlamaForCausalLM(nn.Module):
    """LLaMA / Mistral / SmolLM / TinyLlama causal LM.

    Set `model.gradient_checkpointing = True` to recompute each decoder block in backward (non-reentrant
    torch.utils.checkpoint) instead of keeping its activations; it only acts in training mode with grad enabled.

    Set `model.loss_chunk_tokens = N` (> 0) to compute the training loss without materialising the (B, T, V)
    logits: lm_head and the cross-entropy run over N positions at a time and are recomputed in backward. With a
    49K vocabulary and 1,024 tokens per step the full logits and their gradients cost ~0.8 GB of float32, more
    than a 135M model's 4-bit weights and activations together; chunks of 128 positions cost ~90 MB for ~5% more
    compute. It acts only when labels are given in training mode with grad enabled; `logits` is then None.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.loss_chunk_tokens = 0
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # HF's LLaMA initialisation (normal, std 0.02, zero bias); checkpoints overwrite it.
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Logits for `input_ids` (B, T) and, given `labels` (B, T), the shifted cross-entropy loss.

        attention_mask: (B, S) with 1 for real tokens and 0 for padding (S = cached + new positions), or a
            boolean (B or 1, 1, T, S) mask where True means "may attend" (used as is, causality included).
        position_ids: (B, T) rotary positions; default: consecutive from the cache length (or restarting at every
            document when `doc_ids` is given).
        doc_ids: (B, T) integer document ids for packed sequences: a token attends only to earlier tokens with the
            same id, and positions restart at each document unless `position_ids` is given.
        labels: (B, T) token ids, IGNORE_INDEX (-100) where no loss is taken; the loss at t predicts labels[t + 1].
        kv_cache: a KVCache to read past keys/values from and append this step's to (generation).
        logits_to_keep: if > 0, only the logits of the last `logits_to_keep` positions are computed.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if doc_ids is not None and doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected {tuple(input_ids.shape)}")
        if doc_ids is not None and past:
            raise ValueError("doc_ids (sequence packing) cannot be combined with a non-empty kv_cache")
        if position_ids is None:
            position_ids = _default_positions(B, T, past, doc_ids, input_ids.device)
        mask, is_causal = _attention_mask(
            B, T, past, attention_mask, doc_ids, self.config.sliding_window, input_ids.device
        )

        base = self.model
        x = base.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = rope_cos_sin(base.inv_freq, position_ids, x.dtype)  # (B, T, hd)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in base.layers:
            if use_checkpoint:
                x = checkpoint(layer, x, cos, sin, mask, is_causal, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = base.norm(x)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)}")
            if logits_to_keep > 0:
                raise ValueError("labels cannot be combined with logits_to_keep")
            if self.loss_chunk_tokens > 0 and self.training and torch.is_grad_enabled():
                return CausalLMOutput(logits=None, loss=chunked_lm_loss(x, labels, self.lm_head, self.loss_chunk_tokens))
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutput(logits=logits, loss=loss)


def _default_positions(B: int, T: int, past: int, doc_ids, device) -> torch.Tensor:
    idx = torch.arange(past, past + T, device=device).expand(B, T)
    if doc_ids is None:
        return idx
    # Position restarts at each document start: t - (index of the first token of t's document).
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def _attention_mask(B: int, T: int, past: int, attention_mask, doc_ids, window: int | None, device):
    """(mask, is_causal) for scaled_dot_product_attention; mask is None whenever plain causality suffices.

    window: the sliding window (config.sliding_window): query position q sees key positions q - window + 1 .. q."""
    S = past + T
    windowed = window is not None and S > window
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (T, S):
            raise ValueError(
                f"a 4-D attention_mask must be bool of shape (B, 1, {T}, {S}), got {attention_mask.dtype} "
                f"{tuple(attention_mask.shape)}"
            )
        return attention_mask, False
    if attention_mask is not None:
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({B}, {S})")
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: keep SDPA's fused causal path
    if attention_mask is None and doc_ids is None and not windowed:
        if past == 0:
            return None, T > 1
        if T == 1:
            return None, False  # one new token attends to everything cached
    q_pos, k_pos = torch.arange(past, S, device=device)[:, None], torch.arange(S, device=device)[None, :]
    mask = k_pos <= q_pos  # causal (T, S)
    if windowed:
        mask = mask & (k_pos > q_pos - window)
    mask = mask.expand(B, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    # A padded query may have no visible key; let it see itself so its (ignored) output is finite, not NaN.
    diag = torch.zeros(T, S, dtype=torch.bool, device=device)
    diag[torch.arange(T), q_pos[:, 0]] = True
    return (mask | diag).unsqueeze(1), False  # (B, 1, T, S)

"""The one decoder behind every native family: RMSNorm, RoPE, grouped-query attention, a gated MLP, and the
switches of LlamaConfig that turn it into Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) or Phi-3.

Module and parameter names mirror each family's Hugging Face model (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj` or Phi-3's fused `qkv_proj`, `self_attn.q_norm`, `mlp.gate_proj` or
`mlp.gate_up_proj`, Gemma's `pre_feedforward_layernorm`, `model.norm`, `lm_head`), so checkpoints load one-to-one
and LoRA adapter keys come out PEFT-compatible. Any Linear may be swapped for nf4lora's Linear4bit or LoRA wrapper:
the model only calls the modules.

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

from nf4lora.kernels import model_ops
from .config import GATED_ACTIVATIONS, LlamaConfig
from .kv_cache import KVCache
from .loss import IGNORE_INDEX, chunked_lm_loss, softcap
from .rope import RotaryEmbedding

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
    """RMSNorm; with unit_offset (Gemma) the stored weight is w - 1 and the output is scaled by (1 + w)."""

    def __init__(self, hidden_size: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 (bf16 squares lose too much). LLaMA's order of operations: cast back, then scale;
        # Gemma's: scale in float32, then cast (model_ops.rms_norm_torch; the Triton kernel on CUDA).
        return model_ops.rms_norm(x, self.weight, self.eps, self.unit_offset)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.dropout = config.attention_dropout
        # None: SDPA's own head_dim ** -0.5, exactly as before the switch existed
        self.scale = None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        h, q_out, kv_out = config.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        qkv_bias = config.attention_bias or config.qkv_bias
        self.fused = config.fused_projections
        if self.fused:  # Phi-3: rows [q | k | v] of one Linear
            self.qkv_proj = nn.Linear(h, q_out + 2 * kv_out, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(h, q_out, bias=qkv_bias)
            self.k_proj = nn.Linear(h, kv_out, bias=qkv_bias)
            self.v_proj = nn.Linear(h, kv_out, bias=qkv_bias)
        self.o_proj = nn.Linear(q_out, h, bias=config.attention_bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # Qwen3 / Gemma 3: per-head RMSNorm over hd, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)

    def forward(self, x, cos, sin, mask, is_causal: bool, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, *[self.n_kv * self.head_dim] * 2], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv, self.head_dim)  # (B, T, nkv, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh | nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = model_ops.apply_rope(q, cos, sin), model_ops.apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        dropout = self.dropout if self.training else 0.0
        if self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                               scale=self.scale, enable_gqa=self.n_kv != self.n_heads)  # fmt: skip
        else:
            y = _softcapped_attention(q, k, v, mask, self.scale, self.softcap, dropout)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # y: (B, nh, T, hd)


def _softcapped_attention(q, k, v, mask, scale: float | None, cap: float, dropout: float) -> torch.Tensor:
    """Gemma 2's attention, which SDPA cannot express: scores -> cap * tanh(scores / cap) before the mask and a
    float32 softmax, as its eager attention. q (B, nh, T, hd), k/v (B, nkv, S, hd), mask (B, 1, T, S) bool, or None
    for plain causality over the S - T cached and T new positions (what _attention_mask leaves to SDPA's is_causal
    or to no mask at all). Returns (B, nh, T, hd)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
    scores = softcap(q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale), cap)
    if mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return F.dropout(probs, dropout) @ v if dropout else probs @ v


class LlamaMLP(nn.Module):
    """The gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated_act = GATED_ACTIVATIONS[config.hidden_act]  # act(gate) * up
        self.fused = config.fused_projections
        if self.fused:  # Phi-3: rows [gate | up] of one Linear
            self.gate_up_proj = nn.Linear(h, 2 * i, bias=bias)
        else:
            self.gate_proj = nn.Linear(h, i, bias=bias)
            self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.gated_act(gate, up))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). With sandwich_norms (Gemma 2/3),
    post_attention_layernorm normalises the attention output (in LLaMA it is the MLP's input norm), and
    pre_/post_feedforward_layernorm surround the MLP."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        eps, offset = config.rms_norm_eps, config.norm_unit_offset
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.mlp = LlamaMLP(config)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.sliding = config.is_sliding(layer_idx)  # which mask and RoPE table the model hands this layer
        self.resid_pdrop = config.resid_pdrop

    def forward(self, x, cos, sin, mask, is_causal: bool, kv_cache: KVCache | None = None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv_cache)
        if self.sandwich:
            x = x + self._dropout(self.post_attention_layernorm(h))
            return x + self._dropout(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))
        x = x + self._dropout(h)
        return x + self._dropout(self.mlp(self.post_attention_layernorm(x)))

    def _dropout(self, h):
        return F.dropout(h, self.resid_pdrop, self.training) if self.resid_pdrop else h


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        # Buffers only (checkpoints do not carry them). Computed on the CPU, then moved: on the meta device
        # (empty_init) arange runs a Python kernel whose first use imports torch._dynamo and more (see empty_init).
        self.rotary_emb = RotaryEmbedding(config, device="cpu").to(torch.get_default_device())


class LlamaForCausalLM(nn.Module):
    """The one causal-LM decoder for every native family: LLaMA (SmolLM, TinyLlama), Mistral, Qwen2/2.5, Qwen3,
    Gemma 2, Gemma 3 (text) and Phi-3, told apart only by the switches of its LlamaConfig. (The name is LLaMA's,
    whose layout all of them share.)

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
        config, base = self.config, self.model
        x = base.embed_tokens(input_ids)  # (B, T, H)
        if config.scale_embeddings:  # Gemma: by sqrt(H) rounded to the embedding dtype, as transformers does
            x = x * torch.full((), config.hidden_size**0.5, dtype=x.dtype, device=x.device)  # a fill: no host copy
        # Per layer kind (False: global, True: sliding window): its (mask, is_causal) and its RoPE (cos, sin),
        # each (B, T, rotary_dim). Gemma 3's sliding layers have a RoPE base of their own.
        kinds = {layer.sliding for layer in base.layers}
        masks = {s: _attention_mask(B, T, past, attention_mask, doc_ids, config.sliding_window if s else None,
                                    input_ids.device) for s in kinds}  # fmt: skip
        ropes = {s: base.rotary_emb(position_ids, x.dtype, local=s) for s in kinds}
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in base.layers:
            args = (x, *ropes[layer.sliding], *masks[layer.sliding])
            if use_checkpoint:
                x = checkpoint(layer, *args, None, use_reentrant=False)
            else:
                x = layer(*args, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = base.norm(x)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)}")
            if logits_to_keep > 0:
                raise ValueError("labels cannot be combined with logits_to_keep")
            if self.loss_chunk_tokens > 0 and self.training and torch.is_grad_enabled():
                loss = chunked_lm_loss(x, labels, self.lm_head, self.loss_chunk_tokens, config.final_logit_softcapping)
                return CausalLMOutput(logits=None, loss=loss)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T, V)
        if config.final_logit_softcapping is not None:
            logits = softcap(logits, config.final_logit_softcapping)
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

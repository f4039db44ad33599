"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling, EOS, streaming."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import torch

from .config import LlamaConfig
from .kv_cache import KVCache, StaticKVCache
from .llama import LlamaForCausalLM


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    input_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stream: Callable[[int], None] | None = None,
    use_cache: bool = True,
    decode: str = "auto",
) -> torch.Tensor:
    """Generate up to `max_new_tokens` tokens after `input_ids`; returns only the new ids.

    input_ids: a list of ints or a (T,) tensor -> returns (n,); a (B, T) tensor (no padding) -> returns (B, n),
        rows that stopped early filled with the first EOS id.
    temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / temperature), restricted to the
        `top_k` most likely tokens and/or the smallest set whose probability reaches `top_p`.
    seed: makes sampling reproducible (a private torch.Generator; the global RNG is not touched).
    eos_token_id: stop once every row has produced one of these ids (the EOS token is included in the output).
    stream: called with each new token id as it is produced (batch size 1 only).
    use_cache: False recomputes the whole sequence every step (a reference for testing the cache).
    decode: how the steps after the prompt run with the cache: "dynamic" (a KVCache growing by a token a step),
        "static" (a StaticKVCache: fixed shapes, no host reads), "graph" (static, captured once into a CUDA graph
        and replayed: decode-speed generation on CUDA), or "auto": "graph" on CUDA where a static cache applies
        (no sliding window reached, no longrope switch while decoding), else "dynamic". Same tokens on each.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")

    device = model.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    one_d = ids.dim() == 1
    ids = ids[None] if one_d else ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (T,) or (B, T) sequence of ids, got shape {tuple(ids.shape)}")
    B, T = ids.shape
    if stream is not None and B != 1:
        raise ValueError(f"stream needs a batch of one sequence, got batch size {B}")
    vocab = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab}), got values in [{int(ids.min())}, {int(ids.max())}]")
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    if getattr(model, "nf4lora_generic", False):  # transformers' model: its own generate() and cache
        from .generic import generate as generic_generate

        if decode in ("static", "graph"):
            raise ValueError(f"decode={decode!r} needs a native model: a model loaded through transformers decodes "
                             "with transformers' generate (decode='auto' or 'dynamic')")  # fmt: skip

        out = generic_generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos, stream, use_cache)
        return out[0] if one_d else out

    config = model.config
    # Longrope (Phi-3) switches to its long-context frequencies once a sequence passes the pretraining length, but
    # the cached keys were rotated with the short ones: the cache is rebuilt at that step, as transformers'
    # Phi3ForCausalLM.prepare_inputs_for_generation does.
    rebuild_at = config.rope_scaling["original_max_position_embeddings"] + 1 if config.rope_type == "longrope" else 0

    decode = _decode_mode(decode, config, device, use_cache, T, max_new_tokens, rebuild_at)

    def new_cache():
        dtype = model.model.embed_tokens.weight.dtype
        kind = KVCache if decode == "dynamic" else StaticKVCache
        return kind(config, B, T + max_new_tokens, device=device, dtype=dtype)

    was_training = model.training
    model.eval()  # LoRA dropout etc. must be off while decoding
    try:
        cache = new_cache() if use_cache else None
        logits = model(ids, kv_cache=cache, logits_to_keep=1).logits[:, -1]  # (B, V)
        step_fn = _DecodeStep(model, cache, graph=decode == "graph") if decode in ("static", "graph") else None
        new: list[torch.Tensor] = []
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos:
                token = torch.where(finished, eos_t[0], token)
            new.append(token)
            if stream is not None:
                stream(int(token[0]))
            if eos:
                finished |= torch.isin(token, eos_t)
                if bool(finished.all()):
                    break
            if step + 1 == max_new_tokens:
                break
            if step_fn is not None:
                logits = step_fn(token)
            elif use_cache and T + len(new) != rebuild_at:
                logits = model(token[:, None], kv_cache=cache).logits[:, -1]
            else:
                cache = new_cache() if use_cache else None
                everything = torch.cat([ids, torch.stack(new, dim=1)], dim=1)
                logits = model(everything, kv_cache=cache, logits_to_keep=1).logits[:, -1]
    finally:
        model.train(was_training)
    out = torch.stack(new, dim=1)  # (B, n)
    return out[0] if one_d else out


DECODE_MODES = ("auto", "dynamic", "static", "graph")


def _decode_mode(decode: str, config: LlamaConfig, device, use_cache: bool, T: int, max_new_tokens: int,
                 rebuild_at: int) -> str:  # fmt: skip
    """The mode `decode` asks for, resolved ("auto") and checked: a static cache needs the cache, no sliding window
    reached (StaticKVCache masks none) and no longrope rebuild while decoding after the T prompt tokens (a prompt
    already past the pretraining length runs on the long frequencies throughout); a graph needs CUDA."""
    longest = T + max_new_tokens - 1  # the last token is sampled, never fed to the model
    why_not = None
    if not use_cache:
        why_not = "use_cache=False"
    elif config.sliding_window is not None and longest > config.sliding_window:
        why_not = f"{longest} positions pass the sliding window of {config.sliding_window}"
    elif T < rebuild_at <= longest:
        why_not = f"longrope switches frequencies at position {rebuild_at - 1}"
    if decode == "auto":
        return "graph" if why_not is None and torch.device(device).type == "cuda" else "dynamic"
    if decode in ("static", "graph") and why_not is not None:
        raise ValueError(f"decode={decode!r} needs a static KV cache, which does not apply here: {why_not}")
    if decode == "graph" and torch.device(device).type != "cuda":
        raise ValueError(f"decode='graph' replays a CUDA graph: the model is on {device}")
    return decode


class _DecodeStep:
    """One token per row through the model with a StaticKVCache: fixed shapes and no host reads, so on CUDA the
    step is captured into a CUDA graph and replayed (graph=True). The first call runs eagerly on a side stream
    (it compiles and warms up every kernel, as capture must not); the second captures (capture runs nothing) and
    replays; later calls replay. The logits returned are the graph's output, overwritten by the next call."""

    def __init__(self, model: LlamaForCausalLM, cache: StaticKVCache, graph: bool):
        cache.start_decoding()
        self.model, self.cache, self.use_graph = model, cache, graph
        self.token = torch.zeros(cache.position.shape[0], 1, dtype=torch.long, device=cache.position.device)
        self.graph, self.logits, self.warm = None, None, False

    def _forward(self) -> torch.Tensor:
        position = self.cache.position[:, None]  # (B, 1): read on the device at every replay
        out = self.model(self.token, attention_mask=self.cache.decode_mask(), position_ids=position,
                         kv_cache=self.cache)  # fmt: skip
        return out.logits[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token[:, None])
        if not self.use_graph:
            return self._forward()
        if not self.warm:
            self.warm = True
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._forward()
            torch.cuda.current_stream().wait_stream(side)
            return logits
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
        self.graph.replay()
        return self.logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None):
    """One token id per row of logits (B, V): argmax when temperature is 0, else a filtered softmax sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the more likely tokens before it already reach top_p (the first is always kept).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stop_token_ids(model_dir: str | os.PathLike, config, tokenizer) -> list[int]:
    """The ids generation stops at for the checkpoint in `model_dir`: config.json's eos_token_id, the one in
    generation_config.json (what transformers' generate() stops at; Llama-3 instruct lists its end-of-turn token
    only there) and the tokenizer's eos token, each an int, a list or absent."""
    eos = config.eos_token_id  # int, list or None: LlamaConfig's or a transformers config's (a generic model)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    path = os.path.join(os.fspath(model_dir), "generation_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                generation = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(generation, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(generation).__name__}")
        eos = generation.get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size for i in eos):
            raise ValueError(f"{path}: eos_token_id must be an id or a list of ids in [0, {config.vocab_size}), "
                             f"got {generation['eos_token_id']!r}")  # fmt: skip
        ids |= set(eos)
    return sorted(i for i in ids if i is not None)

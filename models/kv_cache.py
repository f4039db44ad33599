"""A preallocated key/value cache for incremental decoding (one (B, nkv, max_len, hd) buffer pair per layer).

Writing into fixed buffers instead of concatenating keeps decoding allocation-free and its memory known up front.
"""

from __future__ import annotations

import torch

from .config import LlamaConfig


class KVCache:
    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled (by every layer) so far

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v (B, nkv, T, hd) after the cached ones; return all keys/values (B, nkv, S, hd)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {end} positions needed, max_len is {self.max_len}")
        self.k[layer_idx][:, :, self.length : end] = k
        self.v[layer_idx][:, :, self.length : end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions as filled (called once per forward, after every layer has updated)."""
        self.length += n

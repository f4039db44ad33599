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


class StaticKVCache(KVCache):
    """A KVCache whose decode steps have fixed shapes and read no host state: what a CUDA graph can replay.

    The prompt fills it as a KVCache (positions [0, T), sliced views). start_decoding() then keeps the next
    position of each row on the device (`position`, (B,)): each update writes one token there and returns the
    whole buffers (B, nkv, max_len, hd), decode_mask() hides the positions not written yet, and advance() moves
    `position` on the device. The model's forward reads `length` to size its mask: while decoding it is
    max_len - 1, so a one-token step sees (1, max_len) keys, the shape decode_mask() has. Rows all decode at their
    own position; sliding-window layers are not masked here (generate uses this cache only where no window
    applies).
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        self.position: torch.Tensor | None = None  # (B,) long once decoding
        super().__init__(config, batch_size, max_len, device=device, dtype=dtype)

    @property
    def length(self) -> int:
        return self.max_len - 1 if self.position is not None else self._filled

    @length.setter
    def length(self, n: int) -> None:
        self._filled = n

    def start_decoding(self) -> None:
        batch = self.k[0].shape[0]
        self.position = torch.full((batch,), self._filled, dtype=torch.long, device=self.k[0].device)

    def decode_mask(self) -> torch.Tensor:
        """(B, 1, 1, max_len) bool: the positions a one-token step attends to (written ones and its own)."""
        positions = torch.arange(self.max_len, device=self.position.device)
        return (positions[None, :] <= self.position[:, None])[:, None, None, :]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        if self.position is None:
            return super().update(layer_idx, k, v)
        if k.shape[2] != 1:
            raise ValueError(f"StaticKVCache decodes one token per step, got {k.shape[2]}")
        index = self.position.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])  # (B, nkv, 1, hd)
        self.k[layer_idx].scatter_(2, index, k)
        self.v[layer_idx].scatter_(2, index, v)
        return self.k[layer_idx], self.v[layer_idx]

    def advance(self, n: int) -> None:
        if self.position is None:
            super().advance(n)
        else:
            self.position += n  # on the device: a replayed step moves on by itself

"""Key/value caches for decoding: a preallocated per-layer cache and the P-tuning prefix past."""

from __future__ import annotations

import torch

from ..config import ChatGLMConfig
from .masks import InputError


# ----------------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values for every layer, filled left to right.

    Keys are stored already rotated. `length` counts the filled slots (including a P-tuning
    prefix); a forward call with a cache writes its T new tokens at [length, length + T) and
    then advances `length`.

    Args:
        config: model config (layers, heads, head dim).
        batch_size: rows.
        max_length: slots per row (prefix + prompt + new tokens).
        dtype, device: of the stored tensors (the model's activation dtype and device).
    """

    def __init__(self, config: ChatGLMConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (config.num_layers, batch_size, config.num_attention_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, nh, max_length, d]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, nh, T, d] at the current position; return all keys/values so far [B, nh, S, d]."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise InputError(f"KV cache holds {self.max_length} tokens per row; {end} were needed")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def fill_prefix(self, past: torch.Tensor) -> None:
        """Write a P-tuning past [L, 2, B, nh, P, d] into the first P slots of an empty cache."""
        prefix = past.shape[4]
        self.keys[:, :, :, :prefix] = past[:, 0]
        self.values[:, :, :, :prefix] = past[:, 1]
        self.length = prefix

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) batch rows, e.g. to expand one prompt into several samples."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]


class PrefixPast:
    """A P-tuning past used without a cache (training): prepends the prefix keys/values by
    concatenation, so gradients reach the prefix encoder and nothing is written in place."""

    def __init__(self, past: torch.Tensor):
        self.past = past  # [L, 2, B, nh, P, d]
        self.length = past.shape[4]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return torch.cat([self.past[layer, 0], k], dim=2), torch.cat([self.past[layer, 1], v], dim=2)

"""Key/value caches for decoding: a growing per-layer cache, the static per-row cache of the decode
engine, and the P-tuning prefix past."""

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


# ----------------------------------------------------------------------------------- static KV cache


def write_slots(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slots: torch.Tensor) -> None:
    """New tokens of every row into a layer's static cache: keys[b, :, slots[b, t]] = k[b, :, t] (and values).

    keys, values [B, nh, S, d]; k, v [B, nh, T, d]; slots [B] int64 for one token per row (a decode
    step), or [B, T] for T tokens per row (a verification step).
    """
    # One index_put_ (scatter_ along the slot dim was 10x slower on the CPU for one row and 60x for
    # eight). Under autocast (bf16 generation with float32 master weights) k/v arrive in the
    # autocast dtype: cast them to the cache's.
    rows = torch.arange(k.shape[0], device=k.device)
    if slots.dim() == 1:
        keys[rows, :, slots] = k[:, :, 0].to(keys.dtype)
        values[rows, :, slots] = v[:, :, 0].to(values.dtype)
        return
    # Indexed by [B, 1] rows and [B, T] slots around the heads' slice, the target is [B, T, nh, d].
    keys[rows[:, None], :, slots] = k.transpose(1, 2).to(keys.dtype)
    values[rows[:, None], :, slots] = v.transpose(1, 2).to(values.dtype)


class StaticKVCache:
    """Keys and values for a fixed batch of rows ("slots"), allocated once, with a position per row.

    The decode engine's cache (glm6b.inference.engine builds on it). Shapes never change after
    allocation, so a decode step over it compiles to one graph for every position:

        keys, values  [L, B, nh, S, d]  keys stored already rotated; S = max_length slots per row
        lengths       [B] int64         filled slots per row (the next token of row b goes to slot lengths[b])
        visible       [B, S] bool       slots that later tokens of the row may attend to (real prompt
                                        tokens and generated tokens; False for left padding and empty slots)

    Each row is independent: `reset_rows` empties rows while the others keep decoding, and a row
    view (`rows(slice)`) lets a prompt be prefilled into some rows only. A P-tuning prefix is
    written once into the first P slots of every row (`fill_prefix`) and survives resets.

    The model writes through it in three ways (see ChatGLMForConditionalGeneration.forward):
    `input_pos` an int s: T new tokens of every row go to slots [s, s + T) and attention covers
    slots [0, s + T) (prefill, one chunk at a time); `input_pos` a [B] tensor: one new token per row
    goes to slot input_pos[b] and attention covers all S slots (decode; no host sync); `input_pos` a
    [B, T] tensor: T tokens per row go to their own slots (verification of proposed tokens). The
    masks are the caller's; `decode_mask` gives the decode step's and `advance` records its token;
    `verify_slots` / `verify_mask` give a verification step's and `accept` records what it keeps.

    Args:
        config: model config (layers, heads, head dim).
        batch_size: rows.
        max_length: slots per row (prefix + prompt + new tokens).
        dtype, device: of the stored keys/values (the model's activation dtype and device).
    """

    def __init__(self, config: ChatGLMConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (config.num_layers, batch_size, config.num_attention_heads, max_length, config.head_dim)
        # Zeros, not empty: masked slots still enter the attention product (weight 0 times a NaN is NaN).
        self._set_tensors(torch.zeros(shape, dtype=dtype, device=device),  # keys [L, B, nh, S, d]
                          torch.zeros(shape, dtype=dtype, device=device),  # values
                          torch.zeros(batch_size, dtype=torch.long, device=device),  # lengths [B]
                          torch.zeros(batch_size, max_length, dtype=torch.bool, device=device))  # visible [B, S]
        self.prefix_length = 0

    def _set_tensors(self, keys, values, lengths, visible) -> None:
        self.keys, self.values, self.lengths, self.visible = keys, values, lengths, visible
        # A decode step writes through per-layer views: a compiled step that wrote through the
        # [L, ...] tensor would copy each layer's whole cache every step (inductor does not do an
        # index_put on a view of a graph input in place; on a whole input it does).
        self.layer_keys, self.layer_values = keys.unbind(0), values.unbind(0)
        # Plain ints, so that a compiled step reads no shape of the [L, ...] tensors.
        self.batch_size, self.max_length = keys.shape[1], keys.shape[3]

    def rows(self, rows: slice | int, slots: int | None = None) -> StaticKVCache:
        """A cache over some rows (and, given `slots`, only their first slots) that shares this one's
        storage (writes go to the same tensors)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        view = StaticKVCache.__new__(StaticKVCache)
        view._set_tensors(self.keys[:, rows, :, :slots], self.values[:, rows, :, :slots], self.lengths[rows],
                          self.visible[rows, :slots])
        view.prefix_length = self.prefix_length
        return view

    def reset_rows(self, rows: slice | int | torch.Tensor | None = None) -> None:
        """Empty rows (all by default), keeping the P-tuning prefix; the other rows are untouched."""
        rows = slice(None) if rows is None else rows
        self.lengths[rows] = self.prefix_length
        self.visible[rows] = False
        self.visible[rows, :self.prefix_length] = True

    def reorder_rows(self, source_rows: torch.Tensor) -> None:
        """Row i takes the keys, values, length and visibility of row source_rows[i] (in place)."""
        for tensor, dim in ((self.keys, 1), (self.values, 1), (self.lengths, 0), (self.visible, 0)):
            tensor.copy_(tensor.index_select(dim, source_rows))

    def fill_prefix(self, past: torch.Tensor) -> None:
        """Write a P-tuning past [L, 2, B, nh, P, d] into the first P slots of every row and reset them."""
        prefix = past.shape[4]
        self.keys[:, :, :, :prefix] = past[:, 0]
        self.values[:, :, :, :prefix] = past[:, 1]
        self.prefix_length = prefix
        self.reset_rows()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, input_pos: int | torch.Tensor):
        """Store k, v [B, nh, T, d]; return the keys/values attention covers ([B, nh, S', d]).

        Args:
            input_pos: an int s (slots [s, s + T) of every row; returns slots [0, s + T)), a [B]
                int64 tensor with T = 1 (slot input_pos[b] of row b; returns all S slots), or a
                [B, T] int64 tensor (slot input_pos[b, t] for token t of row b; returns all S slots).
        """
        keys, values = self.layer_keys[layer], self.layer_values[layer]  # [B, nh, S, d]
        if isinstance(input_pos, int):
            end = input_pos + k.shape[2]
            if end > self.max_length:
                raise InputError(f"the static KV cache holds {self.max_length} tokens per row; {end} were needed")
            keys[:, :, input_pos:end] = k
            values[:, :, input_pos:end] = v
            return keys[:, :, :end], values[:, :, :end]
        write_slots(keys, values, k, v, input_pos)
        return keys, values

    def update_range(self, layer: int, end: int):
        """The keys/values of slots [0, end) of a layer, [B, nh, end, d] (after a chunked prefill)."""
        return self.layer_keys[layer][:, :, :end], self.layer_values[layer][:, :, :end]

    def record_prompt(self, start: int, visible: torch.Tensor) -> None:
        """After prefilling T tokens at slots [start, start + T): which of them later tokens see.

        Args:
            start: first slot of the prompt (the prefix length for a fresh row).
            visible: [B, T] bool, True at tokens that later tokens attend to (what the prompt's last
                token sees: real tokens, not left padding).
        """
        end = start + visible.shape[1]
        self.visible[:, start:end] = visible
        self.lengths.fill_(end)

    def next_slots(self) -> torch.Tensor:
        """[B] the slot each row's next decoded token goes to (the last slot for a full row)."""
        return self.lengths.clamp(max=self.max_length - 1)

    def decode_mask(self) -> torch.Tensor:
        """The decode step's mask [B, 1, 1, S] (True = masked): the visible slots plus the new token's own."""
        own = torch.arange(self.max_length, device=self.lengths.device)[None, :] == self.next_slots()[:, None]
        return ~(self.visible | own)[:, None, None, :]

    def advance(self) -> None:
        """After a decode step: the token just written becomes visible and every row moves on by one.

        A full row stays full (its later tokens overwrite the last slot), so an idle row in a running
        batch never indexes out of range; the engine stops rows before they fill up.
        """
        own = torch.arange(self.max_length, device=self.lengths.device)[None, :] == self.next_slots()[:, None]
        self.visible |= own
        self.lengths.add_(1).clamp_(max=self.max_length)

    # A verification step (glm6b.inference.engine.DecodeEngine.verify) feeds T tokens per row: the
    # row's newest token and the tokens proposed after it. Their keys go to the row's next slots;
    # `accept` then makes visible only the ones the sampler kept, and the rest are overwritten later.

    def verify_slots(self, counts: torch.Tensor, width: int) -> torch.Tensor:
        """[B, width] the slots of a verification step's tokens: token t of row b goes to lengths[b] + t
        for t < counts[b]; the padding after them (and every token of a row with count 0) goes to the
        last slot, which a verifying caller keeps free (lengths[b] + counts[b] <= S - 1)."""
        offsets = torch.arange(width, device=self.lengths.device)[None, :]
        own = (self.lengths[:, None] + offsets).clamp(max=self.max_length - 1)
        return torch.where(offsets < counts[:, None], own, self.max_length - 1)

    def verify_mask(self, slots: torch.Tensor) -> torch.Tensor:
        """A verification step's mask [B, 1, T, S] (True = masked): token t sees the visible slots and
        this step's slots from the row's next one up to its own, so the fed tokens are causal
        (spec 4.8: each generated token sees what the previous one saw, plus itself)."""
        s = torch.arange(self.max_length, device=self.lengths.device)[None, None, :]
        fed = (s >= self.lengths[:, None, None]) & (s <= slots[:, :, None])  # [B, T, S]
        return ~(self.visible[:, None, :] | fed)[:, None]

    def accept(self, kept: torch.Tensor) -> None:
        """After a verification step: the first kept[b] tokens fed to row b become visible and the row
        moves on by kept[b] (0 leaves a row as it was)."""
        s = torch.arange(self.max_length, device=self.lengths.device)[None, :]
        start = self.lengths[:, None]
        self.visible |= (s >= start) & (s < start + kept[:, None])
        self.lengths.add_(kept).clamp_(max=self.max_length)

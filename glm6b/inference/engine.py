"""The decode engine: a static per-row KV cache, chunked prefill and one compiled decode step.

    engine = DecodeEngine(model, batch_size=4, max_length=512)          # allocates the cache once
    logits = engine.prefill(input_ids, attention_mask, position_ids)    # rows 0..R-1, [R, V] last-token logits
    logits = engine.decode(next_tokens)                                  # one token for every row, [B, V]
    engine.prefill(other_ids, other_mask, other_positions, rows=2)       # refill row 2; the others keep going
    engine.reset_rows(3)                                                 # free row 3
    logits = engine.verify(tokens, counts)                               # up to T tokens per row, [B, T, V]
    engine.accept(kept)                                                  # row b keeps kept[b] of them

The cache (glm6b.model.StaticKVCache) holds keys/values [L, B, nh, S, d] allocated once, the number
of filled slots of each row, and which slots each row's later tokens may see; the engine adds the 2D
position of each row's next token ([mask position, block position], spec 4.8). A decode step reads
all of that from device tensors and writes its token at each row's own slot, so nothing in it
depends on Python-side lengths: the step has fixed shapes for a given (B, S), compiles without graph
breaks (`torch.compile(fullgraph=True)`) and runs for every position without recompiling.
Rows are independent, so a server can prefill a new request into a free row while the other rows
are mid-decode (continuous batching); the caller keeps track of which rows are active and stops a
row before its slots run out (a full row keeps overwriting its last slot instead of failing).

A verification step (prompt lookup, glm6b.inference.lookup) feeds each row its newest token and the tokens
proposed after it, T per row at most, and returns the logits of every position. The generated part of
a ChatGLM sequence is causal (block positions 1, 2, 3, ... with the mask position fixed, spec 4.8), so
position t's logits are exactly those an ordinary step would give after the row's first t + 1 tokens.
Each row's keys go to its next slots; `accept` then advances each row by the number of tokens the
sampler kept (rows differ), and rejected slots are simply overwritten later, with no copies. It runs
through the same model code and kernels as the one-token step (GLMBlock.decode with T tokens) and
compiles the same way: a second width makes T symbolic, so no k or position compiles again.

Prompts are prefilled eagerly (a prefill is large matrix products, which compile does not speed
up), in chunks of `prefill_chunk_size` tokens per layer (GLMBlock.forward_chunked): a ChatGLM
context attends in both directions, so each layer first writes the keys/values of every chunk to
the cache and then runs every chunk's queries, projections and MLP. Activations stay at chunk size
and the results are those of one pass (the reference's, padding positions included).

Compilation (`compile="auto"`, the default) is on for CUDA models and for CPU models whose decode step
reads at least `COMPILE_ON_CPU_FROM_BYTES` of weights (every real ChatGLM-6B, in any precision); tiny
models (tests, the quickstart) run eagerly, as a compile would take longer than their whole run. True
or False force it either way (per call, or per model with glm6b.load(LoadConfig(compile=...))).

On CUDA the whole step is one compiled graph. On the CPU each layer's step (GLMBlock.decode) is
compiled, and one graph serves all layers, as it takes everything that differs between layers (the
cache tensors, the attention coefficient) as inputs: a cold compile then costs seconds instead of the
minutes a whole 28-layer step takes, and the step, a few hundred milliseconds of matrix-vector
products, does not notice the per-layer calls. Graphs are compiled with automatic dynamic shapes: a
second batch size or cache length compiles once more, with those sizes symbolic, and later ones reuse
that graph (compiled per exact shape, a ninth shape would hit torch's recompile limit and fail).

A step's attention reads every slot it covers. On the CPU a step covers, unless told otherwise, the slots
its rows have filled and the ones it writes, rounded up to SLOT_ROUNDING (`slots_for`), not the whole
cache: a chat's cache holds max_length (2048) slots per row while its rows fill a few hundred. Masked
slots weigh exactly 0 in the softmax, so the logits are the same either way. On CUDA the step covers every
slot (fixed shapes; not measured there). The cache has one slot more than a row may fill, which no step
covers: every step sees a view of the first slots with the same strides, so a compiled step takes the slot
count as one symbolic size instead of compiling again when the slots in use reach the end.
"""

from __future__ import annotations

import functools

import torch

from ..config import check_compile
from ..model import GLMBlock, StaticKVCache
from ..model import prompt_inputs as derive_prompt_inputs
from ..quant import cpu_kernels
from ..quant.linear import use_bf16_decode_kernels

DEFAULT_PREFILL_CHUNK_SIZE = 512
# "auto" compiles a CPU model's decode step from this many bytes of weights on (4 glm_6b layers hold 0.8 GB
# in bf16, the golden test model 1.4 MB).
COMPILE_ON_CPU_FROM_BYTES = 256 * 2**20
# The most tokens "auto" prompt lookup proposes per row and step.
AUTO_LOOKUP_TOKENS = 4
# Token rows a verification step may feed with AMX (see verify_rows_budget; measured with 4, docs/speculative.md).
AMX_VERIFY_ROWS = 4
# A CPU step's slots are rounded up to a multiple of this, so that its shape changes every SLOT_ROUNDING
# tokens, not every token (the compiled CPU step takes the slot count as a symbolic size).
SLOT_ROUNDING = 64


def slots_for(needed: int, max_length: int) -> int:
    """`needed` slots rounded up to a multiple of SLOT_ROUNDING, at most max_length."""
    return min(max_length, -(-needed // SLOT_ROUNDING) * SLOT_ROUNDING)


def should_compile(model, compile: bool | str = "auto") -> bool:
    """Resolve the `compile` setting for a model: True, False, or "auto" (see the module docstring).

    Raises:
        ValueError: a value other than True, False or "auto".
    """
    check_compile(compile)
    if compile != "auto":
        return bool(compile)
    return model.device.type == "cuda" or weight_bytes(model) >= COMPILE_ON_CPU_FROM_BYTES


def verify_rows_budget(model) -> int:
    """Token rows a verification step may feed (all rows of the batch together) for about the cost of a
    one-token step of one row, on this model's device, dtype and kernels; 1 where no rows come free.

    What "auto" prompt lookup goes by (docs/speculative.md has the measurements behind it):

    * CPU, bfloat16 activations on glm6b's own CPU kernels with AMX: AMX_VERIFY_ROWS (4). The
      int4/int8 layers' tile products take 8 rows for about 1.2x one row's time (README, kernel table),
      and the bfloat16 layers and lm_head run glm6b's dot products, memory-bound up to 4 rows.
    * CPU otherwise: 1. PyTorch's weight-only int8/int4 ops unpack the weight again for every row; glm6b's
      kernels without AMX are bound by their dot products from a few rows on (on an AMD Zen 4 a
      verification of 2-4 int8 / int4 tokens cost 1.0-1.4 steps at 28 layers, docs/speculative.md); and
      float32 products of 2 rows cost about 2x one row.
    * CUDA: 1, as it was not measured here (pass a number of tokens to turn lookup on).
    * Models below COMPILE_ON_CPU_FROM_BYTES: 1. Their steps are bound by per-call overheads, which grow
      with the tokens fed too, and the tests' and the quickstart's outputs stay those of ordinary
      decoding, random draws included.
    """
    if model.device.type != "cpu" or weight_bytes(model) < COMPILE_ON_CPU_FROM_BYTES:
        return 1
    if model.dtype == torch.bfloat16 and cpu_kernels.available() and cpu_kernels.has_amx():
        return AMX_VERIFY_ROWS
    return 1


def lookup_tokens(setting: int | str | None, model, rows: int, budget: int | None = None) -> int:
    """How many tokens prompt lookup proposes per row (0: off) for the `prompt_lookup_num_tokens` setting.

    Args:
        setting: 0 or None (off), a number of tokens, or "auto": as many as `verify_rows_budget` allows
            for `rows` rows, at most AUTO_LOOKUP_TOKENS (0 where verifying costs more than a step).
        model: the model that decodes.
        rows: rows decoded together.
        budget: `verify_rows_budget(model)` where the caller keeps it (the scheduler asks every step, and
            the budget walks the model's parameters); None: worked out here.
    """
    if not setting:
        return 0
    if setting != "auto":
        return int(setting)
    budget = verify_rows_budget(model) if budget is None else budget
    return max(0, min(AUTO_LOOKUP_TOKENS, budget // max(rows, 1) - 1))


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (tied weights counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def prompt_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's prefix-LM mask [B, 1, T, T] and positions [B, 2, T] for `DecodeEngine.prefill`, on the
    ids' device (glm6b.model.prompt_inputs with the model's config: the given ones, or derived from the ids)."""
    mask, positions = derive_prompt_inputs(input_ids, model.config, attention_mask, position_ids)
    return mask.to(input_ids.device), positions.to(input_ids.device)


def decode_step(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token for every row: write its keys at the row's next slot, return the logits [B, V].

    Everything is on the device and in place (cache slots, lengths, visibility, positions), with
    the same shapes at every position: the eager step, and the step compiled whole on CUDA.

    Args:
        model: a ChatGLMForConditionalGeneration.
        cache: the engine's cache.
        tokens: [B] the token each row feeds.
        positions: [B, 2] its (absolute, block) position; the block position is advanced in place.
    """
    logits = model(tokens[:, None], position_ids=positions[:, :, None], attention_mask=cache.decode_mask(),
                   kv_cache=cache, input_pos=cache.next_slots()).logits[:, -1]
    cache.advance()
    positions[:, 1] += 1  # the absolute position stays at the mask token, the block position counts on
    return logits


def layerwise_decode_step(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor,
                          layer_coeffs: list[torch.Tensor]) -> torch.Tensor:
    """decode_step with each layer's part compiled (GLMBlock.decode, one graph for every layer); the
    embedding, the final LayerNorm and the lm_head run eagerly. The CPU's compiled step.

    Args:
        layer_coeffs: [] float32 tensors, layer index + 1 for each layer (attention's scaling).
    """
    logits = _layerwise_logits(model, cache, tokens[:, None], positions[:, :, None], cache.decode_mask(),
                               cache.next_slots(), layer_coeffs)[:, -1]
    cache.advance()
    positions[:, 1] += 1
    return logits


def verify_positions(positions: torch.Tensor, width: int) -> torch.Tensor:
    """[B, 2, width] the 2D positions of a verification step's tokens: the absolute position stays at the
    mask token and the block position counts on from the row's next one (spec 4.8)."""
    offsets = torch.arange(width, device=positions.device)[None, :]
    return torch.stack([positions[:, 0, None].expand(-1, width), positions[:, 1, None] + offsets], dim=1)


def verify_step(model, cache: StaticKVCache, tokens: torch.Tensor, counts: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """T tokens for every row: write their keys at the row's next slots, return the logits [B, T, V] of
    every position. The cache and positions do not move on: `accept_step` does that once the sampler
    has chosen what to keep. The eager step, and the step compiled whole on CUDA.

    Args:
        model: a ChatGLMForConditionalGeneration.
        cache: the engine's cache.
        tokens: [B, T] each row's newest token and the tokens proposed after it, then any padding.
        counts: [B] how many of the row's tokens are real (0: the row is idle this step).
        positions: [B, 2] the (absolute, block) position of each row's next token.
    """
    slots = cache.verify_slots(counts, tokens.shape[1])
    return model(tokens, position_ids=verify_positions(positions, tokens.shape[1]),
                 attention_mask=cache.verify_mask(slots), kv_cache=cache, input_pos=slots).logits


def layerwise_verify_step(model, cache: StaticKVCache, tokens: torch.Tensor, counts: torch.Tensor,
                          positions: torch.Tensor, layer_coeffs: list[torch.Tensor]) -> torch.Tensor:
    """verify_step through the compiled GLMBlock.decode (the CPU's compiled step; see layerwise_decode_step)."""
    slots = cache.verify_slots(counts, tokens.shape[1])
    return _layerwise_logits(model, cache, tokens, verify_positions(positions, tokens.shape[1]),
                             cache.verify_mask(slots), slots, layer_coeffs)


def accept_step(cache: StaticKVCache, positions: torch.Tensor, kept: torch.Tensor) -> None:
    """After a verification step: row b keeps the first kept[b] tokens it was fed (its newest token and the
    proposals accepted after it) and its length and block position move on by that many."""
    cache.accept(kept)
    positions[:, 1] += kept


def _layerwise_logits(model, cache: StaticKVCache, tokens: torch.Tensor, position_ids: torch.Tensor,
                      mask: torch.Tensor, slots: torch.Tensor, layer_coeffs: list[torch.Tensor]) -> torch.Tensor:
    """The logits [B, T, V] of tokens [B, T] through every layer's compiled GLMBlock.decode."""
    transformer = model.transformer
    x = transformer.word_embeddings(tokens)  # [B, T, H]
    cos, sin = transformer.rotary(position_ids, x.dtype)
    layer_step = _compiled(GLMBlock.decode)  # the layer is its first argument: one graph for all layers
    # The slot count moves on every SLOT_ROUNDING tokens: symbolic from the first graph, not after a recompile.
    torch._dynamo.maybe_mark_dynamic(mask, 3)
    for layer, keys, values, coeff in zip(transformer.layers, cache.layer_keys, cache.layer_values, layer_coeffs):
        torch._dynamo.maybe_mark_dynamic(keys, 2)
        torch._dynamo.maybe_mark_dynamic(values, 2)
        x = layer_step(layer, x, cos, sin, mask, keys, values, slots, coeff)
    return model.lm_head(transformer.final_layernorm(x))


@functools.cache
def _compiled(function):
    """`function` (decode_step or GLMBlock.decode) under torch.compile, made once (torch caches the graphs
    per model and shapes)."""
    return torch.compile(function, fullgraph=True, dynamic=None)


class DecodeEngine:
    """A model with a static KV cache of `batch_size` rows and a (compiled) decode step.

    Args:
        model: a ChatGLMForConditionalGeneration (in eval mode).
        batch_size: rows of the cache.
        max_length: slots per row (P-tuning prefix excluded, prompt and new tokens included).
        compile: True, False or "auto" (see `should_compile`).
        prefill_chunk_size: prompt tokens per prefill forward.

    Attributes:
        cache: the StaticKVCache (rows, lengths, visibility).
        positions: [B, 2] int64, the (absolute, block) position of each row's next token.
        compiled: whether decode() runs the compiled step.
    """

    def __init__(self, model, batch_size: int, max_length: int, compile: bool | str = "auto",
                 prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK_SIZE):
        if prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
        self.model = model
        config = model.config
        prefix = config.pre_seq_len or 0
        self.compiled = should_compile(model, compile)
        slots = prefix + max_length
        device = model.device
        # All engine state is made and changed in inference mode (so the compiled step always sees
        # the same kind of tensors and never recompiles for that).
        with torch.inference_mode():
            # One slot more than a row may fill, never covered by a step: every step covers a view of the
            # first slots, so a compiled step sees the same (non-contiguous) strides at every slot count.
            self.cache = StaticKVCache(config, batch_size, slots + 1, model.dtype, device)
            self._slots = slots
            if prefix:
                self.cache.fill_prefix(model.transformer.prefix_past(batch_size, model.dtype))
            self.positions = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
            # The compiled CPU step takes each layer's attention scaling as a tensor (layerwise_decode_step).
            self.layer_coeffs = [torch.tensor(float(i + 1), device=device) for i in range(config.num_layers)]
        self.prefill_chunk_size = prefill_chunk_size
        if device.type == "cpu" and model.dtype == torch.bfloat16:
            use_bf16_decode_kernels(model)  # one-row bf16 products read memory faster (glm6b.quant.cpu_kernels)

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def max_length(self) -> int:
        """Slots per row (P-tuning prefix included)."""
        return self._slots

    @torch.inference_mode()
    def reset_rows(self, rows: slice | int | torch.Tensor | None = None) -> None:
        """Free rows (all by default): their slots become empty; the other rows are untouched."""
        self.cache.reset_rows(rows)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                rows: slice | int | None = None) -> torch.Tensor:
        """Run prompts into rows of the cache, in chunks; return the last token's logits [R, V].

        Args:
            input_ids: [R, T] prompts (left-padded for several rows).
            attention_mask: [R, 1, T, T] bool prefix-LM mask, True = masked (the tokenizer's, or
                from glm6b.model.build_mask_and_positions).
            position_ids: [R, 2, T].
            rows: the rows to fill: a slice of R rows or a row index (default rows 0..R-1). They
                are reset first; the other rows are untouched.

        Raises:
            InputError: the prompt does not fit into the rows' slots.
        """
        count, length = input_ids.shape
        rows = slice(0, count) if rows is None else rows
        rows = slice(rows, rows + 1) if isinstance(rows, int) else rows
        cache = self.cache.rows(rows, slots=self.max_length)
        if cache.batch_size != count:
            raise ValueError(f"prefill: {count} prompts for {cache.batch_size} rows {rows}")
        cache.reset_rows()
        start = cache.prefix_length
        # The P-tuning prefix (slots [0, start)) is visible to every token.
        prefix_visible = torch.zeros(count, 1, length, start, dtype=torch.bool, device=input_ids.device)
        mask = torch.cat([prefix_visible, attention_mask], dim=-1)  # [R, 1, T, P+T]
        logits = self.model(input_ids, position_ids=position_ids, attention_mask=mask, kv_cache=cache,
                            input_pos=start, last_token_only=True,
                            prefill_chunk_size=self.prefill_chunk_size).logits[:, -1]
        # Later tokens see what the last prompt token saw (spec 4.8), and count on from its position.
        cache.record_prompt(start, ~attention_mask[:, 0, -1, :])
        self.positions[rows] = position_ids[:, :, -1] + torch.tensor([0, 1], device=position_ids.device)
        return logits

    @torch.inference_mode()
    def reorder_rows(self, source_rows: torch.Tensor) -> None:
        """Row i takes the state of row source_rows[i] (beam search; repeating a prompt's row)."""
        self.cache.reorder_rows(source_rows)
        self.positions.copy_(self.positions[source_rows])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, rows: int | None = None, slots: int | None = None) -> torch.Tensor:
        """Feed one token per row; return the next logits (model dtype).

        Args:
            tokens: [B] one per row, or [rows] with `rows`.
            rows, slots: step only rows 0 .. rows-1, attending over their first `slots` slots (a server's
                rows in use; the other rows are untouched). Default: every row; on the CPU the slots in
                use (see the module docstring), elsewhere every slot.

        Returns:
            [B] (or [rows]) x V logits.
        """
        tokens = tokens.to(device=self.positions.device, dtype=torch.long).clone()  # an inference tensor, as always
        cache, positions = self._rows(rows, self._slots_in_use(rows, slots, 1))
        if not self.compiled:
            return decode_step(self.model, cache, tokens, positions)
        if positions.device.type == "cpu":  # one graph for every layer: seconds to compile, not minutes
            return layerwise_decode_step(self.model, cache, tokens, positions, self.layer_coeffs)
        return _compiled(decode_step)(self.model, cache, tokens, positions)

    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor, counts: torch.Tensor, rows: int | None = None,
               slots: int | None = None) -> torch.Tensor:
        """Feed up to T tokens per row (its newest token and the tokens proposed after it); return the logits
        of every position. Follow it with `accept` before the next step.

        The fed tokens are causal (block positions count on, the mask position stays), so position t's
        logits are those a decode step would give after the row's first t + 1 tokens, to rounding. Keys go
        to the row's next slots; `accept` keeps those of the tokens the sampler accepted, and rejected
        slots are overwritten by later steps. A row may feed 1 token (an ordinary step inside a
        verification) or 0 (idle). Each row needs lengths + counts <= S - 1 (the last slot takes the
        padding's keys), which holds when no row is fed past its token budget.

        Args:
            tokens: [B, T] (or [rows, T] with `rows`) token ids, each row's real ones first.
            counts: [B] how many tokens of each row are real (0 .. T).
            rows, slots: as for `decode`.

        Returns:
            [B, T, V] logits (model dtype); positions at or past a row's count are padding.
        """
        tokens = tokens.to(device=self.positions.device, dtype=torch.long).clone()
        counts = counts.to(device=self.positions.device, dtype=torch.long).clone()
        # The fed tokens' slots and the last one, which takes the padding's keys.
        cache, positions = self._rows(rows, self._slots_in_use(rows, slots, tokens.shape[1] + 1))
        if not self.compiled:
            return verify_step(self.model, cache, tokens, counts, positions)
        if positions.device.type == "cpu":
            return layerwise_verify_step(self.model, cache, tokens, counts, positions, self.layer_coeffs)
        return _compiled(verify_step)(self.model, cache, tokens, counts, positions)

    @torch.inference_mode()
    def accept(self, kept: torch.Tensor, rows: int | None = None, slots: int | None = None) -> None:
        """After `verify`: row b keeps its first kept[b] fed tokens and moves on by that many (0: unchanged).

        Args:
            kept: [B] (or [rows]) int64, 1 + the proposals accepted for rows that were fed, 0 for idle ones.
            rows, slots: as given to `verify` (slots None: as far as the kept tokens reach).
        """
        kept = kept.to(device=self.positions.device, dtype=torch.long)
        cache, positions = self._rows(rows, self._slots_in_use(rows, slots, kept))
        accept_step(cache, positions, kept)

    def _slots_in_use(self, rows: int | None, slots: int | None, new: int | torch.Tensor) -> int | None:
        """`slots` where given; else on the CPU the slots a step writing `new` slots per row needs (the rows'
        filled ones and those; a tensor: per row), rounded (`slots_for`); else None (every slot)."""
        if slots is not None or self.positions.device.type != "cpu":
            return slots
        lengths = self.cache.lengths if rows is None else self.cache.lengths[:rows]
        return slots_for(int((lengths + new).max()), self.max_length)

    def _rows(self, rows: int | None, slots: int | None) -> tuple[StaticKVCache, torch.Tensor]:
        """The cache and positions of rows 0 .. rows-1 over their first `slots` slots (default: all a row uses)."""
        slots = self.max_length if slots is None else min(slots, self.max_length)
        return self.cache.rows(slice(0, rows), slots=slots), self.positions[:rows]

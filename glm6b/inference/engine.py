"""The decode engine: a static per-row KV cache, chunked prefill and one compiled decode step.

    engine = DecodeEngine(model, batch_size=4, max_length=512)          # allocates the cache once
    logits = engine.prefill(input_ids, attention_mask, position_ids)    # rows 0..R-1, [R, V] last-token logits
    logits = engine.decode(next_tokens)                                  # one token for every row, [B, V]
    engine.prefill(other_ids, other_mask, other_positions, rows=2)       # refill row 2; the others keep going
    engine.reset_rows(3)                                                 # free row 3

The cache (glm6b.model.StaticKVCache) holds keys/values [L, B, nh, S, d] allocated once, the number
of filled slots of each row, and which slots each row's later tokens may see; the engine adds the 2D
position of each row's next token ([mask position, block position], spec 4.8). A decode step reads
all of that from device tensors and writes its token at each row's own slot, so nothing in it
depends on Python-side lengths: the step has fixed shapes for a given (B, S), compiles once with
`torch.compile(fullgraph=True, dynamic=False)` and runs for every position without recompiling.
Rows are independent, so a server can prefill a new request into a free row while the other rows
are mid-decode (continuous batching); the caller keeps track of which rows are active and stops a
row before its slots run out (a full row keeps overwriting its last slot instead of failing).

Prompts are prefilled eagerly (a prefill is large matrix products, which compile does not speed
up), in chunks of `prefill_chunk_size` tokens per layer (GLMBlock.forward_chunked): a ChatGLM
context attends in both directions, so each layer first writes the keys/values of every chunk to
the cache and then runs every chunk's queries, projections and MLP. Activations stay at chunk size
and the results are those of one pass (the reference's, padding positions included).

Compilation (`compile="auto"`, the default) is on for CUDA models and off on the CPU; True or
False force it either way (per call, or per model with glm6b.load_model(compile=...)). On a quiet
2-core CPU (benchmarks/generate.py) the compiled step of two glm_6b-width layers in bf16 was as fast
as the eager one (53.2 against 53.0 ms/step; eager runs its one-row products on glm6b's kernels, see
glm6b.quant.linear.BF16DecodeLinear) after a 21 s cold compile, and with int4 weights no faster,
while the 28-layer step compiles for minutes per batch size and cache length: so compiling is not the
CPU default; tiny test models run eagerly unless asked. Compiled steps are cached by torch per
(model, batch size, slots); slots are rounded up to a multiple of `SLOT_BUCKET` so that prompts of
different lengths share a graph. Low-precision float weights on the CPU are compiled with inductor
freezing, which prepacks the weights for the CPU's matrix kernels (not for quantized models, where it
was slower); a frozen step holds a copy of the weights, so it is rebuilt (with torch._dynamo.reset())
when the model's parameters have changed in place since (an optimizer step between two evaluations,
a LoRA merge).
"""

from __future__ import annotations

import torch

from ..model import StaticKVCache, build_mask_and_positions
from ..quant.linear import use_bf16_decode_kernels

# Slots per row are rounded up to a multiple of this, so that one compiled step serves many lengths.
SLOT_BUCKET = 128
DEFAULT_PREFILL_CHUNK_SIZE = 512


def default_device() -> torch.device:
    """CUDA when available, else the CPU (inference's default device)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def should_compile(model, compile: bool | str = "auto") -> bool:
    """Resolve the `compile` setting for a model: True, False, or "auto" (see the module docstring;
    "auto" first takes the model's `compile_default` when it has one, as glm6b.api.ChatGLM does).

    Raises:
        ValueError: a value other than True, False or "auto".
    """
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if compile == "auto":  # a model loaded with glm6b.load_model(compile=...) carries its own default
        compile = getattr(model, "compile_default", "auto")
    if compile != "auto":
        return bool(compile)
    return model.device.type == "cuda"  # see the module docstring for the CPU measurements


def prompt_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's prefix-LM mask [B, 1, T, T] and positions [B, 2, T] for `DecodeEngine.prefill`.

    Args:
        model: gives the config (special ids).
        input_ids: [B, T] prompts.
        attention_mask: the tokenizer's [B, 1, T, T] bool mask, a [B, T] 0/1 padding mask, or None.
        position_ids: the tokenizer's [B, 2, T], or None.

    Returns:
        The given tensors, or those built from the ids (spec 4.7), on the ids' device.
    """
    padding_mask = None
    if attention_mask is not None and attention_mask.dim() == 2:
        padding_mask, attention_mask = attention_mask, None
    if attention_mask is None or position_ids is None:
        built_mask, built_positions = build_mask_and_positions(input_ids, model.config, padding_mask)
        attention_mask = built_mask if attention_mask is None else attention_mask
        position_ids = built_positions if position_ids is None else position_ids
    return attention_mask.to(input_ids.device), position_ids.to(input_ids.device)


def decode_step(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token for every row: write its keys at the row's next slot, return the logits [B, V].

    Everything is on the device and in place (cache slots, lengths, visibility, positions), with
    the same shapes at every position: this is the function that gets compiled.

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


_compiled_decode_step = None


def _compiled_step():
    """decode_step under torch.compile, made once (torch caches a graph per model, rows and slots)."""
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    return _compiled_decode_step


def _weights_version(model) -> tuple[int, ...]:
    return tuple(p._version for p in model.parameters())


class DecodeEngine:
    """A model with a static KV cache of `batch_size` rows and a (compiled) decode step.

    Args:
        model: a ChatGLMForConditionalGeneration (in eval mode).
        batch_size: rows of the cache.
        max_length: slots per row needed (P-tuning prefix excluded, prompt and new tokens
            included); when compiled, rounded up to a multiple of SLOT_BUCKET.
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
        # Compiled: round up so that other lengths reuse the graph; eager: attend to no more slots than needed.
        slots = prefix + (-(-max_length // SLOT_BUCKET) * SLOT_BUCKET if self.compiled else max_length)
        device = model.device
        # All engine state is made and changed in inference mode (so the compiled step always sees
        # the same kind of tensors and never recompiles for that).
        with torch.inference_mode():
            self.cache = StaticKVCache(config, batch_size, slots, model.dtype, device)
            if prefix:
                self.cache.fill_prefix(model.transformer.prefix_past(batch_size, model.dtype))
            self.positions = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
        self.prefill_chunk_size = prefill_chunk_size
        if device.type == "cpu" and model.dtype == torch.bfloat16 and not self.compiled:
            use_bf16_decode_kernels(model)  # one-row bf16 products read memory faster (glm6b.quant.cpu_kernels)
        # Freezing prepacks float weights (faster bf16 steps); with quantized layers it made the step slower
        # (benchmarks/generate.py, 4 int4 layers: 158.5 ms/step frozen, 102.2 not, 100.0 eager), so not there.
        self.frozen = (self.compiled and device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16)
                       and not getattr(model.config, "quantization_bit", 0))
        if self.frozen:
            self._ensure_fresh_frozen_weights()

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def max_length(self) -> int:
        """Slots per row (P-tuning prefix included)."""
        return self.cache.max_length

    def _ensure_fresh_frozen_weights(self) -> None:
        # A frozen graph holds its own copy of the weights; recompile when they were changed since.
        version = _weights_version(self.model)
        seen = getattr(self.model, "_glm6b_frozen_weights_version", None)
        if seen is not None and seen != version:
            torch._dynamo.reset()
        self.model._glm6b_frozen_weights_version = version

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
        cache = self.cache.rows(rows)
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
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B]); return the next logits [B, V] (model dtype)."""
        tokens = tokens.to(device=self.positions.device, dtype=torch.long).clone()  # an inference tensor, as always
        if not self.compiled:
            return decode_step(self.model, self.cache, tokens, self.positions)
        from torch._inductor import config as inductor_config  # heavy: only when compiling

        # Freezing applies when a graph is compiled (the first call for a shape); later calls reuse it.
        with inductor_config.patch(freezing=self.frozen):
            return _compiled_step()(self.model, self.cache, tokens, self.positions)

"""Token generation with the KV cache: greedy and sampling, batching, stop conditions, streaming.

The prompt is run once (prefill); each later step feeds only the newest token and attends to the
cached keys (decode). Logits processing follows transformers 4.27.1, which the reference uses:
repetition penalty and the invalid-score guard first, then temperature, top-k and top-p, then a
multinomial draw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch

from ..model import KVCache, build_mask_and_positions


@dataclass
class GenerationConfig:
    """How to generate. Defaults are those of transformers' `generate` for this model.

    Attributes:
        max_length: total length limit, prompt included (padding counts, as in transformers).
        max_new_tokens: limit on generated tokens; overrides max_length when set.
        do_sample: sample instead of taking the argmax.
        temperature, top_k, top_p: sampling warpers (top_k=0 and top_p=1.0 disable them).
        repetition_penalty: >1 discourages tokens already in the sequence (CTRL-style).
        num_return_sequences: samples per prompt.
        eos_token_id: stop token(s); None takes the model config's <eop>.
        pad_token_id: filler after a row stops; None takes the model config's <pad>.
        stop_strings: stop a row once its decoded text contains one of these (needs a tokenizer).
        seed: seeds a private generator for sampling; None uses torch's global RNG.
        allowed_vocab_size: never produce ids at or above this (the model's vocab has unused
            padding rows past the tokenizer's vocabulary, which cannot be decoded).
    """

    max_length: int | None = 20
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] | None = None
    seed: int | None = None
    allowed_vocab_size: int | None = None

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"generation: {message}")

        need(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        need(self.max_length is None or self.max_length >= 1, "max_length must be >= 1")
        need(self.temperature > 0, "temperature must be > 0 (use do_sample=False for greedy)")
        need(self.top_k >= 0, "top_k must be >= 0")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(self.repetition_penalty > 0, "repetition_penalty must be > 0")
        need(self.num_return_sequences >= 1, "num_return_sequences must be >= 1")
        need(self.do_sample or self.num_return_sequences == 1,
             "num_return_sequences > 1 needs do_sample=True (greedy decoding gives one answer)")


def make_generation_config(base: GenerationConfig | None = None, **kwargs) -> GenerationConfig:
    """A GenerationConfig from keyword arguments; unknown names are an error that lists them."""
    known = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown generation argument(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    config = GenerationConfig(**{**(vars(base) if base else {}), **kwargs})
    config.validate()
    return config


@dataclass
class GenerationOutput:
    """`sequences` [B * num_return_sequences, T + N] (prompt included, finished rows filled with
    pad); `scores`: the processed scores of each step, [N, rows, V], when asked for."""

    sequences: torch.Tensor
    scores: list[torch.Tensor] = field(default_factory=list)


# ----------------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(scores: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    seen = torch.gather(scores, 1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, sequences, seen)


def guard_invalid_scores(scores: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Rows with NaN or Inf scores are forced to end with eos.

    The reference instead zeroes every row of the batch and forces the hard-coded id 5 (spec 5.5),
    which corrupts healthy rows and keeps the broken one going.
    """
    bad = ~torch.isfinite(scores).all(dim=-1, keepdim=True)  # [B, 1]
    if not bad.any():
        return scores
    forced = torch.full_like(scores, float("-inf"))
    forced[:, eos_token_id] = 0.0
    return torch.where(bad, forced, scores)


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, top_k).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as transformers does it: drop the low tail whose mass is <= 1 - top_p."""
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def process_scores(scores: torch.Tensor, sequences: torch.Tensor, config: GenerationConfig,
                   eos_token_id: int) -> torch.Tensor:
    """Processors then (when sampling) warpers, in transformers 4.27.1's order."""
    # The guard looks at the model's own scores, before the -inf that filtering below introduces.
    scores = guard_invalid_scores(scores.float(), eos_token_id)
    if config.allowed_vocab_size is not None and config.allowed_vocab_size < scores.shape[-1]:
        scores[:, config.allowed_vocab_size:] = float("-inf")
    if config.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, sequences, config.repetition_penalty)
    if config.do_sample:
        if config.temperature != 1.0:
            scores = scores / config.temperature
        if config.top_k > 0:
            scores = apply_top_k(scores, config.top_k)
        if config.top_p < 1.0:
            scores = apply_top_p(scores, config.top_p)
    return scores


def choose_next_tokens(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------- the loop


def _as_list(value: int | Sequence[int]) -> list[int]:
    return [value] if isinstance(value, int) else list(value)


def _prompt_inputs(model, input_ids, attention_mask, position_ids):
    """The prompt's prefix-LM mask [B, 1, T, T] and positions [B, 2, T]: given, or built from the ids."""
    padding_mask = None
    if attention_mask is not None and attention_mask.dim() == 2:
        padding_mask, attention_mask = attention_mask, None
    if attention_mask is None or position_ids is None:
        built_mask, built_positions = build_mask_and_positions(input_ids, model.config, padding_mask)
        attention_mask = built_mask if attention_mask is None else attention_mask
        position_ids = built_positions if position_ids is None else position_ids
    return attention_mask.to(input_ids.device), position_ids.to(input_ids.device)


@torch.inference_mode()
def generate_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    tokenizer=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (next_tokens [rows], processed scores [rows, V], finished [rows]) once per new token.

    Rows are the prompts repeated num_return_sequences times. A finished row gets pad tokens.
    Stops when every row has finished or the length limit is reached.
    """
    config = config or GenerationConfig()
    config.validate()
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    device = model.device
    input_ids = input_ids.to(device)
    mcfg = model.config
    eos_ids = _as_list(config.eos_token_id if config.eos_token_id is not None else mcfg.eos_token_id)
    pad_id = config.pad_token_id if config.pad_token_id is not None else mcfg.pad_token_id
    batch, prompt_len = input_ids.shape
    if config.max_new_tokens is not None:
        new_tokens = config.max_new_tokens
    else:
        new_tokens = (config.max_length or 20) - prompt_len
        if new_tokens < 1:
            raise ValueError(f"generation: the prompt has {prompt_len} tokens but max_length={config.max_length} "
                             f"counts the prompt too; raise max_length or pass max_new_tokens")
    if config.stop_strings and tokenizer is None:
        raise ValueError("generation: stop_strings need the tokenizer (pass tokenizer=...)")

    mask, positions = _prompt_inputs(model, input_ids, attention_mask, position_ids)
    prefix = mcfg.pre_seq_len or 0
    cache = KVCache(mcfg, batch, prefix + prompt_len + new_tokens, model.dtype, device)
    out = model(input_ids, position_ids=positions, attention_mask=mask, kv_cache=cache, last_token_only=True)
    logits = out.logits[:, -1]

    # Decoding state, carried like the reference carries its mask and positions (spec 4.8): a new
    # token sees what the last prompt token saw, plus every generated token; its absolute position
    # stays at the mask token and its block position counts on.
    key_visible = ~mask[:, 0, -1, :]  # [B, T]
    last_position = positions[:, :, -1:]  # [B, 2, 1]
    sequences = input_ids
    n = config.num_return_sequences
    if n > 1:
        rows = torch.arange(batch, device=device).repeat_interleave(n)
        cache.reorder(rows)
        logits, key_visible, last_position, sequences = (
            logits[rows], key_visible[rows], last_position[rows], sequences[rows])
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(sequences.shape[0], dtype=torch.bool, device=device)
    generated_texts_start = prompt_len

    for step in range(new_tokens):
        scores = process_scores(logits, sequences, config, eos_ids[0])
        next_tokens = choose_next_tokens(scores, config.do_sample, generator)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        finished = finished | torch.isin(next_tokens, eos)
        if config.stop_strings:
            for row in (~finished).nonzero().flatten().tolist():
                text = tokenizer.decode(sequences[row, generated_texts_start:].tolist())
                if any(s in text for s in config.stop_strings):
                    finished[row] = True
        yield next_tokens, scores, finished
        if bool(finished.all()) or step == new_tokens - 1:
            return
        key_visible = torch.cat([key_visible, torch.ones_like(key_visible[:, :1])], dim=1)
        last_position = last_position + torch.tensor([0, 1], device=device)[None, :, None]
        step_mask = None if bool(key_visible.all()) else ~key_visible[:, None, None, :]
        out = model(next_tokens[:, None], position_ids=last_position, attention_mask=step_mask, kv_cache=cache)
        logits = out.logits[:, -1]


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    tokenizer=None,
    output_scores: bool = False,
    **kwargs,
):
    """Generate continuations of a batch of prompts.

    Args:
        model: a ChatGLMForConditionalGeneration.
        input_ids: [B, T] prompts (left-padded for a batch) or [T].
        attention_mask, position_ids: the tokenizer's (for a padded batch), a [B, T] 0/1 padding
            mask, or None to derive them from the ids.
        generation_config: a GenerationConfig; keyword arguments override its fields
            (max_new_tokens=20, do_sample=False, top_p=0.7, ...).
        tokenizer: needed for stop_strings.
        output_scores: also return the processed scores of each step.

    Returns:
        LongTensor [B * num_return_sequences, T + N]: prompt included, rows left-padded like the
        input, finished rows filled with pad. With output_scores, a GenerationOutput instead.
    """
    config = make_generation_config(generation_config, **kwargs)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    sequences = input_ids.to(model.device).repeat_interleave(config.num_return_sequences, dim=0)
    columns, scores = [], []
    for next_tokens, step_scores, _ in generate_steps(model, input_ids, attention_mask, position_ids, config,
                                                      tokenizer):
        columns.append(next_tokens)
        if output_scores:
            scores.append(step_scores)
    if columns:
        sequences = torch.cat([sequences, torch.stack(columns, dim=1)], dim=1)
    return GenerationOutput(sequences, scores) if output_scores else sequences


class TextStreamer:
    """Turns a growing list of generated ids into text deltas that never need taking back.

    Each call decodes everything generated so far and releases only the part that later tokens
    cannot change: it holds back an incomplete UTF-8 byte sequence (decoded as U+FFFD), and a
    short tail that starts with a space (decoding's clean-up may still remove that space, as in
    " ," -> ","). The concatenated deltas equal the final decoded text.
    """

    HOLD = 5  # longest clean-up pattern (" n't", " 've") plus one

    def __init__(self, tokenizer, **decode_kwargs):
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_ids: int | Sequence[int]) -> str:
        self.ids.extend(_as_list(token_ids))
        text = self.tokenizer.decode(self.ids, **self.decode_kwargs)
        stable = len(text.rstrip("\ufffd"))
        space = text.rfind(" ", max(0, stable - self.HOLD), stable)
        if space != -1:
            stable = space
        return self._release(text[:stable])

    def flush(self) -> str:
        return self._release(self.tokenizer.decode(self.ids, **self.decode_kwargs))

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

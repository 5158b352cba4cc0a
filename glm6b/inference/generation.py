"""Token generation: greedy, sampling and beam search over a batch, stop conditions, streaming.

The prompt is run once (prefill into the decode engine's static KV cache); each later step feeds
only the newest token of every row through the engine's (compiled) decode step. Tokens are chosen by
the sampler of glm6b.inference.sampling (transformers 4.27.1's order), beams by glm6b.inference.beam.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..config import GenerationConfig, make_generation_config
from .beam import beam_search
from .engine import DecodeEngine, prompt_inputs
from .sampling import choose_tokens, new_token_budget, process_scores, row_generators
from .text import TextStreamer

__all__ = ["GenerationConfig", "GenerationOutput", "TextStreamer", "generate", "generate_steps",
           "make_generation_config"]


@dataclass
class GenerationOutput:
    """`sequences` [B * num_return_sequences, T + N] (prompt included, finished rows filled with
    pad); `scores`: the processed scores of each step, [N, rows, V], when asked for."""

    sequences: torch.Tensor
    scores: list[torch.Tensor] = field(default_factory=list)


# ----------------------------------------------------------------------------------- the loop


def _as_list(value: int | Sequence[int]) -> list[int]:
    return [value] if isinstance(value, int) else list(value)


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
    Stops when every row has finished or the length limit is reached. Greedy or sampled only
    (beam search keeps several candidates per row: see `generate` and glm6b.inference.beam).
    """
    config = config or GenerationConfig()
    config.validate()
    if config.num_beams > 1:
        raise ValueError("generation: num_beams > 1 is beam search, which yields no tokens step by step; "
                         "use generate()")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    device = model.device
    input_ids = input_ids.to(device)
    mcfg = model.config
    eos_ids = _as_list(config.eos_token_id if config.eos_token_id is not None else mcfg.eos_token_id)
    pad_id = config.pad_token_id if config.pad_token_id is not None else mcfg.pad_token_id
    batch, prompt_len = input_ids.shape
    new_tokens = new_token_budget(config, prompt_len)
    if config.stop_strings and tokenizer is None:
        raise ValueError("generation: stop_strings need the tokenizer (pass tokenizer=...)")

    mask, positions = prompt_inputs(model, input_ids, attention_mask, position_ids)
    n = config.num_return_sequences
    engine = DecodeEngine(model, batch * n, prompt_len + new_tokens, compile=config.compile,
                          prefill_chunk_size=config.prefill_chunk_size)
    # The engine carries the decoding state as the reference carries its mask and positions
    # (spec 4.8): a new token sees what the last prompt token saw, plus every generated token; its
    # absolute position stays at the mask token and its block position counts on.
    logits = engine.prefill(input_ids, mask, positions)
    sequences = input_ids
    if n > 1:
        rows = torch.arange(batch, device=device).repeat_interleave(n)
        engine.reorder_rows(rows)
        logits, sequences = logits[rows], sequences[rows]
    settings = [config] * sequences.shape[0]
    generators = row_generators(config.seed, sequences.shape[0])
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(sequences.shape[0], dtype=torch.bool, device=device)
    generated_texts_start = prompt_len

    for step in range(new_tokens):
        scores = process_scores(logits, settings, sequences, eos_ids[0])
        next_tokens = choose_tokens(scores, settings, generators)
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
        logits = engine.decode(next_tokens)


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
    """Generate continuations of a batch of prompts (greedy, sampled, or beam search).

    Args:
        model: a ChatGLMForConditionalGeneration.
        input_ids: [B, T] prompts (left-padded for a batch) or [T].
        attention_mask, position_ids: the tokenizer's (for a padded batch), a [B, T] 0/1 padding
            mask, or None to derive them from the ids.
        generation_config: a GenerationConfig; keyword arguments override its fields
            (max_new_tokens=20, do_sample=False, top_p=0.7, num_beams=4, compile=False, ...).
        tokenizer: needed for stop_strings.
        output_scores: also return the processed scores of each step (with beam search: the
            final score of each returned sequence instead, one tensor [B * num_return_sequences]).

    Returns:
        LongTensor [B * num_return_sequences, T + N]: prompt included, rows left-padded like the
        input, finished rows filled with pad. With output_scores, a GenerationOutput instead.
    """
    config = make_generation_config(generation_config, **kwargs)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if config.num_beams > 1:
        sequences, beam_scores = beam_search(model, input_ids, attention_mask, position_ids, config)
        return GenerationOutput(sequences, [beam_scores]) if output_scores else sequences
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

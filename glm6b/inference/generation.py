"""Token generation: greedy, sampling and beam search over a batch, stop conditions, streaming.

The prompt is run once (prefill into the decode engine's static KV cache); each later step feeds
only the newest token of every row through the engine's (compiled) decode step. Tokens are chosen by
the sampler of glm6b.inference.sampling (transformers 4.27.1's order), beams by glm6b.inference.beam.

With prompt lookup (`prompt_lookup_num_tokens`, glm6b.inference.lookup) a step feeds each row its
newest token and the tokens proposed after it from its own context (or from `prompt_lookup_corpus`),
and keeps those the sampler accepts: the same tokens (greedy) or the same distribution (sampling) in
fewer steps. Rows keep different numbers of tokens; `generate_steps` still yields one token per row at a time, so stop
strings, <eop>, the length limit and the repetition penalty see exactly the tokens they see without it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..config import GenerationConfig, make_generation_config
from .beam import beam_search
from .engine import DecodeEngine, lookup_tokens, prompt_inputs
from .lookup import CorpusIndex, LookupStats, ProposalLength, check_corpus_setting, corpus_index, propose
from .sampling import accept_verified, choose_tokens, new_token_budget, process_scores, row_generators
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
    stats: LookupStats | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (next_tokens [rows], processed scores [rows, V], finished [rows]) once per new token.

    Rows are the prompts repeated num_return_sequences times. A finished row gets pad tokens.
    Stops when every row has finished or the length limit is reached. Greedy or sampled only
    (beam search keeps several candidates per row: see `generate` and glm6b.inference.beam).
    With prompt lookup, one model step may give a row several tokens: they are yielded one at a
    time, the next ones without a model call in between.

    Args:
        stats: counts the model steps and proposals into this object (glm6b.inference.lookup.LookupStats).
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
    if config.prompt_lookup_corpus:
        check_corpus_setting(config)
        if tokenizer is None:
            raise ValueError("generation: prompt_lookup_corpus needs the tokenizer its answers are encoded with "
                             "(pass tokenizer=...)")

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
    stats = stats if stats is not None else LookupStats()
    limit = lookup_tokens(config.prompt_lookup_num_tokens, model, sequences.shape[0])
    if limit:
        real = ~mask[:, 0, -1, :]  # [B, T] what the last prompt token sees: the prompt without its padding
        contexts = [ids[keep].tolist() for ids, keep in zip(input_ids, real)]
        contexts = [list(contexts[i // n]) for i in range(sequences.shape[0])]
        corpus = None
        if config.prompt_lookup_corpus:
            corpus = corpus_index(config.prompt_lookup_corpus, tokenizer, config.prompt_lookup_max_ngram)
        yield from _steps_with_lookup(engine, logits, sequences, contexts, settings, generators, eos_ids, pad_id,
                                      new_tokens, config, tokenizer, limit, stats, corpus)
        return
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(sequences.shape[0], dtype=torch.bool, device=device)

    for step in range(new_tokens):
        scores = process_scores(logits, settings, sequences, eos_ids[0])
        next_tokens = choose_tokens(scores, settings, generators)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        stats.tokens += int((~finished).sum())
        finished = _finished_after(next_tokens, finished, eos, sequences, prompt_len, config.stop_strings, tokenizer)
        yield next_tokens, scores, finished
        if bool(finished.all()) or step == new_tokens - 1:
            return
        logits = engine.decode(next_tokens)
        stats.count_step(1)


def _finished_after(next_tokens: torch.Tensor, finished: torch.Tensor, eos: torch.Tensor, sequences: torch.Tensor,
                    prompt_len: int, stop_strings, tokenizer) -> torch.Tensor:
    """The rows finished once `next_tokens` (the last column of `sequences`) is taken: those finished before,
    those that chose an end id, and those whose generated text now holds one of the stop strings."""
    finished = finished | torch.isin(next_tokens, eos)
    if stop_strings:
        for row in (~finished).nonzero().flatten().tolist():
            text = tokenizer.decode(sequences[row, prompt_len:].tolist())
            if any(s in text for s in stop_strings):
                finished[row] = True
    return finished


def _steps_with_lookup(engine: DecodeEngine, logits: torch.Tensor, sequences: torch.Tensor, contexts: list[list[int]],
                       settings: list[GenerationConfig], generators: list, eos_ids: list[int], pad_id: int,
                       new_tokens: int, config: GenerationConfig, tokenizer, limit: int, stats: LookupStats,
                       corpus: CorpusIndex | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """generate_steps' loop with prompt lookup (after the prefill, whose `logits` give the first tokens).

    Each row has tokens chosen but not yet yielded (`pending`); when a row that is still running has
    none left, one model step runs for every row that needs tokens: a verification of their proposals
    (DecodeEngine.verify) or, when no row has one, an ordinary decode step. A row stops taking model
    steps once it has chosen <eop> or its whole budget; it finishes, as without lookup, when the
    yielded tokens say so (<eop>, a stop string).
    """
    rows, prompt_len = sequences.shape
    device = sequences.device
    eos = torch.tensor(eos_ids, device=device)
    histories = sequences.tolist()  # what the repetition penalty sees: the prompt row (padding included), then tokens
    penalised = any(s.repetition_penalty != 1.0 for s in settings)
    pending: list[deque] = [deque() for _ in range(rows)]  # (token, its processed scores) chosen, not yielded
    done = [False] * rows  # chose <eop> or its budget, or finished: no more model steps
    lengths = [ProposalLength(limit) for _ in range(rows)]
    pad_scores = torch.full((logits.shape[-1],), float("-inf"), device=device)
    pad_scores[pad_id] = 0.0  # what a finished row "chooses" its pad from

    def record(row: int, tokens: list[int], scores: torch.Tensor) -> None:
        for token, token_scores in zip(tokens, scores):
            pending[row].append((token, token_scores))
            contexts[row].append(token)
            histories[row].append(token)
            if token in eos_ids or len(histories[row]) - prompt_len == new_tokens:
                done[row] = True
                return

    def step() -> None:
        active = [r for r in range(rows) if not done[r]]
        proposals, shadows = {}, {}
        for r in active:
            room = new_tokens - (len(histories[r]) - prompt_len) - 1  # tokens beyond the one every step gives
            proposals[r] = propose(contexts[r], min(lengths[r].next(), room), config.prompt_lookup_max_ngram, corpus)
            if lengths[r].waiting:  # would a proposal be right? (checked against the token chosen: no model work)
                shadows[r] = propose(contexts[r], 1, config.prompt_lookup_max_ngram, corpus)
        width = 1 + max(map(len, proposals.values()), default=0)
        stats.count_step(width)
        if width == 1:  # no proposals anywhere: an ordinary step (finished rows feed pad)
            newest = torch.tensor([contexts[r][-1] if not done[r] else pad_id for r in range(rows)])
            step_logits = engine.decode(newest)[:, None]  # [B, 1, V]
        else:
            feed = torch.full((rows, width), pad_id, dtype=torch.long)
            counts = [0] * rows
            for r in active:
                counts[r] = 1 + len(proposals[r])
                feed[r, :counts[r]] = torch.tensor([contexts[r][-1], *proposals[r]])
            step_logits = engine.verify(feed, torch.tensor(counts))  # [B, T, V]
        accepted = accept_verified(step_logits, active, [proposals[r] for r in active], [settings[r] for r in active],
                                   [generators[r] for r in active], eos_ids[0],
                                   [histories[r] for r in active] if penalised else None)
        kept = [0] * rows
        for r, (tokens, row_scores) in zip(active, accepted):
            m = len(proposals[r])
            kept[r] = len(tokens)  # the newest token and the accepted proposals stay in the cache
            if m:
                lengths[r].verified(m, len(tokens) - 1)
                stats.proposed += m
                stats.accepted += len(tokens) - 1
            elif r in shadows:
                lengths[r].stepped(shadows[r][:1] == tokens[:1])
            record(r, tokens, row_scores)
        if width > 1:
            engine.accept(torch.tensor(kept))

    first = process_scores(logits, settings, sequences, eos_ids[0])
    for r, token in enumerate(choose_tokens(first, settings, generators).tolist()):
        # The prefill's token is the first check of the row's wait: would a proposal have been right?
        lengths[r].stepped(propose(contexts[r], 1, config.prompt_lookup_max_ngram, corpus)[:1] == [token])
        record(r, [token], first[r:r + 1])
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    ended = [False] * rows  # `finished` as a list: read per row and token, without a tensor access each
    for index in range(new_tokens):
        while any(not pending[r] and not ended[r] for r in range(rows)):
            step()
        column = [pending[r].popleft() if not ended[r] else (pad_id, pad_scores) for r in range(rows)]
        next_tokens = torch.tensor([token for token, _ in column], device=device)
        scores = torch.stack([token_scores for _, token_scores in column])
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        stats.tokens += rows - sum(ended)
        finished = _finished_after(next_tokens, finished, eos, sequences, prompt_len, config.stop_strings, tokenizer)
        ended = finished.tolist()
        for r in range(rows):
            if ended[r]:
                done[r] = True
                pending[r].clear()
        yield next_tokens, scores, finished
        if all(ended) or index == new_tokens - 1:
            return


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    tokenizer=None,
    output_scores: bool = False,
    stats: LookupStats | None = None,
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
        stats: counts model steps, proposals and accepted proposals into this LookupStats (greedy and
            sampling; prompt_lookup_num_tokens=k turns prompt lookup on, see glm6b.inference.lookup).

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
                                                      tokenizer, stats):
        columns.append(next_tokens)
        if output_scores:
            scores.append(step_scores)
    if columns:
        sequences = torch.cat([sequences, torch.stack(columns, dim=1)], dim=1)
    return GenerationOutput(sequences, scores) if output_scores else sequences

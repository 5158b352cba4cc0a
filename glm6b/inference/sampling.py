"""How tokens are chosen: the one sampler (`process_scores`, `choose_tokens`) every decoding loop uses.

Logits processing follows transformers 4.27.1, which the reference uses: the invalid-score guard and
the repetition penalty first, then temperature, top-k and top-p, then one draw from the distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import GenerationConfig


def new_token_budget(config: GenerationConfig, prompt_len: int) -> int:
    """How many tokens to generate at most: max_new_tokens, else max_length minus the prompt.

    Raises:
        ValueError: max_length leaves no room after the prompt.
    """
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    new_tokens = (config.max_length or 20) - prompt_len
    if new_tokens < 1:
        raise ValueError(f"generation: the prompt has {prompt_len} tokens but max_length={config.max_length} "
                         f"counts the prompt too; raise max_length or pass max_new_tokens")
    return new_tokens


# ----------------------------------------------------------------------------------- the sampler
#
# One sampler for every decoding loop (generate, chat, evaluation, the server's scheduler, beam
# search's scores): each row has its own settings (a GenerationConfig: greedy or temperature / top-k /
# top-p, repetition penalty, vocabulary limit) and its own random generator, so rows with different
# settings decode in one batch and a seeded row draws the same tokens whatever rows share its batch.


def apply_repetition_penalty(scores: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token in `sequences` [n, T]: positive scores divided by it, negative ones multiplied."""
    seen = torch.gather(scores, 1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, sequences, seen)


def guard_invalid_scores(scores: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Rows with NaN or Inf scores are forced to end with eos.

    The reference instead zeroes every row of the batch and forces the hard-coded id 5 (spec 5.5),
    which corrupts healthy rows and keeps the broken one going.
    """
    bad = ~torch.isfinite(scores).all(dim=-1, keepdim=True)  # [B, 1]
    forced = torch.full_like(scores, float("-inf"))
    forced[:, eos_token_id] = 0.0
    return torch.where(bad, forced, scores)


def _top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """transformers' TopKLogitsWarper then TopPLogitsWarper, row by row settings, on [n, V] scores.

    Top-k keeps each row's k best (k = V where it is off). Top-p then drops the least likely tokens whose
    total mass is <= 1 - top_p, the most likely token always kept. Both work on the k_max best columns
    only (everything else is already -inf after top-k), so a row with top_k 50 never sorts the vocabulary.
    """
    values, candidates = scores.topk(int(top_k.max()), dim=-1)  # [n, K], most likely first
    ranks = torch.arange(values.shape[-1], device=scores.device)
    values = values.masked_fill(ranks[None] >= top_k[:, None], float("-inf"))
    # The mass of each token and all less likely ones, summed from the least likely up (transformers' order).
    tail_mass = values.softmax(dim=-1).flip(-1).cumsum(-1).flip(-1)
    drop = tail_mass <= (1 - top_p)[:, None]
    drop[:, 0] = False
    return torch.full_like(scores, float("-inf")).scatter(1, candidates, values.masked_fill(drop, float("-inf")))


def process_scores(logits: torch.Tensor, settings: Sequence[GenerationConfig],
                   histories: torch.Tensor | Sequence[torch.Tensor] | None, eos_token_id: int) -> torch.Tensor:
    """The scores each row's next token is chosen from, in transformers 4.27.1's order.

    The NaN/Inf guard (on the model's own scores), the vocabulary limit (allowed_vocab_size) and the
    repetition penalty apply to every row; temperature, top-k and top-p to the rows that sample.

    Args:
        logits: [n, V] the model's logits (or log-probabilities: beam search).
        settings: one GenerationConfig per row (the same object for all rows is fine).
        histories: the tokens each row has seen, for the repetition penalty: an [n, T] tensor or one
            1-D tensor per row (None when no row has a penalty).
        eos_token_id: what a row with NaN/Inf scores is forced to produce.

    Returns:
        [n, V] float32 scores, -inf where filtered.
    """
    scores = guard_invalid_scores(logits.float(), eos_token_id)
    vocab = scores.shape[-1]
    for limit in {s.allowed_vocab_size for s in settings}:
        if limit is not None and limit < vocab:
            rows = [i for i, s in enumerate(settings) if s.allowed_vocab_size == limit]
            scores[rows, limit:] = float("-inf")
    penalties = {s.repetition_penalty for s in settings}
    if len(penalties) == 1 and isinstance(histories, torch.Tensor):  # one penalty for the whole batch
        if penalties != {1.0}:
            scores = apply_repetition_penalty(scores, histories, penalties.pop())
    else:
        for i, s in enumerate(settings):
            if s.repetition_penalty != 1.0:
                scores[i:i + 1] = apply_repetition_penalty(scores[i:i + 1], histories[i].reshape(1, -1),
                                                           s.repetition_penalty)
    sampled = [i for i, s in enumerate(settings) if s.do_sample]
    if sampled:
        rows = torch.tensor(sampled, device=scores.device)
        chosen = [settings[i] for i in sampled]
        warped = scores[rows] / torch.tensor([s.temperature for s in chosen], device=scores.device)[:, None]
        if any(0 < s.top_k < vocab or s.top_p < 1.0 for s in chosen):
            top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in chosen], device=scores.device)
            top_p = torch.tensor([s.top_p for s in chosen], device=scores.device)
            warped = _top_k_top_p(warped, top_k, top_p)
        scores[rows] = warped
    return scores


def choose_tokens(scores: torch.Tensor, settings: Sequence[GenerationConfig],
                  generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """The next token of each row from its processed scores: the argmax for greedy rows, a draw from
    softmax(scores) with the row's own generator (torch's global RNG where it is None) for the others.

    Args:
        scores: [n, V] from `process_scores`.
        settings: one GenerationConfig per row.
        generators: one CPU torch.Generator (or None) per row; rows may share one (drawn in row order).

    Returns:
        [n] int64 token ids.
    """
    tokens = scores.argmax(dim=-1)
    sampled = [i for i, s in enumerate(settings) if s.do_sample]
    if sampled:
        rows = torch.tensor(sampled, device=scores.device)
        cdf = scores[rows].softmax(dim=-1).cumsum(dim=-1)  # [m, V]
        draws = torch.stack([torch.rand((), generator=generators[i]) for i in sampled]).to(scores.device)
        # The first token whose cumulative probability exceeds the draw (scaled by the total, so that rounding
        # can never step past the last possible token; a token of probability 0 never gets chosen).
        tokens[rows] = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)[:, 0]
    return tokens


def row_generators(seed: int | None, rows: int) -> list[torch.Generator | None]:
    """The generators of `rows` rows that sample with one `seed`: one seeded generator they share (drawn in
    row order, so the run repeats), or None (torch's global RNG)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return [generator] * rows

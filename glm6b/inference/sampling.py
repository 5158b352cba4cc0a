"""How tokens are chosen: the one sampler (`process_scores`, `choose_tokens`) every decoding loop uses.

Logits processing follows transformers 4.27.1, which the reference uses: the invalid-score guard and
the repetition penalty first, then temperature, top-k and top-p, then one draw from the distribution.
With prompt lookup (glm6b.inference.lookup), `accept_proposals` decides which proposed tokens a row
keeps, with the same scores and draws, so that its tokens are distributed as ordinary decoding's.
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


def accept_proposals(scores: torch.Tensor, proposals: Sequence[int], settings: GenerationConfig,
                     generator: torch.Generator | None) -> list[int]:
    """One row's verification of proposed tokens: the proposals it keeps, then the token after them.

    `scores[j]` are the row's processed scores after its newest token and the first j proposals (from
    `process_scores` with the history that includes them). A greedy row keeps proposals while each is
    the argmax and then takes the argmax, so its tokens are those of greedy decoding. A sampling row
    keeps proposal x with probability p(x) under softmax(scores[j]); on a rejection it draws from p with
    x removed (renormalised), and after keeping them all it draws from the last position's p. A
    proposal does not depend on the model, so each token is distributed exactly as ordinary sampling
    draws it (the speculative-sampling rule with a draft that puts all its mass on x).

    Args:
        scores: [m + 1, V] processed scores, m = len(proposals).
        proposals: the proposed tokens.
        settings: the row's GenerationConfig.
        generator: the row's random generator (None: torch's global RNG).

    Returns:
        The accepted proposals followed by one more token: 1 to m + 1 tokens.
    """
    kept: list[int] = []
    for j, token in enumerate(proposals):
        if not settings.do_sample:
            best = int(scores[j].argmax())
            if best != token:
                return kept + [best]
        elif torch.rand((), generator=generator) >= scores[j].softmax(dim=-1)[token]:  # rejected with 1 - p(x)
            without = scores[j:j + 1].clone()
            without[0, token] = float("-inf")
            return kept + choose_tokens(without, [settings], [generator]).tolist()
        kept.append(token)
    return kept + choose_tokens(scores[-1:], [settings], [generator]).tolist()


def accept_verified(logits: torch.Tensor, rows: Sequence[int], proposals: Sequence[Sequence[int]],
                    settings: Sequence[GenerationConfig], generators: Sequence[torch.Generator | None],
                    eos_token_id: int, histories: Sequence[Sequence[int]] | None = None
                    ) -> list[tuple[list[int], torch.Tensor]]:
    """What each row keeps of a verification step (glm6b.inference.engine.DecodeEngine.verify): the
    processed scores of every position it fed (`process_scores`, the repetition penalty seeing the
    proposals before each position) and `accept_proposals` on them.

    Args:
        logits: [B, T, V], the verification's logits (row b's position j: after its newest token and
            its first j proposals).
        rows: the batch rows to accept for; rows[i] fed its newest token and proposals[i].
        proposals, settings, generators: per listed row.
        eos_token_id: for the scores of invalid rows (glm6b.inference.sampling.guard_invalid_scores).
        histories: per listed row, the tokens the repetition penalty sees before this step (None when
            no row has a penalty).

    Returns:
        Per listed row: the tokens it keeps (its accepted proposals and one more token) and the scores
        [len(proposal) + 1, V] they were chosen from.
    """
    if not any(proposals):  # an ordinary step: one token per row, chosen together (the draws in row order)
        fed = logits[:, 0] if list(rows) == list(range(logits.shape[0])) else logits[list(rows), 0]  # [n, V]
        penalised = None if histories is None else [torch.tensor(h, device=logits.device) for h in histories]
        scores = process_scores(fed, settings, penalised, eos_token_id)
        tokens = choose_tokens(scores, settings, generators).tolist()
        return [([token], scores[i:i + 1]) for i, token in enumerate(tokens)]
    positions = [(i, j) for i, proposal in enumerate(proposals) for j in range(len(proposal) + 1)]
    fed = logits[[rows[i] for i, _ in positions], [j for _, j in positions]]  # [N, V]
    penalised = None
    if histories is not None:
        penalised = [torch.tensor([*histories[i], *proposals[i][:j]], device=logits.device) for i, j in positions]
    scores = process_scores(fed, [settings[i] for i, _ in positions], penalised, eos_token_id)
    kept, start = [], 0
    for i, proposal in enumerate(proposals):
        row_scores = scores[start:start + len(proposal) + 1]
        start += len(proposal) + 1
        kept.append((accept_proposals(row_scores, proposal, settings[i], generators[i]), row_scores))
    return kept


def row_generators(seed: int | None, rows: int) -> list[torch.Generator | None]:
    """The generators of `rows` rows that sample with one `seed`: one seeded generator they share (drawn in
    row order, so the run repeats), or None (torch's global RNG)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return [generator] * rows

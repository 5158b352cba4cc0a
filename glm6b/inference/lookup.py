"""Prompt-lookup decoding: proposals copied from a row's own context, and how many tokens a row proposes.

A ChatGLM answer often copies its input: an ADGEN advertisement repeats the prompt's attributes, a chat
answer quotes the pasted text or a name from the history. `propose_from_context` guesses the next
tokens by finding the row's last n tokens earlier in its context (prompt + generated so far) and
copying what followed them. The decode engine checks all of them in one forward
(glm6b.inference.engine.DecodeEngine.verify) and the sampler keeps the ones the model agrees with
(glm6b.inference.sampling.accept_proposals), so the output is that of ordinary decoding, in fewer
steps. The proposer is a plain function of the context: a draft model could take its place.

`ProposalLength` switches a row's proposals off after a verification that kept nothing, until its text
copies again (a verification of several tokens costs more than a one-token step, a little where the
kernels take several rows at the price of one, and up to T times where they pay per input row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import PROMPT_LOOKUP_MAX_NGRAM as DEFAULT_MAX_NGRAM


def propose_from_context(context: Sequence[int] | torch.Tensor, max_tokens: int,
                         max_ngram: int = DEFAULT_MAX_NGRAM) -> list[int]:
    """Up to `max_tokens` proposed next tokens: what followed the context's last n tokens where they
    occurred before, for the longest n (from `max_ngram` down to 1) that occurs, at its most recent
    occurrence.

    Where the copy reaches the end of the context it goes on copying from the tokens it has just
    proposed, so that a repeating pattern ("a b a b") is proposed as far as asked.

    Args:
        context: the row's tokens so far (prompt without padding, then the generated ones).
        max_tokens: how many tokens to propose at most (0: none).
        max_ngram: the longest suffix to look up.

    Returns:
        The proposed tokens (an empty list when no suffix occurs earlier).
    """
    ids = context.tolist() if isinstance(context, torch.Tensor) else list(context)
    length = len(ids)
    if max_tokens < 1 or length < 2:
        return []
    # One pass back from the end over earlier occurrences of the last token: the first one that matches
    # max_ngram tokens is the answer; otherwise the longest match seen, the most recent among equals.
    follow, longest = -1, 0
    for end in range(length - 2, -1, -1):
        if ids[end] != ids[-1]:
            continue
        n = 1
        while n < max_ngram and end - n >= 0 and ids[end - n] == ids[length - 1 - n]:
            n += 1
        if n > longest:
            follow, longest = end + 1, n
            if n == max_ngram:
                break
    if not longest:
        return []
    for i in range(max_tokens):  # ids grows as it goes, so follow + i is always in range
        ids.append(ids[follow + i])
    return ids[length:]


@dataclass
class LookupStats:
    """What prompt lookup did during a generation (filled by generate / generate_steps when passed in).

    Attributes:
        tokens: tokens generated (<eop> included, pads after it not).
        steps: model steps after the prefill (ordinary decode steps and verifications).
        verify_steps: of those, the verifications of proposed tokens.
        proposed: proposed tokens verified.
        accepted: of those, the ones kept.
        widths: {T: model steps that fed up to T tokens per row} (1: ordinary decode steps), for
            pricing a run with the verification costs of benchmarks/speculative.py.
    """

    tokens: int = 0
    steps: int = 0
    verify_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    widths: dict[int, int] = field(default_factory=dict)

    def count_step(self, width: int) -> None:
        """Record one model step that fed up to `width` tokens per row."""
        self.steps += 1
        self.verify_steps += width > 1
        self.widths[width] = self.widths.get(width, 0) + 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed tokens (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens per model call, the prefill (which gives each row's first token) counted as one."""
        return self.tokens / (self.steps + 1)


@dataclass
class ProposalLength:
    """How many tokens one row proposes at its next step: one (a probe), `limit`, or none while it waits
    for its text to copy again (a switch-off, so that a row whose proposals fail stops paying for them).

    A row's first proposal is a single token; once one is kept, it proposes `limit` tokens. After a
    verification that kept none of its proposals it waits: each ordinary step checks, at no model cost,
    whether a one-token proposal would have matched the token chosen, and the first such match (the text
    copies again) ends the wait with another one-token probe. So an answer whose proposals never come true
    pays for one verification of two tokens, plus one per chance match. Verifying 2 tokens costs less than
    verifying limit + 1 where the kernels pay per row (float32 on a CPU: 2.1 against 3.4 steps for 5
    tokens), and short answers that do not copy pay that once: the ADGEN references of the quickstart's
    tokenizer price at 0.94x in float32 with the probe, 0.87x without it (benchmarks/speculative.py,
    "references" and "expected"; docs/speculative.md). A wait of a fixed 32 steps paid for two
    verifications per 64 tokens, one that doubled from a step (1, 3, 7, ...) for five. A proposal is not
    shortened after a partial rejection: on the ADGEN references shortening kept fewer tokens per step.

    Attributes:
        limit: tokens per proposal (the prompt_lookup_num_tokens setting).
        waiting: no proposals until an ordinary step's token matches what would have been proposed.
        probing: the next proposal is one token (a new row's, or the first after a wait).
    """

    limit: int
    waiting: bool = False
    probing: bool = True

    def next(self) -> int:
        """Tokens to propose at this step (0 while waiting)."""
        if self.waiting:
            return 0
        return min(1, self.limit) if self.probing else self.limit

    def verified(self, proposed: int, accepted: int) -> None:
        """Record a verification of `proposed` tokens of which `accepted` were kept."""
        self.waiting = self.probing = accepted == 0

    def stepped(self, would_have_matched: bool) -> None:
        """Record an ordinary step taken while waiting: whether a proposal would have matched its token."""
        if would_have_matched:
            self.waiting = False

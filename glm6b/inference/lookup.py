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
    """How many tokens one row proposes at its next step: `limit`, or none while it waits for its text to
    copy again (a switch-off, so that a row whose proposals fail stops paying for them).

    A row proposes from its first step. After a verification that kept none of its proposals it waits:
    each ordinary step checks, at no model cost, whether a one-token proposal would have matched the
    token chosen, and the first such match (the text copies again) ends the wait. So an answer whose
    proposals never come true pays for one verification, plus one per chance match. A wait of a fixed
    32 steps had paid for two in a 64-token answer (0.93x in float32 on a CPU, where verifying 5 tokens
    costs 3.4 steps), one that doubled from a step (1, 3, 7, ...) for five (benchmarks/speculative.py,
    "expected"; docs/speculative.md). Waiting from the first step as well would spare short answers their
    one failed verification, but a row would then never propose before its text has copied once. A
    proposal is not shortened after a partial rejection: on the ADGEN references
    (benchmarks/speculative.py, "references") shortening kept fewer tokens per step.

    Attributes:
        limit: tokens per proposal (the prompt_lookup_num_tokens setting).
        waiting: no proposals until an ordinary step's token matches what would have been proposed.
    """

    limit: int
    waiting: bool = False

    def next(self) -> int:
        """Tokens to propose at this step (0 while waiting)."""
        return 0 if self.waiting else self.limit

    def verified(self, proposed: int, accepted: int) -> None:
        """Record a verification of `proposed` tokens of which `accepted` were kept."""
        self.waiting = accepted == 0

    def stepped(self, would_have_matched: bool) -> None:
        """Record an ordinary step taken while waiting: whether a proposal would have matched its token."""
        if would_have_matched:
            self.waiting = False

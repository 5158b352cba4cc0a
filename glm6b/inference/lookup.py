"""Prompt-lookup decoding: proposals copied from a row's own context or a corpus, and how many tokens a row
proposes.

A ChatGLM answer often copies its input: an ADGEN advertisement repeats the prompt's attributes, a chat
answer quotes the pasted text or a name from the history. `propose_from_context` guesses the next
tokens by finding the row's last n tokens earlier in its context (prompt + generated so far) and
copying what followed them. The decode engine checks all of them in one forward
(glm6b.inference.engine.DecodeEngine.verify) and the sampler keeps the ones the model agrees with
(glm6b.inference.sampling.accept_proposals), so the output is that of ordinary decoding, in fewer
steps. The proposer is a plain function of the context: a draft model could take its place.

A corpus can propose too (`CorpusIndex`: retrieval-based speculative decoding, REST, He et al. 2023):
the answers of the fine-tuning data, whose phrases recur in the answers of a model trained on them,
where the row's own context has nothing to copy. `propose` is the one proposer generate and the
server's scheduler call: the context's proposal, or the corpus's where it matches a longer suffix.

`ProposalLength` keeps a row's proposals off until its text copies (a proposal would have matched the
token chosen), and off again after a verification that kept nothing (a verification of several tokens
costs more than a one-token step, a little where the kernels take several rows at the price of one, and
up to T times where they pay per input row).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import weakref
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import PROMPT_LOOKUP_MAX_NGRAM as DEFAULT_MAX_NGRAM
from ..config import DataConfig, DataError
from ..io import read_lines


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
    if max_tokens < 1:
        return []
    follow, longest = _match_in_context(ids, max_ngram)
    return _copy(ids, follow, max_tokens) if longest else []


def _match_in_context(ids: list[int], max_ngram: int) -> tuple[int, int]:
    """(where the copy starts, n) for the longest suffix of `ids` (n <= max_ngram) that occurs earlier in
    `ids`, at its most recent occurrence; (-1, 0) when none does."""
    length = len(ids)
    if length < 2:
        return -1, 0
    # One pass back from the end over earlier occurrences of the last token: the first one that matches
    # max_ngram tokens is the answer; otherwise the longest match seen, the most recent among equals.
    # list.index on the reversed ids finds them in C, so only the occurrences pass through Python.
    last, backwards = ids[-1], ids[::-1]
    follow, longest, i = -1, 0, 0
    while True:
        try:
            i = backwards.index(last, i + 1)
        except ValueError:
            break
        end = length - 1 - i
        n = 1
        while n < max_ngram and end - n >= 0 and ids[end - n] == ids[length - 1 - n]:
            n += 1
        if n > longest:
            follow, longest = end + 1, n
            if n == max_ngram:
                break
    return follow, longest


def _copy(ids: list[int], follow: int, max_tokens: int) -> list[int]:
    """`max_tokens` tokens copied from `follow` on, going on over the ones just copied where the copy
    reaches the end (so "a b a b" continues as far as asked)."""
    copied: list[int] = []
    for j in range(follow, follow + max_tokens):
        copied.append(ids[j] if j < len(ids) else copied[j - len(ids)])
    return copied


def propose(context: Sequence[int] | torch.Tensor, max_tokens: int, max_ngram: int = DEFAULT_MAX_NGRAM,
            corpus: CorpusIndex | None = None) -> list[int]:
    """Prompt lookup's proposal for one row: the one proposer of generate and the server's scheduler.

    The row's own context first (`propose_from_context`); the corpus's proposal (`CorpusIndex.propose`)
    where the context has no match or a shorter one than the corpus. On a tie the context wins: its copy
    is of this very answer (a quoted text, a name, a phrase the answer already used), while the corpus's is
    the most common of many answers, and a context match of max_ngram tokens then needs no corpus search
    at all. (On the built-in ADGEN references, whose prompt attributes copy badly, the corpus winning ties
    gave 1.91 instead of 1.90 tokens per step with the quickstart's tokenizer: not worth losing quotes for.)

    Args:
        context: the row's tokens so far (prompt without padding, then the generated ones).
        max_tokens: how many tokens to propose at most (0: none).
        max_ngram: the longest suffix to look up.
        corpus: an index of other texts to propose from, or None (the context only).

    Returns:
        The proposed tokens (an empty list when neither has a match).
    """
    if max_tokens < 1:
        return []
    ids = context.tolist() if isinstance(context, torch.Tensor) else context
    follow, longest = _match_in_context(ids, max_ngram)
    if corpus is not None and longest < max_ngram:
        tokens, matched = corpus.lookup(ids, max_tokens, max_ngram)
        if matched > longest:
            return tokens
    return _copy(ids, follow, max_tokens) if longest else []


# ----------------------------------------------------------------------------------- the corpus


class CorpusIndex:
    """The n-grams of a corpus of token sequences (documents) and what follows them, for proposals from
    other texts than the row's own (retrieval-based speculative decoding, REST, He et al. 2023).

    The documents are concatenated into one int32 array, each followed by -1 (a document boundary: no
    n-gram and no continuation crosses it). Every token position is sorted by the `max_ngram` tokens from it
    (cut at its document's end) and then by whether another token follows them, so the occurrences of an
    n-gram (n <= max_ngram) that have a continuation are one run of that order, found by binary search. The
    keys are the tokens themselves, not hashes: a match is always a true one. Memory: two int32 arrays of
    the corpus's length (the real ADGEN train set's ~10M answer tokens: about 85 MB).

    Args:
        documents: token sequences (a document of no tokens is skipped).
        max_ngram: the longest n-gram looked up (longer suffixes are looked up at this length).

    Raises:
        ValueError: a token id that is negative or does not fit int32, max_ngram < 1, or more than 2**31
            tokens.
    """

    # Occurrences examined per proposal at most, evenly spaced over the n-gram's run (sorted by what follows,
    # so an even sample keeps the proportions of the continuations): a common 1-gram stays fast.
    SAMPLE = 4096
    FEW = 64  # occurrences counted in plain Python rather than numpy
    CACHED = 1 << 14  # lookups remembered (by the context's last max_ngram tokens and the tokens asked for)

    def __init__(self, documents: Iterable[Sequence[int]], max_ngram: int = DEFAULT_MAX_NGRAM):
        if max_ngram < 1:
            raise ValueError(f"CorpusIndex: max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram
        parts = [np.asarray(d, dtype=np.int64) for d in documents if len(d)]
        lengths = np.array([len(d) for d in parts], dtype=np.int64)
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        del parts
        if flat.size and not 0 <= int(flat.min()) <= int(flat.max()) < 2 ** 31 - 1:
            raise ValueError(f"CorpusIndex: token ids must be in [0, 2**31 - 1), got {int(flat.min())} .. "
                             f"{int(flat.max())}")
        size = int(lengths.sum()) + len(lengths)  # each document and its boundary
        if size + max_ngram + 1 >= 2 ** 31:
            raise ValueError(f"CorpusIndex: {size} tokens are more than an int32 index holds")
        self.documents, self.tokens = len(lengths), int(lengths.sum())
        # max_ngram + 1 boundaries at the end, so that any position + j (j <= max_ngram) is in range.
        tokens = np.full(size + max_ngram + 1, -1, dtype=np.int32)
        is_token = np.ones(size, dtype=bool)
        is_token[np.cumsum(lengths + 1) - 1] = False
        tokens[:size][is_token] = flat
        positions = np.flatnonzero(tokens >= 0).astype(np.int32)
        order = _sorted_positions(tokens, positions, max_ngram)
        # Kept as array.array (4 bytes an entry), which Python indexes at the speed of a list (the binary searches,
        # the continuations of few occurrences), with numpy views of the same memory for many occurrences.
        self._tokens, self._order = array("i", tokens.tobytes()), array("i", order.tobytes())
        self._tokens_np = np.frombuffer(self._tokens, dtype=np.int32)
        self._order_np = np.frombuffer(self._order, dtype=np.int32)
        # Answers share their phrases, so the same few-token tails are looked up again and again (every step's
        # "would it have matched" check too): a search takes tens of microseconds, a remembered one about 2.
        self._lookup_tail = functools.lru_cache(maxsize=self.CACHED)(self._search)

    def __repr__(self) -> str:
        return f"CorpusIndex({self.documents} documents, {self.tokens} tokens, max_ngram={self.max_ngram})"

    def propose(self, context: Sequence[int], max_tokens: int, max_ngram: int = DEFAULT_MAX_NGRAM) -> list[int]:
        """Up to `max_tokens` tokens that follow the context's longest suffix (n from `max_ngram` down to 1)
        occurring in the corpus with a continuation: its most frequent continuation, token by token (the
        commonest next token among the occurrences, then among those that went on with it, and so on; the
        smaller id on a tie), never past a document's end.

        Args:
            context: the tokens so far.
            max_tokens: how many tokens to propose at most.
            max_ngram: the longest suffix to look up (at most the index's max_ngram).

        Returns:
            The proposed tokens (an empty list when no suffix occurs).
        """
        return self.lookup(context, max_tokens, max_ngram)[0]

    def lookup(self, context: Sequence[int], max_tokens: int,
               max_ngram: int = DEFAULT_MAX_NGRAM) -> tuple[list[int], int]:
        """(`propose`'s tokens, n: the length of the suffix they follow, 0 when none occurs)."""
        tail = tuple(int(t) for t in context[max(len(context) - min(max_ngram, self.max_ngram), 0):])
        tokens, n = self._lookup_tail(tail, max_tokens)
        return list(tokens), n

    def _search(self, tail: tuple[int, ...], max_tokens: int) -> tuple[tuple[int, ...], int]:
        """`lookup` of a context ending in `tail` (its last max_ngram tokens, all the answer depends on)."""
        for n in range(len(tail), 0, -1):
            lo, hi = self._run(list(tail[len(tail) - n:]))
            if lo < hi:
                return tuple(self._continuation(lo, hi, n, max_tokens)), n
        return (), 0

    def _run(self, ngram: list[int]) -> tuple[int, int]:
        """The run [lo, hi) of the order whose positions start with `ngram` and go on after it in their document."""
        order, tokens = self._order, self._tokens
        lo, hi = 0, len(order)
        for j, token in enumerate(ngram):  # within the run of ngram[:j], the order is by the token at j
            lo = bisect_left(order, token, lo, hi, key=lambda p: tokens[p + j])
            hi = bisect_right(order, token, lo, hi, key=lambda p: tokens[p + j])
            if lo == hi:
                return lo, hi
        n = len(ngram)  # those ending at their document's boundary sort first
        return bisect_left(order, True, lo, hi, key=lambda p: tokens[p + n] >= 0), hi

    def _continuation(self, lo: int, hi: int, n: int, max_tokens: int) -> list[int]:
        """The most frequent continuation of the occurrences order[lo:hi] of an n-gram (see `propose`)."""
        tokens = self._tokens
        if hi - lo > self.SAMPLE:
            picks = lo + np.arange(self.SAMPLE, dtype=np.int64) * (hi - lo) // self.SAMPLE
            follow = self._order_np[picks].astype(np.int64) + n  # where each occurrence's continuation starts
        else:
            follow = self._order_np[lo:hi].astype(np.int64) + n
        proposal: list[int] = []
        while len(proposal) < max_tokens:
            if len(follow) <= self.FEW:  # plain Python: cheaper than numpy's cost per call on a few entries
                follow = follow.tolist() if isinstance(follow, np.ndarray) else follow
                counts: dict[int, int] = {}
                for at in follow:
                    if tokens[at] >= 0:
                        counts[tokens[at]] = counts.get(tokens[at], 0) + 1
                if not counts:
                    break
                best = min(counts, key=lambda token: (-counts[token], token))
                follow = [at + 1 for at in follow if tokens[at] == best]
            else:
                following = self._tokens_np[follow]
                values, counts_np = np.unique(following[following >= 0], return_counts=True)
                if not values.size:
                    break
                best = int(values[counts_np.argmax()])  # np.unique sorts: the smaller id on a tie
                follow = follow[following == best] + 1
            proposal.append(best)
        return proposal

    # ------------------------------------------------------------------ from files

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer, max_ngram: int = DEFAULT_MAX_NGRAM) -> CorpusIndex:
        """The index of texts as a ChatGLM model writes them: each text is one answer, encoded as a fine-tuning
        target is (<sop> answer <eop>: so the start and the end of an answer are proposed too)."""
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        return cls(([bos, *tokenizer.encode(text, add_special_tokens=False), eos] for text in texts), max_ngram)

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer, max_ngram: int = DEFAULT_MAX_NGRAM,
                  field: str = DataConfig.response_column) -> CorpusIndex:
        """The index of a corpus file's answers (see `from_texts`), encoded with `tokenizer`.

        Args:
            path: a `.json` / `.jsonl` file of one JSON object per line (ADGEN's format: the answer is its
                `field`), or any other text file, one answer per line. Blank lines and empty answers are
                skipped.
            tokenizer: the model's tokenizer.
            max_ngram: the longest n-gram looked up.
            field: the JSON field holding the answer (DataConfig's response column: ADGEN's "summary").

        Raises:
            DataError: the file cannot be read, or a line that is not JSON, not an object, lacks `field` or
                holds no string there (the message names the file and the line), or no answers at all.
        """
        path = Path(path)
        texts = _json_answers(path, field) if path.suffix in (".json", ".jsonl") else \
            (text.rstrip("\r\n") for _, text in read_lines(path, DataError, "prompt-lookup corpus"))
        from tqdm import tqdm  # shown only if reading takes more than a few seconds

        index = cls.from_texts(tqdm(texts, desc=f"indexing {path.name}", unit=" answers", delay=3, file=sys.stderr,
                                    leave=False), tokenizer, max_ngram)
        if not index.documents:
            raise DataError(f"{path}: no answers to propose from (the prompt-lookup corpus is empty)")
        return index


def _sorted_positions(tokens: np.ndarray, positions: np.ndarray, max_ngram: int) -> np.ndarray:
    """`positions` sorted by the max_ngram tokens from each (a token past its document's end as the lowest
    value), then by whether another token follows them, then by position. The columns are packed into as
    few int64 words as they fit (ChatGLM's 130528 ids take 17 bits: max_ngram <= 3 is one word, one sort),
    each column folded in as it is computed, so that building holds one column at a time."""
    bits = (int(tokens.max(initial=0)) + 1).bit_length()  # values 0 (past the end) .. max id + 1
    words, word, used = [], np.zeros(len(positions), dtype=np.int64), 0
    alive = np.ones(len(positions), dtype=bool)
    for j in range(max_ngram + 1):
        following = tokens[positions + j]
        alive &= following >= 0
        width = bits if j < max_ngram else 1  # the last column: whether a continuation follows
        if used + width > 63:
            words.append(word)
            word, used = np.zeros(len(positions), dtype=np.int64), 0
        word <<= width
        word |= np.where(alive, following.astype(np.int64) + 1, 0) if j < max_ngram else alive
        used += width
    words.append(word)
    order = np.argsort(words[0], kind="stable") if len(words) == 1 else np.lexsort(words[::-1])
    return positions[order]


def _json_answers(path: Path, field: str) -> Iterable[str]:
    """The `field` of every line of a JSON-lines file (empty ones skipped), each line checked."""
    for number, text in read_lines(path, DataError, "prompt-lookup corpus"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        if field not in record:
            raise DataError(f"{path}, line {number}: missing field {field!r} (fields: "
                            f"{', '.join(map(repr, record)) or 'none'}): the prompt-lookup corpus reads each "
                            f"line's answer from it")
        if not isinstance(record[field], str):
            raise DataError(f"{path}, line {number}: field {field!r} must be a string, got "
                            f"{type(record[field]).__name__}")
        if record[field]:
            yield record[field]


# Built indexes: tokenizer -> {(file, its modification time and size, max_ngram): CorpusIndex}, kept while
# the tokenizer lives, so that generate() called batch after batch reads a corpus file once.
_CORPORA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_corpus_setting(config) -> None:
    """Raise ValueError where a GenerationConfig names a prompt_lookup_corpus but has prompt lookup off."""
    if config.prompt_lookup_corpus and config.prompt_lookup_num_tokens in (None, 0):
        raise ValueError("generation: prompt_lookup_corpus is a source of prompt lookup's proposals: it needs "
                         "prompt_lookup_num_tokens (a number of tokens or 'auto')")


def corpus_index(path: str | os.PathLike, tokenizer, max_ngram: int = DEFAULT_MAX_NGRAM) -> CorpusIndex:
    """The CorpusIndex of a corpus file (`CorpusIndex.from_file`) for this tokenizer: built on first use,
    then reused until the file changes (GenerationConfig.prompt_lookup_corpus).

    Raises:
        DataError: as `CorpusIndex.from_file`.
    """
    try:
        status = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read the prompt-lookup corpus ({e.strerror})") from None
    key = (os.path.realpath(path), status.st_mtime_ns, status.st_size, max_ngram)
    built = _CORPORA.setdefault(tokenizer, {})
    if key not in built:
        for older in [k for k in built if k[0] == key[0] and k[3] == max_ngram]:  # an earlier version of the file
            del built[older]
        built[key] = CorpusIndex.from_file(path, tokenizer, max_ngram)
    return built[key]


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
    for its text to copy (a switch-off, so that a row whose proposals fail does not pay for them).

    A row starts waiting. Each token chosen without a verification (the prefill's first token, then each
    ordinary step's) is checked, at no model cost, against what a one-token proposal would have been; the
    first match (the text copies) ends the wait with a probe of one token, and once a probe's token is
    kept the row proposes `limit` tokens. After a verification that kept none of its proposals it waits
    again. So an answer whose proposals never come true takes no verification at all, one that copies by
    chance one probe per chance match. Starting with a probe instead cost one failed verification per
    answer that does not copy: 0.94x in float32 on the quickstart's short ADGEN answers priced at glm_6b
    size (benchmarks/speculative.py, "references" and "expected"; docs/speculative.md). A probe of one
    token costs less than a verification of limit + 1 where the kernels pay per row (float32 on a CPU:
    2.1 against 3.4 steps for 5 tokens). A wait of a fixed 32 steps paid for two verifications per 64
    tokens, one that doubled from a step (1, 3, 7, ...) for five. A proposal is not shortened after a
    partial rejection: on the ADGEN references shortening kept fewer tokens per step.

    Attributes:
        limit: tokens per proposal (the prompt_lookup_num_tokens setting).
        waiting: no proposals until a token chosen without a verification matches what would have been
            proposed.
        probing: the next proposal is one token (the first after a wait).
    """

    limit: int
    waiting: bool = True
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
        """Record a token chosen without a verification (the prefill's, an ordinary step's): whether a
        one-token proposal would have matched it. Ends a wait if it would."""
        if would_have_matched:
            self.waiting = False

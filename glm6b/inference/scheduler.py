"""Continuous batching: one decode loop over a shared KV cache that requests join and leave at every step.

    scheduler = Scheduler(model, tokenizer, max_batch=8)
    scheduler.start()                                  # the loop runs in its own thread
    scheduler.submit(Request(prompt_ids, SamplingParams(max_new_tokens=64), on_event=print))

Each loop iteration (`Scheduler.step`) does three things:
  1. decode: one `DecodeEngine` step over the rows in use, each feeding its newest token (with prompt
     lookup, also the tokens proposed after it from its own context or the lookup corpus, which the step
     verifies: a row then gets every token it accepted at once, and rows with and without proposals share
     the step);
  2. admit: waiting requests (up to `max_batch` rows in all) are prefilled into free rows of the
     engine's static cache (left-padded together when their rows are adjacent) and sample their
     first token from the prefill, so they decode with the others from the next step;
  3. retire: rows that produced <eop>, hit a stop string or their token limit, or whose client went
     away (`Scheduler.cancel`) leave at once, freeing their row for the next waiting request.

The rows are those of glm6b.inference.engine.DecodeEngine: a static KV cache with a length, a
visibility mask and a 2D position per row, so a row joins and leaves without touching the others and
the math of each row is that of generate()/chat() on that row alone. A step runs rows 0 .. the
highest row in use (new requests take the lowest free row) over the slots in use, so a light load and
short answers do not pay for idle rows and empty slots (a compiled step takes these sizes as symbolic
after the first change, so they do not recompile it).

Each row has its own sampling settings (greedy or temperature/top-k/top-p), its own random
generator (seeded per request, so a seeded request samples the same tokens whichever rows share
its batch), its own stop strings and token limit. Text is streamed as it becomes final: a piece is
sent once later tokens can no longer change it (no half UTF-8 characters, no tail that clean-up or a
stop string may still remove).
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..config import GenerationConfig
from ..model import build_mask_and_positions
from .engine import DecodeEngine, lookup_tokens, slots_for, verify_rows_budget
from .lookup import DEFAULT_MAX_NGRAM, ProposalLength, check_corpus_setting, corpus_index, propose
from .sampling import accept_verified, choose_tokens, process_scores
from .text import process_response, stable_length

log = logging.getLogger(__name__)

# Tokens decoded again at every step at most (about): older ones are decoded once into a fixed head.
_DECODE_WINDOW = 32

class QueueFullError(RuntimeError):
    """The waiting queue is full; try again later."""


@dataclass
class SamplingParams(GenerationConfig):
    """How one request generates: a GenerationConfig (validated and sampled as every other decoding loop's,
    glm6b.inference.sampling) with THUDM's chat settings as defaults, and the OpenAI API's name `stop`.

    Attributes:
        max_new_tokens: limit on generated tokens (<eop> included).
        do_sample: sample; False takes the argmax (greedy).
        temperature, top_k, top_p, repetition_penalty: as in GenerationConfig.
        seed: seeds this request's own random generator; None draws a fresh seed.
        stop: strings that end the answer (GenerationConfig.stop_strings); the text is cut before the
            first one found.
        prompt_lookup_num_tokens, prompt_lookup_max_ngram, prompt_lookup_corpus: not read here: the
            scheduler's own `prompt_lookup` settings (glm6b serve --prompt-lookup) apply to every row.
    """

    max_new_tokens: int | None = None
    do_sample: bool = True
    temperature: float = 0.95
    top_p: float = 0.7
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens is None:
            raise ValueError("SamplingParams: max_new_tokens is required (the request's token limit)")
        self.stop_strings = [s for s in self.stop if s] or None


@dataclass
class Event:
    """What a request hears from the scheduler: new text, and at the end why it finished.

    Attributes:
        text: text that became final since the previous event (may be empty).
        finish_reason: None while running; then "stop" (<eop> or a stop string), "length" (token
            limit), "cancelled" or "error".
        completion_tokens: tokens generated so far.
        prompt_tokens: tokens in the prompt.
        full_text: the whole answer, on the finishing event only.
        error: what went wrong, when finish_reason is "error".
    """

    text: str
    finish_reason: str | None
    completion_tokens: int
    prompt_tokens: int
    full_text: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One generation request.

    Attributes:
        prompt_ids: the prompt's token ids (ending with [gMASK] <sop>, as `tokenizer.encode` gives).
        params: sampling settings and limits.
        on_event: called from the scheduler thread with every Event; must not block.
        chat: clean the text up as chat() does (`process_response`); False streams the plain decode.
    """

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    chat: bool = True
    id: int = field(default_factory=itertools.count().__next__)
    submitted_at: float = field(default_factory=time.monotonic)


# ----------------------------------------------------------------------------------- rows


class _Row:
    """A running request: its engine row, tokens, random generator and streamed text."""

    def __init__(self, request: Request, tokenizer, slot: int, lookup_limit: int = 0):
        self.request = request
        self.params = request.params
        self.tokenizer = tokenizer
        self.slot = slot  # the DecodeEngine row
        self.filled = 0  # slots of the row holding keys (P-tuning prefix, prompt, fed tokens)
        self.ids: list[int] = []
        self.head, self.start = "", 0  # decode(ids) == head + decode(ids[start:]) (see _advance_head)
        self.sent = ""
        self.finish_reason: str | None = None
        self.final_text = ""
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.stops = self.params.stop_strings or []
        self.lookup = ProposalLength(lookup_limit) if lookup_limit else None  # prompt lookup's proposal length

    def context(self) -> list[int]:
        """The prompt and the tokens generated so far (what prompt lookup copies from)."""
        return self.request.prompt_ids + self.ids

    def room(self) -> int:
        """Tokens a verification may propose beyond the one every step gives (its token limit minus 1)."""
        return self.params.max_new_tokens - len(self.ids) - 1

    def text(self, exact: bool = False) -> str:
        """The answer so far: decoded (incrementally unless `exact`) and, for chat, cleaned up."""
        raw = self.tokenizer.decode(self.ids) if exact else self.head + self.tokenizer.decode(self.ids[self.start:])
        return process_response(raw) if self.request.chat else raw

    def _advance_head(self) -> None:
        """Decode the tokens before a split point once, so each step decodes only the last ones.

        decode(ids) == head + decode(ids[start:]) holds at a token that starts with a CJK character,
        and (with one space between) at a token "▁x" with x a letter other than n or a digit, after
        text not ending in an apostrophe: SentencePiece drops the leading space of the first token
        only, and no clean-up rule (" .", " n't", " ' ", ...) nor `<n>`-style marker spans such a point.
        """
        if len(self.ids) - self.start <= _DECODE_WINDOW:
            return
        for split in range(len(self.ids) - 1, len(self.ids) - _DECODE_WINDOW // 2, -1):
            piece = self.tokenizer.convert_ids_to_tokens(self.ids[split])
            if not piece:
                continue
            if "\u4e00" <= piece[0] <= "\u9fff":
                self.head, self.start = self.tokenizer.decode(self.ids[:split]), split
                return
            if piece[0] == "▁" and len(piece) > 1 and (piece[1].isalpha() and piece[1] != "n" or piece[1].isdigit()):
                head = self.tokenizer.decode(self.ids[:split])
                if not head.endswith("'"):
                    self.head, self.start = head + (" " if head else ""), split
                    return

    def push(self, token: int, eos_id: int) -> str:
        """Record a new token; returns the text that became final. Sets finish_reason when done."""
        self.ids.append(token)
        self._advance_head()
        text = self.text()
        cut = min((i for i in (text.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1 or token == eos_id or len(self.ids) >= self.params.max_new_tokens:
            text = self.text(exact=True)  # the final answer is the plain decode, as chat() gives it
            cut = min((i for i in (text.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            text, self.finish_reason = text[:cut], "stop"
        elif token == eos_id:
            self.finish_reason = "stop"
        elif len(self.ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.final_text = text
            return self._release(text)
        return self._release(text[:stable_length(text, self.stops, chat=self.request.chat)])

    def _release(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


# ----------------------------------------------------------------------------------- the scheduler


class Scheduler:
    """The continuous-batching loop (see the module docstring).

    Args:
        model: a ChatGLMForConditionalGeneration in eval mode.
        tokenizer: its ChatGLMTokenizer.
        max_batch: most rows decoded together.
        max_queue: most requests waiting while every row is busy; `submit` raises QueueFullError
            beyond it (0: refuse whatever cannot start at the next step).
        context_length: most tokens per request, prompt + answer (default: the model config's
            max_sequence_length); sizes the engine's cache.
        compile: the decode step's compilation, as for DecodeEngine (True, False or "auto").
        prompt_lookup: prompt-lookup decoding for every row (GenerationConfig.prompt_lookup_num_tokens):
            up to this many proposed tokens per row and step, 0 or None for none, "auto" for as many as
            verify at about a step's cost for the rows running (glm6b.inference.engine.lookup_tokens).
        prompt_lookup_max_ngram: the longest run of a row's last tokens prompt lookup looks up.
        prompt_lookup_corpus: a file of answers prompt lookup also proposes from
            (GenerationConfig.prompt_lookup_corpus), indexed here once.
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, context_length: int | None = None,
                 compile: bool | str = "auto", prompt_lookup: int | str | None = None,
                 prompt_lookup_max_ngram: int = DEFAULT_MAX_NGRAM, prompt_lookup_corpus: str | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = context_length or model.config.max_sequence_length
        self.eos_id = model.config.eos_token_id
        self.vocab_limit = len(tokenizer)  # the model's extra vocabulary rows have no text
        self.engine = DecodeEngine(model, max_batch, self.context_length, compile=compile)
        lookup = GenerationConfig(prompt_lookup_num_tokens=prompt_lookup, prompt_lookup_corpus=prompt_lookup_corpus,
                                  prompt_lookup_max_ngram=prompt_lookup_max_ngram, max_new_tokens=1)
        lookup.validate()
        check_corpus_setting(lookup)
        self.prompt_lookup = prompt_lookup
        self.prompt_lookup_max_ngram = prompt_lookup_max_ngram
        self.verify_budget = verify_rows_budget(model)  # what "auto" sizes each step's proposals by
        self.corpus = None  # built before serving starts, and only where lookup runs
        if prompt_lookup_corpus and lookup_tokens(prompt_lookup, model, 1, self.verify_budget):
            self.corpus = corpus_index(prompt_lookup_corpus, tokenizer, prompt_lookup_max_ngram)
        self.slots: list[_Row | None] = [None] * max_batch  # the request in each engine row
        self.rows: list[_Row] = []  # the rows in use
        self._waiting: deque[Request] = deque()
        self._cancelled: set[int] = set()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Counters for monitoring (read from other threads; plain ints are fine for that).
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.steps_total = 0
        self.cancelled_total = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last minute's steps
        self._recent_lock = threading.Lock()

    # ------------------------------------------------------------------ public

    @property
    def running(self) -> bool:
        """True while the loop thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.monotonic()
        with self._recent_lock:
            return sum(n for t, n in self._recent if now - t <= window) / window

    def submit(self, request: Request) -> None:
        """Queue a request; it joins the running batch at the next step with a free row.

        Raises:
            QueueFullError: every row is busy and max_queue requests are already waiting.
            ValueError: impossible settings, or a prompt + token limit beyond the context length.
        """
        request.params.validate()
        if request.params.allowed_vocab_size is None:
            request.params.allowed_vocab_size = self.vocab_limit
        total = len(request.prompt_ids) + request.params.max_new_tokens
        if not request.prompt_ids or total > self.context_length:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                             f"({request.params.max_new_tokens}) exceeds the context length {self.context_length}")
        with self._wake:
            free_rows = max(0, self.max_batch - len(self.rows))
            if len(self._waiting) >= self.max_queue + free_rows:
                raise QueueFullError(f"{len(self.rows)} requests are running and {len(self._waiting)} waiting "
                                     f"(max_batch={self.max_batch}, max_queue={self.max_queue})")
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Drop a request (its client went away): its row is freed before the next step."""
        with self._wake:
            self._cancelled.add(request.id)
            self._wake.notify()

    def warm_up(self) -> None:
        """Run one short greedy request through prefill and decode before serving (this compiles the
        decode step where it is compiled, so the first client does not wait for that)."""
        request = Request(self.tokenizer.encode("你好"), SamplingParams(max_new_tokens=2, do_sample=False),
                          lambda event: None)
        self.submit(request)
        while self.step():
            pass
        self.prompt_tokens_total = self.generated_tokens_total = self.steps_total = 0
        with self._recent_lock:
            self._recent.clear()

    def start(self) -> None:
        """Run the loop in a daemon thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="glm6b-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; running and waiting requests finish with "cancelled"."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for row in list(self.rows):
            self._finish(row, "cancelled")
        while self._waiting:
            request = self._waiting.popleft()
            self._emit(request, Event("", "cancelled", 0, len(request.prompt_ids)))

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: drop cancelled requests, decode one token for every row, admit waiting ones.

        Returns:
            True if any work was done (False: nothing is running or waiting).
        """
        self._drop_cancelled()
        joining = []
        with self._wake:
            while self._waiting and len(self.rows) + len(joining) < self.max_batch:
                joining.append(self._waiting.popleft())
        if not joining and not self.rows:
            return False
        running = list(self.rows)
        try:
            if running:
                self._decode(running)
            if joining:
                self._prefill(joining)
        except Exception as e:  # a failing forward ends its requests, never the server
            log.exception("scheduler step failed")
            for row in list(self.rows):
                self._finish(row, "error", f"{type(e).__name__}: {e}")
            for request in joining:
                if not any(row.request is request for row in self.rows):
                    self._emit(request, Event("", "error", 0, len(request.prompt_ids), "", f"{e}"))
        self.steps_total += 1
        return True

    # ------------------------------------------------------------------ internals

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self.rows and not self._cancelled:
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:
            log.exception("request %s: event callback failed", request.id)

    def _drop_cancelled(self) -> None:
        with self._wake:
            if not self._cancelled:
                return
            cancelled, self._cancelled = self._cancelled, set()
            self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
        for row in [row for row in self.rows if row.request.id in cancelled]:
            self.cancelled_total += 1  # counted before the row leaves, so no reader sees it gone yet uncounted
            self._finish(row, "cancelled")

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill the new prompts into the lowest free rows, sample their first tokens."""
        free = [i for i, row in enumerate(self.slots) if row is None][:len(requests)]
        start = 0
        while start < len(free):  # adjacent rows are prefilled together, left-padded
            end = start + 1
            while end < len(free) and free[end] == free[end - 1] + 1:
                end += 1
            self._prefill_rows(requests[start:end], free[start])
            start = end

    def _prefill_rows(self, requests: list[Request], first_row: int) -> None:
        config, device = self.model.config, self.model.device
        longest = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), longest), config.pad_token_id, dtype=torch.long)
        padding = torch.zeros_like(ids)
        for i, r in enumerate(requests):
            ids[i, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            padding[i, longest - len(r.prompt_ids):] = 1
        ids, padding = ids.to(device), padding.to(device)
        mask, positions = build_mask_and_positions(ids, config, padding)
        logits = self.engine.prefill(ids, mask, positions, rows=slice(first_row, first_row + len(requests)))
        rows = []
        limit = lookup_tokens(self.prompt_lookup, self.model, 1, self.verify_budget)  # a row's most; each step caps it for its rows
        for i, r in enumerate(requests):
            row = _Row(r, self.tokenizer, first_row + i, limit)
            row.filled = self.engine.cache.prefix_length + len(r.prompt_ids)
            self.slots[row.slot] = row
            self.rows.append(row)
            rows.append(row)
            self.prompt_tokens_total += len(r.prompt_ids)
        shadows = self._shadows(rows)  # the first token is the first check of a row's wait
        chosen = [[token] for token in self._sample(rows, logits)]
        self._end_waits(rows, shadows, chosen)
        self._push(rows, chosen)

    def _decode(self, rows: list[_Row]) -> None:
        """Feed every row in use its newest token (and its proposals, with prompt lookup) and choose the next
        ones."""
        # A step feeds every slot up to the highest in use (idle ones too): "auto" budgets for those rows.
        limit = lookup_tokens(self.prompt_lookup, self.model, max(row.slot for row in rows) + 1, self.verify_budget)
        proposals = {row.slot: self._propose(row, limit) for row in rows} if limit else {}
        shadows = self._shadows(rows) if limit else {}
        if any(proposals.values()):
            chosen = self._verify(rows, proposals)
        else:
            chosen = [[token] for token in self._step(rows)]
        self._end_waits(rows, shadows, chosen)
        self._push(rows, chosen)

    def _shadows(self, rows: list[_Row]) -> dict[int, list[int]]:
        """What a one-token proposal would be now for the rows waiting to propose (checked against the token
        chosen next, to end the wait: costs no model work)."""
        return {row.slot: propose(row.context(), 1, self.prompt_lookup_max_ngram, self.corpus)
                for row in rows if row.lookup is not None and row.lookup.waiting}

    def _end_waits(self, rows: list[_Row], shadows: dict[int, list[int]], chosen: list[list[int]]) -> None:
        """Tell each waiting row whether its shadow proposal matched the first token it was given."""
        for row, tokens in zip(rows, chosen):
            if row.slot in shadows:
                row.lookup.stepped(shadows[row.slot][:1] == tokens[:1])

    def _step(self, rows: list[_Row]) -> list[int]:
        """One ordinary decode step: every row feeds its newest token; returns the next token of each."""
        engine = self.engine
        # Rows up to the highest one in use (new requests take the lowest free row), over the slots in use
        # (rounded up, so that the step's shape changes every SLOT_ROUNDING tokens, not every token: slots_for).
        count = max(row.slot for row in rows) + 1
        slots = slots_for(max(row.filled for row in rows) + 1, engine.max_length)
        tokens = torch.full((count,), self.model.config.pad_token_id, dtype=torch.long)  # idle rows feed <pad>
        tokens[[row.slot for row in rows]] = torch.tensor([row.ids[-1] for row in rows])
        logits = engine.decode(tokens, rows=count, slots=slots)
        for row in rows:
            row.filled += 1
        return self._sample(rows, logits[[row.slot for row in rows]])

    def _propose(self, row: _Row, limit: int) -> list[int]:
        """Prompt lookup's proposal for a row: at most `limit` tokens, its own length, and its room."""
        length = min(row.lookup.next(), limit, row.room())
        return propose(row.context(), length, self.prompt_lookup_max_ngram, self.corpus) if length > 0 else []

    def _verify(self, rows: list[_Row], proposals: dict[int, list[int]]) -> list[list[int]]:
        """One verification step: every row feeds its newest token and its proposals (maybe none); returns
        what each keeps: the proposals the sampler accepts and one more token."""
        engine, pad = self.engine, self.model.config.pad_token_id
        count = max(row.slot for row in rows) + 1
        width = 1 + max(len(p) for p in proposals.values())
        fed = {row.slot: 1 + len(proposals[row.slot]) for row in rows}
        # As in _decode, plus one slot: the last slot of the step takes the padding's keys (DecodeEngine.verify).
        needed = max(row.filled + fed[row.slot] for row in rows) + 1
        slots = slots_for(needed, engine.max_length)
        tokens = torch.full((count, width), pad, dtype=torch.long)
        counts = torch.zeros(count, dtype=torch.long)  # idle rows feed nothing
        for row in rows:
            tokens[row.slot, :fed[row.slot]] = torch.tensor([row.ids[-1], *proposals[row.slot]])
            counts[row.slot] = fed[row.slot]
        logits = engine.verify(tokens, counts, rows=count, slots=slots)  # [count, T, V]
        penalised = any(row.params.repetition_penalty != 1.0 for row in rows)
        accepted = accept_verified(logits, [row.slot for row in rows], [proposals[row.slot] for row in rows],
                                   [row.params for row in rows], [row.generator for row in rows], self.eos_id,
                                   [row.context() for row in rows] if penalised else None)
        kept = torch.zeros(count, dtype=torch.long)
        chosen = []
        for row, (row_tokens, _) in zip(rows, accepted):
            proposal = proposals[row.slot]
            kept[row.slot] = len(row_tokens)  # the newest token and the accepted proposals stay in the cache
            row.filled += len(row_tokens)
            if proposal:
                row.lookup.verified(len(proposal), len(row_tokens) - 1)
            chosen.append(row_tokens)
        engine.accept(kept, rows=count, slots=slots)
        return chosen

    def _push(self, rows: list[_Row], tokens: list[list[int]]) -> None:
        """Record each row's new tokens (one, or all a verification kept), stream the text they make final in
        one event, retire finished rows (tokens after a row's end are dropped)."""
        pushed = 0
        for row, row_tokens in zip(rows, tokens):
            delta = ""
            for token in row_tokens:
                delta += row.push(token, self.eos_id)
                pushed += 1
                if row.finish_reason is not None:
                    break
            if row.finish_reason is not None:
                self._finish(row, row.finish_reason, text=delta)
            elif delta or len(row.ids) == 1:  # the first event also marks the time to first token
                self._emit(row.request, Event(delta, None, len(row.ids), len(row.request.prompt_ids)))
        self.generated_tokens_total += pushed
        now = time.monotonic()
        with self._recent_lock:
            self._recent.append((now, pushed))
            while now - self._recent[0][0] > 60:
                self._recent.popleft()

    def _finish(self, row: _Row, reason: str, error: str | None = None, text: str = "") -> None:
        if row in self.rows:
            self.rows.remove(row)
            self.slots[row.slot] = None
            self.engine.reset_rows(row.slot)
        full = row.final_text if reason in ("stop", "length") else row.sent
        self._emit(row.request, Event(text, reason, len(row.ids), len(row.request.prompt_ids), full, error))

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Next token per row, each with its own settings and random generator (glm6b.inference.sampling)."""
        settings = [row.params for row in rows]
        histories = None
        if any(p.repetition_penalty != 1.0 for p in settings):
            histories = [torch.tensor(row.request.prompt_ids + row.ids, device=logits.device) for row in rows]
        scores = process_scores(logits, settings, histories, self.eos_id)
        return choose_tokens(scores, settings, [row.generator for row in rows]).tolist()

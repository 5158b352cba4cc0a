"""Answer text: the chat clean-up (`process_response`, spec §5.4) and the one streaming rule (`stable_length`:
which part of a partly generated answer later tokens can no longer change).

`stable_length` is the rule, used wherever text is streamed: `TextStreamer` (text deltas from a
growing list of ids), `stream_chat(..., stable_only=True)` and the terminal chat, and the server's
scheduler. What later tokens can still change at the end of a decoded text:

* an incomplete UTF-8 sequence (a character of several byte tokens decodes as U+FFFD until whole);
* a space near the end: decoding's clean-up removes the space of " ,", " n't", " 's", ...;
* the start of a whitespace marker the tokenizer turns back into text ("<n>", "<|tab|>", "<|blank_4|>");
* the start of a stop string;
* in chat text (cleaned up by `process_response`): an ASCII , ! : ; ? at the end
  (it becomes full-width if a CJK character follows), and the start of the "[[训练时间]]" marker.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Rule 3 of process_response: ASCII marks next to a CJK character become full-width (spec §5.4).
_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
CHAT_PUNCTUATION = "".join(mark for mark, _ in _PUNCTUATION)
_CJK = "[\u4e00-\u9fff]"
# Rule 2: the model's placeholder for its training date.
TRAINING_TIME_MARKER = "[[训练时间]]"
# The longest clean-up pattern (" n't", " 've") plus one: a space this close to the end may still go.
CLEAN_UP_HOLD = 5
# A proper prefix of one of the tokenizer's whitespace markers (glm6b.tokenizer's _postprocess).
_MARKER_PREFIX = re.compile(r"<(n|\|(t(a(b\|?)?)?|b(l(a(n(k(_\d*\|?)?)?)?)?)?)?)?\Z")
_LONGEST_MARKER = len("<|blank_80|>")


def process_response(text: str) -> str:
    """Clean up a decoded answer exactly as the reference does (spec §5.4).

    Args:
        text: the decoded answer.

    Returns:
        The text stripped, with "[[训练时间]]" replaced by "2023年" and ASCII , ! : ; ? next to a
        CJK character (U+4E00-U+9FFF) turned into their full-width forms.
    """
    text = text.strip()
    text = text.replace(TRAINING_TIME_MARKER, "2023年")
    for ascii_mark, full_width in _PUNCTUATION:
        mark = re.escape(ascii_mark)
        text = re.sub(f"({_CJK}){mark}", rf"\g<1>{full_width}", text)
        text = re.sub(f"{mark}({_CJK})", rf"{full_width}\g<1>", text)
    return text


def stable_length(text: str, stop_strings: Sequence[str] = (), chat: bool = False) -> int:
    """How many characters at the start of a partial answer later tokens can no longer change.

    Args:
        text: the answer decoded so far (for chat: cleaned up by process_response).
        stop_strings: strings that will end the answer (a tail that may begin one is held back).
        chat: `text` is chat text: also hold back what process_response may still change.

    Returns:
        The length of the stable prefix (at most len(text)).
    """
    stable = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes as U+FFFD
    space = text.rfind(" ", max(0, stable - CLEAN_UP_HOLD), stable)
    if space != -1:
        stable = space
    marker = text.rfind("<", max(0, stable - _LONGEST_MARKER), stable)
    if marker != -1 and _MARKER_PREFIX.match(text, marker, stable):
        stable = marker
    holds = [s for s in stop_strings if s]
    if chat:
        if stable and text[stable - 1] in CHAT_PUNCTUATION:
            stable -= 1
        holds.append(TRAINING_TIME_MARKER)
    for s in holds:  # a tail that may be the start of a stop string or of the marker
        for k in range(min(len(s) - 1, stable), 0, -1):
            if text.startswith(s[:k], stable - k, stable):
                stable -= k
                break
    return stable


class TextStreamer:
    """Turns a growing list of generated ids into text deltas that never need taking back.

    Each call decodes everything generated so far and releases only its stable part (`stable_length`).
    The concatenated deltas equal the final decoded text.
    """

    HOLD = CLEAN_UP_HOLD

    def __init__(self, tokenizer, **decode_kwargs):
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_ids: int | Sequence[int]) -> str:
        """Add tokens; return the text that became stable."""
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        text = self.tokenizer.decode(self.ids, **self.decode_kwargs)
        return self._release(text[:stable_length(text)])

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        return self._release(self.tokenizer.decode(self.ids, **self.decode_kwargs))

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

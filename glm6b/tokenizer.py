"""Tokenizer: ChatGLM-6B's `ice_text.model` SentencePiece tokenizer with the HF ChatGLMTokenizer behaviour.

Reimplements, on top of the `sentencepiece` library, what the reference `tokenization_chatglm.py`
does under transformers 4.27.1 (spec §3): special-token splitting, newline/tab/blank preprocessing,
`[gMASK] <sop>` special tokens, truncation, left padding with the prefix-LM `attention_mask` and 2D
`position_ids`, and decoding with the English clean-up. SentencePiece itself (normalizer, encode,
piece<->id, decode) is run on the model file, never re-implemented.
"""

from __future__ import annotations

import json
import operator
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Sequence

import numpy as np
import sentencepiece as spm

from .config import ChatGLMConfig
from .io import atomic_write, atomic_write_text

VOCAB_NAME = "ice_text.model"
CONFIG_NAME = "tokenizer_config.json"
MAX_BLANK_LENGTH = 80
_IMAGE_TOKEN_RE = re.compile(r"<image_([0-9]+)>")

# Token-string defaults of the real tokenizer_config.json (spec §1).
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "end_token": "</s>",
    "gmask_token": "[gMASK]",
    "mask_token": "[MASK]",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}


class TokenizerError(ValueError):
    """A tokenizer file, option or id that cannot be used; the message names it and what was expected."""


class BatchEncoding(dict):
    """What `ChatGLMTokenizer.__call__` returns: a dict with attribute access and `.to(device)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> "BatchEncoding":
        """Move every torch tensor value to `device` (in place) and return self.

        Args:
            device: anything `torch.Tensor.to` accepts.

        Returns:
            This BatchEncoding.
        """
        for key, value in self.items():
            if hasattr(value, "to") and not isinstance(value, np.ndarray):
                self[key] = value.to(device)
        return self


# --------------------------------------------------------------------------------------------------
# Text pre- and post-processing (spec §3.2, §3.5)


def _preprocess(text: str) -> str:
    """Newlines -> `<n>`, tabs -> `<|tab|>`, runs of 80..2 spaces -> `<|blank_n|>` (spec §3.2)."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    if "  " in text:  # fast path: nothing to do without a double space
        for n in range(MAX_BLANK_LENGTH, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def check_text(text: str, what: str = "text") -> None:
    """Refuse text that cannot be encoded as UTF-8: lone surrogates, which is what bytes that are not
    UTF-8 become when read with errors="surrogateescape" (command-line arguments, some terminals).

    Raises:
        TokenizerError: one line giving the position and the offending code point or byte.
    """
    match = _SURROGATE_RE.search(text)
    if match:
        code = ord(match.group())
        shown = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise TokenizerError(f"{what} is not valid UTF-8 / Unicode text: {shown} at character {match.start()}; "
                             f"pass UTF-8 text")


def _postprocess(text: str) -> str:
    """Undo `_preprocess` on decoded text: `<n>`, `<|tab|>`, then `<|blank_2|>`..`<|blank_80|>`."""
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    if "<|blank_" in text:
        for n in range(2, MAX_BLANK_LENGTH + 1):
            text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


def _clean_up_tokenization(text: str) -> str:
    """transformers 4.27.1 `clean_up_tokenization`: English spacing clean-up (spec §3.5 step 7)."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _prefix_lm_inputs(
    ids: Sequence[int], bos_id: int, mask_id: int, gmask_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """The tokenizer's attention_mask [1,n,n] (bool, True = masked) and position_ids [2,n] (spec §3.4).

    The rule itself is glm6b.model.masks.build_mask_and_positions (tokenizer_rule=True): the
    context (everything before the first `<sop>`, or the whole row without one) is fully visible;
    from `<sop>` on the mask is causal; positions from `<sop>` on are the index of the first
    `[MASK]` if the row contains one, else of the first `[gMASK]`; block positions count 1, 2, ...
    """
    import torch

    from .model.masks import build_mask_and_positions

    ids = list(ids)
    if not ids:
        return np.zeros((1, 0, 0), dtype=bool), np.zeros((2, 0), dtype=np.int64)
    special = SimpleNamespace(bos_token_id=bos_id, mask_token_id=mask_id, gmask_token_id=gmask_id)
    mask, positions = build_mask_and_positions(torch.tensor([ids]), special, tokenizer_rule=True)
    return mask[0].numpy(), positions[0].numpy()


def _to_id_list(token_ids: Any) -> list[int]:
    """int, list/tuple of ints, numpy array or torch tensor -> list of python ints."""
    if hasattr(token_ids, "tolist"):  # torch tensor, numpy array or numpy scalar
        token_ids = token_ids.tolist()
    if isinstance(token_ids, (list, tuple)):
        out = []
        for position, value in enumerate(token_ids):
            try:
                out.append(operator.index(value))
            except TypeError:
                raise TokenizerError(
                    f"decode expects token ids (ints); got {type(value).__name__} {value!r} at position {position}"
                ) from None
        return out
    try:
        return [operator.index(token_ids)]
    except TypeError:
        raise TokenizerError(
            f"decode expects an int, a list of ints or a tensor; got {type(token_ids).__name__}"
        ) from None


# --------------------------------------------------------------------------------------------------


class ChatGLMTokenizer:
    """The ChatGLM-6B (v1) tokenizer: behaviour of the reference ChatGLMTokenizer (spec §3).

    Attributes:
        padding_side: always "left" (the reference refuses right padding).
        model_input_names: ["input_ids", "attention_mask", "position_ids"].
        num_image_tokens: every SentencePiece id is shifted up by this; ids below it are `<image_{id}>`.
    """

    padding_side = "left"
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        num_image_tokens: int = 0,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        gmask_token: str = "[gMASK]",
        mask_token: str = "[MASK]",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        remove_space: bool = False,
        do_lower_case: bool = False,
        name_or_path: str | None = None,
        **ignored: Any,
    ) -> None:
        """Load the SentencePiece model file and set up the special tokens.

        Args:
            vocab_file: path of the SentencePiece model (`ice_text.model`).
            num_image_tokens: id shift of every SentencePiece piece (0 for the real checkpoint).
            bos_token, eos_token, end_token, gmask_token, mask_token, pad_token, unk_token: the
                special token strings; each must be a piece of the model.
            remove_space: collapse whitespace runs of each text chunk to one space (reference option).
            do_lower_case: lower-case text outside special tokens (reference option).
            name_or_path: name written back by `save_pretrained`.
            **ignored: other tokenizer_config.json keys (tokenizer_class, auto_map, ...).

        Raises:
            TokenizerError: unreadable or invalid model file, bad option, special token not in the model.
        """
        padding_side = ignored.get("padding_side", "left")
        if padding_side != "left":
            raise TokenizerError(f"padding_side={padding_side!r}: only 'left' padding is supported")
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 0:
            raise TokenizerError(f"num_image_tokens={num_image_tokens!r}: expected an integer >= 0")
        self.vocab_file = str(vocab_file)
        self.num_image_tokens = num_image_tokens
        self.remove_space = bool(remove_space)
        self.do_lower_case = bool(do_lower_case)
        self.name_or_path = name_or_path if name_or_path is not None else str(Path(vocab_file).parent)

        self._model_bytes = self._read_model_file(Path(vocab_file))
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._model_bytes)
        except Exception as exc:  # sentencepiece raises RuntimeError with a protobuf message
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TokenizerError(f"'{vocab_file}' is not a SentencePiece model ({detail})") from None
        self._num_pieces = self._sp.GetPieceSize()
        if self._num_pieces == 0:
            raise TokenizerError(f"'{vocab_file}' is not a SentencePiece model (it has no pieces)")
        self._id_to_piece = [self._sp.IdToPiece(i) for i in range(self._num_pieces)]
        self._piece_to_id = {piece: i for i, piece in enumerate(self._id_to_piece)}
        self._sp_unk_id = self._sp.unk_id()

        tokens = dict(
            bos_token=bos_token,
            eos_token=eos_token,
            end_token=end_token,
            gmask_token=gmask_token,
            mask_token=mask_token,
            pad_token=pad_token,
            unk_token=unk_token,
        )
        for field, token in tokens.items():
            if not isinstance(token, str) or token not in self._piece_to_id:
                raise TokenizerError(
                    f"{field}={token!r} is not a piece of the SentencePiece model '{vocab_file}'"
                )
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.end_token = end_token
        self.gmask_token = gmask_token
        self.mask_token = mask_token
        self.pad_token = pad_token
        self.unk_token = unk_token

        # Registered special tokens of the HF base class, in its order (bos, eos, unk, pad, mask).
        # `[gMASK]` and `</s>` are deliberately not registered (spec §3.3.1).
        self.all_special_tokens = list(dict.fromkeys([bos_token, eos_token, unk_token, pad_token, mask_token]))
        self.all_special_ids = [self._token_to_id(t) for t in self.all_special_tokens]
        self._all_special_id_set = set(self.all_special_ids)
        alternatives = sorted(self.all_special_tokens, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    # ------------------------------------------------------------------------------ loading/saving

    @staticmethod
    def _read_model_file(path: Path) -> bytes:
        if not path.exists():
            raise TokenizerError(f"SentencePiece model file '{path}' not found")
        if not path.is_file():
            raise TokenizerError(f"'{path}' is not a file: expected the SentencePiece model {VOCAB_NAME}")
        return path.read_bytes()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "ChatGLMTokenizer":
        """Load a tokenizer folder: `tokenizer_config.json` (optional) and `ice_text.model`.

        Args:
            path: the folder (as in the HF repo / a checkpoint folder).
            **overrides: constructor arguments that replace the config file's values.

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: folder missing, no model file, invalid config JSON, unloadable model.
        """
        folder = Path(path)
        if not folder.exists():
            raise TokenizerError(f"tokenizer folder '{folder}' not found")
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer path '{folder}' is not a folder (expected a folder holding {VOCAB_NAME})")
        config: dict[str, Any] = {}
        config_path = folder / CONFIG_NAME
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise TokenizerError(
                    f"'{config_path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
                ) from None
            except UnicodeDecodeError as exc:
                raise TokenizerError(f"'{config_path}' is not UTF-8 text ({exc.reason})") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"'{config_path}' must hold a JSON object, got {type(config).__name__}")
        vocab_name = config.pop("vocab_file", None) or VOCAB_NAME
        vocab_file = folder / vocab_name
        if not vocab_file.is_file():
            raise TokenizerError(f"tokenizer folder '{folder}' has no SentencePiece model: expected '{vocab_name}'")
        kwargs = {key: value for key, value in config.items() if key in DEFAULT_SPECIAL_TOKENS}
        for key in ("num_image_tokens", "remove_space", "do_lower_case", "padding_side"):
            if key in config:
                kwargs[key] = config[key]
        kwargs["name_or_path"] = str(path)  # HF sets name_or_path to what was passed in
        kwargs.update(overrides)
        return cls(vocab_file, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, str]:
        """Write `tokenizer_config.json` and `ice_text.model` into `directory` (each atomically).

        Args:
            directory: target folder; created if missing.

        Returns:
            (config path, model path).
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "name_or_path": self.name_or_path,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "end_token": self.end_token,
            "gmask_token": self.gmask_token,
            "mask_token": self.mask_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "remove_space": self.remove_space,
            "do_lower_case": self.do_lower_case,
            "tokenizer_class": "ChatGLMTokenizer",
            "num_image_tokens": self.num_image_tokens,
            "auto_map": TOKENIZER_AUTO_MAP,
        }
        config_path, model_path = folder / CONFIG_NAME, folder / VOCAB_NAME
        atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write(model_path, lambda tmp: tmp.write_bytes(self._model_bytes))
        return str(config_path), str(model_path)

    # ------------------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows: SentencePiece pieces + num_image_tokens."""
        return self._num_pieces + self.num_image_tokens

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """Map every token string to its id (image tokens included)."""
        return {self._id_to_token(i): i for i in range(self.vocab_size)}

    def _token_to_id(self, token: str) -> int:
        match = _IMAGE_TOKEN_RE.fullmatch(token)
        if match:
            return int(match.group(1))
        return self._piece_to_id.get(token, self._sp_unk_id) + self.num_image_tokens

    def _id_to_token(self, index: int) -> str:
        if not 0 <= index < self.vocab_size:
            hint = ""
            if index < 0:
                hint = " (replace -100 label ids by the pad id before decoding)" if index == -100 else ""
            else:
                hint = f": ids {self.vocab_size} and above are the model's unused padding rows"
            raise TokenizerError(
                f"token id {index} is outside the tokenizer's vocabulary [0, {self.vocab_size}){hint}"
            )
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self._id_to_piece[index - self.num_image_tokens]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Token string(s) -> id(s); unknown strings give the `<unk>` id, `<image_N>` gives N.

        Args:
            tokens: one token string or an iterable of them.

        Returns:
            An id, or a list of ids.
        """
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Id(s) -> token string(s).

        Args:
            ids: one id or an iterable of ids.
            skip_special_tokens: drop the ids in `all_special_ids` (list input only).

        Returns:
            A token string, or a list of them.

        Raises:
            TokenizerError: an id outside [0, vocab_size).
        """
        if hasattr(ids, "tolist"):  # numpy array / torch tensor
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) and not hasattr(ids, "__iter__"):
            return self._id_to_token(operator.index(ids))
        return [
            self._id_to_token(operator.index(i))
            for i in ids
            if not (skip_special_tokens and i in self._all_special_id_set)
        ]

    @property
    def bos_token_id(self) -> int:
        """Id of `<sop>`."""
        return self._token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        """Id of `<eop>`."""
        return self._token_to_id(self.eos_token)

    @property
    def end_token_id(self) -> int:
        """Id of `</s>`."""
        return self._token_to_id(self.end_token)

    @property
    def pad_token_id(self) -> int:
        """Id of `<pad>`."""
        return self._token_to_id(self.pad_token)

    @property
    def unk_token_id(self) -> int:
        """Id of `<unk>`."""
        return self._token_to_id(self.unk_token)

    @property
    def mask_token_id(self) -> int:
        """Id of `[MASK]`."""
        return self._token_to_id(self.mask_token)

    @property
    def gmask_token_id(self) -> int:
        """Id of `[gMASK]`."""
        return self._token_to_id(self.gmask_token)

    # ------------------------------------------------------------------------------ encoding

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        """Split on the registered special tokens, stripping whitespace next to them (4.27.1 rule).

        Returns (chunk, is_special) pairs, empty chunks dropped.
        """
        if self.do_lower_case:
            # transformers lower-cases everything but the special tokens before splitting.
            parts = self._split_re.split(text)
            text = "".join(part if i % 2 else part.lower() for i, part in enumerate(parts))
        parts = self._split_re.split(text)  # even indices: text, odd indices: special tokens
        for i in range(1, len(parts), 2):
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
        return [(part, bool(i % 2)) for i, part in enumerate(parts) if part]

    def _chunk_pieces(self, chunk: str) -> list[str]:
        check_text(chunk)
        if self.remove_space:
            chunk = " ".join(chunk.strip().split())
        if self.do_lower_case:
            chunk = chunk.lower()
        return self._sp.EncodeAsPieces(_preprocess(chunk))

    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings: special tokens split out, SentencePiece pieces for the rest.

        Args:
            text: the text.

        Returns:
            Token strings (no `[gMASK] <sop>` added).
        """
        tokens: list[str] = []
        for chunk, special in self._split_special(text):
            if special:
                tokens.append(chunk)
            else:
                tokens.extend(self._chunk_pieces(chunk))
        return tokens

    def _text_to_ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"expected text as str, got {type(text).__name__}")
        ids: list[int] = []
        shift, unk, lookup = self.num_image_tokens, self._sp_unk_id, self._piece_to_id
        for chunk, special in self._split_special(text):
            if special:
                ids.append(self._token_to_id(chunk))
            else:
                ids.extend(lookup.get(piece, unk) + shift for piece in self._chunk_pieces(chunk))
        return ids

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """Append the special tokens: `a + [gMASK, <sop>]`, or `a + [gMASK, <sop>] + b + [<eop>]`.

        Args:
            token_ids_0: first sequence.
            token_ids_1: optional second sequence.

        Returns:
            A new list.
        """
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """2 for a single sequence, 3 for a pair."""
        return 3 if pair else 2

    def _prepare(
        self,
        ids: list[int],
        pair: list[int] | None,
        add_special_tokens: bool,
        truncate: bool,
        max_length: int | None,
    ) -> list[int]:
        """transformers 4.27.1 `prepare_for_model`: longest-first truncation, then special tokens."""
        if truncate and max_length is not None:
            n_special = self.num_special_tokens_to_add(pair is not None) if add_special_tokens else 0
            total = len(ids) + (len(pair) if pair is not None else 0) + n_special
            remove = total - max_length
            if remove > 0 and pair is None:
                if len(ids) > remove:
                    ids = ids[:-remove]
                else:  # the reference only logs an error and leaves the sequence as it is
                    warnings.warn(
                        f"cannot truncate a sequence of {len(ids)} tokens to max_length={max_length} "
                        f"with {n_special} special tokens; it is left untruncated (as the reference does)",
                        stacklevel=3,
                    )
            elif remove > 0:
                len_a, len_b = len(ids), len(pair)
                for _ in range(remove):  # one token at a time from the longer (ties: the pair)
                    if len_a > len_b:
                        len_a -= 1
                    elif len_b > 0:
                        len_b -= 1
                ids, pair = ids[:len_a], pair[:len_b]
        if add_special_tokens:
            return self.build_inputs_with_special_tokens(ids, pair)
        return ids + pair if pair is not None else list(ids)

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
    ) -> list[int]:
        """Text (and optional pair) -> ids, with `[gMASK] <sop>` appended by default.

        Args:
            text: the text.
            text_pair: optional second text (gives `a [gMASK] <sop> b <eop>`).
            add_special_tokens: append the special tokens.
            truncation: cut to `max_length` (longest first); None means "yes if max_length is given".
            max_length: length limit including the special tokens.

        Returns:
            The ids.
        """
        truncate = _resolve_truncation(truncation, max_length, padding=False)
        pair = self._text_to_ids(text_pair) if text_pair is not None else None
        return self._prepare(self._text_to_ids(text), pair, add_special_tokens, truncate, max_length)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        text_pair: str | Sequence[str] | None = None,
        text_target: str | Sequence[str] | None = None,
        text_pair_target: str | Sequence[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Encode text(s) as the reference `tokenizer(...)` does (spec §3.4).

        Without padding and without max_length only `input_ids` come back. With padding
        (True/"longest"/"max_length") or a max_length, every row also gets `attention_mask`
        ([1,n,n] bool, True = masked, prefix-LM) and `position_ids` ([2,n] int64), and rows are
        left-padded with the pad id / True / zeros.

        Args:
            text: a string or a list of strings.
            text_pair: matching second text(s).
            text_target: target text(s); encoded the same way and returned as `labels` (or, when
                `text` is None, as the result itself).
            text_pair_target: matching second target text(s).
            add_special_tokens: append `[gMASK] <sop>` (and `<eop>` for pairs).
            padding: False/"do_not_pad", True/"longest", or "max_length".
            truncation: True/"longest_first" or False/"do_not_truncate"; None: truncate when
                max_length is given and padding is False (transformers' default).
            max_length: truncation / padding length.
            pad_to_multiple_of: round the padded length up to a multiple of this.
            return_tensors: None (python lists), "np" or "pt"; tensors always have a batch axis.

        Returns:
            A BatchEncoding (dict).

        Raises:
            TokenizerError: bad argument, or tensors requested for rows of different lengths.
        """
        if text is None and text_target is None:
            raise TokenizerError("tokenizer(...) needs `text` or `text_target`")
        options = dict(
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            return_tensors=return_tensors,
        )
        encodings = self._call_one(text, text_pair, **options) if text is not None else None
        if text_target is None:
            return encodings
        targets = self._call_one(text_target, text_pair_target, **options)
        if encodings is None:
            return targets
        encodings["labels"] = targets["input_ids"]
        return encodings

    def _call_one(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None,
        add_special_tokens: bool,
        padding: bool | str,
        truncation: bool | str | None,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        return_tensors: str | None,
    ) -> BatchEncoding:
        if return_tensors not in (None, "pt", "np"):
            raise TokenizerError(f"return_tensors={return_tensors!r}: expected None, 'pt' or 'np'")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
            raise TokenizerError(f"max_length={max_length!r}: expected an integer")
        strategy = _resolve_padding(padding, max_length)
        truncate = _resolve_truncation(truncation, max_length, padding)

        batched = isinstance(text, (list, tuple))
        if batched:
            texts = list(text)
            if text_pair is None:
                pairs: list[str | None] = [None] * len(texts)
            elif isinstance(text_pair, (list, tuple)) and len(text_pair) == len(texts):
                pairs = list(text_pair)
            else:
                raise TokenizerError("text_pair must be a list of the same length as the batch of texts")
        else:
            if text_pair is not None and not isinstance(text_pair, str):
                raise TokenizerError(f"text_pair for a single text must be a str, got {type(text_pair).__name__}")
            texts, pairs = [text], [text_pair]
        rows = [
            self._prepare(
                self._text_to_ids(t),
                self._text_to_ids(p) if p is not None else None,
                add_special_tokens,
                truncate,
                max_length,
            )
            for t, p in zip(texts, pairs)
        ]

        if not batched and not rows[0]:
            # transformers' pad() returns early on an empty sequence, with an empty attention_mask.
            result = BatchEncoding(input_ids=[], attention_mask=[])
            return _convert(result, return_tensors, batched=False)

        # Target length per transformers' pad()/_pad(): the longest row, max_length, or none.
        target = max_length
        if strategy == "longest":
            target = max((len(r) for r in rows), default=0)
        if target is not None and pad_to_multiple_of and target % pad_to_multiple_of:
            target = (target // pad_to_multiple_of + 1) * pad_to_multiple_of

        result = BatchEncoding(input_ids=rows)
        if target is not None and rows:
            masks, positions = [], []
            pad_id = self.pad_token_id
            for i, row in enumerate(rows):
                mask, pos = _prefix_lm_inputs(row, self.bos_token_id, self.mask_token_id, self.gmask_token_id)
                if strategy is not None and len(row) != target:
                    difference = target - len(row)
                    if difference < 0:
                        raise TokenizerError(
                            f"sequence {i} has {len(row)} tokens, more than the padding length {target}: "
                            "pass truncation=True or a larger max_length"
                        )
                    mask = np.pad(mask, [(0, 0), (difference, 0), (difference, 0)], constant_values=True)
                    pos = np.pad(pos, [(0, 0), (difference, 0)])
                    rows[i] = [pad_id] * difference + row
                masks.append(mask)
                positions.append(pos)
            result["attention_mask"] = masks
            result["position_ids"] = positions
        if not batched:
            result = BatchEncoding({key: value[0] for key, value in result.items()})
        return _convert(result, return_tensors, batched)

    # ------------------------------------------------------------------------------ decoding

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """Ids -> text (spec §3.5): pads removed, SentencePiece decode, `<n>`/tab/blank restore, clean-up.

        Args:
            token_ids: an int, a list of ints, a numpy array or a torch tensor.
            skip_special_tokens: drop `<sop> <eop> <unk> <pad> [MASK]`.
            clean_up_tokenization_spaces: apply the English clean-up (" ," -> ",", " 's" -> "'s", ...).
            spaces_between_special_tokens: accepted for compatibility; no effect.

        Returns:
            The text.

        Raises:
            TokenizerError: an id outside [0, vocab_size).
        """
        del spaces_between_special_tokens  # no added tokens exist, so it never matters
        ids = _to_id_list(token_ids)
        if not ids:
            return ""
        pad_id = self.pad_token_id
        ids = [i for i in ids if i != pad_id]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._all_special_id_set]
        pieces = [self._id_to_token(i) for i in ids]
        text = _postprocess(self._sp.DecodePieces(pieces))
        if clean_up_tokenization_spaces:
            text = _clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[str]:
        """`decode` each sequence (a list of id lists, or a 2-D array/tensor).

        Args:
            sequences: the sequences.
            **kwargs: passed to `decode`.

        Returns:
            One string per sequence.
        """
        return [self.decode(seq, **kwargs) for seq in sequences]

    def __repr__(self) -> str:
        return (
            f"ChatGLMTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"num_image_tokens={self.num_image_tokens})"
        )


# --------------------------------------------------------------------------------------------------


def _resolve_padding(padding: bool | str | None, max_length: int | None) -> str | None:
    """None (no padding), "longest" or "max_length"."""
    if padding is None or padding is False or padding == "do_not_pad":
        return None
    if padding is True or padding == "longest":
        return "longest"
    if padding == "max_length":
        # transformers falls back to no padding when there is no max_length (model_max_length is unset)
        return "max_length" if max_length is not None else None
    raise TokenizerError(f"padding={padding!r}: expected True, False, 'longest', 'max_length' or 'do_not_pad'")


def _resolve_truncation(truncation: bool | str | None, max_length: int | None, padding: Any) -> bool:
    """Whether to truncate; None follows transformers (truncate if max_length is set and padding is False)."""
    if truncation is None:
        return max_length is not None and padding is False
    if truncation is True or truncation == "longest_first":
        return True
    if truncation is False or truncation == "do_not_truncate":
        return False
    raise TokenizerError(
        f"truncation={truncation!r}: expected True/'longest_first' or False/'do_not_truncate'"
    )


def _convert(result: BatchEncoding, return_tensors: str | None, batched: bool) -> BatchEncoding:
    """Turn the numpy masks/positions into lists (None) or into batched numpy arrays / torch tensors."""
    if return_tensors is None:
        for key, value in result.items():
            if isinstance(value, np.ndarray):
                result[key] = value.tolist()
            elif isinstance(value, list) and value and isinstance(value[0], np.ndarray):
                result[key] = [v.tolist() for v in value]
        return result
    out = BatchEncoding()
    for key, value in result.items():
        rows = value if batched else [value]
        lengths = {len(r) if not isinstance(r, np.ndarray) else r.shape[-1] for r in rows}
        if len(lengths) > 1:
            raise TokenizerError(
                f"cannot make a {return_tensors!r} tensor of '{key}' from rows of different lengths "
                f"{sorted(lengths)}: pass padding=True"
            )
        if key in ("attention_mask",) and rows and isinstance(rows[0], np.ndarray):
            array = np.stack(rows).astype(bool)
        elif rows and isinstance(rows[0], np.ndarray):
            array = np.stack(rows).astype(np.int64)
        else:
            array = np.array(rows, dtype=np.int64)
        if return_tensors == "pt":
            import torch

            out[key] = torch.from_numpy(array)
        else:
            out[key] = array
    return out


def check_tokenizer_matches(tokenizer: ChatGLMTokenizer, config: ChatGLMConfig, model_source: Any = None) -> None:
    """Check that a tokenizer belongs to a model: every id it produces has an embedding row, and its
    special tokens ([MASK], [gMASK], <sop>, <eop>, <pad>) have the ids the model's config.json gives.

    Args:
        tokenizer: the tokenizer.
        config: the model's config.
        model_source: where the model came from, for the message (a folder or a name).

    Raises:
        TokenizerError: one line naming the tokenizer, the model and the first mismatch.
    """
    where = f"tokenizer {tokenizer.name_or_path or '(given)'} and model {model_source or '(given)'}"
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"{where} do not belong together: the tokenizer has {tokenizer.vocab_size} ids but "
                             f"the model's vocab_size is {config.vocab_size}; load the tokenizer files of the "
                             f"model's own folder")
    for name in ("mask", "gmask", "bos", "eos", "pad"):
        ours, theirs = getattr(tokenizer, f"{name}_token_id"), getattr(config, f"{name}_token_id")
        if ours != theirs:
            raise TokenizerError(f"{where} do not belong together: the tokenizer's {name} token id is {ours}, "
                                 f"the model's config.json has {name}_token_id = {theirs}; load the tokenizer "
                                 f"files of the model's own folder")


def load_tokenizer(path: str | os.PathLike) -> ChatGLMTokenizer:
    """Load the tokenizer of a checkpoint folder (= `ChatGLMTokenizer.from_pretrained(path)`).

    Args:
        path: folder holding `ice_text.model` and optionally `tokenizer_config.json`; or a
            single-file checkpoint (a MindSpore `.ckpt`), whose folder is used.

    Returns:
        The tokenizer.
    """
    path = Path(path)
    if path.suffix == ".ckpt" and path.is_file():  # the tokenizer files sit beside the checkpoint
        if not (path.parent / VOCAB_NAME).is_file():
            raise TokenizerError(f"no {VOCAB_NAME} beside {path}: put the tokenizer files there or give the "
                                 f"tokenizer folder separately (--tokenizer)")
        path = path.parent
    return ChatGLMTokenizer.from_pretrained(path)

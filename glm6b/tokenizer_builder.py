"""Train a small `ice_text.model` with the exact piece layout of ChatGLM-6B's tokenizer (spec §3.1).

The real `ice_text.model` is a unigram SentencePiece model trained with the library defaults
(nmt_nfkc normalizer, dummy prefix, removal of extra whitespace) whose last 344 pieces were appended
after training. `train_ice_text_model` reproduces that recipe on any texts, the way the golden test
tokenizer was made (tests/golden/README.md):

| ids                     | pieces                                              | type          |
|-------------------------|-----------------------------------------------------|---------------|
| 0, 1, 2, 3              | `<unk>` `<s>` `</s>` `<pad>`                        | UNKNOWN, CONTROL ×3 |
| 4                       | `<n>` (newline stand-in)                            | USER_DEFINED  |
| 5                       | `▁`                                                 | NORMAL        |
| 6 … V−1                 | trained pieces                                      | NORMAL        |
| V … V+7                 | `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>` | CONTROL |
| V+8, V+9 … V+87         | `<|tab|>`, `<|blank_2|>` … `<|blank_80|>`           | USER_DEFINED  |
| V+88 … V+343            | `<0x00>` … `<0xFF>`                                 | BYTE          |

with V = `vocab_size` (the SentencePiece trainer's count, which includes ids 0-4) and
`trainer_spec.byte_fallback = true`. The texts are preprocessed as the tokenizer does before
SentencePiece (spec §3.2: "\\n" -> `<n>`); tabs and runs of spaces become single spaces for training
only, because their `<|tab|>`/`<|blank_n|>` pieces are appended afterwards and the marker strings
must not leak into the learned vocabulary.
"""

from __future__ import annotations

import io
import json
import os
import unicodedata
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from .io import atomic_path, atomic_write_text
from .tokenizer import DEFAULT_SPECIAL_TOKENS, TOKENIZER_AUTO_MAP

__all__ = [
    "CONTROL_SPECIALS",
    "WHITESPACE_PIECES",
    "BYTE_PIECES",
    "NUM_APPENDED",
    "TokenizerBuildError",
    "train_ice_text_model",
    "special_piece_ids",
    "tokenizer_config",
    "check_tokenizer",
    "model_config",
    "write_tokenizer_config",
    "write_json_atomic",
]

#: The 8 CONTROL pieces appended after the trained vocabulary, in id order.
CONTROL_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
#: The 80 USER_DEFINED whitespace pieces: `<|tab|>` then `<|blank_2|>` … `<|blank_80|>`.
WHITESPACE_PIECES = ["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
#: The 256 BYTE pieces for byte fallback.
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]
NUM_APPENDED = len(CONTROL_SPECIALS) + len(WHITESPACE_PIECES) + len(BYTE_PIECES)  # 344

_HEAD = [  # ids 0-4 as the trainer must produce them
    ("<unk>", model_pb2.ModelProto.SentencePiece.UNKNOWN),
    ("<s>", model_pb2.ModelProto.SentencePiece.CONTROL),
    ("</s>", model_pb2.ModelProto.SentencePiece.CONTROL),
    ("<pad>", model_pb2.ModelProto.SentencePiece.CONTROL),
    ("<n>", model_pb2.ModelProto.SentencePiece.USER_DEFINED),
]
_SPACE = "\u2581"

# Defaults of the default tokenizer; the trainer's own defaults for everything not listed here.
DEFAULT_VOCAB_SIZE = 1000
DEFAULT_MAX_PIECE_LENGTH = 8


class TokenizerBuildError(RuntimeError):
    """Training produced something that does not have the ice_text.model layout."""


def _training_line(text: str) -> str:
    """Spec §3.2 preprocessing for training: newline -> `<n>`; tabs/space runs -> one space."""
    text = text.replace("\n", "<n>").replace("\t", " ")
    while "  " in text:
        text = text.replace("  ", " ")
    return text.strip(" ")


def _train_proto(lines: list[str], vocab_size: int, max_piece_length: int) -> model_pb2.ModelProto:
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=writer,
            model_type="unigram",
            vocab_size=vocab_size,
            character_coverage=1.0,
            max_sentencepiece_length=max_piece_length,
            split_digits=True,
            user_defined_symbols=["<n>"],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=1,  # one thread and no shuffling: the result is a pure function of the texts
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise TokenizerBuildError(f"SentencePiece training failed: {str(exc).strip()}") from None
    proto = model_pb2.ModelProto()
    proto.ParseFromString(writer.getvalue())
    return proto


def _apply_layout(proto: model_pb2.ModelProto) -> None:
    """Check ids 0-4, move `▁` to id 5, append the 344 pieces and switch byte fallback on."""
    SP = model_pb2.ModelProto.SentencePiece
    pieces = proto.pieces
    for i, (piece, kind) in enumerate(_HEAD):
        if i >= len(pieces) or pieces[i].piece != piece or pieces[i].type != kind:
            got = (pieces[i].piece, pieces[i].type) if i < len(pieces) else None
            raise TokenizerBuildError(f"trained id {i}: expected {piece!r} of type {kind}, got {got}")
    index = next((i for i, p in enumerate(pieces) if p.piece == _SPACE), None)
    if index is None or pieces[index].type != SP.NORMAL:
        raise TokenizerBuildError("the trained vocabulary has no NORMAL '▁' piece (are the texts empty?)")
    if index != 5:
        # Ids only name pieces; a unigram model segments by score, so moving '▁' to id 5 (where the
        # real and golden models have it) changes no segmentation.
        space = SP()
        space.CopyFrom(pieces[index])
        del pieces[index]
        pieces.insert(5, space)
    appended = (
        [(p, SP.CONTROL) for p in CONTROL_SPECIALS]
        + [(p, SP.USER_DEFINED) for p in WHITESPACE_PIECES]
        + [(p, SP.BYTE) for p in BYTE_PIECES]
    )
    existing = {p.piece for p in pieces}
    clash = [p for p, _ in appended if p in existing]
    if clash:
        raise TokenizerBuildError(f"trained pieces collide with the appended specials: {clash[:5]}")
    for piece, kind in appended:
        pieces.add(piece=piece, score=0.0, type=kind)
    proto.trainer_spec.byte_fallback = True


def special_piece_ids(num_trained: int = DEFAULT_VOCAB_SIZE) -> dict[str, int]:
    """Ids of the special pieces for a model trained with `vocab_size=num_trained` (no image tokens)."""
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<n>": 4, _SPACE: 5}
    for offset, piece in enumerate(CONTROL_SPECIALS + WHITESPACE_PIECES + BYTE_PIECES):
        ids[piece] = num_trained + offset
    return ids


def tokenizer_config(name_or_path: str) -> dict:
    """A `tokenizer_config.json` dict with the keys of the real file (num_image_tokens 0)."""
    return {
        "name_or_path": name_or_path,
        **DEFAULT_SPECIAL_TOKENS,
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "num_image_tokens": 0,
        "auto_map": TOKENIZER_AUTO_MAP,
    }


def _expected_round_trip(text: str) -> str:
    """What decode(encode(text)) gives for text without whitespace runs: the NFKC form, stripped."""
    return unicodedata.normalize("NFKC", text).strip(" ")


_MARKERS = ("<sop>", "<eop>", "<unk>", "<pad>", "[MASK]", "<n>", "<|", "<s>", "</s>")


def _plain(text: str) -> bool:
    """Texts whose round trip is simply NFKC(text): single spaces and newlines as the only whitespace,
    no control characters, no special-token strings, no leading/trailing space."""
    if text != text.strip(" ") or any(m in text for m in _MARKERS):
        return False
    if any((c.isspace() and c not in " \n") or (unicodedata.category(c)[0] == "C" and c != "\n") for c in text):
        return False
    return "  " not in unicodedata.normalize("NFKC", text)


def check_tokenizer(tokenizer, texts: Iterable[str] = (), num_trained: int | None = None) -> list[str]:
    """Problems found in a tokenizer built by `train_ice_text_model` (empty list = all good).

    Checks the special layout (ids 0-5, the 344 appended pieces, `<sop>`/`<eop>`/`[MASK]`/`[gMASK]`
    ids), emoji byte fallback, and that decode(encode(t)) equals NFKC(t) without `<unk>` for each of
    `texts` (plain texts: single spaces and newlines as the only whitespace, no special-token strings).
    """
    problems: list[str] = []
    total = tokenizer.vocab_size
    trained = total - NUM_APPENDED if num_trained is None else num_trained
    if total != trained + NUM_APPENDED:
        problems.append(f"vocab_size {total} != {trained} trained + {NUM_APPENDED} appended")
    for piece, want in special_piece_ids(trained).items():
        got = tokenizer.convert_tokens_to_ids(piece)
        if got != want:
            problems.append(f"piece {piece!r}: id {got}, expected {want}")
    for name, piece in [("bos", "<sop>"), ("eos", "<eop>"), ("mask", "[MASK]"), ("gmask", "[gMASK]"),
                        ("pad", "<pad>"), ("unk", "<unk>"), ("end", "</s>")]:
        if getattr(tokenizer, f"{name}_token_id") != tokenizer.convert_tokens_to_ids(piece):
            problems.append(f"{name}_token_id is not the id of {piece}")
    # byte fallback: a character no trained piece contains must come out as its UTF-8 bytes
    vocab_text = "".join(tokenizer.convert_ids_to_tokens(list(range(trained))))
    char = next(c for c in "😀🦙🧬🪐\U0002A6A5" if c not in vocab_text)
    emoji = "a" + char
    ids = tokenizer.encode(emoji, add_special_tokens=False)
    byte_ids = [special_piece_ids(trained)[f"<0x{b:02X}>"] for b in char.encode("utf-8")]
    if ids[-len(byte_ids):] != byte_ids or tokenizer.decode(ids) != emoji:
        problems.append(f"emoji byte fallback: {emoji!r} -> {ids} -> {tokenizer.decode(ids)!r}")
    chat = "[Round 0]\n问：你好\n答：\t  x"
    if tokenizer.decode(tokenizer.encode(chat)) != _expected_round_trip(chat):
        problems.append(f"chat template round trip: {tokenizer.decode(tokenizer.encode(chat))!r}")
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        back = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        if back != _expected_round_trip(text) or unk in ids:
            problems.append(f"round trip {text!r} -> {back!r}")
            if len(problems) > 20:
                break
    return problems


def train_ice_text_model(
    texts: Iterable[str],
    output_path: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_piece_length: int = DEFAULT_MAX_PIECE_LENGTH,
    verify: bool = True,
) -> Path:
    """Train a unigram `ice_text.model` on `texts` with the ChatGLM-6B piece layout; write it atomically.

    Args:
        texts: training texts (newlines allowed: they become `<n>`).
        output_path: file to write (e.g. `.../ice_text.model`); its folder is created.
        vocab_size: SentencePiece vocabulary size, ids 0-4 included; the model gets vocab_size + 344
            pieces. SentencePiece refuses sizes the texts cannot support (the error says the maximum).
        max_piece_length: longest trained piece, in characters.
        verify: load the result with glm6b's ChatGLMTokenizer and run `check_tokenizer` (layout,
            byte fallback, round trip of every plain training text) before the file replaces `output_path`.

    Returns:
        The path written.

    Raises:
        TokenizerBuildError: training failed, the layout came out wrong, or verification failed.
    """
    texts = list(texts)
    lines = [line for line in (_training_line(t) for t in texts) if line]
    if not lines:
        raise TokenizerBuildError("no non-empty training texts")
    proto = _train_proto(lines, vocab_size, max_piece_length)
    _apply_layout(proto)
    data = proto.SerializeToString()

    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        if verify:
            from .tokenizer import ChatGLMTokenizer

            tokenizer = ChatGLMTokenizer(tmp)
            problems = check_tokenizer(tokenizer, [t for t in texts if _plain(t)], num_trained=vocab_size)
            if problems:
                raise TokenizerBuildError("trained tokenizer failed its checks:\n  " + "\n  ".join(problems))
    return path


def write_tokenizer_config(folder: str | os.PathLike, name_or_path: str) -> Path:
    """Write `tokenizer_config.json` (see `tokenizer_config`) into `folder`, atomically."""
    return write_json_atomic(Path(folder) / "tokenizer_config.json", tokenizer_config(name_or_path))


def model_config(num_trained: int = DEFAULT_VOCAB_SIZE, name_or_path: str = "glm6b-default",
                 hidden_size: int = 256, num_layers: int = 4, num_attention_heads: int = 4,
                 inner_hidden_size: int = 1024, max_sequence_length: int = 512) -> dict:
    """An HF-style `config.json` dict (keys as in the real file) for a model over this tokenizer.

    vocab_size is the tokenizer's piece count rounded up to a multiple of 64 (the extra rows, if
    any, are padding rows as in the real checkpoint); token ids follow `special_piece_ids`.
    """
    ids = special_piece_ids(num_trained)
    pieces = num_trained + NUM_APPENDED
    return {
        "_name_or_path": name_or_path,
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bos_token_id": ids["<sop>"],
        "eos_token_id": ids["<eop>"],
        "mask_token_id": ids["[MASK]"],
        "gmask_token_id": ids["[gMASK]"],
        "pad_token_id": ids["<pad>"],
        "hidden_size": hidden_size,
        "inner_hidden_size": inner_hidden_size,
        "layernorm_epsilon": 1e-05,
        "max_sequence_length": max_sequence_length,
        "model_type": "chatglm",
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "position_encoding_2d": True,
        "torch_dtype": "float32",
        "transformers_version": "4.27.1",
        "use_cache": True,
        "vocab_size": -(-pieces // 64) * 64,
    }


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    """Write `data` as indented UTF-8 JSON (trailing newline), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path

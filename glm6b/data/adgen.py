"""Fine-tuning data: prompt/response jsonl (ADGEN) -> training and evaluation rows, offline cache, batches.

Rows are built exactly as the THUDM recipe (ptuning/main.py, spec §7.1/§7.2) builds them:

* training row: ``prompt ids[:max_source_length-1] + [gMASK] <sop> + answer ids[:max_target_length-2]
  + <eop>``; labels are -100 over the prompt and ``[gMASK]``, then the ids from ``<sop>`` on; right
  padding to ``max_source_length + max_target_length`` with pad ids whose labels are -100.
* evaluation row: ``prompt ids[:max_source_length-2] + [gMASK] <sop>`` (left-padded in a batch with the
  tokenizer's prefix-LM mask and 2D positions) and labels ``answer ids[:max_target_length-2] + [gMASK]
  <sop>`` with pad ids -> -100.

The prompt is ``source_prefix + build_prompt(query, history)``: with a history column the chat
template of glm6b.inference.chat (rounds from 0); without one, or with an empty history, the bare query.
Deliberate difference: the reference *training* code renders an empty history as "[Round 0]..."
while its evaluation code and chat() use the bare query; we use the bare query everywhere, so a
fine-tuned model sees at training time exactly the prompt that chat() will give it.

Two ways to feed a run, which give identical batches:

* online: `JsonlDataset` reads and checks the jsonl once and encodes rows when they are asked for;
* offline: `glm6b.data.preprocess.preprocess` writes the encoded rows once to ``input_ids.npy`` / ``labels.npy`` (int32,
  all rows concatenated, unpadded), ``offsets.npy`` (int64 [rows + 1, 2]: row i's input_ids are
  ``input_ids[offsets[i, 0]:offsets[i + 1, 0]]``, its labels ``labels[offsets[i, 1]:offsets[i + 1, 1]]``;
  the two columns are equal for training rows) and ``meta.json`` (settings, tokenizer hash, counts);
  `EncodedDataset` memory-maps them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch

from ..config import DataConfig, DataError
from ..inference.chat import build_prompt
from ..io import read_lines
from ..model.masks import build_mask_and_positions

Mode = Literal["train", "eval"]
IGNORE_INDEX = -100
FORMAT = "glm6b-encoded-rows-v1"
META_NAME = "meta.json"
ENCODED_ARRAYS = ("input_ids", "labels", "offsets")  # the .npy files of a preprocessed folder


# ----------------------------------------------------------------------------------- single rows


def render_prompt(query: str, history: Sequence[Sequence[str]] | None = None, source_prefix: str = "") -> str:
    """The model prompt for one example: source_prefix + chat template (bare query without history).

    Args:
        query: the prompt field.
        history: earlier (query, response) pairs, oldest first.
        source_prefix: text put in front.

    Returns:
        The prompt text.
    """
    return source_prefix + build_prompt(query, history)


def _train_row(tok, prompt: str, answer: str, max_source_length: int, max_target_length: int,
               ignore_pad_token_for_loss: bool) -> tuple[list[int], list[int]]:
    """Unpadded training row (spec §7.1 steps 1-4)."""
    a = tok.encode(prompt, add_special_tokens=False)[: max_source_length - 1]
    b = tok.encode(answer, add_special_tokens=False)[: max_target_length - 2]
    input_ids = tok.build_inputs_with_special_tokens(a, b)  # a [gMASK] <sop> b <eop>
    context = len(a) + 1  # index of <sop>
    labels = [IGNORE_INDEX] * context + input_ids[context:]
    if ignore_pad_token_for_loss:
        labels = [IGNORE_INDEX if t == tok.pad_token_id else t for t in labels]
    return input_ids, labels


def adgen_train_features(tok, prompt: str, answer: str, max_source_length: int, max_target_length: int,
                         ignore_pad_token_for_loss: bool = True) -> dict[str, list[int]]:
    """One training row exactly as the reference ADGEN recipe builds it (spec §7.1).

    Args:
        tok: a ChatGLMTokenizer.
        prompt: the rendered prompt (see `render_prompt`).
        answer: the target text.
        max_source_length, max_target_length: token budgets.
        ignore_pad_token_for_loss: labels equal to the pad id become -100.

    Returns:
        {"input_ids", "labels"}, both right-padded to max_source_length + max_target_length.
    """
    input_ids, labels = _train_row(tok, prompt, answer, max_source_length, max_target_length,
                                   ignore_pad_token_for_loss)
    pad = max_source_length + max_target_length - len(input_ids)
    return {"input_ids": input_ids + [tok.pad_token_id] * pad, "labels": labels + [IGNORE_INDEX] * pad}


def adgen_eval_features(tok, prompt: str, answer: str, max_source_length: int, max_target_length: int,
                        ignore_pad_token_for_loss: bool = True) -> dict[str, list[int]]:
    """One evaluation/prediction row as the reference builds it (spec §7.2), before batch padding.

    Args:
        tok: a ChatGLMTokenizer.
        prompt: the rendered prompt.
        answer: the reference answer.
        max_source_length, max_target_length: token budgets (special tokens included).
        ignore_pad_token_for_loss: label ids equal to the pad id become -100.

    Returns:
        {"input_ids": prompt ids + [gMASK, <sop>], "labels": answer ids + [gMASK, <sop>]}, unpadded.
    """
    input_ids = tok.encode(prompt, truncation=True, max_length=max_source_length)
    labels = tok.encode(answer, truncation=True, max_length=max_target_length)
    if ignore_pad_token_for_loss:
        labels = [IGNORE_INDEX if t == tok.pad_token_id else t for t in labels]
    return {"input_ids": input_ids, "labels": labels}


def encode_example(tok, prompt: str, answer: str, config: DataConfig, mode: Mode) -> tuple[list[int], list[int]]:
    """Unpadded (input_ids, labels) of one example for `mode` ("train" or "eval")."""
    if mode == "train":
        return _train_row(tok, prompt, answer, config.max_source_length, config.max_target_length,
                          config.ignore_pad_token_for_loss)
    row = adgen_eval_features(tok, prompt, answer, config.max_source_length, config.max_target_length,
                              config.ignore_pad_token_for_loss)
    return row["input_ids"], row["labels"]


# ----------------------------------------------------------------------------------- reading jsonl


@dataclass
class Example:
    """One usable line: its rendered prompt and answer."""

    line: int
    prompt: str
    answer: str


@dataclass
class ReadStats:
    """What reading a jsonl file found.

    Attributes:
        lines: non-blank lines read.
        rows: examples kept.
        skipped_empty: lines whose prompt or answer is empty (skipped, as the reference does).
        skipped_bad: malformed lines skipped because skip_bad was set.
        bad_lines: the first few problems, "file, line n: what".
    """

    lines: int = 0
    rows: int = 0
    skipped_empty: int = 0
    skipped_bad: int = 0
    bad_lines: list[str] = field(default_factory=list)


def _check_line(record: Any, config: DataConfig) -> str | None:
    """What is wrong with a parsed line, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for column in (config.prompt_column, config.response_column):
        if column not in record:
            return f"missing field {column!r} (fields: {', '.join(map(repr, record)) or 'none'})"
        if not isinstance(record[column], str):
            return f"field {column!r} must be a string, got {type(record[column]).__name__}"
    if config.history_column is not None:
        history = record.get(config.history_column)
        if history is None:
            return None
        if not isinstance(history, list):
            return f"field {config.history_column!r} must be a list of [query, response] pairs, " \
                   f"got {type(history).__name__}"
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                return f"field {config.history_column!r}[{i}] must be a [query, response] pair of strings"
    return None


def iter_examples(path: str | os.PathLike, config: DataConfig, stats: ReadStats | None = None,
                  skip_bad: bool | None = None) -> Iterator[Example]:
    """Read a prompt/response jsonl file line by line, checking every line.

    Blank lines are ignored; lines with an empty prompt or answer are skipped and counted.

    Args:
        path: the jsonl file (one JSON object per line).
        config: column names and source_prefix.
        stats: filled in while reading, if given.
        skip_bad: skip and count malformed lines; None takes config.skip_bad.

    Yields:
        Example per usable line.

    Raises:
        DataError: the file cannot be read, or (without skip_bad) a line that is not JSON, not an
            object, misses a field or has a non-string field; the message names file and line.
    """
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    skip_bad = config.skip_bad if skip_bad is None else skip_bad
    for lineno, text in read_lines(path, DataError, "data file"):
        stats.lines += 1
        try:
            record = json.loads(text)
            problem = _check_line(record, config)
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e.msg} at column {e.colno})"
        if problem is not None:
            message = f"{path}, line {lineno}: {problem}"
            if not skip_bad:
                raise DataError(message + " (to skip such lines: --skip-bad, or data.skip_bad: true in a recipe)")
            stats.skipped_bad += 1
            if len(stats.bad_lines) < 10:
                stats.bad_lines.append(message)
            continue
        query, answer = record[config.prompt_column], record[config.response_column]
        if not query or not answer:
            stats.skipped_empty += 1
            continue
        history = record.get(config.history_column) if config.history_column else None
        stats.rows += 1
        yield Example(lineno, render_prompt(query, history, config.source_prefix), answer)


# ----------------------------------------------------------------------------------- datasets


def prefix_lm_inputs(ids: Sequence[int], pad_count: int, total: int, bos_id: int, mask_id: int,
                     gmask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokenizer's attention_mask [1, T, T] and position_ids [2, T] for a left-padded row (spec §3.4).

    The rule is glm6b.model.masks.build_mask_and_positions (tokenizer_rule=True), as the tokenizer uses it.

    Args:
        ids: the unpadded row.
        pad_count: pads put in front of it; total = pad_count + len(ids).
        bos_id, mask_id, gmask_id: <sop>, [MASK], [gMASK] ids.

    Returns:
        (mask, positions): mask True = not visible (pads are invisible to every row), positions
        count from the first real token, the tokenizer's [MASK]-before-[gMASK] rule.
    """
    row = torch.zeros(1, total, dtype=torch.long)
    row[0, pad_count:] = torch.as_tensor(list(ids), dtype=torch.long)
    real = torch.zeros(1, total, dtype=torch.long)
    real[0, pad_count:] = 1
    special = SimpleNamespace(bos_token_id=bos_id, mask_token_id=mask_id, gmask_token_id=gmask_id)
    mask, positions = build_mask_and_positions(row, special, padding_mask=real, tokenizer_rule=True)
    return mask[0], positions[0]


class RowDataset(torch.utils.data.Dataset):
    """Encoded rows of one mode, plus the batching rule for them (`collate`).

    Attributes:
        mode: "train" (teacher-forced rows) or "eval" (prompt-only rows with reference labels).
        config: the DataConfig the rows were built with.
        special_ids: {"pad", "bos", "mask", "gmask"} token ids used to batch.
    """

    mode: Mode
    config: DataConfig
    special_ids: dict[str, int]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def collate(self, rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Batch rows: training rows right-padded (to max_source_length + max_target_length, or to the
        longest row with dynamic_padding); evaluation rows left-padded with the tokenizer's mask and
        positions (labels left-padded with -100).

        Args:
            rows: items of this dataset.

        Returns:
            Tensors "input_ids" [B, T] and "labels"; for eval also "attention_mask" [B, 1, T, T]
            and "position_ids" [B, 2, T].
        """
        pad = self.special_ids["pad"]
        longest = max(len(r["input_ids"]) for r in rows)
        if self.mode == "train":
            width = longest if self.config.dynamic_padding else max(
                longest, self.config.max_source_length + self.config.max_target_length)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r["input_ids"])
                input_ids[i, :n] = torch.from_numpy(np.asarray(r["input_ids"], dtype=np.int64))
                labels[i, :n] = torch.from_numpy(np.asarray(r["labels"], dtype=np.int64))
            return {"input_ids": input_ids, "labels": labels}
        label_width = max(len(r["labels"]) for r in rows)
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        labels = torch.full((len(rows), label_width), IGNORE_INDEX, dtype=torch.long)
        masks, positions = [], []
        for i, r in enumerate(rows):
            n, m = len(r["input_ids"]), len(r["labels"])
            input_ids[i, longest - n:] = torch.from_numpy(np.asarray(r["input_ids"], dtype=np.int64))
            labels[i, label_width - m:] = torch.from_numpy(np.asarray(r["labels"], dtype=np.int64))
            mask, pos = prefix_lm_inputs(r["input_ids"].tolist(), longest - n, longest, self.special_ids["bos"],
                                         self.special_ids["mask"], self.special_ids["gmask"])
            masks.append(mask)
            positions.append(pos)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.stack(masks),
                "position_ids": torch.stack(positions)}


def special_ids_of(tok) -> dict[str, int]:
    """The special token ids rows are built with (recorded in a preprocessed folder's meta.json)."""
    return {"pad": tok.pad_token_id, "bos": tok.bos_token_id, "mask": tok.mask_token_id,
            "gmask": tok.gmask_token_id}


def as_row(input_ids: Sequence[int], labels: Sequence[int]) -> dict[str, np.ndarray]:
    """One dataset row: {"input_ids", "labels"} as int64 arrays."""
    return {"input_ids": np.asarray(input_ids, dtype=np.int64), "labels": np.asarray(labels, dtype=np.int64)}


class JsonlDataset(RowDataset):
    """Online data: the jsonl is read and checked once; rows are encoded when asked for.

    Args:
        path: the jsonl file.
        tokenizer: a ChatGLMTokenizer.
        config: lengths, columns, prefix.
        mode: "train" or "eval".
        skip_bad: None takes config.skip_bad.

    Attributes:
        examples: the usable examples (rendered prompt, answer).
        stats: counts of lines read and skipped.
    """

    def __init__(self, path: str | os.PathLike, tokenizer, config: DataConfig, mode: Mode = "train",
                 skip_bad: bool | None = None):
        check_mode(mode)
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.config = config
        self.mode = mode
        self.special_ids = special_ids_of(tokenizer)
        self.stats = ReadStats()
        self.examples = list(iter_examples(path, config, self.stats, skip_bad))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ex = self.examples[index]
        return as_row(*encode_example(self.tokenizer, ex.prompt, ex.answer, self.config, self.mode))


def check_mode(mode: str) -> None:
    """Raise DataError unless `mode` is "train" or "eval"."""
    if mode not in ("train", "eval"):
        raise DataError(f"mode={mode!r}: expected 'train' or 'eval'")

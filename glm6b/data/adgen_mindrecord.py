"""MindFormers' ADGEN MindRecord files (`mindformers/tools/dataset_preprocess/glm/adgen_dataset.py`): writing
them from prompt/answer texts, and reading them back as glm6b's rows.

What adgen_dataset.py writes (schema description "lm-schema", one file, int32 columns):

* train mode, L = max_source_length + max_target_length. The prompt keeps its first
  max_source_length - 1 tokens and the answer its first max_target_length - 2, then
  `input_ids = prompt [gMASK] <sop> answer <eop>` right-padded with pad to L [-1];
  `labels = [-100] * c + input_ids[c + 1:]` (c = index of <sop>) padded with pad to L, every pad id
  then -100 [-1]: already shifted (the label at t is the token at t + 1);
  `position_ids` [2, L]: row 0 counts 0, 1, ... with every position from <sop> on set to the [gMASK]
  position, row 1 is 0 up to <sop> and 1, 2, ... from it; `attention_mask` [1, L, L], 1 = masked:
  not (lower triangle or a column before <sop>).
* eval mode: the prompt keeps its first max_source_length - 2 *characters* and the answer its first
  max_target_length - 2; `input_ids = encode(prompt) + [gMASK, <sop>]` right-padded with pad to
  max_source_length (a longer prompt is not cut), `labels = encode(answer) + [gMASK, <sop>]`.

glm6b's rows (glm6b.train.data, THUDM's recipe, spec §7.1) hold unshifted labels from <sop> on, and
the model shifts them: the [gMASK] position learns to predict <sop>. MindFormers' labels have no
target at the [gMASK] position. A train file read here gives glm6b's row of the same example:
input_ids without the right padding, the labels shifted back by one, and the <sop> target put back,
so a MindRecord file and the jsonl it was made from train the same objective with the same losses.
Every row is checked on the way: the labels must be input_ids shifted by one (or -100), and the
stored position_ids and attention_mask must be the ones glm6b's model builds from the ids itself.

This module needs only numpy (and a tokenizer object with glm6b's ChatGLMTokenizer interface).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import numpy as np

from .mindrecord import MindRecordError, MindRecordReader, MindRecordWriter, read_schema

SCHEMA_DESC = "lm-schema"
IGNORE_INDEX = -100
EVAL_SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}
Mode = Literal["train", "eval"]


def train_schema(seq_length: int) -> dict[str, dict[str, Any]]:
    """adgen_dataset.py's train-mode schema for rows of `seq_length` = max_source_length + max_target_length."""
    return {"input_ids": {"type": "int32", "shape": [-1]},
            "labels": {"type": "int32", "shape": [-1]},
            "position_ids": {"type": "int32", "shape": [2, seq_length]},
            "attention_mask": {"type": "int32", "shape": [1, seq_length, seq_length]}}


@dataclass(frozen=True)
class SpecialIds:
    """The token ids the rows are built and checked with.

    Attributes:
        pad, bos, eos, gmask: pad, <sop>, <eop> and [gMASK].
    """

    pad: int
    bos: int
    eos: int
    gmask: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        """The ids of a ChatGLMTokenizer."""
        return cls(tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.gmask_token_id)


def prefix_lm_inputs(input_ids: np.ndarray, bos: int, gmask: int) -> tuple[np.ndarray, np.ndarray]:
    """position_ids [2, L] and attention_mask [1, L, L] (1 = masked) as adgen_dataset.py stores them; they
    are the ones glm6b's model builds from a row with one [gMASK] and one <sop>.

    Raises:
        ValueError: the row has no <sop>, or no [gMASK] before it.
    """
    ids = np.asarray(input_ids)
    seq_length = len(ids)
    (sops,), (gmasks,) = np.nonzero(ids == bos), np.nonzero(ids == gmask)
    if not len(sops) or not len(gmasks) or gmasks[0] > sops[0]:
        raise ValueError("the row needs a [gMASK] and a <sop> after it")
    context, mask_position = int(sops[0]), int(gmasks[0])
    positions = np.arange(seq_length, dtype=np.int32)
    positions[context:] = mask_position
    blocks = np.zeros(seq_length, dtype=np.int32)
    blocks[context:] = np.arange(1, seq_length - context + 1)
    return np.stack([positions, blocks]), _prefix_lm_mask(seq_length, context)


@functools.lru_cache(maxsize=128)
def _prefix_lm_mask(seq_length: int, context: int) -> np.ndarray:
    """[1, L, L] int32, 1 = masked; cached (read-only) because rows of a file share few context lengths."""
    visible = np.tril(np.ones((seq_length, seq_length), dtype=bool))
    visible[:, :context] = True
    mask = (~visible).astype(np.int32)[None]
    mask.flags.writeable = False
    return mask


def train_columns(tokenizer, prompt: str, answer: str, max_source_length: int, max_target_length: int,
                  ignore_pad_token_for_loss: bool = True) -> dict[str, np.ndarray]:
    """One train-mode row as adgen_dataset.py writes it (see the module docstring).

    Args:
        tokenizer: a ChatGLMTokenizer.
        prompt: the rendered prompt (source prefix and chat template applied).
        answer: the target text.
        max_source_length, max_target_length: token budgets (the row length is their sum).
        ignore_pad_token_for_loss: label pad ids become -100 (adgen_dataset.py always sets it).

    Returns:
        {"input_ids", "labels", "position_ids", "attention_mask"} as int32 arrays.
    """
    seq_length = max_source_length + max_target_length
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)[: max_source_length - 1]
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)[: max_target_length - 2]
    input_ids = tokenizer.build_inputs_with_special_tokens(prompt_ids, answer_ids)
    context = input_ids.index(tokenizer.bos_token_id)
    pad = tokenizer.pad_token_id
    labels = [IGNORE_INDEX] * context + input_ids[context + 1:]  # shifted: the label at t is the token at t + 1
    labels += [pad] * (seq_length - len(labels))
    input_ids = input_ids + [pad] * (seq_length - len(input_ids))
    if ignore_pad_token_for_loss:
        labels = [IGNORE_INDEX if t == pad else t for t in labels]
    position_ids, attention_mask = prefix_lm_inputs(np.array(input_ids), tokenizer.bos_token_id,
                                                    tokenizer.gmask_token_id)
    return {"input_ids": np.array(input_ids, dtype=np.int32), "labels": np.array(labels, dtype=np.int32),
            "position_ids": position_ids, "attention_mask": attention_mask}


def eval_columns(tokenizer, prompt: str, answer: str, max_source_length: int,
                 max_target_length: int) -> dict[str, np.ndarray]:
    """One eval-mode row as adgen_dataset.py writes it: texts cut by characters (see the module docstring).

    Returns:
        {"input_ids", "labels"} as int32 arrays.
    """
    input_ids = tokenizer.encode(prompt[: max_source_length - 2], add_special_tokens=True)
    labels = tokenizer.encode(answer[: max_target_length - 2], add_special_tokens=True)
    input_ids += [tokenizer.pad_token_id] * (max_source_length - len(input_ids))
    return {"input_ids": np.array(input_ids, dtype=np.int32), "labels": np.array(labels, dtype=np.int32)}


def write_adgen_mindrecord(path: str | os.PathLike, examples: Iterable[tuple[str, str]], tokenizer,
                           mode: Mode = "train", max_source_length: int = 64, max_target_length: int = 64,
                           ignore_pad_token_for_loss: bool = True, **writer_options: Any) -> int:
    """Write the MindRecord file adgen_dataset.py writes for these examples (same schema, names, dtypes, shapes).

    Args:
        path: the file to write (with `<path>.db` beside it), replaced atomically.
        examples: (rendered prompt, answer) pairs; pairs with an empty prompt or answer must already
            be left out (adgen_dataset.py skips them).
        tokenizer: a ChatGLMTokenizer.
        mode: "train" or "eval".
        max_source_length, max_target_length: the budgets (train: tokens, eval: characters).
        ignore_pad_token_for_loss: train mode: label pad ids become -100.
        **writer_options: MindRecordWriter options (num_shards, header_size, page_size).

    Returns:
        The number of rows written.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode={mode!r}: expected 'train' or 'eval'")
    schema = train_schema(max_source_length + max_target_length) if mode == "train" else EVAL_SCHEMA
    rows = 0
    with MindRecordWriter(path, schema, SCHEMA_DESC, **writer_options) as writer:
        for prompt, answer in examples:
            if mode == "train":
                columns = train_columns(tokenizer, prompt, answer, max_source_length, max_target_length,
                                        ignore_pad_token_for_loss)
            else:
                columns = eval_columns(tokenizer, prompt, answer, max_source_length, max_target_length)
            writer.write(columns)
            rows += 1
    return rows


# ----------------------------------------------------------------------------------- reading


class AdgenMindRecord:
    """The rows of an ADGEN MindRecord file (MindFormers' train or eval mode) in glm6b's layout.

    Args:
        path: the file (any shard of a set, or its base name).
        special: the tokenizer's special ids.
        ignore_pad_token_for_loss: label pad ids become -100 (as in glm6b's own rows).

    Attributes:
        mode: "train" (the file has position_ids and attention_mask) or "eval" (input_ids and labels only).
        seq_length: train mode: the stored row length L; eval mode: the longest stored input_ids.
        reader: the MindRecordReader.

    Raises:
        MindRecordError: not a MindRecord set, or not one of the two layouts (the message names the file
            and what is missing).
    """

    def __init__(self, path: str | os.PathLike, special: SpecialIds, ignore_pad_token_for_loss: bool = True):
        schema, where = read_schema(path)
        self.labels_column = "labels" if "labels" in schema else "label"
        for name in ("input_ids", self.labels_column):
            column = schema.get(name)
            if column is None or column.type not in ("int32", "int64") or column.shape is None:
                raise MindRecordError(f"{where}: expected an int32 array column {name!r} (MindFormers' ADGEN "
                                      f"layout: input_ids, labels[, position_ids, attention_mask]); columns: "
                                      f"{', '.join(schema)}")
        train = {"position_ids", "attention_mask"} & set(schema)
        if train and train != {"position_ids", "attention_mask"}:
            raise MindRecordError(f"{where}: a train-mode ADGEN file has both position_ids and attention_mask; "
                                  f"found only {train.pop()}")
        self.mode: Mode = "train" if train else "eval"
        columns = ["input_ids", self.labels_column] + (["position_ids", "attention_mask"] if train else [])
        self.reader = MindRecordReader(path, columns=columns)
        self.path, self.special, self.ignore_pad = where, special, ignore_pad_token_for_loss
        self.seq_length = schema["position_ids"].shape[1] if train else None

    def __len__(self) -> int:
        return len(self.reader)

    def close(self) -> None:
        """Unmap the files."""
        self.reader.close()

    def _fail(self, index: int, column: str, what: str) -> MindRecordError:
        return MindRecordError(f"{self.path}: row {index}, column {column!r}: {what}")

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """glm6b's (input_ids, labels) of row `index`, unpadded, int64.

        Train mode: glm6b's training row (see the module docstring); eval mode: the prompt ids with
        [gMASK] <sop> and the answer ids with [gMASK] <sop>, as glm6b's evaluation rows.

        Raises:
            MindRecordError: a row that is not what adgen_dataset.py writes (one line naming the row and column).
        """
        values = self.reader[index]
        input_ids = values["input_ids"].astype(np.int64)
        labels = values[self.labels_column].astype(np.int64)
        if self.mode == "eval":
            return self._eval_row(index, input_ids, labels)
        return self._train_row(index, input_ids, labels, values["position_ids"], values["attention_mask"])

    def _train_row(self, index: int, input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray,
                   attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        special = self.special
        if len(input_ids) != self.seq_length or len(labels) != self.seq_length:
            raise self._fail(index, "input_ids", f"{len(input_ids)} ids and {len(labels)} labels, expected "
                                                 f"{self.seq_length} each (the position_ids length)")
        try:
            positions, mask = prefix_lm_inputs(input_ids, special.bos, special.gmask)
        except ValueError as e:
            raise self._fail(index, "input_ids", str(e)) from None
        if not np.array_equal(position_ids, positions):
            raise self._fail(index, "position_ids", "not the positions glm6b's model builds from input_ids (a "
                                                    "[gMASK] ... <sop> prefix-LM row)")
        if not np.array_equal(attention_mask, mask):
            raise self._fail(index, "attention_mask", "not the prefix-LM mask glm6b's model builds from input_ids")
        following = np.append(input_ids[1:], special.pad)
        stray = np.nonzero((labels != IGNORE_INDEX) & (labels != following))[0]
        if len(stray):
            t = int(stray[0])
            raise self._fail(index, self.labels_column, f"label[{t}] = {labels[t]} is neither -100 nor input_ids"
                                                        f"[{t + 1}] = {following[t]}: not adgen_dataset.py's labels "
                                                        f"(input_ids shifted by one)")
        real = np.nonzero(input_ids != special.pad)[0]
        length = int(real[-1]) + 1  # the right padding goes; dynamic padding then sees glm6b's row length
        context = int(np.nonzero(input_ids == special.bos)[0][0])
        row_labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
        row_labels[1:] = labels[: length - 1]  # back to unshifted: the label at t is the token at t
        if row_labels[context] == IGNORE_INDEX:
            row_labels[context] = special.bos  # the [gMASK] -> <sop> target MindFormers leaves out
        if self.ignore_pad:
            row_labels[row_labels == special.pad] = IGNORE_INDEX
        return input_ids[:length], row_labels

    def _eval_row(self, index: int, input_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        special = self.special
        real = np.nonzero(input_ids != special.pad)[0]
        input_ids = input_ids[: int(real[-1]) + 1] if len(real) else input_ids[:0]
        tail = [special.gmask, special.bos]
        for name, ids in (("input_ids", input_ids), (self.labels_column, labels)):
            if len(ids) < 2 or ids[-2:].tolist() != tail:
                raise self._fail(index, name, "does not end with [gMASK] <sop> (an eval-mode adgen_dataset.py row)")
        if self.ignore_pad:
            labels = np.where(labels == special.pad, IGNORE_INDEX, labels)
        return input_ids, labels

    def texts_ids(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The prompt's and the answer's token ids of row `index`, without special tokens (to decode).

        Train mode: the ids before [gMASK] and those between <sop> and <eop>; eval mode: input_ids
        and labels without the padding and the final [gMASK] <sop>.
        """
        input_ids, labels = self.row(index)
        if self.mode == "eval":
            return input_ids[:-2], labels[labels != IGNORE_INDEX][:-2]
        special = self.special
        gmask = int(np.nonzero(input_ids == special.gmask)[0][0])
        context = int(np.nonzero(input_ids == special.bos)[0][0])
        answer = input_ids[context + 1:]
        return input_ids[:gmask], answer[:-1] if answer[-1:].tolist() == [special.eos] else answer

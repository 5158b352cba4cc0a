"""Offline data: `preprocess` writes a jsonl file's encoded rows once, `EncodedDataset` memory-maps them,
and `load_dataset` opens a jsonl file, such a folder (see glm6b.data.adgen for the layout) or a
MindFormers ADGEN MindRecord file (`MindRecordDataset`, see glm6b.data.adgen_mindrecord)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from array import array
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig, DataError
from ..io import atomic_write, atomic_write_text
from .adgen import (ENCODED_ARRAYS, FORMAT, META_NAME, Example, JsonlDataset, Mode, ReadStats, RowDataset, as_row,
                    check_mode, encode_example, iter_examples, special_ids_of)
from .adgen_mindrecord import AdgenMindRecord, SpecialIds, write_adgen_mindrecord
from .mindrecord import is_mindrecord


class EncodedDataset(RowDataset):
    """Offline data: the arrays written by `preprocess`, memory-mapped.

    Args:
        folder: the output folder of `preprocess`.
        config: if given, its lengths/columns/prefix must equal those recorded in meta.json (a
            stale cache is an error), and its dynamic_padding is used for batching.
        tokenizer: if given, the sha256 of its model file must equal the recorded one.

    Raises:
        DataError: missing/corrupt files, or settings that differ from the recorded ones.
    """

    def __init__(self, folder: str | os.PathLike, config: DataConfig | None = None, tokenizer=None):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        recorded = DataConfig(**self.meta["data"])
        if config is not None:
            for key in ("max_source_length", "max_target_length", "prompt_column", "response_column",
                        "history_column", "source_prefix", "ignore_pad_token_for_loss"):
                if getattr(config, key) != getattr(recorded, key):
                    raise DataError(f"{self.folder / META_NAME}: the rows were built with {key}="
                                    f"{getattr(recorded, key)!r} but this run asks for {getattr(config, key)!r}; "
                                    f"run `glm6b preprocess` again with the new setting")
            recorded.dynamic_padding = config.dynamic_padding
        if tokenizer is not None and _file_sha256(tokenizer.vocab_file) != self.meta["tokenizer"]["sha256"]:
            raise DataError(f"{self.folder / META_NAME}: the rows were encoded with another tokenizer model "
                            f"({self.meta['tokenizer']['path']}); run `glm6b preprocess` again")
        self.config = recorded
        self.mode = self.meta["mode"]
        self.special_ids = self.meta["special_ids"]
        arrays = {}
        for name in ENCODED_ARRAYS:
            try:
                arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"{self.folder / (name + '.npy')}: cannot read ({e})") from None
        self.input_ids, self.labels, self.offsets = arrays["input_ids"], arrays["labels"], arrays["offsets"]
        if self.offsets.shape != (self.meta["counts"]["rows"] + 1, 2) \
                or tuple(self.offsets[-1]) != (len(self.input_ids), len(self.labels)):
            raise DataError(f"{self.folder}: input_ids.npy, labels.npy and offsets.npy do not agree with "
                            f"meta.json (an interrupted or mixed write?); run `glm6b preprocess` again")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        (ids_start, labels_start), (ids_end, labels_end) = self.offsets[index], self.offsets[index + 1]
        return as_row(self.input_ids[ids_start:ids_end], self.labels[labels_start:labels_end])


class MindRecordDataset(RowDataset):
    """The rows of a MindFormers ADGEN MindRecord file (adgen_dataset.py's train or eval mode), read one at
    a time in glm6b's layout: a train file gives the rows glm6b builds from the same examples.

    Args:
        path: the file (any shard of a set, or its base name).
        tokenizer: the ChatGLMTokenizer the file was encoded with.
        config: batching settings (the file fixes the rows themselves).

    Raises:
        MindRecordError: not a MindRecord file of MindFormers' ADGEN layout, truncated or corrupt.
    """

    def __init__(self, path: str | os.PathLike, tokenizer, config: DataConfig):
        self.path = Path(path)
        self.rows = AdgenMindRecord(path, SpecialIds.of(tokenizer), config.ignore_pad_token_for_loss)
        self.mode = self.rows.mode
        self.config = config
        self.tokenizer = tokenizer
        self.special_ids = special_ids_of(tokenizer)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return as_row(*self.rows.row(index))

    @functools.cached_property
    def examples(self) -> list[Example]:
        """Each row's prompt and answer decoded back to text (what generation-based evaluation and
        predict take); `line` is the row number from 1. The ids decode without clean-up, so the
        prompt encodes back to the stored ids."""
        decode = functools.partial(self.tokenizer.decode, clean_up_tokenization_spaces=False)
        examples = []
        for index in range(len(self)):
            prompt, answer = self.rows.texts_ids(index)
            examples.append(Example(index + 1, decode(prompt), decode(answer)))
        return examples


def _file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a preprocessed folder.

    Raises:
        DataError: no meta.json, unreadable, or not written by `preprocess`.
    """
    path = Path(folder) / META_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: no {META_NAME}; is this a folder written by `glm6b preprocess`?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a glm6b preprocessed-data folder (expected format {FORMAT!r})")
    return meta


def _save_npy(path: Path, values: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, values)

    atomic_write(path, write)


def preprocess(tokenizer, input_path: str | os.PathLike, output_dir: str | os.PathLike, config: DataConfig,
               mode: Mode = "train", skip_bad: bool | None = None) -> dict[str, Any]:
    """Encode a jsonl file once into memory-mappable arrays (see the module docstring).

    Rows are stored unpadded. Every file is written atomically and meta.json last, so a folder with
    meta.json is complete.

    Args:
        tokenizer: a ChatGLMTokenizer (its model file's sha256 is recorded).
        input_path: the jsonl file.
        output_dir: the folder to write (created).
        config: lengths, columns, prefix, ignore_pad_token_for_loss.
        mode: "train" or "eval".
        skip_bad: skip and count malformed lines; None takes config.skip_bad.

    Returns:
        The meta dict written to meta.json (counts under "counts").

    Raises:
        DataError: as `iter_examples`.
    """
    check_mode(mode)
    input_path, output_dir = Path(input_path), Path(output_dir)
    stats = ReadStats()
    ids_out, labels_out, offsets = array("i"), array("i"), array("q", [0, 0])
    for ex in iter_examples(input_path, config, stats, skip_bad):
        input_ids, labels = encode_example(tokenizer, ex.prompt, ex.answer, config, mode)
        ids_out.extend(input_ids)
        labels_out.extend(labels)
        offsets.extend((len(ids_out), len(labels_out)))
    output_dir.mkdir(parents=True, exist_ok=True)
    meta_path = output_dir / META_NAME
    if meta_path.exists():
        meta_path.unlink()  # the folder is incomplete until the new meta.json lands
    _save_npy(output_dir / "input_ids.npy", np.frombuffer(ids_out, dtype=np.int32))
    _save_npy(output_dir / "labels.npy", np.frombuffer(labels_out, dtype=np.int32))
    _save_npy(output_dir / "offsets.npy", np.frombuffer(offsets, dtype=np.int64).reshape(-1, 2))
    data = asdict(config)
    for key in ("train_data", "eval_data", "dynamic_padding", "skip_bad"):
        data.pop(key)
    meta = {
        "format": FORMAT,
        "mode": mode,
        "source": {"path": str(input_path), "sha256": _file_sha256(input_path)},
        "tokenizer": {"path": str(tokenizer.vocab_file), "sha256": _file_sha256(tokenizer.vocab_file)},
        "special_ids": special_ids_of(tokenizer),
        "data": data,
        "counts": {"lines": stats.lines, "rows": stats.rows, "skipped_empty": stats.skipped_empty,
                   "skipped_bad": stats.skipped_bad, "tokens": len(ids_out)},
        "bad_lines": stats.bad_lines,
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def preprocess_mindrecord(tokenizer, input_path: str | os.PathLike, output_path: str | os.PathLike,
                          config: DataConfig, mode: Mode = "train", skip_bad: bool | None = None) -> dict[str, Any]:
    """Write a jsonl file's examples as the MindRecord file MindFormers' adgen_dataset.py writes (same
    schema, names, dtypes and shapes; see glm6b.data.adgen_mindrecord), for MindFormers or glm6b.

    Prompts are rendered as glm6b renders them (source_prefix, history_column). Train rows cut the
    prompt and answer by tokens, eval rows by characters, as adgen_dataset.py does.

    Args:
        tokenizer: a ChatGLMTokenizer.
        input_path: the jsonl file.
        output_path: the MindRecord file (and `<output>.db`), replaced atomically.
        config: lengths, columns, prefix, ignore_pad_token_for_loss.
        mode: "train" or "eval".
        skip_bad: skip and count malformed lines; None takes config.skip_bad.

    Returns:
        {"counts": {"lines", "rows", "skipped_empty", "skipped_bad"}, "bad_lines": [...]}.

    Raises:
        DataError: as `iter_examples`.
    """
    check_mode(mode)
    stats = ReadStats()
    examples = ((ex.prompt, ex.answer) for ex in iter_examples(input_path, config, stats, skip_bad))
    write_adgen_mindrecord(output_path, examples, tokenizer, mode, config.max_source_length, config.max_target_length,
                           config.ignore_pad_token_for_loss)
    return {"counts": {"lines": stats.lines, "rows": stats.rows, "skipped_empty": stats.skipped_empty,
                       "skipped_bad": stats.skipped_bad}, "bad_lines": stats.bad_lines}


def load_dataset(path: str | os.PathLike, tokenizer, config: DataConfig, mode: Mode = "train") -> RowDataset:
    """A dataset from a jsonl file (online encoding), a preprocessed folder or a MindRecord file (memory-mapped).

    Args:
        path: jsonl file, folder written by `preprocess`, or MindFormers ADGEN MindRecord file.
        tokenizer: a ChatGLMTokenizer.
        config: the data settings; a preprocessed folder must have been built with the same ones.
        mode: "train" or "eval"; a preprocessed folder must hold rows of that mode.

    Returns:
        A RowDataset.

    Raises:
        DataError: unreadable data, malformed lines, or a folder built with other settings.
    """
    path = Path(path)
    if is_mindrecord(path):
        dataset = MindRecordDataset(path, tokenizer, config)
        if dataset.mode != mode:
            raise DataError(f"{path}: holds MindFormers {dataset.mode}-mode rows but {mode!r} rows are needed here; "
                            f"write the file with `glm6b preprocess --format mindrecord --mode {mode}`")
        return dataset
    if path.is_dir():
        dataset = EncodedDataset(path, config, tokenizer)
        if dataset.mode != mode:
            raise DataError(f"{path}: holds {dataset.mode!r} rows but {mode!r} rows are needed here; "
                            f"run `glm6b preprocess --mode {mode}`")
        return dataset
    return JsonlDataset(path, tokenizer, config, mode)

"""MindSpore `.ckpt` files (what MindFormers reads and writes) without MindSpore, and the one
MindFormers <-> HF name map for ChatGLM-6B.

The format is MindSpore's `checkpoint.proto` (proto2):

    message Checkpoint { message Value { required string tag = 1;
                                         oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
                         repeated Value value = 1; }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }

MindSpore writes one serialized one-value `Checkpoint` per chunk and concatenates them, so a file is a
run of records `0x0A <varint length> <Value>`. A tensor larger than 512 MiB is split into byte
chunks: consecutive records with the same tag, each repeating the full dims. `tensor_content` is the
raw little-endian row-major data; a scalar has no dims (older files: dims [0]); a string is stored
as dims [0], type "str" and UCS-4 (UTF-32-LE) bytes. `save_checkpoint(..., crc_check=True)` appends
a trailer: b"crc_num" and the CRC32 of everything before it as a 10-byte big-endian integer. A file
saved with `enc_key` is encrypted as a whole and starts with a 4-byte magic (xx 5e 3a 7f).

The wire format is parsed here by hand (a varint and a length per field) on a memory-mapped file, one
record at a time: a 12.5 GB checkpoint is never read whole, each tensor is copied once into its own
memory, and skipped entries are never copied. These facts were checked against files written by
`mindspore.save_checkpoint` 2.10.0 (tests/test_mindspore.py does so again where MindSpore is installed).

MindFormers' ChatGLM-6B names are the HF names with the word embeddings called `embedding_table` and
the LayerNorm weight/bias called `gamma`/`beta` (`NAME_MAP`); its LoRA (MindPet `LoRADense`) adds
`<layer>.mindpet_delta_lora_a` [r, in] and `<layer>.mindpet_delta_lora_b` [out, r] to an adapted layer.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ..config import ChatGLMConfig
from ..io import atomic_path
from ..model import ChatGLMForConditionalGeneration
from .errors import CheckpointError

logger = logging.getLogger(__name__)

CKPT_SUFFIX = ".ckpt"
# MindSpore's slice size: a tensor's bytes are written in chunks of at most this many.
CHUNK_BYTES = 512 * 1024 * 1024
CRC_MARK = b"crc_num"
_CRC_TRAILER = len(CRC_MARK) + 10
_ENCRYPTED_MAGIC = b"\x5e\x3a\x7f"  # bytes 1..3 of an encrypted file (byte 0 names the cipher)

# tensor_type -> torch dtype, for every type MindSpore writes ("str" and "Int4" are handled apart).
DTYPES: dict[str, torch.dtype] = {
    "Float32": torch.float32, "Float16": torch.float16, "BFloat16": torch.bfloat16, "Float64": torch.float64,
    "Int8": torch.int8, "UInt8": torch.uint8, "Int16": torch.int16, "UInt16": torch.uint16,
    "Int32": torch.int32, "UInt32": torch.uint32, "Int64": torch.int64, "UInt64": torch.uint64,
    "Bool": torch.bool,
}
TYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
STRING_TYPE = "str"

# ----------------------------------------------------------------------------------- the name map

# (HF name, MindFormers name) for ChatGLM-6B; "{}" stands for a layer index. The one table both
# directions read: a name that matches no row is not a model tensor of either layout.
NAME_MAP: tuple[tuple[str, str], ...] = (
    ("transformer.word_embeddings.weight", "transformer.word_embeddings.embedding_table"),
    ("transformer.layers.{}.input_layernorm.weight", "transformer.layers.{}.input_layernorm.gamma"),
    ("transformer.layers.{}.input_layernorm.bias", "transformer.layers.{}.input_layernorm.beta"),
    ("transformer.layers.{}.attention.rotary_emb.inv_freq", "transformer.layers.{}.attention.rotary_emb.inv_freq"),
    ("transformer.layers.{}.attention.query_key_value.weight", "transformer.layers.{}.attention.query_key_value.weight"),
    ("transformer.layers.{}.attention.query_key_value.bias", "transformer.layers.{}.attention.query_key_value.bias"),
    ("transformer.layers.{}.attention.dense.weight", "transformer.layers.{}.attention.dense.weight"),
    ("transformer.layers.{}.attention.dense.bias", "transformer.layers.{}.attention.dense.bias"),
    ("transformer.layers.{}.post_attention_layernorm.weight", "transformer.layers.{}.post_attention_layernorm.gamma"),
    ("transformer.layers.{}.post_attention_layernorm.bias", "transformer.layers.{}.post_attention_layernorm.beta"),
    ("transformer.layers.{}.mlp.dense_h_to_4h.weight", "transformer.layers.{}.mlp.dense_h_to_4h.weight"),
    ("transformer.layers.{}.mlp.dense_h_to_4h.bias", "transformer.layers.{}.mlp.dense_h_to_4h.bias"),
    ("transformer.layers.{}.mlp.dense_4h_to_h.weight", "transformer.layers.{}.mlp.dense_4h_to_h.weight"),
    ("transformer.layers.{}.mlp.dense_4h_to_h.bias", "transformer.layers.{}.mlp.dense_4h_to_h.bias"),
    ("transformer.final_layernorm.weight", "transformer.final_layernorm.gamma"),
    ("transformer.final_layernorm.bias", "transformer.final_layernorm.beta"),
    ("lm_head.weight", "lm_head.weight"),
)
# MindPet LoRA tensors (suffix of the adapted layer's name) and PEFT's names for the same tensors.
MINDPET_LORA_A, MINDPET_LORA_B = "mindpet_delta_lora_a", "mindpet_delta_lora_b"
PEFT_PREFIX = "base_model.model."
_MINDPET_RE = re.compile(r"^(.+)\.mindpet_delta_lora_([ab])$", re.IGNORECASE)  # some MindPet versions write A/B
_PEFT_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


_TO_HF = [(_pattern(ms), hf) for hf, ms in NAME_MAP]
_TO_MS = [(_pattern(hf), ms) for hf, ms in NAME_MAP]


def _rename(name: str, table) -> str | None:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.replace("{}", match.group(1)) if match.groups() else template
    return None


def to_hf_name(name: str) -> str | None:
    """The HF name of a MindFormers ChatGLM-6B tensor name, or None if `NAME_MAP` has no row for it."""
    return _rename(name, _TO_HF)


def to_hf_name_or_same(name: str) -> str:
    """`to_hf_name`, keeping a name without a row as it is (so a loader reports it under its own name)."""
    return to_hf_name(name) or name


def to_mindformers_name(name: str) -> str | None:
    """The MindFormers name of an HF ChatGLM-6B tensor name, or None if `NAME_MAP` has no row for it."""
    return _rename(name, _TO_MS)


def _module_to_hf(module: str) -> str | None:
    hf = to_hf_name(module + ".weight")
    return hf[: -len(".weight")] if hf is not None and hf.endswith(".weight") else None


def _module_to_mindformers(module: str) -> str | None:
    ms = to_mindformers_name(module + ".weight")
    return ms[: -len(".weight")] if ms is not None and ms.endswith(".weight") else None


def mindpet_to_peft_name(name: str) -> str | None:
    """`<layer>.mindpet_delta_lora_a|b` -> PEFT's `base_model.model.<layer>.lora_A|B.weight` (None: not MindPet)."""
    match = _MINDPET_RE.match(name)
    module = _module_to_hf(match.group(1)) if match else None
    return None if module is None else f"{PEFT_PREFIX}{module}.lora_{match.group(2).upper()}.weight"


def peft_to_mindpet_name(name: str) -> str | None:
    """PEFT's `base_model.model.<layer>.lora_A|B.weight` -> `<layer>.mindpet_delta_lora_a|b` (None: not PEFT LoRA)."""
    match = _PEFT_RE.match(name)
    module = _module_to_mindformers(match.group(1)) if match else None
    return None if module is None else f"{module}.mindpet_delta_lora_{match.group(2).lower()}"


def is_lora_entry(name: str) -> bool:
    """True for a MindPet LoRA tensor name (`...mindpet_delta_lora_a` / `_b`)."""
    return _MINDPET_RE.match(name) is not None


def is_model_entry(name: str) -> bool:
    """True for a network parameter; False for optimizer state and other training entries
    (`adam_m.*`, `adam_v.*`, `global_step`, `learning_rate`, `scale_sense`, ...)."""
    return name.startswith(("transformer.", "lm_head."))


def mindformers_dtype(hf_name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype MindFormers' convert_weight.py stores `hf_name` in when converting to `dtype`
    (it always casts `input_layernorm` to float16)."""
    return torch.float16 if ".input_layernorm." in hf_name and dtype.is_floating_point else dtype


# ----------------------------------------------------------------------------------- the wire format


def is_ckpt_file(path: str | os.PathLike) -> bool:
    """True if `path` names a MindSpore checkpoint file (by its `.ckpt` suffix; it need not exist)."""
    return Path(path).suffix == CKPT_SUFFIX


class _Corrupt(Exception):
    """A malformed byte sequence at a known offset (turned into a CheckpointError with the path)."""


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Corrupt("a length or number runs past the end of its record")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Corrupt("a varint is longer than 10 bytes")


def _skip_field(buf, pos: int, end: int, wire_type: int) -> int:
    if wire_type == 0:
        return _read_varint(buf, pos, end)[1]
    if wire_type == 1:
        pos += 8
    elif wire_type == 2:
        length, pos = _read_varint(buf, pos, end)
        pos += length
    elif wire_type == 5:
        pos += 4
    else:
        raise _Corrupt(f"unexpected protobuf wire type {wire_type}")
    if pos > end:
        raise _Corrupt("a field runs past the end of its record")
    return pos


def _fields(buf, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field of the message in buf[pos:end]; for wire
    type 2 the span is the payload, for wire type 0 start is the value and end is unused."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, start = _read_varint(buf, pos, end)
            pos = start + length
            if pos > end:
                raise _Corrupt(f"field {field} claims {length} bytes, more than its record holds")
            yield field, wire_type, start, pos
        elif wire_type == 0:
            value, pos = _read_varint(buf, pos, end)
            yield field, wire_type, value, pos
        else:
            pos = _skip_field(buf, pos, end, wire_type)


@dataclass
class _Record:
    offset: int  # of the record in the file
    tag: str
    dims: list[int]
    tensor_type: str
    content: tuple[int, int]  # span of tensor_content in the file


def _parse_value(buf, start: int, end: int, offset: int) -> _Record:
    tag = tensor = None
    for field, wire_type, a, b in _fields(buf, start, end):
        if field == 1 and wire_type == 2:
            tag = bytes(buf[a:b]).decode("utf-8", errors="replace")
        elif field == 2 and wire_type == 2:
            tensor = (a, b)
        elif field == 3 and wire_type == 2:
            raise _Corrupt(f"entry {tag or '?'} is a MapParameter (maptensor), which glm6b does not read")
    if tag is None or tensor is None:
        raise _Corrupt("a record without a tag or a tensor")
    dims: list[int] = []
    tensor_type = content = None
    for field, wire_type, a, b in _fields(buf, *tensor):
        if field == 1 and wire_type == 0:
            dims.append(a)
        elif field == 1 and wire_type == 2:  # packed dims
            pos = a
            while pos < b:
                value, pos = _read_varint(buf, pos, b)
                dims.append(value)
        elif field == 2 and wire_type == 2:
            tensor_type = bytes(buf[a:b]).decode("utf-8", errors="replace")
        elif field == 3 and wire_type == 2:
            content = (a, b)
    if tensor_type is None or content is None:
        raise _Corrupt(f"entry {tag} has no tensor_type or no tensor_content")
    if any(d >= 2**63 for d in dims):
        raise _Corrupt(f"entry {tag} has a negative dimension")
    return _Record(offset, tag, dims, tensor_type, content)


def _check_start(path: Path, head: bytes) -> None:
    if head[:1] == b"\x0a":
        return
    if head[1:4] == _ENCRYPTED_MAGIC:
        raise CheckpointError(f"{path} is an encrypted MindSpore checkpoint (saved with enc_key); glm6b cannot read "
                              f"encrypted files: decrypt it with MindSpore first (mindspore.load_checkpoint(path, "
                              f"dec_key=...) then mindspore.save_checkpoint(params, new_path) without enc_key)")
    raise CheckpointError(f"{path} is not a MindSpore checkpoint (it does not start with a checkpoint record; "
                          f"first bytes {head[:8].hex(' ')})")


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[tuple[mmap.mmap, memoryview]]:
    if not path.is_file():
        raise CheckpointError(f"MindSpore checkpoint {path} not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (not a MindSpore checkpoint)")
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    try:
        yield mapped, view
    finally:
        with contextlib.suppress(BufferError):  # a slice still held somewhere: the GC closes the map
            view.release()
            mapped.close()


def _records(path: Path, view: memoryview, check_crc: bool) -> Iterator[_Record]:
    """Every record of the file in order; with check_crc the CRC trailer (if any) is verified after
    the last record (a mismatch raises before the iteration ends)."""
    size = len(view)
    _check_start(path, bytes(view[:8]))
    end, stored_crc = size, None
    if size >= _CRC_TRAILER and bytes(view[size - _CRC_TRAILER:size - 10]) == CRC_MARK:
        end, stored_crc = size - _CRC_TRAILER, int.from_bytes(view[size - 10:], "big")
    crc, pos = 0, 0
    while pos < end:
        offset = pos
        try:
            if view[pos] != 0x0A:
                raise _Corrupt(f"expected a checkpoint record (byte 0x0a), found 0x{view[pos]:02x}")
            length, start = _read_varint(view, pos + 1, end)
            if start + length > end:
                raise CheckpointError(f"{path} is truncated: the record at byte {offset} needs {length} bytes, "
                                      f"only {end - start} remain")
            record = _parse_value(view, start, start + length, offset)
        except _Corrupt as e:
            raise CheckpointError(f"{path} is corrupt at byte {offset}: {e}") from None
        pos = start + length
        if check_crc and stored_crc is not None:
            crc = zlib.crc32(view[offset:pos], crc)
        yield record
    if check_crc and stored_crc is not None and crc != stored_crc:
        raise CheckpointError(f"{path} is corrupt: its CRC32 is {crc}, the trailer says {stored_crc}")


@dataclass(frozen=True)
class CkptEntry:
    """One entry of a checkpoint, as described by its record headers.

    Attributes:
        name: the tag.
        tensor_type: MindSpore's type name ("Float16", ..., "str").
        shape: the dims (() for a scalar or a string).
        nbytes: the stored data size (all chunks).
        chunks: how many records hold it.
    """

    name: str
    tensor_type: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: int


def _shape(record: _Record) -> tuple[int, ...]:
    # MindSpore reads dims [0] as a scalar (older writers stored scalars and strings that way)
    return () if record.dims == [0] else tuple(record.dims)


def scan_ckpt(path: str | os.PathLike) -> list[CkptEntry]:
    """List the entries of a checkpoint from their record headers (no tensor data is read or checked).

    Args:
        path: the `.ckpt` file.

    Returns:
        The entries in file order, chunks merged.

    Raises:
        CheckpointError: missing, encrypted, truncated or malformed file.
    """
    path = Path(path)
    entries: list[CkptEntry] = []
    with _mapped(path) as (_, view):
        for record in _records(path, view, check_crc=False):
            size = record.content[1] - record.content[0]
            last = entries[-1] if entries else None
            if last is not None and last.name == record.tag:
                entries[-1] = CkptEntry(last.name, last.tensor_type, last.shape, last.nbytes + size, last.chunks + 1)
            else:
                entries.append(CkptEntry(record.tag, record.tensor_type, _shape(record), size, 1))
    return entries


def iter_ckpt(path: str | os.PathLike, skip: Callable[[str], bool] | None = None,
              check_crc: bool = True) -> Iterator[tuple[str, torch.Tensor | str]]:
    """Yield (name, value) for every entry of a MindSpore checkpoint, value by value.

    Each tensor is assembled from its chunks into one CPU tensor that owns its memory (the file is
    memory-mapped, never read whole); a string entry is yielded as a str, a scalar as a 0-d tensor.

    Args:
        path: the `.ckpt` file.
        skip: names for which this returns True are not copied (nor type-checked).
        check_crc: verify the CRC trailer if the file has one; a mismatch raises after the last
            entry, so consume the whole iterator before trusting what it gave.

    Raises:
        CheckpointError: missing, empty, encrypted, truncated or corrupt file (the message gives the
            byte offset), an unknown tensor_type, data that does not fit the dims, a name that
            appears twice, or a CRC mismatch.
    """
    for name, value in _iter_entries(Path(path), skip or (lambda name: False), check_crc):
        if value is not None:
            yield name, value


def _iter_entries(path: Path, skip: Callable[[str], bool], check_crc: bool) -> Iterator[tuple[str, Any]]:
    """(name, value) for every entry; (name, None) for skipped ones."""
    with _mapped(path) as (mapped, view):
        seen: set[str] = set()
        current: _Pending | None = None
        released = 0
        for record in _records(path, view, check_crc):
            # pages of records already copied leave this process (they stay in the page cache)
            released = _release_pages(mapped, released, record.offset)
            if current is not None and record.tag == current.name:  # the next chunk of the same tensor
                if record.dims != current.dims or record.tensor_type != current.tensor_type:
                    raise CheckpointError(f"{path}: entry {record.tag} changes its dims or type between chunks "
                                          f"(byte {record.offset})")
            else:
                if current is not None:
                    yield current.name, current.finish()
                if record.tag in seen:
                    raise CheckpointError(f"{path}: entry {record.tag} appears twice (again at byte {record.offset})")
                seen.add(record.tag)
                current = _Pending(path, record, skip(record.tag))
            chunk = view[record.content[0]:record.content[1]]
            current.add(chunk, record.offset)
            chunk.release()
        if current is not None:
            yield current.name, current.finish()


def _release_pages(mapped: mmap.mmap, start: int, end: int) -> int:
    """Drop the mapping's pages in [start, end) (whole pages only); returns the new start."""
    end -= end % mmap.PAGESIZE
    if end > start and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
        return end
    return start


class _Pending:
    """One entry being assembled from its chunks: a tensor's bytes go straight into its own memory."""

    def __init__(self, path: Path, record: _Record, skipped: bool):
        self.path, self.name, self.dims, self.tensor_type = path, record.tag, record.dims, record.tensor_type
        self.skipped, self.filled = skipped, 0
        self.parts: list[bytes] | None = None  # a string's bytes
        self.data: torch.Tensor | None = None  # a tensor's bytes (uint8), preallocated from the dims
        if skipped:
            return
        if self.tensor_type == STRING_TYPE:
            self.parts = []
            return
        if self.tensor_type not in DTYPES:
            known = ", ".join([*DTYPES, STRING_TYPE])
            raise CheckpointError(f"{path}: entry {self.name} has tensor_type {self.tensor_type!r}, which glm6b "
                                  f"does not read (known: {known})")
        self.shape, self.dtype = _shape(record), DTYPES[self.tensor_type]
        self.data = torch.empty(int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize, dtype=torch.uint8)

    def add(self, chunk: memoryview, offset: int) -> None:
        size = len(chunk)
        if self.parts is not None:
            self.parts.append(bytes(chunk))
        elif self.data is not None:
            if self.filled + size > self.data.numel():
                raise CheckpointError(f"{self.path}: entry {self.name} holds more than {self.data.numel()} bytes, "
                                      f"the size of shape {list(self.shape)} {self.tensor_type} (byte {offset})")
            self.data[self.filled:self.filled + size].numpy()[:] = np.frombuffer(chunk, dtype=np.uint8)
        self.filled += size

    def finish(self) -> torch.Tensor | str | None:
        if self.skipped:
            return None
        if self.parts is not None:
            try:
                return b"".join(self.parts).decode("utf-32-le").rstrip("\x00")
            except UnicodeDecodeError:
                raise CheckpointError(f"{self.path}: string entry {self.name} is not UCS-4 text") from None
        if self.filled != self.data.numel():
            raise CheckpointError(f"{self.path}: entry {self.name} has {self.filled} bytes, expected "
                                  f"{self.data.numel()} for shape {list(self.shape)} {self.tensor_type}: the file "
                                  f"is truncated or corrupt")
        return self.data.view(self.dtype).reshape(self.shape)


class CkptReader:
    """A `.ckpt` file memory-mapped and indexed by its record headers, so that entries are read by name
    in any order (what merging the ranks of a sharded set needs: one parameter from every file at a time).

    Only the record headers are read on opening; an entry's bytes are copied when it is read, and its
    pages then leave this process. The CRC trailer is not checked (that needs every byte of the file).

    Args:
        path: the `.ckpt` file.

    Attributes:
        path: the file.
        entries: name -> CkptEntry, in file order.

    Raises:
        CheckpointError: missing, empty, encrypted, truncated or malformed file; a name that appears twice.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._context = _mapped(self.path)
        self._map, self._view = self._context.__enter__()
        self._records: dict[str, list[_Record]] = {}
        try:
            last = None
            for record in _records(self.path, self._view, check_crc=False):
                if record.tag != last and record.tag in self._records:
                    raise CheckpointError(f"{self.path}: entry {record.tag} appears twice (again at byte "
                                          f"{record.offset})")
                self._records.setdefault(record.tag, []).append(record)
                last = record.tag
        except BaseException:
            self.close()
            raise
        self.entries = {
            name: CkptEntry(name, records[0].tensor_type, _shape(records[0]),
                            sum(r.content[1] - r.content[0] for r in records), len(records))
            for name, records in self._records.items()}

    def __enter__(self) -> "CkptReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the file."""
        self._context.__exit__(None, None, None)

    def read(self, name: str) -> torch.Tensor | str:
        """The value of entry `name`, as `iter_ckpt` gives it (a tensor owning its memory, or a str).

        Raises:
            KeyError: no such entry.
            CheckpointError: an unknown tensor_type, chunks that disagree, or data that does not fit the dims.
        """
        records = self._records[name]
        pending = _Pending(self.path, records[0], skipped=False)
        for record in records:
            if record.dims != records[0].dims or record.tensor_type != records[0].tensor_type:
                raise CheckpointError(f"{self.path}: entry {name} changes its dims or type between chunks "
                                      f"(byte {record.offset})")
            chunk = self._view[record.content[0]:record.content[1]]
            pending.add(chunk, record.offset)
            chunk.release()
        value = pending.finish()
        for record in records:
            _release_range(self._map, record.offset, record.content[1])
        return value


def _release_range(mapped: mmap.mmap, start: int, end: int) -> None:
    """Drop the mapping's pages around [start, end) from this process (they stay in the page cache)."""
    first = start - start % mmap.PAGESIZE
    if end > first and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED, first, end - first)


# ----------------------------------------------------------------------------------- writing


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _as_bytes_view(value: torch.Tensor | str | bool | int | float) -> tuple[list[int], str, memoryview]:
    """(dims, tensor_type, raw bytes) as MindSpore stores the value."""
    if isinstance(value, str):
        return [0], STRING_TYPE, memoryview(np.array(value).tobytes())  # numpy's UCS-4, as MindSpore writes it
    if isinstance(value, bool):
        value = torch.tensor(value)
    elif isinstance(value, int):
        value = torch.tensor(value, dtype=torch.int64)
    elif isinstance(value, float):
        value = torch.tensor(value, dtype=torch.float32)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"cannot store a {type(value).__name__} in a MindSpore checkpoint")
    if value.dtype not in TYPE_NAMES:
        raise TypeError(f"MindSpore checkpoints have no {value.dtype} type")
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    return list(value.shape), TYPE_NAMES[value.dtype], memoryview(raw.numpy())


def _write_entry(f, name: str, value, chunk_bytes: int, crc: int) -> int:
    dims, tensor_type, raw = _as_bytes_view(value)
    head = b"".join(_varint(1 << 3 | 0) + _varint(d) for d in dims) + _field(2, tensor_type.encode())
    tag = _field(1, name.encode("utf-8"))
    starts = range(0, len(raw), chunk_bytes) if len(raw) else [0]
    for start in starts:
        chunk = raw[start:start + chunk_bytes]
        content_head = _varint(3 << 3 | 2) + _varint(len(chunk))
        tensor_len = len(head) + len(content_head) + len(chunk)
        value_head = tag + _varint(2 << 3 | 2) + _varint(tensor_len)
        record_head = b"\x0a" + _varint(len(value_head) + tensor_len) + value_head + head + content_head
        f.write(record_head)
        f.write(chunk)
        crc = zlib.crc32(chunk, zlib.crc32(record_head, crc))
    return crc


def save_ckpt(path: str | os.PathLike, entries: Iterable[tuple[str, torch.Tensor | str | bool | int | float]],
              crc_check: bool = False, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Write a MindSpore checkpoint, entry by entry, atomically.

    The bytes are those `mindspore.save_checkpoint` writes for the same tensors: records in the
    given order, tensors split into byte chunks of `chunk_bytes`, strings as UCS-4, Python scalars
    as 0-d Int64 / Float32 / Bool tensors.

    Args:
        path: the `.ckpt` file to write (replaced if it exists).
        entries: (name, value) pairs; values are CPU or GPU tensors of a dtype in `TYPE_NAMES`, str,
            bool, int or float. Consumed lazily: only one tensor needs to exist at a time.
        crc_check: append the CRC32 trailer (MindSpore >= 2.3 reads it; older versions cannot parse it).
        chunk_bytes: largest tensor_content per record (MindSpore's is 512 MiB).

    Returns:
        The number of entries written.

    Raises:
        TypeError: a value of a type MindSpore checkpoints cannot hold.
    """
    count, crc = 0, 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for name, value in entries:
            crc = _write_entry(f, name, value, chunk_bytes, crc)
            count += 1
        if crc_check:
            f.write(CRC_MARK + crc.to_bytes(10, "big"))
    return count


# ----------------------------------------------------------------------------------- loading support


def iter_model_tensors(path: str | os.PathLike,
                       skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (MindFormers name, tensor) for the network parameters of a `.ckpt` file.

    Optimizer state and other training entries (see `is_model_entry`) are skipped without being
    read and counted in one log line. Names are as stored: map them with `to_hf_name`.

    Args:
        path: the `.ckpt` file.
        skip: further (MindFormers) names not to read.

    Raises:
        CheckpointError: see `iter_ckpt`; also a network entry that is not a tensor.
    """
    path = Path(path)
    other: list[str] = []

    def skip_entry(name: str) -> bool:
        if not is_model_entry(name):
            other.append(name)
            return True
        return skip is not None and skip(name)

    for name, value in iter_ckpt(path, skip_entry):
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name} is a string, expected a tensor")
        yield name, value
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        logger.warning("%s: skipped %d optimizer-state / training entries (%s)", path, len(other), shown)


def ckpt_config(path: str | os.PathLike, config: ChatGLMConfig | str | os.PathLike | None = None,
                strict: bool = True) -> ChatGLMConfig:
    """The model config for a `.ckpt` file, after checking that the file is one whole ChatGLM-6B network.

    The config is `config` if given (a ChatGLMConfig or a config.json path), else the config.json
    beside the file, else the built-in `glm_6b` preset.

    Args:
        path: the `.ckpt` file.
        config: see above.
        strict: refuse MindPet LoRA tensors (they would be dropped); with False they are left to the
            loader, which ignores tensors the model does not have.

    Returns:
        The config.

    Raises:
        CheckpointError: unreadable file; no network tensors; one rank's shard of a model-parallel
            run; LoRA tensors with strict.
        ConfigError: unusable config.json.
    """
    path = Path(path)
    resolved = resolve_config(config, path.parent)
    check_network_entries(path, scan_ckpt(path), resolved, strict)
    return resolved


def resolve_config(config: ChatGLMConfig | str | os.PathLike | None, folder: Path) -> ChatGLMConfig:
    """`config` itself (a ChatGLMConfig or a config.json path), else `folder`/config.json, else the glm_6b preset.

    Raises:
        ConfigError: unusable config.json.
    """
    if isinstance(config, ChatGLMConfig):
        return config
    if config is not None:
        return ChatGLMConfig.from_json_file(config)
    if (folder / "config.json").is_file():
        return ChatGLMConfig.from_json_file(folder / "config.json")
    return ChatGLMConfig.from_name("glm_6b")


def check_network_entries(where: Path, entries: Iterable[CkptEntry], config: ChatGLMConfig, strict: bool = True,
                          whole: bool = True) -> None:
    """Check that `entries` are one ChatGLM-6B network of `config`'s shape (see `ckpt_config`).

    Args:
        where: the file (or folder) to name in errors.
        entries: its entries.
        config: the model config.
        strict: refuse MindPet LoRA tensors.
        whole: the entries come from one file (so weights cut along one dim mean one rank's shard).

    Raises:
        CheckpointError: no network tensors; one rank's shard; LoRA tensors with strict.
    """
    entries = {e.name: e for e in entries}
    model_entries = [e for e in entries.values() if is_model_entry(e.name)]
    if not model_entries:
        raise CheckpointError(f"{where} holds no ChatGLM-6B network tensors (no transformer.* entries; found "
                              f"{', '.join(list(entries)[:3]) or 'nothing'})")
    expected = expected_shapes(config)
    mismatched = [(entry, expected[hf]) for entry in model_entries
                  if (hf := to_hf_name(entry.name)) in expected and entry.shape != expected[hf]]
    # a shard cuts some weights k ways along one dim and leaves the rest whole; other mismatches
    # (e.g. a config for another model size) are left to the loader, which names the tensor
    if whole and mismatched and all(_is_slice_of(entry.shape, whole) for entry, whole in mismatched):
        entry, full = mismatched[0]
        raise CheckpointError(
            f"{where} looks like one rank's shard of a model-parallel MindFormers run ({entry.name} is "
            f"{list(entry.shape)}, the whole model's is {list(full)}): load the folder holding rank_*/ with its "
            f"strategy file beside it (ckpt_strategy.ckpt), or merge it into an HF folder with `glm6b convert "
            f"--input FOLDER --strategy STRATEGY_FILE --output HF_DIR`")
    lora = [e.name for e in model_entries if is_lora_entry(e.name)]
    if lora and strict:
        raise CheckpointError(
            f"{where} holds {len(lora)} MindPet LoRA tensors ({lora[0]}, ...): convert it into a base model and a "
            f"PEFT adapter with `glm6b convert --input {where} --output BASE_DIR --adapter-output ADAPTER_DIR "
            f"--lora-alpha A`, then load BASE_DIR with --adapter ADAPTER_DIR (or merge it with glm6b merge-lora)")


def expected_shapes(config: ChatGLMConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape of the model `config` describes (built on the meta device)."""
    model = ChatGLMForConditionalGeneration(config, device="meta")
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


def _is_slice_of(shape: tuple[int, ...], whole: tuple[int, ...]) -> bool:
    """True if `shape` is `whole` cut into k > 1 equal parts along exactly one dim (a model-parallel shard)."""
    if len(shape) != len(whole) or shape == whole:
        return False
    differ = [(a, b) for a, b in zip(shape, whole) if a != b]
    return len(differ) == 1 and 0 < differ[0][0] < differ[0][1] and differ[0][1] % differ[0][0] == 0


def lora_rank(entries: Iterable[CkptEntry]) -> int | None:
    """The LoRA rank of a checkpoint's MindPet tensors (the first dim of `mindpet_delta_lora_a`), or None.

    Raises:
        CheckpointError: the adapted layers do not share one rank.
    """
    ranks = {e.shape[0] for e in entries if e.name.lower().endswith(MINDPET_LORA_A) and len(e.shape) == 2}
    if len(ranks) > 1:
        raise CheckpointError(f"the MindPet LoRA tensors have different ranks {sorted(ranks)}; expected one")
    return ranks.pop() if ranks else None

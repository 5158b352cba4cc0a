"""MindRecord files (MindSpore's dataset format, what MindFormers' `adgen_dataset.py` writes), read and
written without MindSpore.

A MindRecord set is one shard file or several (`file0 ... fileN-1`, `FileWriter(file, N)`), each with
an SQLite index beside it (`<shard>.db`). The layout, as `mindspore.mindrecord.FileWriter` 2.10 writes
it (checked against its files by tests/test_mindrecord.py):

* A shard file starts with its header: an 8-byte little-endian length, then that many bytes of JSON
  (`header_size`, `index_fields`, `page`, `page_size`, `compression_size`, `schema`,
  `shard_addresses`, `shard_id`, `statistics`, `version`). The header region is `header_size` bytes
  (16 MiB by default); page p starts at `header_size + p * page_size` (32 MiB pages). Every page but
  the last is padded to `page_size`; the last one ends the file. A set with no rows is the header alone.
* `header["page"]` lists the pages: BLOB_DATA pages hold rows `start_row_id` to `end_row_id`
  (exclusive), in `page_type_id` order; RAW_DATA pages hold the same rows' scalar fields, in page
  order. A row never spans two pages.
* A row in a blob page: 8-byte little-endian length, then its blob fields (the schema's
  `blob_fields`, arrays and bytes, in name order), each as an 8-byte big-endian length and its bytes;
  with a single blob field the field's bytes follow directly. Bytes are stored as they are. An int32 /
  int64 array is compressed: a 4-byte big-endian element count, 2 bits per element (first element in
  the high bits of the first byte) giving its width (0: 1 byte, 1: 2, 2: 4, 3: 8), then each element
  little-endian and signed in its width. Floats are raw little-endian.
* A row in a raw page: 8-byte little-endian length, then a msgpack map of the scalar fields
  (int32 / int64 / float / string) by name; `{"id": 0}` when the schema has none.
* `<shard>.db` holds the tables INDEXES (per row: raw page, offset and end, row group, blob page,
  offset and end, with offsets relative to the page and the 8-byte length included, then the index
  fields) and SHARD_NAME (the shard's file name). MindSpore's readers need it; this reader does not
  (the header's page table and the length-prefixed rows locate every row), and `MindRecordWriter`
  writes it so MindSpore reads glm6b's files.

`MindRecordReader` reads int32 / int64 columns (arrays of any shape, and scalars), strings and
bytes, one row at a time from memory-mapped shards; a float column is an error that names the file
and the column. `MindRecordWriter` writes the same column types, row by row. This module needs only
numpy and the standard library.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

HEADER_SIZE = 1 << 24  # FileWriter's defaults: 16 MiB header, 32 MiB pages
PAGE_SIZE = 1 << 25
MIN_HEADER_SIZE, MIN_PAGE_SIZE = 1 << 14, 1 << 15  # the smallest sizes FileWriter accepts
VERSION = "3.0"
DB_SUFFIX = ".db"
BLOB_PAGE, RAW_PAGE = "BLOB_DATA", "RAW_DATA"
# Column types this module reads and writes; MindRecord also has float32 / float64.
INT_TYPES = {"int32": np.dtype("<i4"), "int64": np.dtype("<i8")}
SUPPORTED_TYPES = ("int32", "int64", "string", "bytes")
MINDRECORD_TYPES = (*SUPPORTED_TYPES, "float32", "float64")
_NAME_RE = re.compile(r"^[0-9a-zA-Z_]+$")
_HEADER_START = b'{"header_size"'
_WIDTHS = np.array([1, 2, 4, 8])
_INT_OF_WIDTH = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}


class MindRecordError(ValueError):
    """An unusable MindRecord file; the one-line message names the file (and row and column)."""


@dataclass(frozen=True)
class Column:
    """One column of a MindRecord schema.

    Attributes:
        name: the field name.
        type: "int32", "int64", "string", "bytes" (or "float32" / "float64", which are not read).
        shape: the array shape (one dim may be -1), or None for a scalar / string / bytes field.
    """

    name: str
    type: str
    shape: tuple[int, ...] | None = None

    @property
    def is_blob(self) -> bool:
        """Stored in the blob pages (arrays and bytes) rather than the raw (msgpack) pages."""
        return self.shape is not None or self.type == "bytes"

    def to_schema(self) -> dict[str, Any]:
        """The column as a FileWriter schema entry ({"type": ..., "shape": [...]})."""
        return {"type": self.type} if self.shape is None else {"type": self.type, "shape": list(self.shape)}


def parse_schema(schema: dict[str, dict[str, Any]], where: str = "schema") -> dict[str, Column]:
    """Columns from a FileWriter-style schema, e.g. {"input_ids": {"type": "int32", "shape": [-1]}}.

    Args:
        schema: field name -> {"type": ..., "shape": [...] (arrays only)}.
        where: what to name in an error (a file, or "schema").

    Returns:
        name -> Column, in name order (the order MindRecord stores them in).

    Raises:
        MindRecordError: an empty schema, a bad name, an unknown type, a bad shape.
    """
    if not isinstance(schema, dict) or not schema:
        raise MindRecordError(f"{where}: the schema must be a non-empty mapping of field name to type")
    columns = {}
    for name in sorted(schema):
        spec = schema[name]
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise MindRecordError(f"{where}: column name {name!r} must consist of 0-9, a-z, A-Z and _")
        if not isinstance(spec, dict) or spec.get("type") not in MINDRECORD_TYPES or set(spec) - {"type", "shape"}:
            raise MindRecordError(f"{where}: column {name!r}: expected {{'type': one of {', '.join(MINDRECORD_TYPES)}"
                                  f"}} (and 'shape' for arrays), got {spec!r}")
        shape = spec.get("shape")
        if shape is not None:
            if spec["type"] in ("string", "bytes") or not isinstance(shape, list) or not shape or \
                    not all(isinstance(d, int) and (d > 0 or d == -1) for d in shape) or shape.count(-1) > 1:
                raise MindRecordError(f"{where}: column {name!r}: shape {shape!r} must be a list of positive ints "
                                      f"with at most one -1, on an int or float column")
            shape = tuple(shape)
        columns[name] = Column(name, spec["type"], shape)
    return columns


# ----------------------------------------------------------------------------------- int arrays


def encode_ints(values: np.ndarray) -> bytes:
    """MindRecord's compressed form of an int32 / int64 array (see the module docstring).

    Args:
        values: the array (any shape; stored flat, row-major).

    Returns:
        count (4 bytes, big-endian), the 2-bit width codes, the elements.
    """
    flat = np.ascontiguousarray(values, dtype=np.int64).reshape(-1)
    codes = np.full(flat.shape, 3, dtype=np.uint8)
    codes[(flat >= -(1 << 31)) & (flat < 1 << 31)] = 2
    codes[(flat >= -(1 << 15)) & (flat < 1 << 15)] = 1
    codes[(flat >= -(1 << 7)) & (flat < 1 << 7)] = 0
    padded = np.zeros(-(-len(flat) // 4) * 4, dtype=np.uint8)
    padded[:len(flat)] = codes
    quads = padded.reshape(-1, 4)
    bitmap = (quads[:, 0] << 6) | (quads[:, 1] << 4) | (quads[:, 2] << 2) | quads[:, 3]
    head = struct.pack(">I", len(flat)) + bitmap.astype(np.uint8).tobytes()
    if codes.size and (codes == codes[0]).all():  # one width for all: one cast
        return head + flat.astype(_INT_OF_WIDTH[int(_WIDTHS[codes[0]])]).tobytes()
    widths = _WIDTHS[codes]
    starts = np.cumsum(widths) - widths
    data = np.zeros(int(widths.sum()), dtype=np.uint8)
    for code in range(4):
        chosen = np.nonzero(codes == code)[0]
        if len(chosen):
            width = int(_WIDTHS[code])
            as_bytes = flat[chosen].astype(_INT_OF_WIDTH[width]).view(np.uint8).reshape(-1, width)
            data[starts[chosen][:, None] + np.arange(width)] = as_bytes
    return head + data.tobytes()


def decode_ints(buf: memoryview, dtype: np.dtype) -> np.ndarray:
    """Decode one compressed int array (see `encode_ints`).

    Args:
        buf: exactly the field's bytes.
        dtype: the column's dtype (int32 or int64).

    Returns:
        A 1-D array of `dtype` that owns its memory.

    Raises:
        ValueError: the bytes do not hold what their count and width codes say.
    """
    if len(buf) < 4:
        raise ValueError(f"{len(buf)} bytes, too short for the element count")
    count = int.from_bytes(buf[:4], "big")
    map_bytes = -(-count // 4)
    if 4 + map_bytes > len(buf):
        raise ValueError(f"{count} elements need {map_bytes} width bytes, only {len(buf) - 4} remain")
    bitmap = np.frombuffer(buf, dtype=np.uint8, count=map_bytes, offset=4)
    data = np.frombuffer(buf, dtype=np.uint8, offset=4 + map_bytes)
    # the common case, one width for every element (a mask, small ids): no per-element codes needed
    full, rest = divmod(count, 4)
    first = int(bitmap[0]) if count else 0
    if count and first in (0x00, 0x55, 0xAA, 0xFF) and (bitmap[:full] == first).all() and \
            (not rest or int(bitmap[full]) >> (8 - 2 * rest) == first >> (8 - 2 * rest)):
        width = int(_WIDTHS[first & 3])
        if width * count != len(data):
            raise ValueError(f"{count} elements of {width} bytes take {width * count} bytes, the field holds "
                             f"{len(data)}")
        if dtype.itemsize == 4 and width == 8:
            raise ValueError("an 8-byte element in an int32 column")
        return data.view(_INT_OF_WIDTH[width]).astype(dtype)
    codes = np.stack([bitmap >> 6, (bitmap >> 4) & 3, (bitmap >> 2) & 3, bitmap & 3], axis=1).reshape(-1)[:count]
    widths = _WIDTHS[codes]
    if int(widths.sum()) != len(data):
        raise ValueError(f"{count} elements of the widths given take {int(widths.sum())} bytes, the field holds "
                         f"{len(data)}")
    if dtype.itemsize == 4 and count and codes.max() == 3:
        raise ValueError("an 8-byte element in an int32 column")
    if count and (codes == codes[0]).all():
        return data.view(_INT_OF_WIDTH[int(widths[0])]).astype(dtype)
    out = np.empty(count, dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]) if count else widths
    for code in range(4):
        chosen = np.nonzero(codes == code)[0]
        if len(chosen):
            width = int(_WIDTHS[code])
            gathered = data[starts[chosen][:, None] + np.arange(width)]  # [elements, width] bytes
            out[chosen] = gathered.reshape(-1).view(_INT_OF_WIDTH[width])
    return out


# ----------------------------------------------------------------------------------- msgpack (raw fields)


def _unpack(buf: memoryview, pos: int) -> tuple[Any, int]:
    """One msgpack value at buf[pos:] -> (value, position after it). Ints, floats, strings, bytes, maps,
    arrays, nil and booleans: what MindSpore's raw pages hold."""
    tag = buf[pos]
    pos += 1
    if tag <= 0x7F:
        return tag, pos
    if tag >= 0xE0:
        return tag - 0x100, pos
    if 0x80 <= tag <= 0x8F:
        return _unpack_map(buf, pos, tag & 0x0F)
    if 0x90 <= tag <= 0x9F:
        return _unpack_array(buf, pos, tag & 0x0F)
    if 0xA0 <= tag <= 0xBF:
        return _text(buf, pos, tag & 0x1F)
    fixed = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
             0xCA: ">f", 0xCB: ">d"}
    if tag in fixed:
        size = struct.calcsize(fixed[tag])
        return struct.unpack_from(fixed[tag], buf, pos)[0], pos + size
    lengths = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}
    if tag in lengths:
        size = lengths[tag]
        n = int.from_bytes(buf[pos:pos + size], "big")
        pos += size
        if tag in (0xD9, 0xDA, 0xDB):
            return _text(buf, pos, n)
        if tag in (0xC4, 0xC5, 0xC6):
            return bytes(buf[pos:pos + n]), pos + n
        return (_unpack_array if tag in (0xDC, 0xDD) else _unpack_map)(buf, pos, n)
    if tag in (0xC0, 0xC2, 0xC3):
        return {0xC0: None, 0xC2: False, 0xC3: True}[tag], pos
    raise ValueError(f"msgpack type byte 0x{tag:02x} is not one MindRecord writes")


def _text(buf: memoryview, pos: int, n: int) -> tuple[str, int]:
    if pos + n > len(buf):
        raise ValueError("a string runs past the end of its row")
    return bytes(buf[pos:pos + n]).decode("utf-8"), pos + n


def _unpack_map(buf: memoryview, pos: int, n: int) -> tuple[dict, int]:
    out = {}
    for _ in range(n):
        key, pos = _unpack(buf, pos)
        out[key], pos = _unpack(buf, pos)
    return out, pos


def _unpack_array(buf: memoryview, pos: int, n: int) -> tuple[list, int]:
    out = []
    for _ in range(n):
        value, pos = _unpack(buf, pos)
        out.append(value)
    return out, pos


def _pack(value: Any) -> bytes:
    """msgpack of an int, str or dict of them, with the smallest encodings (as MindSpore writes them)."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"cannot store {value!r} in a MindRecord raw field")
    if isinstance(value, int):
        if 0 <= value < 0x80:
            return bytes([value])
        if -32 <= value < 0:
            return struct.pack(">b", value)
        if value >= 0:
            for tag, fmt, limit in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16), (0xCE, ">I", 1 << 32)):
                if value < limit:
                    return bytes([tag]) + struct.pack(fmt, value)
            return b"\xcf" + struct.pack(">Q", value)
        for tag, fmt, limit in ((0xD0, ">b", 1 << 7), (0xD1, ">h", 1 << 15), (0xD2, ">i", 1 << 31)):
            if value >= -limit:
                return bytes([tag]) + struct.pack(fmt, value)
        return b"\xd3" + struct.pack(">q", value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        n = len(raw)
        head = bytes([0xA0 | n]) if n < 32 else b"\xd9" + bytes([n]) if n < 1 << 8 else \
            b"\xda" + struct.pack(">H", n) if n < 1 << 16 else b"\xdb" + struct.pack(">I", n)
        return head + raw
    if isinstance(value, dict):
        n = len(value)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
        return head + b"".join(_pack(k) + _pack(v) for k, v in value.items())
    raise TypeError(f"cannot store a {type(value).__name__} in a MindRecord raw field")


# ----------------------------------------------------------------------------------- finding a set


def _looks_like_shard(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8 + len(_HEADER_START))
    except OSError:
        return False
    return len(head) == 8 + len(_HEADER_START) and head[8:] == _HEADER_START


def is_mindrecord(path: str | os.PathLike) -> bool:
    """True if `path` is a MindRecord shard file (by its first bytes), or the base name of a set
    whose first shard is `<path>0` (what `FileWriter(path, N)` writes for N > 1)."""
    path = Path(path)
    if path.is_file():
        return _looks_like_shard(path)
    return not path.exists() and Path(f"{path}0").is_file() and _looks_like_shard(Path(f"{path}0"))


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The shard files of the set `path` belongs to, in shard order (`header["shard_addresses"]`).

    Args:
        path: any shard file of the set, or the set's base name (`file` for `file0 ... fileN-1`).

    Returns:
        The shard paths, all in the folder of `path`.

    Raises:
        MindRecordError: not a MindRecord file, or a shard the header names is missing.
    """
    path = Path(path)
    if not path.exists() and Path(f"{path}0").is_file():
        path = Path(f"{path}0")
    if not path.is_file():
        raise MindRecordError(f"MindRecord file {path} not found")
    with _Shard(path, walk=False) as shard:
        addresses = shard.header["shard_addresses"]
    if len(addresses) == 1:  # one shard: whatever its name now (MindSpore itself wants the written name)
        return [path]
    files = [path.with_name(Path(a).name) for a in addresses]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MindRecordError(f"{path}: the set has {len(files)} shard files; missing: {', '.join(missing)}")
    return files


def read_schema(path: str | os.PathLike) -> tuple[dict[str, Column], Path]:
    """The columns of a MindRecord set, from its first shard's header (no row is read).

    Args:
        path: any shard file of the set, or its base name.

    Returns:
        (name -> Column, the first shard file).

    Raises:
        MindRecordError: see `shard_files`; an unreadable header.
    """
    first = shard_files(path)[0]
    with _Shard(first, walk=False) as shard:
        return shard.columns, first


# ----------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Spans:
    """Absolute [start, end) of each row's blob and raw bytes in a shard (the 8-byte lengths excluded)."""

    blob: np.ndarray  # [rows, 2] int64
    raw: np.ndarray   # [rows, 2] int64


class _Shard:
    """One memory-mapped shard file: its header checked, its rows located by walking the pages."""

    def __init__(self, path: Path, walk: bool = True):
        self.path = path
        try:
            size = path.stat().st_size
        except OSError as e:
            raise MindRecordError(f"{path}: cannot read the MindRecord file ({e.strerror})") from None
        if size < 8 + len(_HEADER_START):
            raise MindRecordError(f"{path} is not a MindRecord file ({size} bytes, too short for a header)")
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.view = memoryview(self.map)
        try:
            self.header = self._read_header(size)
            self.columns = parse_schema(self.header["schema"][0]["schema"], str(path))
            self.blob_fields = list(self.header["schema"][0]["blob_fields"])
            self._check_blob_fields()
            self.spans = self._walk_pages(size) if walk else None
            self.release(0, size)  # the walk touched a page per row: they leave this process
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "_Shard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a row's view still alive: the GC closes the map
            self.view.release()
            self.map.close()

    def _read_header(self, size: int) -> dict[str, Any]:
        path = self.path
        length = int.from_bytes(self.view[:8], "little")
        if self.view[8:8 + len(_HEADER_START)] != _HEADER_START or 8 + length > size:
            raise MindRecordError(f"{path} is not a MindRecord file (no MindRecord header at its start)")
        try:
            header = json.loads(bytes(self.view[8:8 + length]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MindRecordError(f"{path}: the MindRecord header is not valid JSON ({e})") from None
        for key, kind in (("header_size", int), ("page_size", int), ("schema", list), ("shard_addresses", list),
                          ("shard_id", int)):
            if not isinstance(header.get(key), kind):
                raise MindRecordError(f"{path}: the MindRecord header has no valid {key!r}")
        if 8 + length > header["header_size"] or header["page_size"] <= 0:
            raise MindRecordError(f"{path}: the MindRecord header's sizes are inconsistent (header_size "
                                  f"{header['header_size']}, page_size {header['page_size']})")
        if len(header["schema"]) != 1 or not isinstance(header["schema"][0], dict) or \
                not isinstance(header["schema"][0].get("schema"), dict) or \
                not isinstance(header["schema"][0].get("blob_fields"), list):
            raise MindRecordError(f"{path}: expected one schema in the MindRecord header, found "
                                  f"{len(header['schema'])}")
        return header

    def _check_blob_fields(self) -> None:
        expected = [c.name for c in self.columns.values() if c.is_blob]
        if sorted(self.blob_fields) != expected:
            raise MindRecordError(f"{self.path}: the header's blob_fields {self.blob_fields} do not match its "
                                  f"schema (arrays and bytes: {expected})")

    def _walk_pages(self, size: int) -> _Spans:
        path, header = self.path, self.header
        pages = header.get("page") or []
        blob_pages, raw_pages = [], []
        for page in pages:
            try:
                start = header["header_size"] + int(page["page_id"]) * header["page_size"]
                used, kind = int(page["page_size"]), page["page_type"]
                first, last = int(page["start_row_id"]), int(page["end_row_id"])
            except (KeyError, TypeError, ValueError):
                raise MindRecordError(f"{path}: malformed page entry in the MindRecord header: {page}") from None
            if kind not in (BLOB_PAGE, RAW_PAGE) or not 0 <= used <= header["page_size"]:
                raise MindRecordError(f"{path}: page {page['page_id']} has type {kind!r} and size {used}")
            if start + used > size:
                raise MindRecordError(f"{path} is truncated: page {page['page_id']} ends at byte {start + used}, "
                                      f"the file has {size} bytes")
            if kind == BLOB_PAGE:
                blob_pages.append((int(page["page_type_id"]), first, last, start, used))
            else:
                raw_pages.append((int(page["page_id"]), start, used))
        blob, rows = [], 0
        for type_id, first, last, start, used in sorted(blob_pages):
            if first != rows or last < first:
                raise MindRecordError(f"{path}: blob page {type_id} holds rows {first}..{last}, expected rows from "
                                      f"{rows}")
            blob += self._records(start, used, last - first, f"blob page {type_id}")
            rows = last
        raw = []
        for page_id, start, used in sorted(raw_pages):
            raw += self._records(start, used, None, f"raw page {page_id}")
        if len(raw) != rows:
            raise MindRecordError(f"{path}: {rows} rows in the blob pages but {len(raw)} in the raw pages")
        as_array = lambda spans: np.array(spans, dtype=np.int64).reshape(-1, 2)
        return _Spans(as_array(blob), as_array(raw))

    def _records(self, start: int, used: int, count: int | None, what: str) -> list[tuple[int, int]]:
        """The [start, end) of each length-prefixed record of a page (count records, or until it is full)."""
        spans, pos, end = [], start, start + used
        while (pos < end) if count is None else (len(spans) < count):
            if pos + 8 > end:
                raise MindRecordError(f"{self.path} is corrupt: {what} ends inside a row's length")
            length = int.from_bytes(self.view[pos:pos + 8], "little")
            if pos + 8 + length > end:
                raise MindRecordError(f"{self.path} is corrupt: a row of {what} claims {length} bytes, more than "
                                      f"the page holds")
            spans.append((pos + 8, pos + 8 + length))
            pos += 8 + length
        if pos != end:
            raise MindRecordError(f"{self.path} is corrupt: {what} holds {end - pos} bytes after its last row")
        return spans

    def release(self, start: int, end: int) -> None:
        """Drop the mapping's pages around [start, end) from this process (they stay in the page cache)."""
        first = start - start % mmap.PAGESIZE
        if end > first and hasattr(self.map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED, first, min(end, len(self.map)) - first)


class MindRecordReader:
    """The rows of a MindRecord set, decoded one at a time from memory-mapped shard files.

    Rows come shard by shard, in shard order (as `mindspore.mindrecord.FileReader` and
    `MindDataset(file, shuffle=False)` give them). Values: int32 / int64 arrays as numpy arrays of the
    column's dtype and shape (a -1 dim takes the row's length), int scalars as int, strings as str,
    bytes as bytes. The reader can be pickled (DataLoader workers reopen the files).

    Args:
        path: any shard file of the set, or its base name (see `shard_files`).
        columns: the columns to read (default: all); only these need a supported type.

    Attributes:
        files: the shard files.
        schema: name -> Column, every column of the set.
        desc: the schema's description (MindFormers: "lm-schema").
        columns: the columns read.

    Raises:
        MindRecordError: not a MindRecord set, truncated or corrupt shard, shards that disagree, an
            unknown column, a column of a type this reader does not decode (floats).
    """

    def __init__(self, path: str | os.PathLike, columns: Iterable[str] | None = None):
        self.files = shard_files(path)
        self._requested = None if columns is None else list(columns)
        self._open()

    def _open(self) -> None:
        self._shards: list[_Shard] = []
        try:
            for file in self.files:
                self._shards.append(_Shard(file))
            first = self._shards[0]
            for index, shard in enumerate(self._shards):
                names = [Path(a).name for a in shard.header["shard_addresses"]]
                if shard.header["shard_id"] != index or shard.columns != first.columns or \
                        len(names) != len(self.files) or len(names) > 1 and names != [f.name for f in self.files]:
                    raise MindRecordError(f"{shard.path}: this shard's header does not match the set of "
                                          f"{first.path} (shard id, schema or shard list)")
        except BaseException:
            self.close()
            raise
        self.schema = first.columns
        self.desc = first.header["schema"][0].get("desc", "")
        names = list(self.schema) if self._requested is None else self._requested
        for name in names:
            if name not in self.schema:
                raise MindRecordError(f"{first.path}: no column {name!r} (columns: {', '.join(self.schema)})")
            if self.schema[name].type not in SUPPORTED_TYPES:
                raise MindRecordError(f"{first.path}: column {name!r} has type {self.schema[name].type}, which glm6b "
                                      f"does not read (it reads {', '.join(SUPPORTED_TYPES)})")
        self.columns = names
        self._starts = np.cumsum([0] + [len(s.spans.blob) for s in self._shards])
        raw_names = [n for n in names if not self.schema[n].is_blob]
        self._read_raw = bool(raw_names)

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self.files, "_requested": self._requested}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __enter__(self) -> "MindRecordReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the shard files."""
        for shard in getattr(self, "_shards", []):
            shard.close()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        shard_index = int(np.searchsorted(self._starts, index, side="right")) - 1
        shard, row = self._shards[shard_index], index - int(self._starts[shard_index])
        out: dict[str, Any] = {}
        start, end = (int(x) for x in shard.spans.blob[row])
        try:
            out.update(self._blob_values(shard, shard.view[start:end], row))
            if self._read_raw:
                raw_start, raw_end = (int(x) for x in shard.spans.raw[row])
                out.update(self._raw_values(shard, shard.view[raw_start:raw_end], row))
                shard.release(raw_start, raw_end)
        except (ValueError, IndexError, struct.error) as e:
            if isinstance(e, MindRecordError):
                raise
            raise MindRecordError(f"{shard.path} is corrupt: row {row}: {e}") from None
        shard.release(start, end)
        return {name: out[name] for name in self.columns}

    def _blob_values(self, shard: _Shard, blob: memoryview, row: int) -> dict[str, Any]:
        fields = shard.blob_fields
        wanted = set(self.columns)
        values, pos = {}, 0
        for name in fields:
            if len(fields) == 1:
                data, pos = blob, len(blob)
            else:
                if pos + 8 > len(blob):
                    raise MindRecordError(f"{shard.path} is corrupt: row {row}, column {name!r}: the row ends "
                                          f"before the column's length")
                length = int.from_bytes(blob[pos:pos + 8], "big")
                if pos + 8 + length > len(blob):
                    raise MindRecordError(f"{shard.path} is corrupt: row {row}, column {name!r} claims {length} "
                                          f"bytes, the row holds {len(blob) - pos - 8}")
                data, pos = blob[pos + 8:pos + 8 + length], pos + 8 + length
            if name in wanted:
                values[name] = self._blob_value(shard, shard.columns[name], data, row)
        if pos != len(blob):
            raise MindRecordError(f"{shard.path} is corrupt: row {row} holds {len(blob) - pos} bytes after its "
                                  f"last column")
        return values

    @staticmethod
    def _blob_value(shard: _Shard, column: Column, data: memoryview, row: int) -> Any:
        if column.type == "bytes":
            return bytes(data)
        try:
            flat = decode_ints(data, INT_TYPES[column.type])
        except ValueError as e:
            raise MindRecordError(f"{shard.path} is corrupt: row {row}, column {column.name!r}: {e}") from None
        try:
            return flat.reshape(column.shape)
        except ValueError:
            raise MindRecordError(f"{shard.path}: row {row}, column {column.name!r} holds {flat.size} values, which "
                                  f"do not fit its shape {list(column.shape)}") from None

    def _raw_values(self, shard: _Shard, raw: memoryview, row: int) -> dict[str, Any]:
        fields, end = _unpack(raw, 0)
        if end != len(raw) or not isinstance(fields, dict):
            raise MindRecordError(f"{shard.path} is corrupt: row {row}'s scalar fields are not one msgpack map")
        values = {}
        for name in self.columns:
            column = shard.columns[name]
            if column.is_blob:
                continue
            if name not in fields:
                raise MindRecordError(f"{shard.path}: row {row} has no value for column {name!r}")
            value = fields[name]
            expected = str if column.type == "string" else int
            if not isinstance(value, expected) or isinstance(value, bool):
                raise MindRecordError(f"{shard.path}: row {row}, column {name!r} holds a {type(value).__name__}, "
                                      f"expected {column.type}")
            values[name] = value
        return values


# ----------------------------------------------------------------------------------- writing


class _Page:
    def __init__(self, page_id: int, type_id: int, kind: str, first_row: int):
        self.page_id, self.type_id, self.kind = page_id, type_id, kind
        self.first_row = self.end_row = first_row
        self.parts: list[bytes] = []
        self.used = 0
        self.groups: list[tuple[int, int]] = []  # raw pages: (blob page type id, offset where its rows start)

    def header(self, shard_id: int) -> dict[str, Any]:
        blob = self.kind == BLOB_PAGE
        groups = [(0, 0)] if blob else self.groups
        return {"end_row_id": self.end_row if blob else 0, "page_id": self.page_id, "page_size": self.used,
                "page_type": self.kind, "page_type_id": self.type_id,
                "row_group_ids": [{"id": g, "offset": o} for g, o in groups], "shard_id": shard_id,
                "start_row_id": self.first_row if blob else 0}


class _ShardWriter:
    """One shard being written, laid out as FileWriter lays it out.

    Rows fill a blob page until the next one does not fit; the rows of a blob page form a row group,
    and when the group is complete its raw rows go into the current raw page if the whole group
    fits there, else into a new one. Pages are numbered in the order they are opened.
    """

    def __init__(self, path: Path, shard_id: int, header_size: int, page_size: int):
        self.path, self.shard_id = path, shard_id
        self.header_size, self.page_size = header_size, page_size
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.tmp_db = path.with_name(f".{path.name}{DB_SUFFIX}.{os.getpid()}.tmp")
        self.file = open(self.tmp, "wb")
        self.pages: list[dict[str, Any]] = []
        self.blob: _Page | None = None
        self.raw: _Page | None = None
        self.group: list[tuple[int, bytes, tuple, int, int]] = []  # the current blob page's rows
        self.next_page = self.blob_pages = 0
        self.rows = 0
        self.compression = 0
        self.index: list[tuple] = []

    def _write(self, page: _Page | None) -> None:
        if page is None or not page.parts:
            return
        self.file.seek(self.header_size + page.page_id * self.page_size)
        self.file.write(b"".join(page.parts))
        self.pages.append(page.header(self.shard_id))
        page.parts = []

    def _new_blob_page(self) -> _Page:
        page = _Page(self.next_page, self.blob_pages, BLOB_PAGE, self.rows)
        self.next_page += 1
        self.blob_pages += 1
        return page

    def _new_raw_page(self) -> _Page:
        # FileWriter numbers a raw page after the page id of the raw page before it
        type_id = 0 if self.raw is None else self.raw.page_id + 1
        self._write(self.raw)
        page = _Page(self.next_page, type_id, RAW_PAGE, 0)
        self.next_page += 1
        return page

    def add(self, blob: bytes, raw: bytes, index_values: tuple, saved: int) -> None:
        blob = struct.pack("<Q", len(blob)) + blob
        raw = struct.pack("<Q", len(raw)) + raw
        if max(len(blob), len(raw)) > self.page_size:
            raise MindRecordError(f"{self.path}: row {self.rows} takes {max(len(blob), len(raw))} bytes, more than "
                                  f"a page ({self.page_size}); write with a larger page_size")
        if self.blob is None or self.blob.used + len(blob) > self.page_size:
            self._close_group()
            self.blob = self._new_blob_page()
        self.group.append((self.rows, raw, index_values, self.blob.used, self.blob.used + len(blob)))
        self.blob.parts.append(blob)
        self.blob.used += len(blob)
        self.rows += 1
        self.blob.end_row = self.rows
        self.compression += saved

    def _close_group(self) -> None:
        """Write the full blob page and place its rows' raw data."""
        if self.blob is None:
            return
        self._write(self.blob)
        size = sum(len(raw) for _, raw, _, _, _ in self.group)
        if self.raw is None or self.raw.used + size > self.page_size:
            self.raw = self._new_raw_page()
        for row, raw, index_values, blob_start, blob_end in self.group:
            if self.raw.used + len(raw) > self.page_size:  # a group larger than a page
                self.raw = self._new_raw_page()
            if not self.raw.groups or self.raw.groups[-1][0] != self.blob.type_id:
                self.raw.groups.append((self.blob.type_id, self.raw.used))
            self.index.append((row, self.raw.page_id, self.raw.used, self.raw.used + len(raw), self.blob.type_id,
                               self.blob.page_id, blob_start, blob_end, *index_values))
            self.raw.parts.append(raw)
            self.raw.used += len(raw)
        self.group = []

    def finish(self, header: dict[str, Any], index_columns: list[Column]) -> None:
        self._close_group()
        self._write(self.raw)
        self.pages.sort(key=lambda p: p["page_id"])
        header["page"] = self.pages or None
        header["compression_size"] = self.compression
        header["shard_id"] = self.shard_id
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if 8 + len(text) > self.header_size:
            raise MindRecordError(f"{self.path}: the header takes {8 + len(text)} bytes, more than header_size "
                                  f"{self.header_size}; write with a larger header_size")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", len(text)) + text)
        if self.pages:  # the last page ends the file; a set without rows is its header alone
            last = self.pages[-1]
            self.file.truncate(self.header_size + last["page_id"] * self.page_size + last["page_size"])
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        _write_index_db(self.tmp_db, self.path.name, self.index, index_columns)

    def publish(self) -> None:
        os.replace(self.tmp, self.path)
        os.replace(self.tmp_db, Path(f"{self.path}{DB_SUFFIX}"))

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        for tmp in (self.tmp, self.tmp_db):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


_SQL_TYPES = {"int32": "INTEGER", "int64": "INTEGER", "string": "TEXT", "float32": "REAL", "float64": "REAL"}


def _write_index_db(path: Path, shard_name: str, rows: list[tuple], index_columns: list[Column]) -> None:
    """The `<shard>.db` SQLite index MindSpore's readers look rows up in (see the module docstring)."""
    fixed = ["ROW_ID", "PAGE_ID_RAW", "PAGE_OFFSET_RAW", "PAGE_OFFSET_RAW_END", "ROW_GROUP_ID", "PAGE_ID_BLOB",
             "PAGE_OFFSET_BLOB", "PAGE_OFFSET_BLOB_END"]
    definitions = [f"{name} INT NOT NULL" for name in fixed]
    for i, column in enumerate(index_columns):
        definitions += [f"INC_{i} INT", f"{column.name}_0 {_SQL_TYPES[column.type]}"]
    key = ", ".join(["ROW_ID"] + [f"INC_{i}" for i in range(len(index_columns))])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    connection = sqlite3.connect(path)
    try:
        connection.execute(f"CREATE TABLE INDEXES({', '.join(definitions)}, PRIMARY KEY({key}))")
        connection.execute("CREATE TABLE SHARD_NAME(NAME TEXT NOT NULL)")
        connection.execute("INSERT INTO SHARD_NAME VALUES (?)", (shard_name,))
        width = len(fixed) + 2 * len(index_columns)
        connection.executemany(f"INSERT INTO INDEXES VALUES ({', '.join('?' * width)})", rows)
        connection.commit()
    finally:
        connection.close()


class MindRecordWriter:
    """Write a MindRecord set row by row, as `mindspore.mindrecord.FileWriter` lays it out.

    Use it as a context manager: the shard files and their `.db` indexes are written under temporary
    names and renamed into place when the block ends without an exception (else removed), so a
    half-written set never lies under the final names.

    Args:
        path: the file to write (`num_shards` > 1: `path0 ... path{N-1}`, as FileWriter names them).
        schema: FileWriter-style schema, e.g. {"input_ids": {"type": "int32", "shape": [-1]}}; types
            int32, int64 (arrays or scalars), string, bytes.
        desc: the schema's description (MindFormers' ADGEN files: "lm-schema").
        num_shards: shard files to spread the rows over (row i goes to shard i % num_shards).
        header_size, page_size: the header region and page sizes (FileWriter's defaults: 16 MiB and
            32 MiB; at least 16 KiB and 32 KiB).

    Raises:
        MindRecordError: a bad schema or sizes; a row that does not fit the schema (one line naming
            the column); a row larger than a page.
    """

    def __init__(self, path: str | os.PathLike, schema: dict[str, dict[str, Any]], desc: str = "",
                 num_shards: int = 1, header_size: int = HEADER_SIZE, page_size: int = PAGE_SIZE):
        self.path = Path(path)
        self.columns = parse_schema(schema, str(self.path))
        unsupported = [c.name for c in self.columns.values() if c.type not in SUPPORTED_TYPES]
        if unsupported:
            raise MindRecordError(f"{self.path}: column {unsupported[0]!r} has type "
                                  f"{self.columns[unsupported[0]].type}; glm6b writes {', '.join(SUPPORTED_TYPES)}")
        if num_shards < 1 or header_size < MIN_HEADER_SIZE or page_size < MIN_PAGE_SIZE:
            raise MindRecordError(f"{self.path}: num_shards {num_shards}, header_size {header_size}, page_size "
                                  f"{page_size}: need >= 1, >= {MIN_HEADER_SIZE}, >= {MIN_PAGE_SIZE}")
        self.desc = desc
        self.blob_fields = [c.name for c in self.columns.values() if c.is_blob]
        self.raw_fields = [c.name for c in self.columns.values() if not c.is_blob]
        self.files = [self.path] if num_shards == 1 else [Path(f"{self.path}{i}") for i in range(num_shards)]
        self._shards: list[_ShardWriter] = []
        try:
            for i, file in enumerate(self.files):
                self._shards.append(_ShardWriter(file, i, header_size, page_size))
        except BaseException:
            self._discard()
            raise
        self.rows = 0

    def __enter__(self) -> "MindRecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._discard()

    def write(self, row: dict[str, Any]) -> None:
        """Add one row: {column: value} with every column of the schema.

        Args:
            row: int32 / int64 arrays (numpy arrays or lists; their values must fit the column's type
                and their size its shape), ints, str, bytes.
        """
        where = f"{self.path}: row {self.rows}"
        if set(row) != set(self.columns):
            missing, extra = sorted(set(self.columns) - set(row)), sorted(set(row) - set(self.columns))
            raise MindRecordError(f"{where}: the row's columns do not match the schema (missing {missing}, "
                                  f"unexpected {extra})")
        saved = 0
        blob_parts = []
        for name in self.blob_fields:
            data, column_saved = self._blob_bytes(self.columns[name], row[name], where)
            saved += column_saved
            blob_parts.append(data if len(self.blob_fields) == 1 else struct.pack(">Q", len(data)) + data)
        scalars = {name: self._scalar(self.columns[name], row[name], where) for name in self.raw_fields}
        raw = _pack(scalars if scalars else {"id": 0})  # FileWriter's raw row when every field is a blob
        shard = self._shards[self.rows % len(self._shards)]
        shard.add(b"".join(blob_parts), raw, tuple(v for name in self.raw_fields for v in (0, scalars[name])), saved)
        self.rows += 1

    @staticmethod
    def _blob_bytes(column: Column, value: Any, where: str) -> tuple[bytes, int]:
        if column.type == "bytes":
            if not isinstance(value, (bytes, bytearray)):
                raise MindRecordError(f"{where}, column {column.name!r}: expected bytes, got {type(value).__name__}")
            return bytes(value), 0
        array = np.asarray(value)
        if array.dtype.kind not in "iub" and array.size:
            raise MindRecordError(f"{where}, column {column.name!r}: expected integers, got {array.dtype}")
        dtype = INT_TYPES[column.type]
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise MindRecordError(f"{where}, column {column.name!r}: values outside the {column.type} range")
        try:
            np.reshape(array, column.shape)
        except ValueError:
            raise MindRecordError(f"{where}, column {column.name!r}: {array.size} values do not fit its shape "
                                  f"{list(column.shape)}") from None
        data = encode_ints(array)
        return data, array.size * dtype.itemsize - len(data)

    @staticmethod
    def _scalar(column: Column, value: Any, where: str) -> Any:
        if column.type == "string":
            if not isinstance(value, str):
                raise MindRecordError(f"{where}, column {column.name!r}: expected a str, got {type(value).__name__}")
            return value
        if isinstance(value, np.integer):
            value = int(value)
        info = np.iinfo(INT_TYPES[column.type])
        if not isinstance(value, int) or isinstance(value, bool) or not info.min <= value <= info.max:
            raise MindRecordError(f"{where}, column {column.name!r}: expected an {column.type}, got {value!r}")
        return value

    def commit(self) -> list[Path]:
        """Write the headers and indexes and move every file into place.

        Returns:
            The shard files written.
        """
        # the header's JSON has its keys in name order, as FileWriter writes it
        schema = {"blob_fields": self.blob_fields, "desc": self.desc,
                  "schema": {name: dict(sorted(column.to_schema().items())) for name, column in self.columns.items()}}
        index_columns = [self.columns[name] for name in self.raw_fields]
        try:
            for shard in self._shards:
                header = {"header_size": shard.header_size,
                          "index_fields": [{"index_field": c.name, "schema_id": 0} for c in index_columns] or None,
                          "page": None, "page_size": shard.page_size, "compression_size": 0, "schema": [schema],
                          "shard_addresses": [f.name for f in self.files], "shard_id": 0, "statistics": None,
                          "version": VERSION}
                shard.finish(header, index_columns)
            for shard in self._shards:
                shard.publish()
        except BaseException:
            self._discard()
            raise
        return self.files

    def _discard(self) -> None:
        for shard in self._shards:
            shard.discard()

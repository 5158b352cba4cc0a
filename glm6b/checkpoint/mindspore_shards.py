"""MindFormers' sharded checkpoints (model parallel, optimizer sharding, pipeline stages) merged into whole
tensors without MindSpore: the strategy file, the rank folders, and the stitching of each parameter.

A set is what a MindFormers run with model_parallel > 1 (or pipeline_stage > 1) saves: one `.ckpt`
per rank, `<folder>/rank_<r>/<prefix>_rank_<r>-<epoch>_<step>.ckpt`, each holding that rank's slice
of every parameter it has (and optimizer state), plus the strategy file written at compile time
(`strategy_ckpt_save_file`, e.g. ckpt_strategy.ckpt). The strategy file is MindSpore's
`node_strategy.proto` (proto2), parsed here by hand:

    ParallelStrategyMap { required uint32 current_stage = 1; repeated ParallelStrategyItem parallel_strategy_item = 2;
                          repeated ParallelLayoutItem parallel_layout_item = 3; }
    ParallelStrategyItem { required string node_name = 1; required ParallelStrategys parallel_strategys = 2; }
    ParallelStrategys { required uint32 stage = 1; ... }
    ParallelLayoutItem { required string param_name = 1; required ParallelLayouts parallel_layouts = 2; }
    ParallelLayouts { repeated DevMatrix dev_matrix = 1; repeated TensorMap tensor_map = 2;
                      repeated ParamSplitShape param_split_shape = 3; repeated IndicesOffset indices_offset = 4;
                      required int32 field = 5; required int32 opt_weight_shard_step = 6;
                      required int32 opt_weight_shard_size = 7; }
    DevMatrix { repeated uint32 dim = 1; }  TensorMap { repeated int32 dim = 1; }
    ParamSplitShape, IndicesOffset { repeated int64 dim = 1; }

What a layout means for the ranks of one stage (n = len(dev_matrix)):

* A rank's coordinates in the device matrix are its index in row-major order (the last dim varies fastest).
* `tensor_map[j] = k >= 0`: tensor dim j is cut into `dev_matrix[n - 1 - k]` equal parts (the map
  counts device dims from the right), and a rank holds the part of its coordinate along that device
  dim; -1: dim j is not cut. Ranks that differ only along device dims the map does not use hold the
  same slice.
* Optimizer sharding (`opt_weight_shard_step` and `opt_weight_shard_size` both non-zero; a size of
  -1 means all the repeated devices) cuts each slice again along dim 0, over the device dims the map
  does not use (of size > 1), taken from the right until their sizes make up the shard size (a device
  dim larger than what is left contributes its inner part: the coordinate modulo what is left). The
  slice's part is the mixed-radix number of those coordinates, leftmost dim most significant.
* `param_split_shape` (uneven splits, dim 0 only, no optimizer sharding): the dim-0 size of each
  slice, by slice index (row-major over the cut dims); `indices_offset`, when given, their offsets.
* Pipeline stages: a strategy merged over stages (`mindspore.merge_pipeline_strategys`) names a
  stage's parameters `<stage>-<name>`; a folder of per-stage files is read the same way (a file's
  stage is its first strategy item's). Stage s holds ranks `s * D ... (s + 1) * D - 1`, D the product
  of the device matrix. A parameter in several stages (shared) comes from the lowest one, as
  MindSpore merges it. Parameters missing from the strategy are whole on every rank that has them.

`ShardedCheckpoint` opens a set (all rank files memory-mapped, only their record headers read), checks
every parameter's slices against the strategy (a missing rank, a mismatched strategy or shape is one
line naming the parameter and rank) and yields the whole tensors one parameter at a time, under their
MindFormers names; optimizer state is skipped and counted, as for one `.ckpt`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..config import ChatGLMConfig
from . import mindspore as ms
from .errors import CheckpointError

logger = logging.getLogger(__name__)

STRATEGY_NAME = "ckpt_strategy.ckpt"  # MindFormers' default strategy_ckpt_save_file
_RANK_DIR_RE = re.compile(r"^rank_(\d+)$")
_STEP_RE = re.compile(r"-(\d+)_(\d+)\.ckpt$")  # <prefix>-<epoch>_<step>.ckpt


# ----------------------------------------------------------------------------------- the strategy file


@dataclass(frozen=True)
class Layout:
    """How one parameter is cut over the devices of its stage (see the module docstring).

    Attributes:
        dev_matrix: the device matrix.
        tensor_map: per tensor dim, the device dim cutting it (counted from the right) or -1.
        split_shape: param_split_shape (uneven dim-0 sizes per slice), or ().
        indices_offset: the slices' dim-0 offsets, or ().
        field: MindSpore's field slicing (0: none).
        opt_shard_step, opt_shard_size: optimizer sharding (0: none; size -1: every repeated device).
        stages: the pipeline stages holding the parameter, lowest first.
    """

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[int, ...]
    split_shape: tuple[int, ...] = ()
    indices_offset: tuple[int, ...] = ()
    field: int = 0
    opt_shard_step: int = 0
    opt_shard_size: int = 0
    stages: tuple[int, ...] = (0,)

    @property
    def devices(self) -> int:
        """Devices per stage."""
        return math.prod(self.dev_matrix)

    @property
    def strategy(self) -> tuple[int, ...]:
        """Parts per tensor dim from model parallelism."""
        n = len(self.dev_matrix)
        return tuple(self.dev_matrix[n - 1 - k] if k >= 0 else 1 for k in self.tensor_map)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # a negative int32/int64 is a 10-byte varint


def _dims(buf, start: int, end: int) -> list[int]:
    """The `repeated ... dim = 1` of a DevMatrix / TensorMap / ParamSplitShape / IndicesOffset message."""
    dims = []
    for field, wire_type, a, b in ms._fields(buf, start, end):
        if field == 1 and wire_type == 0:
            dims.append(_signed(a))
        elif field == 1 and wire_type == 2:  # packed
            pos = a
            while pos < b:
                value, pos = ms._read_varint(buf, pos, b)
                dims.append(_signed(value))
    return dims


def _parse_layouts(buf, start: int, end: int, name: str, where: Path) -> Layout:
    repeated: dict[int, list[list[int]]] = {1: [], 2: [], 3: [], 4: []}
    scalars = {5: 0, 6: 0, 7: 0}
    for field, wire_type, a, b in ms._fields(buf, start, end):
        if field in repeated and wire_type == 2:
            repeated[field].append(_dims(buf, a, b))
        elif field in scalars and wire_type == 0:
            scalars[field] = _signed(a)
    if len(repeated[1]) != 1 or len(repeated[2]) != 1:
        many = "a tensor dim cut over several device dims" if len(repeated[2]) > 1 else "no device matrix or map"
        raise CheckpointError(f"{where}: parameter {name}: expected one dev_matrix and one tensor_map, found "
                              f"{len(repeated[1])} and {len(repeated[2])} ({many}: glm6b merges one device dim per "
                              f"tensor dim)")
    first = lambda lists: tuple(lists[0]) if lists else ()
    return Layout(tuple(repeated[1][0]), tuple(repeated[2][0]), first(repeated[3]), first(repeated[4]),
                  scalars[5], scalars[6], scalars[7])


def _read_strategy_file(path: Path) -> tuple[int, list[tuple[str, Layout]]]:
    """(the file's pipeline stage, [(parameter name as stored, layout)]) of one ParallelStrategyMap file."""
    if path.suffix == ".json":
        raise CheckpointError(f"{path}: JSON strategy files are not read; pass the protobuf one (MindSpore writes "
                              f"protobuf unless strategy_ckpt_save_file ends with .json)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"strategy file {path}: cannot read it ({e.strerror})") from None
    if not data:
        raise CheckpointError(f"strategy file {path} is empty")
    if data[:1] == b"\x0a":
        raise CheckpointError(f"{path} is a MindSpore checkpoint, not a strategy file (ParallelStrategyMap)")
    stage, layouts = None, []
    try:
        for field, wire_type, a, b in ms._fields(data, 0, len(data)):
            if field == 2 and wire_type == 2 and stage is None:  # the first strategy item gives the stage
                for f2, w2, a2, b2 in ms._fields(data, a, b):
                    if f2 == 2 and w2 == 2:
                        stage = next((v for f3, w3, v, _ in ms._fields(data, a2, b2) if f3 == 1 and w3 == 0), 0)
            elif field == 3 and wire_type == 2:
                name, span = None, None
                for f2, w2, a2, b2 in ms._fields(data, a, b):
                    if f2 == 1 and w2 == 2:
                        name = bytes(data[a2:b2]).decode("utf-8", errors="replace")
                    elif f2 == 2 and w2 == 2:
                        span = (a2, b2)
                if name is None or span is None:
                    raise ms._Corrupt("a parallel_layout_item without param_name or parallel_layouts")
                layouts.append((name, _parse_layouts(data, *span, name, path)))
    except ms._Corrupt as e:
        raise CheckpointError(f"strategy file {path} is corrupt: {e}") from None
    if not layouts:
        raise CheckpointError(f"strategy file {path} holds no parameter layouts (not a ParallelStrategyMap?)")
    return stage or 0, layouts


def read_strategy(path: str | os.PathLike) -> dict[str, Layout]:
    """The layouts of a strategy file, or of a folder of per-stage strategy files (pipeline sets).

    Args:
        path: a ParallelStrategyMap file (one stage, or merged over stages with `<stage>-<name>`
            names), or a folder whose `*.ckpt` files are one strategy file per stage.

    Returns:
        MindFormers parameter name -> Layout, `stages` set to the stages holding it (the layout is
        the lowest stage's).

    Raises:
        CheckpointError: unreadable or corrupt file; no layouts; stages that are missing or that
            have different device counts.
    """
    path = Path(path)
    files = sorted(p for p in path.glob("*.ckpt") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise CheckpointError(f"strategy folder {path} holds no *.ckpt strategy files")
    if not path.exists():
        raise CheckpointError(f"strategy file {path} not found")
    by_stage: dict[int, dict[str, Layout]] = {}
    for file in files:
        stage, layouts = _read_strategy_file(file)
        for stored, layout in layouts:
            prefix, dash, rest = stored.partition("-")
            named_stage, name = (int(prefix), rest) if dash and prefix.isdigit() else (stage, stored)
            by_stage.setdefault(named_stage, {})[name] = layout
    stages = sorted(by_stage)
    if stages != list(range(len(stages))):
        raise CheckpointError(f"{path}: the strategy covers pipeline stages {stages}; expected 0 to {stages[-1]} "
                              f"(pass the strategy merged over all stages, or the folder of every stage's file)")
    merged: dict[str, Layout] = {}
    for stage in stages:
        for name, layout in by_stage[stage].items():
            if name in merged:
                first = merged[name]
                merged[name] = Layout(**{**first.__dict__, "stages": (*first.stages, stage)})
            else:
                merged[name] = Layout(**{**layout.__dict__, "stages": (stage,)})
    counts = {stage: {layout.devices for layout in by_stage[stage].values()} for stage in stages}
    if any(len(c) != 1 for c in counts.values()) or len({c.pop() for c in counts.values()}) != 1:
        raise CheckpointError(f"{path}: the layouts' device matrices cover different numbers of devices; a "
                              f"MindFormers strategy has one device count per stage, the same in every stage")
    return merged


def find_strategy(folder: str | os.PathLike) -> Path:
    """The strategy of a sharded set when none is given: `<folder>/ckpt_strategy.ckpt`, else the only
    strategy file among `<folder>/*.ckpt`, else a `strategy/` folder beside `rank_*/` or one level up
    (MindFormers' output/checkpoint and output/strategy).

    Raises:
        CheckpointError: none found (the message says where to put it or to pass it).
    """
    folder = Path(folder)
    if (folder / STRATEGY_NAME).is_file():
        return folder / STRATEGY_NAME
    candidates = [p for p in sorted(folder.glob("*.ckpt")) if p.is_file() and _is_strategy_file(p)]
    if len(candidates) == 1:
        return candidates[0]
    for place in (folder / "strategy", folder.parent / "strategy"):
        if place.is_dir() and any(_is_strategy_file(p) for p in place.glob("*.ckpt")):
            return place
    found = f" ({len(candidates)} candidates: {', '.join(p.name for p in candidates)})" if candidates else ""
    raise CheckpointError(f"{folder}: a sharded checkpoint (rank_*/) needs its strategy file{found}: pass it "
                          f"(glm6b convert --strategy FILE) or put it beside rank_*/ as {STRATEGY_NAME}")


def _is_strategy_file(path: Path) -> bool:
    """A ParallelStrategyMap starts with field 1, 2 or 3; a MindSpore checkpoint with a record (0x0a)."""
    try:
        with open(path, "rb") as f:
            return f.read(1) in (b"\x08", b"\x12", b"\x1a")
    except OSError:
        return False


# ----------------------------------------------------------------------------------- the rank files


def is_sharded_folder(path: str | os.PathLike) -> bool:
    """True if `path` is a folder holding `rank_<r>/` folders with `.ckpt` files (a MindFormers sharded set)."""
    path = Path(path)
    return path.is_dir() and any(_RANK_DIR_RE.match(d.name) and d.is_dir() and any(d.glob("*.ckpt"))
                                 for d in path.iterdir())


def find_rank_files(folder: str | os.PathLike) -> dict[int, Path]:
    """The `.ckpt` file of every `rank_<r>/` folder.

    A rank folder holding several checkpoints (one per save) gives the one of the highest
    `-<epoch>_<step>` (MindSpore's transform_checkpoints takes the last name in sorting order, which
    puts `-9_` after `-10_`); every rank must have that step.

    Raises:
        CheckpointError: no rank folders; a rank folder without a `.ckpt`, with several of no
            `-<epoch>_<step>` name, or without the step the others have.
    """
    folder = Path(folder)
    ranks = {int(m.group(1)): d for d in folder.iterdir() if d.is_dir() and (m := _RANK_DIR_RE.match(d.name))}
    if not ranks:
        raise CheckpointError(f"{folder}: no rank_<r>/ folders (a MindFormers sharded checkpoint)")
    files = {}
    for rank, rank_dir in sorted(ranks.items()):
        files[rank] = sorted(p for p in rank_dir.glob("*.ckpt") if p.is_file())
        if not files[rank]:
            raise CheckpointError(f"{rank_dir}: rank {rank} holds no .ckpt file")
    if all(len(found) == 1 for found in files.values()):
        return {rank: found[0] for rank, found in files.items()}
    steps: dict[int, dict[tuple[int, int], Path]] = {}
    for rank, found in files.items():
        steps[rank] = {(int(m.group(1)), int(m.group(2))): p for p in found if (m := _STEP_RE.search(p.name))}
        if len(steps[rank]) != len(found):
            raise CheckpointError(f"{ranks[rank]}: rank {rank} holds {len(found)} checkpoints ({found[0].name}, ...) "
                                  f"not all named <prefix>-<epoch>_<step>.ckpt; keep one per rank")
    newest = max(max(numbered) for numbered in steps.values())
    chosen = {}
    for rank, numbered in steps.items():
        if newest not in numbered:
            raise CheckpointError(f"{ranks[rank]}: rank {rank} has no checkpoint of epoch {newest[0]} step "
                                  f"{newest[1]}, which other ranks have")
        chosen[rank] = numbered[newest]
    return dict(sorted(chosen.items()))


# ----------------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class _Piece:
    rank: int
    region: tuple[slice, ...]  # where the rank's slice goes in the whole tensor


@dataclass(frozen=True)
class _Plan:
    name: str
    tensor_type: str
    shape: tuple[int, ...]
    pieces: tuple[_Piece, ...]


def _coordinates(rank: int, dev_matrix: tuple[int, ...]) -> list[int]:
    coords = []
    for size in reversed(dev_matrix):  # row-major: the last device dim varies fastest
        coords.append(rank % size)
        rank //= size
    return coords[::-1]


def _opt_axes(layout: Layout, name: str, where: Path) -> list[tuple[int, int]]:
    """(device dim, size used) of the optimizer-shard dims, leftmost first (see the module docstring)."""
    size = layout.opt_shard_size
    if size == -1:
        size = layout.devices // math.prod(layout.strategy)
    n = len(layout.dev_matrix)
    used = {n - 1 - k for k in layout.tensor_map if k >= 0}
    repeated = [i for i, d in enumerate(layout.dev_matrix) if i not in used and d > 1]
    axes, remaining = [], size
    for axis in reversed(repeated):
        if remaining == 1:
            break
        dim = layout.dev_matrix[axis]
        if remaining < dim:  # only the inner part of this dim: its coordinate modulo what is left
            if dim % remaining:
                break
            use = remaining
        else:
            if remaining % dim:
                break
            use = dim
        axes.insert(0, (axis, use))
        remaining //= use
    if remaining != 1 or size < 1:
        raise CheckpointError(f"{where}: parameter {name}: optimizer shard size {layout.opt_shard_size} does not fit "
                              f"the devices its tensor_map {list(layout.tensor_map)} leaves over in dev_matrix "
                              f"{list(layout.dev_matrix)}")
    return axes


class ShardedCheckpoint:
    """A MindFormers sharded checkpoint set: `rank_<r>/` folders and the strategy that cut them.

    Opening checks everything that can be checked without reading tensor data: every rank the
    strategy needs is there, every rank's slice of every parameter has the shape the strategy gives,
    and the rank count fits the strategy.

    Args:
        folder: the folder holding `rank_<r>/`.
        strategy: the strategy file or per-stage folder (default: `find_strategy(folder)`).

    Attributes:
        folder, strategy_path: as given / found.
        layouts: parameter name -> Layout.
        rank_files: rank -> its `.ckpt` file.
        entries: the network's whole tensors as CkptEntry (MindFormers names, whole shapes; chunks =
            the slices read), in rank-0 order.
        other: the names of the optimizer-state and training entries, which are not merged.

    Raises:
        CheckpointError: see `read_strategy`, `find_rank_files`; a missing rank, a strategy that does not
            fit the slices (one line naming the parameter and rank).
    """

    def __init__(self, folder: str | os.PathLike, strategy: str | os.PathLike | None = None):
        self.folder = Path(folder)
        self.strategy_path = Path(strategy) if strategy is not None else find_strategy(self.folder)
        self.layouts = read_strategy(self.strategy_path)
        self.rank_files = find_rank_files(self.folder)
        self._readers: dict[int, ms.CkptReader] = {}
        try:
            for rank, file in self.rank_files.items():
                self._readers[rank] = ms.CkptReader(file)
            self._plans = self._plan()
        except BaseException:
            self.close()
            raise
        self.other = [name for name in self._holders if not ms.is_model_entry(name)]
        self.entries = [ms.CkptEntry(p.name, p.tensor_type, p.shape,
                                     math.prod(p.shape) * ms.DTYPES[p.tensor_type].itemsize, len(p.pieces))
                        for p in self._plans.values()]

    def __enter__(self) -> "ShardedCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Unmap every rank file."""
        for reader in self._readers.values():
            reader.close()

    def _plan(self) -> dict[str, _Plan]:
        stage_devices = next(iter(self.layouts.values())).devices
        stages = 1 + max(s for layout in self.layouts.values() for s in layout.stages)
        total = stage_devices * stages
        extra = [r for r in self.rank_files if r >= total]
        if extra:
            raise CheckpointError(f"{self.folder}: rank_{extra[0]}/ is beyond the strategy's {total} devices "
                                  f"({stages} stage(s) of {stage_devices}; strategy {self.strategy_path}): the "
                                  f"strategy file is not this set's")
        holders: dict[str, list[int]] = {}
        for rank, reader in self._readers.items():
            for name in reader.entries:
                holders.setdefault(name, []).append(rank)
        self._holders = holders
        plans = {}
        for name in holders:
            if not ms.is_model_entry(name):
                continue
            layout = self.layouts.get(name)
            plans[name] = self._plan_whole(name, holders[name]) if layout is None else \
                self._plan_sliced(name, layout, holders[name])
        missing = [n for n in self.layouts if ms.is_model_entry(n) and n not in holders]
        if missing:
            raise CheckpointError(f"{self.folder}: parameter {missing[0]} is in the strategy file but in no rank's "
                                  f"checkpoint ({len(missing)} such)")
        return plans

    def _entry(self, rank: int, name: str) -> ms.CkptEntry:
        return self._readers[rank].entries[name]

    def _plan_whole(self, name: str, ranks: list[int]) -> _Plan:
        """A parameter the strategy does not list: whole on every rank holding it (the lowest one is read)."""
        first = self._entry(ranks[0], name)
        for rank in ranks[1:]:
            entry = self._entry(rank, name)
            if (entry.shape, entry.tensor_type) != (first.shape, first.tensor_type):
                raise CheckpointError(f"{self.folder}: parameter {name} is not in the strategy file but rank {rank} "
                                      f"holds {list(entry.shape)} {entry.tensor_type} and rank {ranks[0]} "
                                      f"{list(first.shape)} {first.tensor_type}")
        self._check_type(name, first, ranks[0])
        return _Plan(name, first.tensor_type, first.shape,
                     (_Piece(ranks[0], tuple(slice(0, d) for d in first.shape)),))

    def _check_type(self, name: str, entry: ms.CkptEntry, rank: int) -> None:
        if entry.tensor_type not in ms.DTYPES:
            raise CheckpointError(f"{self.rank_files[rank]}: parameter {name} has tensor_type {entry.tensor_type!r}, "
                                  f"expected a tensor")

    def _plan_sliced(self, name: str, layout: Layout, holders: list[int]) -> _Plan:
        where = self.strategy_path
        strategy = layout.strategy
        n = len(layout.dev_matrix)
        if layout.field:
            raise CheckpointError(f"{where}: parameter {name}: field slicing (field={layout.field}) is not supported")
        if any(k >= n or k < -1 for k in layout.tensor_map):
            raise CheckpointError(f"{where}: parameter {name}: tensor_map {list(layout.tensor_map)} names device dims "
                                  f"beyond dev_matrix {list(layout.dev_matrix)}")
        sharded_opt = layout.opt_shard_step != 0 and layout.opt_shard_size != 0
        opt_axes = _opt_axes(layout, name, where) if sharded_opt else []
        opt_parts = math.prod(use for _, use in opt_axes)
        if layout.split_shape and (sharded_opt or len(layout.split_shape) != math.prod(strategy)):
            raise CheckpointError(f"{where}: parameter {name}: param_split_shape {list(layout.split_shape)} needs one "
                                  f"size per slice ({math.prod(strategy)}) and no optimizer sharding")
        stage = layout.stages[0]
        base = stage * layout.devices
        stage_ranks = range(base, base + layout.devices)
        holding = [r for r in holders if r in stage_ranks]
        absent = [r for r in stage_ranks if r in self._readers and r not in holding]
        if absent:
            raise CheckpointError(f"{self.rank_files[absent[0]]}: rank {absent[0]} has no parameter {name}, which the "
                                  f"strategy puts on every rank of pipeline stage {stage} (ranks {base} to "
                                  f"{base + layout.devices - 1})")
        if not holding:
            raise CheckpointError(f"{self.folder}: parameter {name} (pipeline stage {stage}): ranks {base} to "
                                  f"{base + layout.devices - 1} are missing")
        first = self._entry(holding[0], name)
        self._check_type(name, first, holding[0])
        ndim = len(layout.tensor_map)
        if len(first.shape) != ndim:
            raise CheckpointError(f"{self.rank_files[holding[0]]}: parameter {name} on rank {holding[0]} has "
                                  f"{len(first.shape)} dims, its tensor_map {list(layout.tensor_map)} has {ndim}")
        # dim-0 sizes per dim-0 part (uneven splits), else the one slice shape
        if layout.split_shape:
            flat = [int(i) for i in layout.split_shape]
            stride = math.prod(strategy[1:])
            dim0 = [flat[i * stride] for i in range(strategy[0])]
            if any(flat[i] != dim0[i // stride] for i in range(len(flat))):
                raise CheckpointError(f"{where}: parameter {name}: param_split_shape {flat} gives different dim-0 "
                                      f"sizes to slices of the same dim-0 part")
            offsets = [sum(dim0[:i]) for i in range(len(dim0))]
            if layout.indices_offset and [int(o) for o in layout.indices_offset[::stride]][:len(dim0)] != offsets:
                raise CheckpointError(f"{where}: parameter {name}: indices_offset {list(layout.indices_offset)} does "
                                      f"not match param_split_shape {flat}")
            rest = tuple(first.shape[j] for j in range(1, ndim))
            shape = (sum(dim0), *(d * s for d, s in zip(rest, strategy[1:])))
        else:
            piece_shape = first.shape
            shape = tuple(d * s * (opt_parts if j == 0 else 1) for j, (d, s) in enumerate(zip(piece_shape, strategy)))
        pieces: dict[tuple[int, ...], _Piece] = {}
        owners: dict[tuple[int, ...], list[int]] = {}
        for local in range(layout.devices):
            rank = base + local
            coords = _coordinates(local, layout.dev_matrix)
            index = tuple(coords[n - 1 - k] if k >= 0 else 0 for k in layout.tensor_map)
            part = 0
            for axis, use in opt_axes:
                part = part * use + coords[axis] % use
            key = (*index, part)
            owners.setdefault(key, []).append(rank)
            region = []
            for j in range(ndim):
                if layout.split_shape and j == 0:
                    region.append(slice(offsets[index[0]], offsets[index[0]] + dim0[index[0]]))
                elif j == 0 and opt_parts > 1:
                    chunk = shape[0] // strategy[0]
                    start = index[0] * chunk + part * (chunk // opt_parts)
                    region.append(slice(start, start + chunk // opt_parts))
                else:
                    size = shape[j] // strategy[j]
                    region.append(slice(index[j] * size, (index[j] + 1) * size))
            expected = tuple(r.stop - r.start for r in region)
            if rank in self._readers:
                entry = self._entry(rank, name)
                if entry.shape != expected or entry.tensor_type != first.tensor_type:
                    raise CheckpointError(
                        f"{self.rank_files[rank]}: parameter {name} on rank {rank} is {list(entry.shape)} "
                        f"{entry.tensor_type}; the strategy (dev_matrix {list(layout.dev_matrix)}, tensor_map "
                        f"{list(layout.tensor_map)}) gives it {list(expected)} {first.tensor_type} of a "
                        f"{list(shape)} whole")
                if key not in pieces:
                    pieces[key] = _Piece(rank, tuple(region))
        lost = [k for k in owners if k not in pieces]
        if lost:
            ranks = owners[lost[0]]
            folders = " or ".join(f"rank_{r}/" for r in ranks)
            raise CheckpointError(f"{self.folder}: parameter {name}: its slice on rank(s) {', '.join(map(str, ranks))} "
                                  f"is missing (no {folders} checkpoint)")
        return _Plan(name, first.tensor_type, shape, tuple(pieces[k] for k in sorted(pieces)))

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor of network parameter `name`, stitched from its slices.

        Raises:
            KeyError: not a network parameter of the set.
            CheckpointError: a slice that cannot be read.
        """
        plan = self._plans[name]
        whole = torch.empty(plan.shape, dtype=ms.DTYPES[plan.tensor_type])
        for piece in plan.pieces:
            whole[piece.region] = self._readers[piece.rank].read(name)
        return whole

    def iter_model_tensors(self, skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (MindFormers name, whole tensor) for every network parameter, one at a time.

        Optimizer state and other training entries are not read; they are counted in one log line.

        Args:
            skip: names for which this returns True are not read.
        """
        for name in self._plans:
            if skip is None or not skip(name):
                yield name, self.read(name)
        if self.other:
            shown = ", ".join(self.other[:3]) + (", ..." if len(self.other) > 3 else "")
            logger.warning("%s: skipped %d optimizer-state / training entries (%s)", self.folder, len(self.other),
                           shown)

    def config(self, config: ChatGLMConfig | str | os.PathLike | None = None, strict: bool = True) -> ChatGLMConfig:
        """The model config for the set (given, else `<folder>/config.json`, else the glm_6b preset),
        checked against the whole tensors' names and shapes as `ms.ckpt_config` checks one file."""
        resolved = ms.resolve_config(config, self.folder)
        ms.check_network_entries(self.folder, self.entries, resolved, strict, whole=False)
        # shapes that fit the slices but not the model: a strategy of another run (or another config)
        expected = dict(ms.expected_shapes(resolved))
        for entry in self.entries:
            plan, layout = self._plans[entry.name], self.layouts.get(entry.name)
            hf_name = ms.to_hf_name(entry.name)
            if layout is not None and hf_name in expected and entry.shape != expected[hf_name]:
                piece = self._readers[plan.pieces[0].rank].entries[entry.name]
                raise CheckpointError(f"{self.folder}: parameter {entry.name} merges to {list(entry.shape)} by the "
                                      f"strategy {self.strategy_path} (rank {plan.pieces[0].rank} holds "
                                      f"{list(piece.shape)}), but the model (config.json) has "
                                      f"{list(expected[hf_name])}: the strategy file is not this set's")
        return resolved

"""Output safety: before any expensive work, check that an output cannot destroy what the user did not
ask to replace, and that it can be written at all.

Every command that writes a file or a folder (generate, merge-lora, merge-checkpoint, run, quickstart)
calls `check_output_file` or `check_output_dir` first. They refuse, with one line that says how to
proceed, an output that

* is (or contains) one of the command's inputs: `--output` equal to `--input`, a merge into the base
  model's folder, a merged folder over the run folder that holds the checkpoint;
* already holds files the command would not write itself (a run's logs and checkpoints, unrelated
  files): these are never deleted, whatever the flags;
* already holds a previous output, unless `overwrite` (the `--overwrite` flag) is given;
* cannot be written: its folder is missing or read-only, a file is a folder or the other way round,
  or the disk has less free space than the estimated size of the output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

PathLike = str | os.PathLike


class OutputError(ValueError):
    """An output that must not or cannot be written; the message names the path and what to do."""


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(os.path.realpath(os.fspath(path))))


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    """True if `child` is `parent` or lies below it."""
    return child == parent or parent in child.parents


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size_text(nbytes: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def check_writable(folder: PathLike, flag: str = "--output", needed_bytes: int | None = None,
                   shown: PathLike | None = None) -> None:
    """Check that files can be created in `folder` (or in the nearest existing folder above it) and,
    when `needed_bytes` is given, that its disk has that much free space.

    Args:
        folder: the folder the output goes to (it may not exist yet).
        flag: the option named in the message.
        needed_bytes: estimated size of the output; None skips the free-space check.
        shown: the output as the user gave it, for messages (default: `folder`).

    Raises:
        OutputError: not a folder, not writable, or not enough free space.
    """
    base = _existing_ancestor(_resolved(folder))
    folder = folder if shown is None else shown
    if not base.is_dir():
        raise OutputError(f"{flag} {folder}: {base} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise OutputError(f"{flag} {folder}: cannot write in {base} ({e.strerror}); choose another folder") from None
    if needed_bytes:
        free = shutil.disk_usage(base).free
        if free < needed_bytes:
            raise OutputError(f"{flag} {folder}: the output needs about {_size_text(needed_bytes)} but only "
                              f"{_size_text(free)} is free on that disk; free space or choose another folder")


def check_output_file(path: PathLike, inputs: Iterable[PathLike | None] = (), flag: str = "--output",
                      overwrite: bool = True, needed_bytes: int | None = None) -> Path:
    """Check an output file before the work that produces it starts.

    Args:
        path: the file to write.
        inputs: files and folders the command reads; the output may not be one of them or lie in a
            folder among them that the command reads as a whole (None entries are ignored).
        flag: the option named in messages.
        overwrite: whether an existing file may be replaced.
        needed_bytes: estimated size, checked against the free space.

    Returns:
        The path as given, as a Path.

    Raises:
        OutputError: the output is an input, a folder, in a missing or read-only folder, or exists
            while `overwrite` is false.
    """
    target = _resolved(path)
    for source in inputs:
        if source is None:
            continue
        source_path = _resolved(source)
        if _same(target, source_path) or (source_path.is_dir() and _inside(target, source_path)):
            raise OutputError(f"{flag} {path} would overwrite the input {source}; write to another file")
    if target.is_dir():
        raise OutputError(f"{flag} {path} is a folder; expected a file name (e.g. {Path(path) / 'out.jsonl'})")
    if not target.parent.is_dir():
        raise OutputError(f"{flag} {path}: the folder {Path(path).parent} does not exist; create it first")
    if target.exists() and not overwrite:
        raise OutputError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another file")
    check_writable(target.parent, flag, needed_bytes, shown=path)
    return Path(path)


def check_output_dir(path: PathLike, inputs: Iterable[PathLike | None] = (), flag: str = "--output",
                     overwrite: bool = False, owned: Iterable[str] = (), owned_prefixes: Iterable[str] = (),
                     needed_bytes: int | None = None) -> Path:
    """Check an output folder before the work that fills it starts.

    The folder may be missing or empty. One that holds a previous output of the same command (only
    file names in `owned`, or starting with one of `owned_prefixes`) may be replaced with
    `overwrite`. Anything else in it is never deleted: the command is refused.

    Args:
        path: the folder to write.
        inputs: files and folders the command reads; the output may not be, contain or lie inside
            any of them (None entries are ignored).
        flag: the option named in messages.
        overwrite: whether a previous output may be replaced.
        owned: file names the command writes into the folder.
        owned_prefixes: prefixes of such names (e.g. "model-" for weight shards).
        needed_bytes: estimated size, checked against the free space.

    Returns:
        The path as given, as a Path.

    Raises:
        OutputError: see above.
    """
    target = _resolved(path)
    for source in inputs:
        if source is None:
            continue
        source_path = _resolved(source)
        if _inside(source_path, target):
            what = "is" if _same(source_path, target) else "contains"
            raise OutputError(f"{flag} {path} {what} the input {source}; writing there would destroy it: "
                              f"choose another folder")
        if source_path.is_dir() and _inside(target, source_path):
            raise OutputError(f"{flag} {path} lies inside the input {source}; choose a folder outside it")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{flag} {path} is a file; expected a folder")
    present = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if present:
        owned, prefixes = set(owned), tuple(owned_prefixes)
        foreign = [name for name in present if name not in owned and not name.startswith(prefixes)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputError(f"{flag} {path} already holds files this command does not write ({shown}); "
                              f"choose another (new or empty) folder")
        if not overwrite:
            raise OutputError(f"{flag} {path} already holds an output ({', '.join(present[:3])}"
                              f"{', ...' if len(present) > 3 else ''}); pass --overwrite to replace it, "
                              f"or choose another folder")
    check_writable(target, flag, needed_bytes)
    return Path(path)


def folder_bytes(path: PathLike) -> int:
    """Total size of the files under `path` (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0

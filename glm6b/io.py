"""Atomic file writes: write to a temporary name in the same folder, then rename over the target; and the one
line-by-line reader of the text files glm6b reads (JSON-lines data, prompt-lookup corpora).

Every file glm6b writes (checkpoints, configs, tokenizer files, logs that replace a previous
version, data sets) goes through here, so an interrupted write never leaves a truncated file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is synced and renamed to `path`.

    On any exception the temporary file is removed and `path` is left as it was.

    Args:
        path: the final file name. Its folder must exist.

    Yields:
        The temporary path to write (not created yet).
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files `atomic_path` left beside `path` in processes that no longer run
    (killed with SIGKILL, or a power loss: no cleanup code ran). Those of live processes are kept.

    Args:
        path: the final file name.

    Returns:
        The files removed.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-[0-9a-f]+\.tmp$")
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.iterdir():
        match = pattern.match(candidate.name)
        if match and not _process_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], Any]) -> None:
    """Call `write_fn(tmp_path)` and atomically rename the result to `path` (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        write_fn(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# A folder that glm6b is writing (`<folder>.tmp`) or replacing (`<folder>.old`) holds this file, so a
# later write removes only folders of its own under those names, never a user's folder that happens
# to carry one.
STAGING_MARKER = ".glm6b-staging"


def _remove_own_folder(path: Path) -> None:
    if not path.exists():
        return
    if not (path / STAGING_MARKER).is_file():
        raise FileExistsError(f"{path} is in the way of an atomic write and was not made by glm6b: "
                              f"move or delete it, or write elsewhere")
    shutil.rmtree(path)


def staging_folder(folder: str | os.PathLike) -> Path:
    """Create (empty but for the marker) and return `<folder>.tmp`, the name a folder is written
    under before `commit_folder`; one left by an interrupted write of glm6b's is removed first."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    _remove_own_folder(tmp)
    tmp.mkdir(parents=True)
    (tmp / STAGING_MARKER).touch()
    return tmp


def commit_folder(tmp: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Give a fully written `tmp` folder the name `folder`, replacing an older `folder` if any.

    The old folder is first renamed to `<folder>.old` (marked as glm6b's), so at every moment either
    the old or the new complete folder exists under a known name.
    """
    tmp, folder = Path(tmp), Path(folder)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        _remove_own_folder(old)
        (folder / STAGING_MARKER).touch()
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    with contextlib.suppress(FileNotFoundError):
        (folder / STAGING_MARKER).unlink()


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield `<folder>.tmp` to fill; on success it becomes `folder`, on an exception it is removed.

    Args:
        folder: the final folder name (its parent is created if needed).

    Yields:
        The temporary folder (created, empty).
    """
    tmp = staging_folder(folder)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_folder(tmp, folder)


def read_lines(path: str | os.PathLike, error: type[Exception] = ValueError,
               what: str = "file") -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of a UTF-8 text file, read one line at a time, so that a
    large file is never held whole and a byte that is not UTF-8 is reported with its line.

    Args:
        path: the file.
        error: the exception type raised (e.g. glm6b.config.DataError).
        what: what the file is, for the message when it cannot be opened ("data file").

    Yields:
        (line number counted from 1, the line with its newline) for each line that is not blank.

    Raises:
        `error`: the file cannot be opened ("PATH: cannot read the WHAT (reason)"), or a line is not UTF-8
            ("PATH, line N: not UTF-8 text (reason)").
    """
    try:
        handle = open(path, "rb")  # decoded line by line, so that a bad byte is reported with its own line
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}, line {number}: not UTF-8 text ({e.reason})") from None
            if text.strip():
                yield number, text

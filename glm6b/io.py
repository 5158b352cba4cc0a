"""Atomic file writes: write to a temporary name in the same folder, then rename over the target.

Every file glm6b writes (checkpoints, configs, tokenizer files, logs that replace a previous
version, data sets) goes through here, so an interrupted write never leaves a truncated file.
"""

from __future__ import annotations

import contextlib
import os
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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], Any]) -> None:
    """Call `write_fn(tmp_path)` and atomically rename the result to `path` (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        write_fn(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

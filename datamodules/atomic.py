"""Atomic output files: written under ``<name>.partial`` and renamed only when complete.

A reader therefore finds either the previous file or the new, complete one, never a half file
that looks whole. The temporary file sits in the target's folder (so the rename is atomic) and is
removed when the write fails; a stale one left by a killed process is overwritten by the next run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output", "commit", "partial_path"]


def partial_path(path: str | os.PathLike[str]) -> Path:
    """``<path>.partial``, with the folder created and a stale temporary removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    return partial


def commit(partial: Path, path: str | os.PathLike[str]) -> None:
    """Flush ``partial`` to disk and rename it to ``path`` (replacing any previous file)."""
    descriptor = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(partial, path)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield the temporary path to write; on success it becomes ``path``, on error it is removed.

    The caller must have closed the temporary file when the block ends.
    """
    partial = partial_path(path)
    try:
        yield partial
        commit(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise

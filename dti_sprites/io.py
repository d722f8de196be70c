"""Files: written atomically (a reader sees the previous file or the whole new one, never
half), and the errors that name a missing or invalid data file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DataSourceError", "MissingDataError", "atomic_write", "commit", "partial_path"]


class DataSourceError(Exception):
    """Data that is missing or not what its reader expects. The message names the file (and
    the record or key) and what was expected; the command line prints it as one line."""


class MissingDataError(DataSourceError, FileNotFoundError):
    """A data file or folder that does not exist; the message says how to create it."""


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`atomic_write` writes ``path`` before renaming it: ``<name>.partial`` in the
    same folder (one file system, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def commit(temporary: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Flush the closed file ``temporary`` to disk and rename it to ``path`` (replacing it).

    The last step of :func:`atomic_write`; called directly only for a temporary file that must
    outlive a failed attempt, e.g. a resumable download's ``.part`` file.
    """
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the data is on disk before the new name is
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success.

    Write the whole file to the yielded path (:func:`partial_path`; its name ends in
    ``.partial``, so writers that infer the format from the name need it given explicitly) and
    close it before the block ends. When the block ends normally the file is flushed to disk and
    replaces ``path`` (:func:`commit`); when it raises, the temporary file is deleted and
    ``path`` keeps its previous content (or stays absent). The parent folder is created; a stale
    temporary file left by a killed process is overwritten.

    A writer that stays open across calls (``datamodules.pipeline.hdf5_writer.HDF5Writer``)
    holds the block open in a :class:`contextlib.ExitStack`.

    Example::

        with atomic_write("table.csv") as tmp:
            tmp.write_text("a,b\\n1,2\\n")
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(target)
    temporary.unlink(missing_ok=True)
    try:
        yield temporary
        commit(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

"""Writing files atomically: a reader sees the previous file or the whole new one, never half."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "partial_path"]


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`atomic_write` writes ``path`` before renaming it: ``<name>.partial`` in the
    same folder (one file system, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success.

    Write the whole file to the yielded path (:func:`partial_path`; its name ends in
    ``.partial``, so writers that infer the format from the name need it given explicitly).
    When the block ends normally the file replaces ``path``; when it raises, the temporary
    file is deleted and ``path`` keeps its previous content (or stays absent). The parent
    folder is created; a stale temporary file left by a killed process is overwritten.

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
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

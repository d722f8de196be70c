"""``HDF5Writer``: the one appendable writer of the project's HDF5 files, atomic.

It writes the dataset files of ``dti-sprites-data convert`` and the prediction files of
``dti-sprites predict`` and ``dti-sprites-decompose``, batch by batch; their layouts are described
in :mod:`dti_sprites.datamodules.hdf5`, which validates and reads them. A file is written as
``<name>.partial`` (``dti_sprites.io.atomic_write``), renamed when complete and removed on
failure, so a failed write keeps a previous file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from dti_sprites.io import atomic_write

__all__ = ["HDF5Writer"]

_CHUNK_BYTES = 64 << 10  # target HDF5 chunk size


class _Discard(Exception):
    """Ends the atomic write of an :class:`HDF5Writer` without keeping the file."""


class HDF5Writer:
    """Appends batches of rows to datasets at the root of a new HDF5 file, atomically.

    The first ``append`` creates one resizable dataset per key (row shape and dtype from the
    arrays, about 64 KB chunks; string arrays become UTF-8 strings); later batches must carry the
    same keys. Until ``close(commit=True)`` only ``<path>.partial`` exists: the writer holds an
    :func:`~dti_sprites.io.atomic_write` block open from construction to ``close``. As a context
    manager it commits on success and discards the file on an exception.

    Args:
        path: the file to write.
        attrs: file attributes (more can be set through ``attrs`` until the file is closed).
        compression: HDF5 filter of every dataset (e.g. ``"gzip"``), or None.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        attrs: Mapping[str, Any] | None = None,
        compression: str | None = None,
    ) -> None:
        self.path = Path(path)
        with contextlib.ExitStack() as stack:  # an error here deletes the temporary file
            self.partial = stack.enter_context(atomic_write(self.path))
            self.file = h5py.File(self.partial, "w")
            self.file.attrs.update(attrs or {})
            self._write = stack.pop_all()  # held open across batches until ``close``
        self.compression = compression
        self.count = 0  # rows written

    @property
    def attrs(self) -> h5py.AttributeManager:
        """The file attributes."""
        return self.file.attrs

    def append(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append ``rows`` (key -> (n, ...) array, the same n for every key)."""
        lengths = {len(value) for value in rows.values()}
        if len(lengths) != 1:
            raise ValueError(f"{self.path}: rows of different lengths {sorted(lengths)}")
        if self.count or len(self.file):
            if set(rows) != set(self.file):
                raise ValueError(
                    f"{self.path}: keys {sorted(rows)} differ from the first batch's "
                    f"{sorted(self.file)}"
                )
        n = lengths.pop()
        for name, value in rows.items():
            dataset = self.file[name] if name in self.file else self._create(name, value)
            dataset.resize(self.count + n, axis=0)
            dataset[self.count :] = value
        self.count += n

    def _create(self, name: str, value: np.ndarray) -> h5py.Dataset:
        row = value.shape[1:]
        text = value.dtype.kind in "OU"
        row_bytes = max(int(np.prod(row)) * (8 if text else value.dtype.itemsize), 1)
        chunk_rows = int(np.clip(_CHUNK_BYTES // row_bytes, 1, 4096))
        return self.file.create_dataset(
            name,
            shape=(0, *row),
            maxshape=(None, *row),
            chunks=(chunk_rows, *row),
            dtype=h5py.string_dtype() if text else value.dtype,
            compression=self.compression,
        )

    def close(self, commit: bool = True) -> Path:
        """Close the file; rename it to ``path`` (``commit``) or delete it. Returns ``path``."""
        if self.file.id.valid:
            self.file.close()
        if commit:
            self._write.close()  # atomic_write flushes and renames the temporary file
        else:
            with contextlib.suppress(_Discard), self._write:
                raise _Discard  # atomic_write deletes the temporary file
        return self.path

    def __enter__(self) -> HDF5Writer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(commit=kind is None)

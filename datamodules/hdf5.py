"""The project's HDF5 files: their layout, validation and reading (the training-time side).

Dataset files (``dti-sprites-data convert``; N records, every key at the file root):

- ``image``         (N, H, W, 3) uint8 (1 channel only in files written by hand)
- ``mask``          (N, H, W) uint8 instance label map, 0 = background
- ``semantic``      (N, H, W) uint8 class map, 0 = background (absent for Objects Room)
- ``source_index``  (N,) int64 record index in the source file
- ``visibility`` and the other source features, (N, ...); attributes ``dataset``, ``variant``,
  ``num_semantic_classes`` and the conversion's provenance (see ``pipeline.convert``).

Prediction files (``dti-sprites predict``, ``dti-sprites-decompose``): the arrays of
``Decomposition.to_arrays`` (``reconstruction``, ``instance``, ``instance_fg``, ``semantic``,
``layers``, ``sprite_choice``), one row per image, plus ``index`` and the input's
``source_index`` or ``path``.

``pipeline.hdf5_writer.HDF5Writer`` writes both, batch by batch and atomically.
``check_file`` validates a dataset file before training or decomposing, naming the file, the key
and what was expected; ``MultiObjectHDF5Dataset`` reads its records.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from dti_sprites.datamodules.base import Sample
from dti_sprites.io import DataSourceError

__all__ = [
    "HDF5FormatError",
    "MultiObjectHDF5Dataset",
    "check_file",
    "read_attr",
]

_MAP_KEYS = {"mask": "instance label map", "semantic": "semantic label map"}


class HDF5FormatError(DataSourceError, ValueError):
    """An HDF5 file that is not what the reader expects; the message names file and key."""


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def read_attr(path: str | os.PathLike[str], name: str) -> Any:
    """Attribute ``name`` of the file (``str`` for text), or None if absent or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get(name)
    except OSError:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _expected(key: str, size: str, channels: tuple[int, ...]) -> str:
    if key == "image":
        return f"(N, {size}, {' or '.join(map(str, channels))}) uint8 images"
    if key == "source_index":
        return "(N,) integer record indices"
    return f"(N, {size}) uint8 {_MAP_KEYS[key]}"


def _check_key(
    path: Path, f: h5py.File, key: str, hw: tuple[int, int] | None, channels: tuple[int, ...]
) -> h5py.Dataset:
    """The dataset ``key`` after checking its shape and dtype (``hw``: required H, W)."""
    size = "H, W" if hw is None else f"{hw[0]}, {hw[1]}"
    expected = _expected(key, size, channels)
    if key not in f or not isinstance(f[key], h5py.Dataset):
        present = ", ".join(sorted(f.keys())) or "none"
        raise HDF5FormatError(
            f"{path}: missing dataset {key!r}, expected {expected} (keys present: {present})"
        )
    ds = f[key]
    if key == "image":
        ok = ds.ndim == 4 and ds.shape[3] in channels and hw in (None, ds.shape[1:3])
    elif key == "source_index":
        ok = ds.ndim == 1
    else:
        ok = ds.ndim == 3 and ds.shape[1:] == hw
    if not ok:
        raise HDF5FormatError(
            f"{path}: {key!r} has shape {ds.shape}, expected {expected} "
            "(a file of another dataset or image size?)"
        )
    dtype_ok = ds.dtype.kind in "iu" if key == "source_index" else ds.dtype == np.uint8
    if not dtype_ok:
        wanted = "an integer type" if key == "source_index" else "uint8"
        raise HDF5FormatError(f"{path}: {key!r} has dtype {ds.dtype}, expected {wanted}")
    return ds


def check_file(
    path: str | os.PathLike[str],
    keys: Sequence[str] = (),
    optional: Sequence[str] = (),
    image_size: tuple[int, int] | None = None,
    channels: tuple[int, ...] = (3,),
    dataset: str | None = None,
    variant: str | None = None,
    num_semantic_classes: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Check that ``path`` holds records in the dataset layout; the shapes of the checked keys.

    Args:
        path: the HDF5 file.
        keys: keys required besides ``image`` (``mask``, ``semantic``, ``source_index``).
        optional: keys checked when the file has them.
        image_size: required (H, W), or None for any (the label maps must match the images).
        channels: allowed image channel counts.
        dataset, variant: required values of the attributes of that name (when the file has
            them), or None.
        num_semantic_classes: ``semantic`` labels must be below it (first 320 records checked).

    Returns:
        ``{key: shape}`` for ``image``, ``keys`` and the ``optional`` keys present, in that order.

    Raises:
        HDF5FormatError: unreadable file, attribute ``dataset`` / ``variant`` of another
            dataset, a missing key, a wrong shape (image size) or dtype, keys of different
            lengths, no records, or semantic labels out of range.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise HDF5FormatError(f"{path}: not a readable HDF5 file ({err})") from err
    with f:
        for name, required in (("dataset", dataset), ("variant", variant)):
            found = f.attrs.get(name)
            found = found.decode() if isinstance(found, bytes) else found
            if required is not None and found not in (None, "", required):
                raise HDF5FormatError(
                    f"{path}: attribute {name!r} is {found!r}, expected {required!r}"
                    + (" (this file holds another dataset)" if name == "dataset" else "")
                )
        shapes = {"image": _check_key(path, f, "image", image_size, channels).shape}
        n, hw = shapes["image"][0], shapes["image"][1:3]
        for key in [*keys, *(key for key in optional if key in f)]:
            shapes[key] = _check_key(path, f, key, hw, channels).shape
            if shapes[key][0] != n:
                raise HDF5FormatError(
                    f"{path}: {key!r} holds {shapes[key][0]} records but 'image' holds {n}"
                )
        if n == 0:
            raise HDF5FormatError(f"{path}: 'image' holds no records")
        if "semantic" in keys and num_semantic_classes is not None:
            top = int(f["semantic"][: min(n, 320)].max())
            if top >= num_semantic_classes:
                raise HDF5FormatError(
                    f"{path}: 'semantic' holds label {top} in its first records, expected "
                    f"labels < {num_semantic_classes} (num_semantic_classes of {dataset})"
                )
        return shapes


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class MultiObjectHDF5Dataset(Dataset[Sample]):
    """Records ``[start, stop)`` of an HDF5 file, as uint8 tensors.

    A sample: ``image`` (C, H, W) uint8 (C = 3, or 1 for binarized Multi-dSprites), ``mask`` and
    ``semantic`` (H, W) uint8 when listed in ``keys``, ``index`` () int64 = position in the split.

    Lazy mode opens the file on first access in the process that reads (each DataLoader worker
    opens its own handle; a handle is never pickled and is reopened after a fork).
    ``in_memory=True`` reads the whole range as numpy uint8 arrays at construction.

    Args:
        path: the HDF5 file.
        start, stop: record range.
        keys: HDF5 datasets to read besides ``image`` (``mask``, ``semantic``).
        in_memory: load the range now instead of reading on access.
    """

    def __init__(
        self,
        path: str | Path,
        start: int,
        stop: int,
        keys: Sequence[str] = ("mask", "semantic"),
        in_memory: bool = False,
    ) -> None:
        self.path = Path(path)
        self.start, self.stop = start, stop
        self.keys = ("image", *keys)
        self.arrays: dict[str, np.ndarray] | None = None
        self._file: h5py.File | None = None
        self._handles: dict[str, h5py.Dataset] = {}
        self._pid = -1
        if in_memory:
            with h5py.File(self.path, "r") as f:
                self.arrays = {k: f[k][start:stop] for k in self.keys}

    def view(self, start: int, stop: int) -> MultiObjectHDF5Dataset:
        """Records ``[start, stop)`` of the file sharing this dataset's arrays (no copy)."""
        if not self.start <= start <= stop <= self.stop:
            raise ValueError(f"[{start}, {stop}) is not inside [{self.start}, {self.stop})")
        view = MultiObjectHDF5Dataset(self.path, start, stop, self.keys[1:])
        if self.arrays is not None:
            lo, hi = start - self.start, stop - self.start
            view.arrays = {k: a[lo:hi] for k, a in self.arrays.items()}
        return view

    def __len__(self) -> int:
        return self.stop - self.start

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_handles"], state["_pid"] = None, {}, -1  # never pickled
        return state

    def close(self) -> None:
        """Close this process's file handle (reopened on the next access)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._handles, self._pid = None, {}, -1

    def rows(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Records at split positions (sorted, unique) for every key: key -> (n, …) array."""
        if self.arrays is not None:
            return {k: a[positions] for k, a in self.arrays.items()}
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._handles = {k: self._file[k] for k in self.keys}  # a lookup costs ~50 µs
            self._pid = os.getpid()
        rows = (positions + self.start).tolist()
        lo, hi = rows[0], rows[-1] + 1
        if hi - lo <= 2 * len(rows):  # dense (e.g. evaluation order): one contiguous read
            sel = np.asarray(rows) - lo
            return {k: h[lo:hi][sel] for k, h in self._handles.items()}
        # One slice per row: ~15x faster than h5py's fancy indexing (a point selection).
        return {k: np.concatenate([h[r : r + 1] for r in rows]) for k, h in self._handles.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """A whole batch, rows read in file order (what the DataLoader calls when batching)."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return []
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"index out of range for a split of {len(self)} records")
        unique, inverse = np.unique(idx, return_inverse=True)
        rows = self.rows(unique)
        samples = []
        for j, i in zip(inverse.tolist(), idx.tolist(), strict=True):
            sample = {k: torch.from_numpy(np.ascontiguousarray(rows[k][j])) for k in self.keys}
            sample["image"] = sample["image"].permute(2, 0, 1)  # (C, H, W)
            sample["index"] = torch.tensor(i, dtype=torch.int64)
            samples.append(sample)
        return samples

    def __getitem__(self, i: int) -> Sample:
        if i < 0:
            i += len(self)
        return self.__getitems__([i])[0]

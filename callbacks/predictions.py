"""``predict`` output: ``<run dir>/predictions.h5`` written batch by batch, atomically."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import h5py
import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from dti_sprites.callbacks.run_dir import run_dir
from dti_sprites.io import atomic_write


class _Discard(Exception):
    """Ends the atomic write of a :class:`PredictionFile` without keeping the file."""


class PredictionFile:
    """Appends batches of arrays to an HDF5 file under a temporary name; ``close`` renames it.

    Until ``close(commit=True)`` only the temporary file of :func:`~dti_sprites.io.atomic_write`
    exists, so a crashed run never leaves a file that looks whole.
    """

    def __init__(self, path: str | Path, attrs: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self._write = contextlib.ExitStack()  # holds the atomic write open across batches
        self.tmp = self._write.enter_context(atomic_write(self.path))
        self.file = h5py.File(self.tmp, "w")
        for key, value in (attrs or {}).items():
            self.file.attrs[key] = value
        self.count = 0

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        n = len(next(iter(arrays.values())))
        for key, value in arrays.items():
            if key not in self.file:
                self.file.create_dataset(
                    key, data=value, maxshape=(None, *value.shape[1:]),
                    chunks=(max(1, min(n, 64)), *value.shape[1:]), compression="gzip",
                )  # fmt: skip
            else:
                dataset = self.file[key]
                dataset.resize(self.count + n, axis=0)
                dataset[self.count :] = value
        self.count += n

    def close(self, commit: bool = True) -> Path:
        self.file.close()
        if commit:
            self._write.close()  # renames the temporary file to ``path``
        else:
            with contextlib.suppress(_Discard), self._write:
                raise _Discard  # the atomic write deletes its temporary file
        return self.path


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results to ``<run dir>/predictions.h5`` (``filename``).

    With several processes each rank writes ``predictions.rank<r>.h5`` with an ``index``
    dataset (position in the predicted split) so the files can be merged.
    """

    def __init__(self, filename: str = "predictions.h5") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename
        self.file: PredictionFile | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = self.filename
        if trainer.world_size > 1:
            stem, suffix = os.path.splitext(name)
            name = f"{stem}.rank{trainer.global_rank}{suffix}"
        self.file = PredictionFile(run_dir(trainer) / name)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        self.file.append(prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.file.close(commit=True)
        self.file = None
        print(f"predictions written to {path}")

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.file is not None:
            self.file.close(commit=False)
            self.file = None

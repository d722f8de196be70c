"""``predict`` output: ``<run dir>/predictions.h5`` written batch by batch, atomically."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from dti_sprites.callbacks.run_dir import run_dir
from dti_sprites.datamodules.pipeline.hdf5_writer import HDF5Writer


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results to ``<run dir>/predictions.h5`` (``filename``).

    The file is written under ``<name>.partial`` and renamed when prediction ends (see
    ``pipeline.hdf5_writer.HDF5Writer``): a failed run keeps the previous file. With several
    processes each rank writes ``predictions.rank<r>.h5`` with an ``index`` dataset (position in
    the predicted split) so the files can be merged.
    """

    def __init__(self, filename: str = "predictions.h5") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename
        self.file: HDF5Writer | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = self.filename
        if trainer.world_size > 1:
            stem, suffix = os.path.splitext(name)
            name = f"{stem}.rank{trainer.global_rank}{suffix}"
        self.file = HDF5Writer(run_dir(trainer) / name, compression="gzip")

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

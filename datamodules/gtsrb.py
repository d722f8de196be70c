"""GTSRB-8 (docs/method.md §7): eight classes of the German Traffic Sign Recognition Benchmark."""

from __future__ import annotations

import csv
from functools import partial
from typing import Any, Literal

from torch.utils.data import Dataset

from dti_sprites.datamodules.base import Sample
from dti_sprites.datamodules.image_files import ImageRecord, load_record, require
from dti_sprites.datamodules.single_object import (
    FileImageDataset,
    ResizedImagesDataModule,
    preload,
)

__all__ = ["GTSRB8_CLASSES", "GTSRB8DataModule"]

GTSRB8_CLASSES: tuple[int, ...] = (3, 7, 9, 11, 17, 18, 25, 35)
"""GTSRB class ids kept by GTSRB-8; class ``GTSRB8_CLASSES[i]`` gets label ``i``."""


class GTSRB8DataModule(ResizedImagesDataModule):
    """GTSRB-8: the GTSRB classes 3, 7, 9, 11, 17, 18, 25, 35, relabelled 0..7 in that order.

    Reads torchvision's ``GTSRB`` layout under ``root``::

        root/gtsrb/GTSRB/Training/00003/*.ppm      train (class = folder name)
        root/gtsrb/GTSRB/Final_Test/Images/*.ppm   test
        root/gtsrb/GT-final_test.csv               test labels (";"-separated, Filename, ClassId)

    The class is parsed from the folder name (torchvision numbers folders in sorted order, which
    is only right when all 43 are present). Each full image is resized to ``image_size`` ×
    ``image_size`` (aspect ratio not kept, the annotated ROI is ignored; PIL bilinear,
    antialiased). Trains on the train split; evaluates on the test split by default.

    Batches: ``image`` (B, 3, S, S) float32 in [0, 1], ``label`` (B,) int64 in 0..7, ``index``.

    Args:
        root: folder that holds (or will hold) ``gtsrb/``.
        batch_size: per process (docs/method.md §7: 128).
        eval_protocols: validation / test splits, in order (predict: the first).
        image_size: output side S in pixels.
        download: let torchvision download the missing splits in ``prepare_data``.
        **kwargs: ``num_workers``, ``in_memory``.
    """

    _protocols = ("train", "test")

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        eval_protocols: tuple[Literal["train", "test"], ...] = ("test",),
        image_size: int = 28,
        download: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root, image_size, batch_size=batch_size, eval_protocols=eval_protocols, **kwargs
        )
        self.num_classes = len(GTSRB8_CLASSES)
        self.download = download

    def prepare_data(self) -> None:
        """Download the needed splits with torchvision when ``download=True``."""
        if self.download:
            from torchvision.datasets import GTSRB

            for split in {"train", *self.eval_protocols}:
                GTSRB(str(self.root), split=split, download=True)

    def _records(self, name: str) -> list[ImageRecord]:
        hint = "(pass download=True to fetch it with torchvision)"
        base = require(self.root / "gtsrb", f"torchvision's GTSRB folder {hint}")
        labels = {c: i for i, c in enumerate(GTSRB8_CLASSES)}
        if name == "train":
            records = []
            for c in GTSRB8_CLASSES:
                folder = require(
                    base / "GTSRB" / "Training" / f"{c:05d}", f"the GTSRB train class {c} {hint}"
                )
                images = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".ppm")
                if not images:
                    raise FileNotFoundError(f"{folder} holds no .ppm image of GTSRB class {c}")
                records += [ImageRecord(p, label=labels[c]) for p in images]
            return records
        folder = require(base / "GTSRB" / "Final_Test" / "Images", f"the GTSRB test images {hint}")
        table = require(base / "GT-final_test.csv", f"the GTSRB test labels {hint}", "file")
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
        if rows and not {"Filename", "ClassId"} <= rows[0].keys():
            raise ValueError(f"{table}: expected the columns Filename and ClassId")
        records = []
        for line, row in enumerate(rows, start=2):
            try:
                class_id = int(row["ClassId"])
            except (TypeError, ValueError):
                raise ValueError(f"{table}, line {line}: ClassId {row['ClassId']!r}") from None
            if class_id in labels:
                image = folder / row["Filename"]
                require(image, f"the GTSRB test image on line {line} of {table}", "file")
                records.append(ImageRecord(image, label=labels[class_id]))
        return records

    def _make_split(self, name: str) -> Dataset[Sample]:
        records = self._records(name)
        load = partial(load_record, size=self.image_size[0], geometry="stretch")
        if not self.in_memory:
            return FileImageDataset(records, load)
        return preload(records, load, self.image_size[0], self.num_workers)

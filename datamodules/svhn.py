"""SVHN (docs/method.md §7): Street View House Numbers, read from torchvision's ``.mat`` files."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dti_sprites.datamodules.base import Sample, check_names
from dti_sprites.datamodules.image_files import require
from dti_sprites.datamodules.single_object import SingleObjectDataModule, TensorImageDataset

__all__ = ["SVHNDataModule"]


class SVHNDataModule(SingleObjectDataModule):
    """SVHN (32 × 32) from torchvision's files: ``root/{train,test,extra}_32x32.mat``.

    Each ``.mat`` holds ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) with label 10 for the digit
    0; labels are mapped 10 -> 0 (as torchvision does), so ``label`` is the digit. The files are
    read directly (not through torchvision's class, which rejects any file whose MD5 differs
    from the official one); ``download=True`` fetches them with torchvision's checksum. The whole
    data set is always held in memory: ``scipy.io.loadmat`` reads a file entirely anyway
    (train + test + extra ≈ 1.9 GB as uint8).

    Trains on the concatenation of ``splits`` (paper: train + test + extra, ``index`` = position
    in the concatenation); evaluates on ``eval_protocols`` (default test).

    Args:
        root: folder holding the ``.mat`` files.
        batch_size: per process (docs/method.md §7: 128).
        eval_protocols: SVHN files for validation / test, in order (predict: the first).
        splits: SVHN files concatenated into the training set; each must exist.
        download: let torchvision download the missing files in ``prepare_data``.
        **kwargs: ``num_workers``.
    """

    _protocols = ("train", "test", "extra")

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        eval_protocols: tuple[Literal["train", "test", "extra"], ...] = ("test",),
        splits: tuple[Literal["train", "test", "extra"], ...] = ("train", "test", "extra"),
        download: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, batch_size, eval_protocols=eval_protocols, **kwargs)
        check_names("splits", splits, self._protocols)
        self.image_size = (32, 32)
        self.num_classes = 10
        self._train_splits = tuple(splits)
        self.download = download

    def prepare_data(self) -> None:
        """Download the needed ``.mat`` files (MD5-checked) when ``download=True``."""
        if self.download:
            from torchvision.datasets import SVHN
            from torchvision.datasets.utils import download_url

            for split in {*self._train_splits, *self.eval_protocols}:
                url, filename, md5 = SVHN.split_list[split]
                download_url(url, str(self.root), filename, md5)

    def _make_split(self, name: str) -> Dataset[Sample]:
        import scipy.io

        require(self.root, "a folder holding SVHN's {train,test,extra}_32x32.mat files")
        path = require(
            self.root / f"{name}_32x32.mat",
            f"SVHN's {name} split (pass download=True, or drop it from splits / eval_protocols)",
            "file",
        )
        try:
            mat = scipy.io.loadmat(path, variable_names=["X", "y"])
        except Exception as exc:
            raise ValueError(f"cannot read {path} as a MATLAB file: {exc}") from exc
        x, y = mat.get("X"), mat.get("y")
        if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise ValueError(f"{path}: expected X (32, 32, 3, N) uint8 and y (N, 1)")
        if x.dtype != np.uint8 or y.size != x.shape[3]:
            raise ValueError(
                f"{path}: expected X uint8 and N labels, got X {x.dtype} {x.shape}, y {y.shape}"
            )
        labels = torch.from_numpy(y.reshape(-1).astype(np.int64))
        labels[labels == 10] = 0  # SVHN stores the digit 0 as 10
        if labels.numel() and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{path}: labels outside 1..10")
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # (N, 3, H, W)
        return TensorImageDataset(images, labels)

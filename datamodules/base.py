"""What every DataModule of this project provides to the LightningModule, and what they share.

Batches are dicts of tensors (collated by the default collate function):

- ``image``    (B, 3, H, W) float32 in [0, 1]; always
- ``mask``     (B, H, W) int64 label map, 0 = background, e = entity e (multi-object data;
               Weizmann Horse: 0 = background, 1 = horse)
- ``semantic`` (B, H, W) int64 class map, 0 = background (multi-object data)
- ``label``    (B,) int64 class label (labelled single-object data)
- ``index``    (B,) int64 position of the sample in its split; always

A key is present only when the dataset has that ground truth.

:class:`DTIDataModule` also holds what the DataModules have in common: the dataloader arguments
(``batch_size``, ``num_workers``, ``shuffle_seed``) and their checks, and the two loader
factories (training: shuffled, sharded, resumable; evaluation: in order).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dti_sprites.datamodules.resumable import (
    ResumableDataLoader,
    evaluation_loader,
    training_loader,
)

__all__ = ["DTIDataModule", "Sample", "check_names"]

Sample = dict[str, Tensor]
"""One sample of a dataset (or one collated batch): the keys above -> tensors."""


def check_names(what: str, names: Sequence[str], allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``names`` (argument ``what``) is a non-empty sequence of
    distinct names among ``allowed``."""
    if not names or any(n not in allowed for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"{what} must be distinct names among {tuple(allowed)}, got {tuple(names)}"
        )


class DTIDataModule(L.LightningDataModule):
    """Base class: plain attributes the model and the evaluation read, the loader arguments.

    Attributes:
        image_size: (H, W) of the images this DataModule yields.
        eval_protocols: names of the validation / test dataloaders, in order
            (e.g. ``("paper320", "heldout")``); metric keys carry these names.
        num_semantic_classes: classes of ``semantic`` including background (0 when absent).
        num_classes: classes of ``label`` (0 when absent).

    Args:
        batch_size: per process (under DDP the global batch is ``batch_size × world size``).
        num_workers: DataLoader worker processes (persistent when > 0).
        shuffle_seed: seed of the training order (epoch ``e``: a permutation drawn from
            ``shuffle_seed + e``); None: the run's ``seed_everything`` seed.
    """

    image_size: tuple[int, int] = (0, 0)
    eval_protocols: tuple[str, ...] = ("val",)
    num_semantic_classes: int = 0
    num_classes: int = 0

    def __init__(
        self, batch_size: int = 32, num_workers: int = 2, shuffle_seed: int | None = None
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed

    def _train_loader(self, dataset: Dataset[Sample]) -> ResumableDataLoader:
        """Shuffled batches of ``dataset`` (``batch_size`` per process, this process's shard),
        resumable mid-epoch (:mod:`dti_sprites.datamodules.resumable`)."""
        return training_loader(
            dataset, self.batch_size, self.num_workers, self.shuffle_seed, self.trainer
        )

    def _eval_loader(self, dataset: Dataset[Sample]) -> DataLoader[Sample]:
        """Batches of ``dataset`` in order (validation, test, predict)."""
        return evaluation_loader(dataset, self.batch_size, self.num_workers)

    def check_source(self, stage: str) -> None:
        """Raise :class:`~dti_sprites.io.DataSourceError` now when the data that ``stage``
        reads is missing or invalid and ``prepare_data`` will not create it.

        The command line calls it before the trainer or the logger start anything, so that a
        missing or broken file costs one line of output and no run. Default: no check.
        """

    def init_images(self, n: int = 100) -> torch.Tensor:
        """The first ``n`` training images, (n, 3, H, W) float32 in [0, 1].

        Deterministic (same on every DDP rank); used for data-dependent initialisation such as
        the mean background. Called after ``setup("fit")``.
        """
        raise NotImplementedError

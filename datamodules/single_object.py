"""The single-object family (docs/method.md §7): its datasets and the base of its DataModules.

The DataModules are GTSRB-8 (:mod:`~dti_sprites.datamodules.gtsrb`), SVHN
(:mod:`~dti_sprites.datamodules.svhn`), Weizmann Horse (:mod:`~dti_sprites.datamodules.horse`)
and folders of images such as Instagram collections
(:mod:`~dti_sprites.datamodules.image_folder`). Each yields the dict batches of
:mod:`dti_sprites.datamodules.base`: ``image`` (B, 3, H, W) float32 in [0, 1], ``index`` (B,)
int64 (position in its split), plus ``label`` (B,) int64 for GTSRB-8, SVHN and labelled folders,
and ``mask`` (B, H, W) int64 (0 = background, 1 = object) for Weizmann Horse and folders with
masks.

Protocols: the validation and test dataloaders iterate one split per name in
``eval_protocols``, in that order; the predict dataloader iterates the first one.

- GTSRB-8 trains on GTSRB's train split and is evaluated on its test split.
- SVHN trains on train + test + extra, as the paper, and is evaluated on test (which is therefore
  seen during training, as in the paper).
- Weizmann Horse and image folders train and evaluate on all their images (protocol ``train``).

Everything that can be checked without decoding every image (roots, folders, CSV and ``.mat``
files, image/mask pairing) is checked in ``setup``, before training, with an error naming the
path and what was expected. Images are decoded at ``setup`` when they are preloaded
(``in_memory``) and, for image folders, always: a file that cannot be decoded raises
:class:`~dti_sprites.datamodules.image_files.ImageReadError` naming it, or is skipped with a
warning when ``skip_invalid=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from dti_sprites.datamodules.base import DTIDataModule, Sample, check_names
from dti_sprites.datamodules.image_files import ImageReadError, ImageRecord
from dti_sprites.datamodules.resumable import ResumableDataLoader

__all__ = [
    "FileImageDataset",
    "Loader",
    "ResizedImagesDataModule",
    "SingleObjectDataModule",
    "TensorImageDataset",
    "preload",
    "read_all",
]

Loader = Callable[[ImageRecord], tuple[Tensor, Tensor | None]]
"""Decodes one record: image (3, S, S) uint8 and mask (S, S) uint8 or None (e.g. a
``functools.partial`` of :func:`~dti_sprites.datamodules.image_files.load_record`)."""


def _sample(image: Tensor, mask: Tensor | None, label: int | Tensor | None, index: int) -> Sample:
    """uint8 tensors -> one sample of the batch contract (image (3, H, W) float32 in [0, 1])."""
    sample = {"image": image.float().div_(255), "index": torch.tensor(index, dtype=torch.int64)}
    if mask is not None:
        sample["mask"] = mask.long()  # (H, W)
    if label is not None:
        sample["label"] = torch.as_tensor(label, dtype=torch.int64)
    return sample


class TensorImageDataset(Dataset[Sample]):
    """Preloaded samples.

    Args:
        images: (N, 3, H, W) uint8.
        labels: (N,) int64, or None.
        masks: (N, H, W) uint8 label maps, or None.
    """

    def __init__(
        self, images: Tensor, labels: Tensor | None = None, masks: Tensor | None = None
    ) -> None:
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        mask = None if self.masks is None else self.masks[i]
        label = None if self.labels is None else self.labels[i]
        return _sample(self.images[i], mask, label, i)


class FileImageDataset(Dataset[Sample]):
    """Samples decoded from disk on access (``in_memory=False``)."""

    def __init__(self, records: Sequence[ImageRecord], load: Loader) -> None:
        self.records, self.load = list(records), load

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        image, mask = self.load(self.records[i])
        return _sample(image, mask, self.records[i].label, i)


class _Reindexed(ConcatDataset):
    """Concatenated splits whose ``index`` is the position in the concatenation."""

    def __getitem__(self, i: int) -> Sample:
        sample = dict(super().__getitem__(i))
        sample["index"] = torch.tensor(i, dtype=torch.int64)
        return sample


def read_all(
    records: Sequence[ImageRecord],
    load: Loader,
    size: int,
    threads: int,
    *,
    keep: bool = True,
    skip_invalid: bool = False,
) -> tuple[list[ImageRecord], TensorImageDataset | None]:
    """Decode every record (PIL releases the GIL, so threads run in parallel).

    Returns the records that decoded and, when ``keep``, a dataset holding them. An undecodable
    file raises :class:`ImageReadError`, or is left out with a warning naming it if
    ``skip_invalid``.
    """

    def attempt(record: ImageRecord) -> tuple[Tensor, Tensor | None] | ImageReadError:
        try:
            return load(record)
        except ImageReadError as exc:
            if not skip_invalid:
                raise
            return exc

    n = len(records)
    with_masks = bool(records) and records[0].mask is not None
    images = torch.empty((n, 3, size, size), dtype=torch.uint8) if keep else None
    masks = torch.empty((n, size, size), dtype=torch.uint8) if keep and with_masks else None
    kept: list[ImageRecord] = []
    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    try:
        for record, result in zip(records, pool.map(attempt, records), strict=True):
            if isinstance(result, ImageReadError):
                warnings.warn(f"skipping {record.image}: {result}", stacklevel=2)
                continue
            if images is not None:
                images[len(kept)] = result[0]
            if masks is not None and result[1] is not None:
                masks[len(kept)] = result[1]
            kept.append(record)
    finally:
        pool.shutdown(cancel_futures=True)  # on error, do not decode the rest first
    if images is None:
        return kept, None
    n = len(kept)
    labels = None
    if kept and kept[0].label is not None:
        labels = torch.tensor([r.label for r in kept], dtype=torch.int64)
    dataset = TensorImageDataset(images[:n], labels, None if masks is None else masks[:n])
    return kept, dataset


def preload(
    records: Sequence[ImageRecord], load: Loader, size: int, threads: int
) -> TensorImageDataset:
    """Decode every record into a :class:`TensorImageDataset`; raise on an unreadable file."""
    dataset = read_all(records, load, size, threads)[1]
    assert dataset is not None
    return dataset


# ----------------------------------------------------------------------------------------------
# DataModules
# ----------------------------------------------------------------------------------------------


class SingleObjectDataModule(DTIDataModule):
    """Shared logic: split datasets built once, dataloaders, ``init_images``.

    Subclasses implement :meth:`_make_split` (one named split -> dataset), list their split
    names in ``_protocols`` and set ``_train_splits`` (the splits concatenated for training);
    they forward the arguments they do not change with ``**kwargs``.

    Args:
        root: the dataset folder.
        batch_size: per process (docs/method.md §7: 32; 128 for GTSRB-8 and SVHN).
        num_workers: dataloader workers; also the threads that preload or decode at ``setup``.
        eval_protocols: validation / test splits, in order (predict: the first); ``train``:
            all images, as the paper for Weizmann Horse and image folders.
        shuffle_seed: seed of the training order (epoch ``e``: a permutation drawn from
            ``shuffle_seed + e``); None: the run's ``seed_everything`` seed.
    """

    _protocols: ClassVar[tuple[str, ...]] = ("train",)
    _train_splits: tuple[str, ...] = ("train",)

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int = 2,
        eval_protocols: tuple[str, ...] = ("train",),
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle_seed)  # checks batch_size, num_workers
        check_names("eval_protocols", eval_protocols, self._protocols)
        self.root = Path(root)
        self.eval_protocols = tuple(eval_protocols)
        self._splits: dict[str, Dataset[Sample]] = {}
        self._train: Dataset[Sample] | None = None
        self.save_hyperparameters()  # with the arguments of the subclasses' __init__

    def _make_split(self, name: str) -> Dataset[Sample]:
        raise NotImplementedError

    def split(self, name: str) -> Dataset[Sample]:
        """The dataset of one named split, built (and checked) on first use."""
        if name not in self._splits:
            self._splits[name] = self._make_split(name)
        return self._splits[name]

    def train_set(self) -> Dataset[Sample]:
        """The training set: the ``_train_splits`` concatenated (index = position in it)."""
        if self._train is None:
            parts = [self.split(name) for name in self._train_splits]
            self._train = parts[0] if len(parts) == 1 else _Reindexed(parts)
        return self._train

    def setup(self, stage: str) -> None:
        """Build and check the splits the stage needs (training set for ``fit``, eval sets)."""
        if stage == "fit":
            self.train_set()
        for protocol in self.eval_protocols:
            self.split(protocol)

    def check_source(self, stage: str) -> None:
        """Build and check the splits now (see :meth:`DTIDataModule.check_source`), unless
        ``download`` will fetch them."""
        if not getattr(self, "download", False):
            self.setup(stage)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled batches of the training set (``batch_size`` per process, this process's
        shard), resumable mid-epoch (:mod:`dti_sprites.datamodules.resumable`)."""
        return self._train_loader(self.train_set())

    def val_dataloader(self) -> list[DataLoader[Sample]]:
        """One unshuffled loader per name in ``eval_protocols``, in that order."""
        return [self._eval_loader(self.split(p)) for p in self.eval_protocols]

    def test_dataloader(self) -> list[DataLoader[Sample]]:
        """Same loaders as :meth:`val_dataloader`."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[Sample]:
        """The first evaluation split (``eval_protocols[0]``) in order, unshuffled."""
        return self._eval_loader(self.split(self.eval_protocols[0]))

    def init_images(self, n: int = 100) -> Tensor:
        """The first ``min(n, N)`` training images in split order: (n, 3, H, W) float32, [0, 1]."""
        train = self.train_set()
        return torch.stack([train[i]["image"] for i in range(min(n, len(train)))])


class ResizedImagesDataModule(SingleObjectDataModule):
    """Single-object data decoded from image files and resized to S × S.

    Args:
        root: the dataset folder.
        image_size: output side S in pixels.
        in_memory: decode and resize everything at ``setup`` into uint8 tensors (3·S² bytes an
            image); otherwise decode on access.
        **kwargs: ``batch_size``, ``num_workers``, ``eval_protocols``.
    """

    def __init__(
        self, root: str, image_size: int = 128, in_memory: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(root, **kwargs)
        self.image_size = (image_size, image_size)
        self.in_memory = in_memory

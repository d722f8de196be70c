"""Single-object DataModules (docs/method.md §7): GTSRB-8, SVHN, Weizmann Horse, image folders.

Every DataModule yields the dict batches of :mod:`dti_sprites.datamodules.base`:
``image`` (B, 3, H, W) float32 in [0, 1], ``index`` (B,) int64 (position in its split), plus
``label`` (B,) int64 for GTSRB-8, SVHN and labelled folders, and ``mask`` (B, H, W) int64 (0 =
background, 1 = object) for Weizmann Horse and folders with masks.

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
:class:`ImageReadError` naming it, or is skipped with a warning when ``skip_invalid=True``.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from dti_sprites.datamodules.base import DTIDataModule, Sample, check_names
from dti_sprites.datamodules.image_files import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    ImageRecord,
    find_images,
    load_record,
    pair_masks,
    require,
)
from dti_sprites.datamodules.resumable import ResumableDataLoader

__all__ = [
    "GTSRB8_CLASSES",
    "GTSRB8DataModule",
    "ImageFolderDataModule",
    "SVHNDataModule",
    "WeizmannHorseDataModule",
]

GTSRB8_CLASSES: tuple[int, ...] = (3, 7, 9, 11, 17, 18, 25, 35)
"""GTSRB class ids kept by GTSRB-8 (docs/method.md §7); class ``GTSRB8_CLASSES[i]`` gets label
``i``."""

Loader = Callable[[ImageRecord], tuple[Tensor, Tensor | None]]


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


class _FileDataset(Dataset[Sample]):
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


def _read_all(
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


def _preload(
    records: Sequence[ImageRecord], load: Loader, size: int, threads: int
) -> TensorImageDataset:
    """Decode every record into a :class:`TensorImageDataset`; raise on an unreadable file."""
    dataset = _read_all(records, load, size, threads)[1]
    assert dataset is not None
    return dataset


# ----------------------------------------------------------------------------------------------
# DataModules
# ----------------------------------------------------------------------------------------------


class _SingleObjectDataModule(DTIDataModule):
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


class _ResizedImagesDataModule(_SingleObjectDataModule):
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


class GTSRB8DataModule(_ResizedImagesDataModule):
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
            return _FileDataset(records, load)
        return _preload(records, load, self.image_size[0], self.num_workers)


class SVHNDataModule(_SingleObjectDataModule):
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


class WeizmannHorseDataModule(_ResizedImagesDataModule):
    """Weizmann Horse: ~328 horse photos with binary masks, resized to S × S.

    Images in ``root/images_dir`` are paired with masks in ``root/masks_dir`` by file stem (any
    of :data:`IMAGE_EXTENSIONS`); an image without mask is an error. A mask pixel is horse when
    any channel exceeds ``mask_threshold`` (0: any nonzero). Images are resized whole (aspect
    ratio not kept, PIL bilinear, antialiased), masks with nearest, so they stay binary. As in
    the paper, all images are used for training and evaluation (protocol ``train``).

    Batches: ``image`` (B, 3, S, S) float32 in [0, 1], ``mask`` (B, S, S) int64 (1 = horse),
    ``index``.

    Args:
        root: dataset folder (e.g. ``weizmann_horse_db``).
        images_dir: image folder under ``root`` (``rgb`` in the original archive).
        masks_dir: mask folder under ``root`` (``figure_ground`` in the original archive).
        mask_threshold: largest mask value still counted as background (0: any nonzero is
            horse; raise it, e.g. to 127, for JPEG masks with compression noise).
        **kwargs: ``image_size``, ``in_memory`` (328 images: ~16 MB at 128 px),
            ``batch_size``, ``num_workers``, ``eval_protocols`` (only ``train``).
    """

    def __init__(
        self,
        root: str,
        images_dir: str = "horse",
        masks_dir: str = "mask",
        mask_threshold: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        self.images_dir, self.masks_dir = images_dir, masks_dir
        self.mask_threshold = mask_threshold

    def _make_split(self, name: str) -> Dataset[Sample]:
        require(
            self.root, f"the Weizmann Horse folder with {self.images_dir}/ and {self.masks_dir}/"
        )
        images_dir = require(self.root / self.images_dir, "the Weizmann Horse images")
        masks_dir = require(self.root / self.masks_dir, "the Weizmann Horse masks")
        images = find_images(images_dir, recursive=False)
        if not images:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} image in {images_dir}")
        masks = pair_masks(images, images_dir, masks_dir)
        records = [ImageRecord(i, m) for i, m in zip(images, masks, strict=True)]
        size = self.image_size[0]
        load = partial(
            load_record, size=size, geometry="stretch", mask_threshold=self.mask_threshold
        )
        if not self.in_memory:
            return _FileDataset(records, load)
        return _preload(records, load, size, self.num_workers)


class ImageFolderDataModule(_ResizedImagesDataModule):
    """A folder of JPEG / PNG images (searched recursively), e.g. an Instagram collection.

    Each image's short side is resized to S (PIL bilinear, antialiased), then the centre S × S
    is cropped (torchvision's ``Resize(S)`` + ``CenterCrop(S)``); EXIF orientation is applied.
    Optional ground truth for evaluation: binary masks in ``masks_dir`` at the same relative
    path (any suffix of :data:`IMAGE_EXTENSIONS`; nonzero above ``mask_threshold`` = object),
    resized and cropped the same way with nearest; and/or class labels from the first-level
    sub-folder names (sorted; ``class_names`` and ``num_classes`` are set at ``setup``).

    Every file is decoded at ``setup``: an unreadable or non-image file (with an image suffix)
    raises :class:`ImageReadError` naming it, or is skipped with a warning naming it when
    ``skip_invalid``. Files with other suffixes are ignored. Trains and evaluates on all images.

    Batches: ``image`` (B, 3, S, S) float32 in [0, 1], ``index``, plus ``mask`` (B, S, S) int64
    with ``masks_dir`` and ``label`` (B,) int64 with ``labels``.

    Args:
        root: the image folder.
        in_memory: keep the decoded images (49 KB each at 128 px) instead of decoding again.
        masks_dir: folder of masks mirroring ``root``, or None.
        labels: label each image by its first-level sub-folder under ``root``.
        skip_invalid: skip undecodable files with a warning instead of raising.
        mask_threshold: largest mask value still counted as background.
        **kwargs: ``image_size``, ``batch_size``, ``num_workers``, ``eval_protocols`` (only
            ``train``).
    """

    def __init__(
        self,
        root: str,
        in_memory: bool = False,
        masks_dir: str | None = None,
        labels: bool = False,
        skip_invalid: bool = False,
        mask_threshold: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, in_memory=in_memory, **kwargs)
        self.masks_dir = None if masks_dir is None else Path(masks_dir)
        self.labels = labels
        self.skip_invalid = skip_invalid
        self.mask_threshold = mask_threshold
        self.class_names: tuple[str, ...] = ()

    def _records(self) -> list[ImageRecord]:
        root = require(self.root, "a folder of .jpg / .jpeg / .png images")
        images = find_images(root, recursive=True)
        if not images:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} image under {root}")
        masks: list[Path | None] = [None] * len(images)
        if self.masks_dir is not None:
            masks_dir = require(self.masks_dir, f"masks mirroring the images in {root}")
            masks = list(pair_masks(images, root, masks_dir))
        labels: list[int | None] = [None] * len(images)
        if self.labels:
            tops = [p.relative_to(root).parts for p in images]
            flat = [p for p, parts in zip(images, tops, strict=True) if len(parts) == 1]
            if flat:
                raise ValueError(f"labels=True needs every image in a class sub-folder: {flat[0]}")
            self.class_names = tuple(sorted({parts[0] for parts in tops}))
            self.num_classes = len(self.class_names)
            labels = [self.class_names.index(parts[0]) for parts in tops]
        return [ImageRecord(*r) for r in zip(images, masks, labels, strict=True)]

    def _make_split(self, name: str) -> Dataset[Sample]:
        size = self.image_size[0]
        load = partial(load_record, size=size, geometry="crop", mask_threshold=self.mask_threshold)
        records, dataset = _read_all(
            self._records(),
            load,
            size,
            self.num_workers,
            keep=self.in_memory,
            skip_invalid=self.skip_invalid,
        )
        if not records:
            raise ValueError(f"no readable image under {self.root}")
        return dataset if dataset is not None else _FileDataset(records, load)

"""Folders of images (docs/method.md §7: the Instagram collections), optionally with masks and
class sub-folders."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from dti_sprites.datamodules.base import Sample
from dti_sprites.datamodules.image_files import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    find_images,
    load_record,
    pair_masks,
    require,
)
from dti_sprites.datamodules.single_object import (
    FileImageDataset,
    ResizedImagesDataModule,
    read_all,
)

__all__ = ["ImageFolderDataModule"]


class ImageFolderDataModule(ResizedImagesDataModule):
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
        records, dataset = read_all(
            self._records(),
            load,
            size,
            self.num_workers,
            keep=self.in_memory,
            skip_invalid=self.skip_invalid,
        )
        if not records:
            raise ValueError(f"no readable image under {self.root}")
        return dataset if dataset is not None else FileImageDataset(records, load)

"""Weizmann Horse (docs/method.md §7): horse photos with binary figure-ground masks."""

from __future__ import annotations

from functools import partial
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
    preload,
)

__all__ = ["WeizmannHorseDataModule"]


class WeizmannHorseDataModule(ResizedImagesDataModule):
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
            return FileImageDataset(records, load)
        return preload(records, load, size, self.num_workers)

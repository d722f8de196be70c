"""Image files on disk -> uint8 tensors: finding, decoding, mask pairing and resizing.

Used by the single-object DataModules (``single_object`` and its subclasses) and by
``dti-sprites-decompose``. Images are decoded completely with EXIF orientation applied and
converted to RGB; masks are binarised (any channel above a threshold is the object) and resized
with nearest so they stay binary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode

from dti_sprites.io import DataSourceError, MissingDataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Geometry",
    "ImageReadError",
    "ImageRecord",
    "find_images",
    "load_record",
    "pair_masks",
    "require",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
"""File suffixes (case-insensitive) treated as images in image and mask folders."""

Geometry = Literal["stretch", "crop"]


class ImageReadError(DataSourceError, ValueError):
    """A file that should hold an image could not be decoded; the message names the file."""


@dataclass(frozen=True)
class ImageRecord:
    """One sample on disk: an image, optionally its mask and its class label."""

    image: Path
    mask: Path | None = None
    label: int | None = None


def require(path: Path, expected: str, kind: Literal["dir", "file"] = "dir") -> Path:
    """Return ``path`` if it is an existing directory / file, else raise naming it."""
    ok = path.is_dir() if kind == "dir" else path.is_file()
    if not ok:
        raise MissingDataError(f"{path} not found: expected {expected}")
    return path


def _open(path: Path) -> Image.Image:
    """Decode an image file completely (EXIF orientation applied); raise naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image file {path}: {exc}") from exc


def _binary(mask: Image.Image, threshold: int) -> Image.Image:
    """Mask image -> mode "L" image of 0 (background) / 1 (object): any channel > threshold."""
    if mask.mode not in ("1", "L", "I", "I;16", "F"):
        mask = mask.convert("RGB")  # palette -> colours, alpha dropped
    values = np.asarray(mask)
    fg = values > threshold
    if fg.ndim == 3:
        fg = fg.any(axis=2)
    return Image.fromarray(fg.astype(np.uint8), mode="L")


def _resize(img: Image.Image, size: int, geometry: Geometry, nearest: bool) -> Image.Image:
    """Resize to ``size`` × ``size``.

    ``stretch``: the full image, aspect ratio not kept. ``crop``: short side to ``size`` (as
    torchvision's ``Resize(size)``), then a centred ``size`` × ``size`` crop (``CenterCrop``).
    Images use PIL bilinear, which is antialiased when shrinking (the filter support scales with
    the factor); masks use nearest, so they keep their values.
    """
    mode = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
    if geometry == "stretch":
        return TF.resize(img, [size, size], interpolation=mode, antialias=True)
    img = TF.resize(img, size, interpolation=mode, antialias=True)
    return TF.center_crop(img, [size, size])


def load_record(
    record: ImageRecord, size: int, geometry: Geometry, mask_threshold: int = 0
) -> tuple[Tensor, Tensor | None]:
    """Read one record: image (3, size, size) uint8 and mask (size, size) uint8 of 0/1 or None."""
    image = _resize(_open(record.image).convert("RGB"), size, geometry, nearest=False)
    image_t = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # (3, H, W)
    if record.mask is None:
        return image_t, None
    mask = _resize(_binary(_open(record.mask), mask_threshold), size, geometry, nearest=True)
    return image_t, torch.from_numpy(np.array(mask))  # (H, W)


def find_images(folder: Path, recursive: bool) -> list[Path]:
    """Sorted image files (by :data:`IMAGE_EXTENSIONS`) in ``folder``."""
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def pair_masks(images: Sequence[Path], root: Path, masks_dir: Path) -> list[Path]:
    """For each image, the mask with the same path relative to its folder, any suffix.

    Flat folders therefore pair by file stem (``horse001.jpg`` <-> ``horse001.png``).
    """
    masks: dict[Path, Path] = {}
    for mask in find_images(masks_dir, recursive=True):
        key = mask.relative_to(masks_dir).with_suffix("")
        if key in masks:
            raise ValueError(f"two masks for one image: {masks[key]} and {mask}")
        masks[key] = mask
    paired = []
    for image in images:
        key = image.relative_to(root).with_suffix("")
        if key not in masks:
            raise FileNotFoundError(
                f"no mask for {image}: expected {masks_dir / key}"
                f" with one of the suffixes {IMAGE_EXTENSIONS}"
            )
        paired.append(masks[key])
    return paired

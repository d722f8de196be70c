"""The datasets of this project, one record each (docs/method.md §7, §8): what conversion,
download and the DataModules know about them.

- ``Schema``: one public DeepMind TFRecord file (a dataset and variant): its features with the
  ``tf.io.FixedLenFeature`` shapes of DeepMind's readers, image size, entities, mask layout,
  location below ``BASE_URL``, record count and checksum. Images are (H, W, C) uint8; masks
  (E, H, W, 1) entity-first, except Multi-dSprites (H, W, E, 1) entity-last; per-entity factors
  (E,) or (E, D). Masks are 0/255 and form a partition; entity 0 is the background.
- ``DatasetInfo``: one dataset of ``dti-sprites-data`` and of the DataModules (``tetrominoes``,
  ``multi_dsprites``, ``clevr6``, ``clevr10``, ``objects_room``): its source files, conversion
  protocol, stored image size, semantic classes, paper training split and HDF5 file name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import numpy as np

__all__ = [
    "BASE_URL",
    "DATASETS",
    "DEFAULT_VARIANTS",
    "SCHEMAS",
    "VARIANTS",
    "DatasetInfo",
    "FeatureKind",
    "FeatureSpec",
    "Protocol",
    "Schema",
    "dataset_info",
    "get_schema",
    "resolve_variant",
]

BASE_URL = "https://storage.googleapis.com/multi-object-datasets/"
"""DeepMind's public bucket of the multi-object datasets."""

# --------------------------------------------------------------------------------------------
# Source files
# --------------------------------------------------------------------------------------------

FeatureKind: TypeAlias = Literal["bytes", "float", "int64"]
"""``bytes``: per-byte BytesList decoded to uint8; ``float``: float32; ``int64``: int64."""

_DTYPES: dict[str, type[np.generic]] = {"bytes": np.uint8, "float": np.float32, "int64": np.int64}


@dataclass(frozen=True)
class FeatureSpec:
    """One stored feature: its name, wire kind and ``FixedLenFeature`` shape."""

    name: str
    kind: FeatureKind
    shape: tuple[int, ...]
    size: int = field(init=False)  # number of stored values
    dtype: np.dtype = field(init=False)  # dtype of the decoded array

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", math.prod(self.shape))
        object.__setattr__(self, "dtype", np.dtype(_DTYPES[self.kind]))

    def describe(self) -> str:
        """E.g. ``a per-byte bytes list of 35×35×3 = 3675 values``."""
        kind = {"bytes": "per-byte bytes list", "float": "float list", "int64": "int64 list"}
        dims = "×".join(str(d) for d in self.shape)
        return f"a {kind[self.kind]} of {dims} = {self.size} values"


@dataclass(frozen=True)
class Schema:
    """A DeepMind dataset variant: features, image size, entities and mask layout.

    Attributes:
        dataset: DeepMind name (``tetrominoes``, ``multi_dsprites``, ``clevr_with_masks``,
            ``objects_room``).
        variant: variant name, ``None`` for datasets without variants.
        image_size: (H, W).
        channels: C of the stored image (1 for binarized Multi-dSprites).
        num_entities: E, background included.
        mask_layout: ``entity_first`` (E, H, W, 1) or ``entity_last`` (H, W, E, 1).
        features: every stored feature, ``image`` and ``mask`` first.
        source: path of the public file below ``BASE_URL``.
        num_records: records in the public file.
        class_feature: per-entity factor that gives the semantic class, or ``None``.
        sha256: hex SHA-256 of the public file, checked after a download; ``None`` where it is
            not recorded yet (the download then checks the MD5 that the bucket publishes, and
            the converter stores the file's SHA-256 in the HDF5 attribute ``source_sha256``).
    """

    dataset: str
    variant: str | None
    image_size: tuple[int, int]
    channels: int
    num_entities: int
    mask_layout: Literal["entity_first", "entity_last"]
    features: tuple[FeatureSpec, ...]
    source: str
    num_records: int
    class_feature: str | None
    sha256: str | None = None

    @property
    def name(self) -> str:
        """``dataset`` or ``dataset/variant``."""
        return self.dataset if self.variant is None else f"{self.dataset}/{self.variant}"

    def feature(self, name: str) -> FeatureSpec:
        """The spec of feature ``name`` (KeyError when the dataset does not store it)."""
        for spec in self.features:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.name} has no feature {name!r}")

    @property
    def factor_names(self) -> tuple[str, ...]:
        """Every feature except ``image`` and ``mask``."""
        return tuple(s.name for s in self.features if s.name not in ("image", "mask"))

    def url(self, base_url: str = BASE_URL) -> str:
        """Where the public file is, below ``base_url`` (the DeepMind bucket or a mirror)."""
        return base_url.rstrip("/") + "/" + self.source


def _pixels(h: int, w: int, c: int, e: int, entity_last: bool = False) -> tuple[FeatureSpec, ...]:
    """The image (H, W, C) and the masks of E entities, entity-first or entity-last."""
    mask = (h, w, e, 1) if entity_last else (e, h, w, 1)
    return FeatureSpec("image", "bytes", (h, w, c)), FeatureSpec("mask", "bytes", mask)


def _sprite_factors(e: int, c: int) -> tuple[FeatureSpec, ...]:
    """Position, shape, colour (C channels) and visibility of E sprites, in the stored order."""
    return (
        FeatureSpec("x", "float", (e,)),
        FeatureSpec("y", "float", (e,)),
        FeatureSpec("shape", "float", (e,)),
        FeatureSpec("color", "float", (e, c)),
        FeatureSpec("visibility", "float", (e,)),
    )


def _tetrominoes() -> Schema:
    e, (h, w) = 4, (35, 35)
    return Schema(
        "tetrominoes",
        None,
        (h, w),
        3,
        e,
        "entity_first",
        (*_pixels(h, w, 3, e), *_sprite_factors(e, 3)),
        "tetrominoes/tetrominoes_train.tfrecords",
        1_000_000,
        "shape",
    )


def _multi_dsprites(variant: str, e: int, c: int) -> Schema:
    h, w = 64, 64
    return Schema(
        "multi_dsprites",
        variant,
        (h, w),
        c,
        e,
        "entity_last",
        (
            *_pixels(h, w, c, e, entity_last=True),
            *_sprite_factors(e, c),
            FeatureSpec("orientation", "float", (e,)),
            FeatureSpec("scale", "float", (e,)),
        ),
        f"multi_dsprites/multi_dsprites_{variant}.tfrecords",
        1_000_000,
        "shape",
    )


def _clevr() -> Schema:
    e, (h, w) = 11, (240, 320)
    return Schema(
        "clevr_with_masks",
        None,
        (h, w),
        3,
        e,
        "entity_first",
        (
            *_pixels(h, w, 3, e),
            FeatureSpec("x", "float", (e,)),
            FeatureSpec("y", "float", (e,)),
            FeatureSpec("z", "float", (e,)),
            FeatureSpec("pixel_coords", "float", (e, 3)),
            FeatureSpec("rotation", "float", (e,)),
            FeatureSpec("size", "bytes", (e,)),
            FeatureSpec("material", "bytes", (e,)),
            FeatureSpec("shape", "bytes", (e,)),
            FeatureSpec("color", "bytes", (e,)),
            FeatureSpec("visibility", "float", (e,)),
        ),
        "clevr_with_masks/clevr_with_masks_train.tfrecords",
        100_000,
        "shape",
    )


def _objects_room(variant: str, e: int) -> Schema:
    h, w = 64, 64
    source = "train" if variant == "train" else f"test_{variant}"
    return Schema(
        "objects_room",
        variant,
        (h, w),
        3,
        e,
        "entity_first",
        _pixels(h, w, 3, e),
        f"objects_room/objects_room_{source}.tfrecords",
        1_000_000 if variant == "train" else 922,
        None,
    )


SCHEMAS: dict[tuple[str, str | None], Schema] = {
    ("tetrominoes", None): _tetrominoes(),
    ("multi_dsprites", "colored_on_grayscale"): _multi_dsprites("colored_on_grayscale", 6, 3),
    ("multi_dsprites", "colored_on_colored"): _multi_dsprites("colored_on_colored", 5, 3),
    ("multi_dsprites", "binarized"): _multi_dsprites("binarized", 4, 1),
    ("clevr_with_masks", None): _clevr(),
    ("objects_room", "train"): _objects_room("train", 7),
    ("objects_room", "six_objects"): _objects_room("six_objects", 10),
    ("objects_room", "empty_room"): _objects_room("empty_room", 4),
    ("objects_room", "identical_color"): _objects_room("identical_color", 10),
}

VARIANTS: dict[str, tuple[str | None, ...]] = {}
for _dataset, _variant in SCHEMAS:
    VARIANTS.setdefault(_dataset, ())
    VARIANTS[_dataset] += (_variant,)

DEFAULT_VARIANTS: dict[str, str | None] = {
    "tetrominoes": None,
    "multi_dsprites": "colored_on_grayscale",  # the paper's Multi-dSprites
    "clevr_with_masks": None,
    "objects_room": "train",
}

# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """What a conversion does beyond decoding.

    Attributes:
        first_n: read only the first ``first_n`` records (``None``: all).
        max_objects: keep records with ``visibility[1:].sum() <= max_objects`` (``None``: all).
        crop: (top, bottom, left, right) rows ``top:bottom`` and columns ``left:right``.
        resize: (H, W) after the crop.
    """

    first_n: int | None = None
    max_objects: int | None = None
    crop: tuple[int, int, int, int] | None = None
    resize: tuple[int, int] | None = None

    def describe(self, first_n: int | None) -> str:
        """One line, e.g. ``first 70000 records; keep visibility[1:].sum() <= 6; ...``."""
        parts = [f"first {first_n} records" if first_n is not None else "all records"]
        if self.max_objects is not None:
            parts.append(f"keep visibility[1:].sum() <= {self.max_objects}")
        if self.crop is not None:
            top, bottom, left, right = self.crop
            parts.append(f"crop rows {top}:{bottom} cols {left}:{right}")
        if self.resize is not None:
            parts.append(
                f"resize {self.resize[0]}x{self.resize[1]} (image bilinear align_corners=False "
                "antialias=False rounded; mask/semantic nearest)"
            )
        return "; ".join(parts)


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset of ``dti-sprites-data`` and of the DataModules.

    Attributes:
        name: the converter's ``--dataset`` and the HDF5 attribute ``dataset``.
        source_dataset: the DeepMind dataset whose records it reads; its variants (``VARIANTS``)
            are this dataset's variants.
        protocol: what the conversion does beyond decoding.
        num_semantic_classes: classes of the ``semantic`` map, background included (0: no map).
        semantic: what the class ids mean (stored in the HDF5 attribute ``semantic``).
        train_size: the paper's training split, records ``[0, train_size)`` of the HDF5 file;
            ``None`` where no experiment of the paper uses the dataset.
        variant_in_name: the HDF5 file name carries the variant even when it is the default.
    """

    name: str
    source_dataset: str
    protocol: Protocol
    num_semantic_classes: int
    semantic: str
    train_size: int | None
    variant_in_name: bool = False

    def schema(self, variant: str | None = None) -> Schema:
        """The source file of ``variant`` (``None``: the default variant).

        Raises:
            ValueError: unknown variant, listing the valid ones.
        """
        return get_schema(self.name, variant)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the converted images (after the protocol's crop and resize)."""
        h, w = self.schema().image_size
        if self.protocol.crop is not None:
            top, bottom, left, right = self.protocol.crop
            h, w = bottom - top, right - left
        return self.protocol.resize or (h, w)

    def h5_name(self, variant: str | None = None) -> str:
        """File name of the converted dataset: ``<name>[_<variant>].h5``.

        The variant is left out when it is the default, unless ``variant_in_name``: e.g.
        ``tetrominoes.h5``, ``multi_dsprites_colored_on_grayscale.h5``, ``clevr6.h5``,
        ``objects_room.h5``, ``objects_room_six_objects.h5``.
        """
        variant = self.schema(variant).variant
        default = DEFAULT_VARIANTS[self.source_dataset]
        if variant is None or (variant == default and not self.variant_in_name):
            return f"{self.name}.h5"
        return f"{self.name}_{variant}.h5"


_CLEVR_CROP = (29, 221, 64, 256)
_CLEVR6 = Protocol(70_000, 6, _CLEVR_CROP, (128, 128))
_CLEVR10 = Protocol(70_000, None, _CLEVR_CROP, (128, 128))
_SHAPE_IDS = "shape id 1..19 of the piece (0 = background)"
_DSPRITES = "shape 1 square, 2 ellipse, 3 heart (0 = background)"
_CLEVR_CLASSES = "1 + 2*(shape - 1) + (material - 1): shape x material, 1..6 (0 = background)"
_NONE = "absent: Objects Room has no object classes"

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        # name, DeepMind source, protocol, semantic classes, their meaning, paper training split
        DatasetInfo("tetrominoes", "tetrominoes", Protocol(), 20, _SHAPE_IDS, 60_000),
        DatasetInfo("multi_dsprites", "multi_dsprites", Protocol(), 4, _DSPRITES, 60_000, True),
        DatasetInfo("clevr6", "clevr_with_masks", _CLEVR6, 7, _CLEVR_CLASSES, 34_963),
        DatasetInfo("clevr10", "clevr_with_masks", _CLEVR10, 7, _CLEVR_CLASSES, None),
        DatasetInfo("objects_room", "objects_room", Protocol(), 0, _NONE, 60_000),
    )
}
"""CLEVR6 trains on all 34,963 scenes of the first 70,000 records with at most 6 objects; CLEVR10
is in no experiment of the paper. Multi-dSprites' file names always carry the variant."""


def dataset_info(name: str) -> DatasetInfo:
    """The record of dataset ``name``.

    Raises:
        ValueError: unknown dataset, listing the valid ones.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def resolve_variant(dataset: str, variant: str | None) -> tuple[str, str | None]:
    """(DeepMind dataset, variant) for a DeepMind or ``DATASETS`` name (e.g. ``clevr6``).

    ``variant=None`` picks the default (``colored_on_grayscale`` for Multi-dSprites, ``train``
    for Objects Room).

    Raises:
        ValueError: unknown dataset or variant, listing the valid ones.
    """
    source = DATASETS[dataset].source_dataset if dataset in DATASETS else dataset
    if source not in VARIANTS:
        known = sorted({*VARIANTS, *DATASETS})
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(known)}")
    if variant is None:
        variant = DEFAULT_VARIANTS[source]
    if variant not in VARIANTS[source]:
        allowed = [v for v in VARIANTS[source] if v is not None]
        expected = ", ".join(allowed) if allowed else "no variant"
        raise ValueError(f"unknown variant {variant!r} for {dataset}; expected {expected}")
    return source, variant


def get_schema(dataset: str, variant: str | None = None) -> Schema:
    """The source file of ``dataset`` (see ``resolve_variant`` for names and defaults)."""
    return SCHEMAS[resolve_variant(dataset, variant)]

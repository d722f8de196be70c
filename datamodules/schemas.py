"""One table per DeepMind multi-object dataset and variant (SPEC §8), and the record decoder.

Shapes are the ``tf.io.FixedLenFeature`` shapes of DeepMind's readers: images (H, W, C) uint8;
masks (E, H, W, 1) entity-first, except Multi-dSprites (H, W, E, 1) entity-last; per-entity
factors (E,) or (E, D). Masks are 0/255 and form a partition; entity 0 is the background.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import numpy as np

from dti_sprites.datamodules.tf_example import FeatureValue
from dti_sprites.datamodules.tfrecord import TFRecordError

__all__ = [
    "DEFAULT_VARIANTS",
    "SCHEMAS",
    "VARIANTS",
    "FeatureKind",
    "FeatureSpec",
    "Schema",
    "decode_example",
    "entity_first_masks",
    "get_schema",
    "resolve_variant",
]

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
        source: path of the public file under the DeepMind bucket.
        num_records: records in the public file.
        class_feature: per-entity factor that gives the semantic class, or ``None``.
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


def _tetrominoes() -> Schema:
    e, (h, w) = 4, (35, 35)
    return Schema(
        "tetrominoes", None, (h, w), 3, e, "entity_first",
        (
            FeatureSpec("image", "bytes", (h, w, 3)),
            FeatureSpec("mask", "bytes", (e, h, w, 1)),
            FeatureSpec("x", "float", (e,)),
            FeatureSpec("y", "float", (e,)),
            FeatureSpec("shape", "float", (e,)),
            FeatureSpec("color", "float", (e, 3)),
            FeatureSpec("visibility", "float", (e,)),
        ),
        "tetrominoes/tetrominoes_train.tfrecords", 1_000_000, "shape",
    )  # fmt: skip


def _multi_dsprites(variant: str, e: int, c: int) -> Schema:
    h, w = 64, 64
    return Schema(
        "multi_dsprites", variant, (h, w), c, e, "entity_last",
        (
            FeatureSpec("image", "bytes", (h, w, c)),
            FeatureSpec("mask", "bytes", (h, w, e, 1)),
            FeatureSpec("x", "float", (e,)),
            FeatureSpec("y", "float", (e,)),
            FeatureSpec("shape", "float", (e,)),
            FeatureSpec("color", "float", (e, c)),
            FeatureSpec("visibility", "float", (e,)),
            FeatureSpec("orientation", "float", (e,)),
            FeatureSpec("scale", "float", (e,)),
        ),
        f"multi_dsprites/multi_dsprites_{variant}.tfrecords", 1_000_000, "shape",
    )  # fmt: skip


def _clevr() -> Schema:
    e, (h, w) = 11, (240, 320)
    return Schema(
        "clevr_with_masks", None, (h, w), 3, e, "entity_first",
        (
            FeatureSpec("image", "bytes", (h, w, 3)),
            FeatureSpec("mask", "bytes", (e, h, w, 1)),
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
        "clevr_with_masks/clevr_with_masks_train.tfrecords", 100_000, "shape",
    )  # fmt: skip


def _objects_room(variant: str, e: int) -> Schema:
    h, w = 64, 64
    source = "train" if variant == "train" else f"test_{variant}"
    return Schema(
        "objects_room", variant, (h, w), 3, e, "entity_first",
        (FeatureSpec("image", "bytes", (h, w, 3)), FeatureSpec("mask", "bytes", (e, h, w, 1))),
        f"objects_room/objects_room_{source}.tfrecords",
        1_000_000 if variant == "train" else 922, None,
    )  # fmt: skip


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

# Converter names that read another dataset's records.
_ALIASES = {"clevr6": "clevr_with_masks", "clevr10": "clevr_with_masks"}


def resolve_variant(dataset: str, variant: str | None) -> tuple[str, str | None]:
    """(DeepMind dataset, variant) for a dataset name (aliases ``clevr6``/``clevr10`` allowed).

    ``variant=None`` picks the default (``colored_on_grayscale`` for Multi-dSprites, ``train``
    for Objects Room).

    Raises:
        ValueError: unknown dataset or variant, listing the valid ones.
    """
    source = _ALIASES.get(dataset, dataset)
    if source not in VARIANTS:
        known = sorted([*VARIANTS, *_ALIASES])
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(known)}")
    if variant is None:
        variant = DEFAULT_VARIANTS[source]
    if variant not in VARIANTS[source]:
        allowed = [v for v in VARIANTS[source] if v is not None]
        expected = ", ".join(allowed) if allowed else "no variant"
        raise ValueError(f"unknown variant {variant!r} for {dataset}; expected {expected}")
    return source, variant


def get_schema(dataset: str, variant: str | None = None) -> Schema:
    """The schema of ``dataset`` (see ``resolve_variant`` for names and defaults)."""
    return SCHEMAS[resolve_variant(dataset, variant)]


def _kind_of(value: FeatureValue) -> str:
    if isinstance(value, list):
        return "a bytes list of multi-byte strings"
    return {
        np.dtype(np.uint8): "a per-byte bytes list",
        np.dtype(np.float32): "a float list",
        np.dtype(np.int64): "an int64 list",
    }.get(value.dtype, f"an array of {value.dtype}")


def decode_example(
    schema: Schema,
    example: dict[str, FeatureValue],
    path: str | os.PathLike[str],
    index: int,
) -> dict[str, np.ndarray]:
    """Check a parsed Example against ``schema`` and reshape its features.

    Args:
        schema: the expected dataset.
        example: output of ``tf_example.parse_example``.
        path, index: file and record index, for error messages.

    Returns:
        ``{name: array}`` with each feature's ``FixedLenFeature`` shape and dtype (uint8 for
        ``bytes``, float32, int64), in schema order; features outside the schema are dropped.

    Raises:
        TFRecordError: a feature is missing, of the wrong kind or of the wrong size.
    """
    missing = [spec for spec in schema.features if spec.name not in example]
    if missing:  # before any size check: a missing feature usually means another dataset
        others = "".join(f", {spec.name!r}" for spec in missing[1:])
        present = ", ".join(sorted(example)) or "none"
        raise TFRecordError(
            path,
            index,
            f"missing feature {missing[0].name!r}: {schema.name} expects "
            f"{missing[0].describe()} (also missing: {others[2:] or 'nothing'}; "
            f"features present: {present})",
        )
    out: dict[str, np.ndarray] = {}
    for spec in schema.features:
        value = example[spec.name]
        if isinstance(value, list) or value.dtype != spec.dtype:
            raise TFRecordError(
                path,
                index,
                f"feature {spec.name!r} is {_kind_of(value)}, expected "
                f"{spec.describe()} for {schema.name}",
            )
        if value.size != spec.size:
            raise TFRecordError(
                path,
                index,
                f"feature {spec.name!r} has {value.size} values, expected "
                f"{spec.describe()} for {schema.name} (wrong image size or dataset?)",
            )
        out[spec.name] = value.reshape(spec.shape)
    return out


def entity_first_masks(schema: Schema, mask: np.ndarray) -> np.ndarray:
    """Masks as (..., E, H, W) uint8 from the stored layout.

    Args:
        schema: the dataset (gives the layout).
        mask: (..., E, H, W, 1) entity-first or (..., H, W, E, 1) entity-last, as stored.
    """
    masks = mask[..., 0]  # (..., E, H, W) or (..., H, W, E)
    if schema.mask_layout == "entity_last":
        masks = np.moveaxis(masks, -1, -3)  # (..., E, H, W)
    return masks


def entity_classes(schema: Schema, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Semantic class of every entity, (N, E) uint8, 0 = background or no object.

    Tetrominoes: the shape id 1..19; Multi-dSprites: the shape 1..3. CLEVR: shape × material,
    ``1 + 2·(shape − 1) + (material − 1)`` in 1..6 (cube, sphere, cylinder × rubber, metal), the
    6 classes that CLEVR6's 6 sprites are meant to find (the authors' code counts 7 classes with
    the background).
    """
    if schema.class_feature is None:
        raise ValueError(f"{schema.dataset} has no object classes")
    if schema.dataset == "clevr_with_masks":
        shape = np.rint(batch["shape"]).astype(np.int64)
        material = np.rint(batch["material"]).astype(np.int64)
        classes = np.where((shape > 0) & (material > 0), 1 + 2 * (shape - 1) + (material - 1), 0)
    else:
        classes = np.rint(batch[schema.class_feature])
    classes = classes.clip(0, 255).astype(np.uint8)  # (N, E)
    classes[..., 0] = 0  # entity 0 is the background
    return classes

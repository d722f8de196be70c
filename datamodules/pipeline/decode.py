"""Decoding DeepMind records: a parsed ``tf.train.Example`` checked against its ``Schema`` and
reshaped, masks in entity-first order, and the semantic class of every entity.
"""

from __future__ import annotations

import os

import numpy as np

from dti_sprites.datamodules.catalog import Schema
from dti_sprites.datamodules.pipeline.tf_example import FeatureValue
from dti_sprites.datamodules.pipeline.tfrecord import TFRecordError

__all__ = ["decode_example", "entity_classes", "entity_first_masks"]


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

"""Convert DeepMind multi-object TFRecords to one HDF5 file per dataset (no TensorFlow).

The file has the dataset layout of :mod:`dti_sprites.datamodules.hdf5` (written with
``hdf5_writer.HDF5Writer``), filled as follows (N converted records, E entities, H×W after the
protocol):

- ``image``         (N, H, W, 3) uint8 (binarized Multi-dSprites: the grey channel repeated)
- ``mask``          (N, H, W) uint8 label map: 0 = background (entity 0), k = entity k
- ``semantic``      (N, H, W) uint8 class map, 0 = background: Tetrominoes the shape id 1..19,
                    Multi-dSprites the shape 1..3 (square, ellipse, heart), CLEVR shape ×
                    material 1..6 (see ``decode.entity_classes``); absent for Objects Room
- ``visibility``    (N, E) float32 as stored (Objects Room: derived, 1 where the mask is non-empty)
- ``source_index``  (N,) int64 record index in the source file
- every other feature under its source name, (N, *stored shape), stored dtype

The label map takes, per pixel, the entity whose 0/255 mask is on (≥ 128); masks that are not a
partition fall back to the first entity of maximum value. Provenance is in the file attributes
(``dataset``, ``variant``, ``source_file``, ``source_bytes``, ``source_sha256``, ``protocol`` and
its parts, counts, ``converter_version``).

Protocols: CLEVR6 reads the first 70,000 records, keeps ``visibility[1:].sum() <= 6``, crops rows
29:221 and columns 64:256 and resizes to 128×128 (images bilinear, ``align_corners=False``, no
antialias, rounded to the nearest integer; masks and classes nearest, PyTorch's ``"nearest"``:
source index ``floor(1.5 i)``). CLEVR10 is the same without the object filter. ``pixel_coords``
and the other CLEVR factors stay in the source frame. Other datasets are converted as stored.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dti_sprites.datamodules.catalog import DatasetInfo, Protocol, Schema, dataset_info
from dti_sprites.datamodules.pipeline.decode import (
    decode_example,
    entity_classes,
    entity_first_masks,
)
from dti_sprites.datamodules.pipeline.hdf5_writer import HDF5Writer
from dti_sprites.datamodules.pipeline.tf_example import iter_examples

__all__ = ["CONVERTER_VERSION", "ConversionSummary", "convert"]

CONVERTER_VERSION = "1.0"

_BATCH_BYTES = 32 << 20  # decoded bytes held per batch


@dataclass(frozen=True)
class ConversionSummary:
    """Counts of a conversion: ``read`` source records, of which ``kept`` passed the filter and
    ``filtered`` did not; ``written`` rows in the HDF5 file."""

    dataset: str
    variant: str | None
    src: Path
    out: Path
    read: int
    kept: int
    filtered: int
    written: int
    protocol: str
    seconds: float

    def __str__(self) -> str:
        name = self.dataset if self.variant is None else f"{self.dataset}/{self.variant}"
        rate = self.read / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"{name}: read {self.read} records, kept {self.kept}, filtered {self.filtered}, "
            f"wrote {self.written} to {self.out} in {self.seconds:.1f} s ({rate:.0f} records/s); "
            f"protocol: {self.protocol}"
        )


class _FileDigest:
    """SHA-256 and size of the bytes fed to it (the source file, in the reading pass)."""

    def __init__(self, progress: tqdm | None) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._progress = progress

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.size += len(chunk)
        if self._progress is not None:
            self._progress.update(len(chunk))

    def finish(self, path: Path) -> str:
        """Hash the part of ``path`` not read yet (after an early stop); the hex digest."""
        self._progress = None
        with open(path, "rb") as handle:
            handle.seek(self.size)
            while chunk := handle.read(1 << 20):
                self.update(chunk)
        return self.sha256.hexdigest()


class _Batch:
    """Preallocated arrays for a batch of decoded records (stored shapes and dtypes)."""

    def __init__(self, schema: Schema) -> None:
        record_bytes = sum(s.size * s.dtype.itemsize for s in schema.features)
        self.capacity = int(np.clip(_BATCH_BYTES // record_bytes, 8, 4096))
        self.arrays = {
            s.name: np.empty((self.capacity, *s.shape), dtype=s.dtype) for s in schema.features
        }
        self.source_index = np.empty(self.capacity, dtype=np.int64)
        self.size = 0

    def add(self, index: int, record: dict[str, np.ndarray]) -> None:
        for name, value in record.items():
            self.arrays[name][self.size] = value
        self.source_index[self.size] = index
        self.size += 1

    def take(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Views of the filled rows; the batch is empty afterwards."""
        n, self.size = self.size, 0
        return {k: v[:n] for k, v in self.arrays.items()}, self.source_index[:n]


def _label_map(masks: np.ndarray) -> np.ndarray:
    """(N, E, H, W) 0/255 masks -> (N, H, W) uint8 entity index of each pixel."""
    label = np.zeros((masks.shape[0], *masks.shape[2:]), dtype=np.uint8)
    count = np.zeros_like(label)
    for k in range(masks.shape[1]):
        on = masks[:, k] >> 7  # (N, H, W) 0/1
        count += on
        if k:
            label += on * np.uint8(k)
    if (count == 1).all():
        return label
    return masks.argmax(axis=1).astype(np.uint8)  # not a partition: first maximum


def _semantic_map(label: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(N, H, W) class of each pixel's entity, from label (N, H, W) and classes (N, E) uint8.

    Entity 0 (the background) is class 0 whatever its stored factor.
    """
    semantic = np.zeros_like(label)
    for k in range(1, classes.shape[1]):
        semantic += (label == k) * classes[:, k, None, None]  # uint8, one entity at a time
    return semantic


def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(N, C, H, W) float32 -> (N, C, *size), bilinear (align_corners=False) or nearest."""
    if mode == "bilinear":
        return F.interpolate(
            images, size=size, mode="bilinear", align_corners=False, antialias=False
        )
    return F.interpolate(images, size=size, mode="nearest")


def _apply_geometry(
    image: np.ndarray, label: np.ndarray, protocol: Protocol
) -> tuple[np.ndarray, np.ndarray]:
    """Crop and resize: image (N, H, W, 3) uint8 and label (N, H, W) uint8."""
    if protocol.crop is not None:
        top, bottom, left, right = protocol.crop
        image, label = image[:, top:bottom, left:right], label[:, top:bottom, left:right]
    if protocol.resize is not None:
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2).float()
        pixels = _resize(pixels, protocol.resize, "bilinear").round().clamp(0, 255)
        image = pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()  # (N, h, w, 3)
        labels = torch.from_numpy(np.ascontiguousarray(label))[:, None].float()
        label = _resize(labels, protocol.resize, "nearest")[:, 0].to(torch.uint8).numpy()
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def _process(
    schema: Schema, protocol: Protocol, batch: dict[str, np.ndarray], index: np.ndarray
) -> dict[str, np.ndarray]:
    """One batch of decoded records -> the HDF5 rows (see the module docstring)."""
    masks = entity_first_masks(schema, batch["mask"])  # (N, E, H, W)
    label = _label_map(masks)
    image = batch["image"]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)  # (N, H, W, 3)
    image, label = _apply_geometry(image, label, protocol)
    rows = {"image": image, "mask": label}
    if schema.class_feature is not None:
        rows["semantic"] = _semantic_map(label, entity_classes(schema, batch))
    if "visibility" in batch:
        rows["visibility"] = batch["visibility"]
    else:
        rows["visibility"] = masks.any(axis=(2, 3)).astype(np.float32)  # (N, E)
    rows["source_index"] = index
    for name in schema.factor_names:
        if name != "visibility":
            rows[name] = batch[name]
    return rows


def _no_rows(info: DatasetInfo, schema: Schema) -> dict[str, np.ndarray]:
    """Zero rows of every HDF5 dataset (their row shapes and dtypes)."""
    h, w = info.image_size
    u8 = np.dtype(np.uint8)
    shapes = {"image": ((h, w, 3), u8), "mask": ((h, w), u8)}
    if schema.class_feature is not None:
        shapes["semantic"] = ((h, w), u8)
    shapes["visibility"] = ((schema.num_entities,), np.dtype(np.float32))
    shapes["source_index"] = ((), np.dtype(np.int64))
    for name in schema.factor_names:
        if name != "visibility":
            spec = schema.feature(name)
            shapes[name] = (spec.shape, spec.dtype)
    return {name: np.empty((0, *shape), dtype) for name, (shape, dtype) in shapes.items()}


def convert(
    dataset: str,
    src: str | Path,
    out: str | Path,
    variant: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> ConversionSummary:
    """Convert a DeepMind TFRecord file to HDF5 (layout and protocols: module docstring).

    Args:
        dataset: ``tetrominoes``, ``multi_dsprites``, ``clevr6``, ``clevr10`` or ``objects_room``.
        src: the source ``.tfrecords`` file (GZIP, ZLIB or uncompressed; CRCs are checked).
        out: the HDF5 file; written as ``<out>.partial`` and renamed at the end, so on any error
            no ``out`` is created (an existing one is left untouched) and a re-run restarts.
        variant: Multi-dSprites / Objects Room variant (default: ``colored_on_grayscale`` /
            ``train``).
        limit: read only the first ``limit`` records (overrides CLEVR's 70,000; the number used
            is in the ``first_n`` attribute).
        progress: show a progress bar and print the summary on stderr.

    Returns:
        The counts; CLEVR6's ``kept`` is the number of scenes that passed the ≤ 6 objects filter.

    Raises:
        TFRecordError: bad input (truncated, CRC mismatch, wrong compression, missing feature,
            wrong size), naming the file and record.
        ValueError: unknown dataset or variant, negative limit, ``out`` equal to ``src``.
        FileNotFoundError: ``src`` does not exist.
    """
    info = dataset_info(dataset)
    schema = info.schema(variant)
    protocol = info.protocol
    src, out = Path(src), Path(out)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such TFRecord file")
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the output would overwrite the source")
    first_n = limit if limit is not None else protocol.first_n
    start = time.perf_counter()
    with HDF5Writer(out) as writer:
        counts, sha256 = _convert_into(writer, info, schema, src, first_n, progress)
        writer.attrs.update(_provenance(info, schema, src, first_n, sha256, counts))
    read, kept, written, _ = counts
    summary = ConversionSummary(
        dataset,
        schema.variant,
        src,
        out,
        read,
        kept,
        read - kept,
        written,
        protocol.describe(first_n),
        time.perf_counter() - start,
    )
    if progress:
        print(summary, file=sys.stderr)
        if protocol.max_objects is not None:
            print(
                f"{kept} of {read} scenes passed the filter visibility[1:].sum() <= "
                f"{protocol.max_objects}",
                file=sys.stderr,
            )
    return summary


def _convert_into(
    writer: HDF5Writer,
    info: DatasetInfo,
    schema: Schema,
    src: Path,
    first_n: int | None,
    progress: bool,
) -> tuple[tuple[int, int, int, int], str]:
    """Stream ``src`` into ``writer``; ((read, kept, written, max class id), source sha256)."""
    protocol = info.protocol
    writer.append(_no_rows(info, schema))  # every dataset exists, even if none is kept
    batch = _Batch(schema)
    max_class = 0  # largest class id written to ``semantic``
    by_records = first_n is not None
    bar = tqdm(
        total=first_n if by_records else src.stat().st_size,
        unit="rec" if by_records else "B",
        unit_scale=not by_records,
        desc=src.name,
        disable=not progress,
        file=sys.stderr,
        mininterval=0.5,
    )
    digest = _FileDigest(None if by_records else bar)
    examples = iter_examples(src, on_raw_chunk=digest.update)
    read = kept = 0
    try:
        for index, example in enumerate(itertools.islice(examples, first_n)):
            record = decode_example(schema, example, src, index)
            read += 1
            if by_records:
                bar.update(1)
            if protocol.max_objects is not None:
                if record["visibility"][1:].sum() > protocol.max_objects:
                    continue
            kept += 1
            batch.add(index, record)
            if batch.size == batch.capacity:
                max_class = max(max_class, _flush(writer, schema, protocol, batch))
        if batch.size:
            max_class = max(max_class, _flush(writer, schema, protocol, batch))
    finally:
        examples.close()
        bar.close()
    return (read, kept, writer.count, max_class), digest.finish(src)


def _flush(writer: HDF5Writer, schema: Schema, protocol: Protocol, batch: _Batch) -> int:
    """Process and append the batch (emptying it); the largest class id written."""
    rows = _process(schema, protocol, *batch.take())
    writer.append(rows)
    return int(rows["semantic"].max(initial=0)) if "semantic" in rows else 0


def _provenance(
    info: DatasetInfo,
    schema: Schema,
    src: Path,
    first_n: int | None,
    sha256: str,
    counts: tuple[int, int, int, int],
) -> dict[str, object]:
    """File attributes: what was converted, from which file, how."""
    read, kept, _, max_class = counts
    protocol = info.protocol
    classes = info.num_semantic_classes
    if schema.class_feature is not None:
        classes = max(classes, max_class + 1)  # codes beyond the expected range widen it
    stored = "visibility" in schema.factor_names
    return {
        "dataset": info.name,
        "variant": schema.variant or "",
        "source_dataset": schema.dataset,
        "source_file": src.name,
        "source_bytes": src.stat().st_size,
        "source_sha256": sha256,
        "source_image_size": list(schema.image_size),
        "source_mask_layout": schema.mask_layout,
        "num_entities": schema.num_entities,
        "protocol": protocol.describe(first_n),
        "first_n": -1 if first_n is None else first_n,
        "max_objects": -1 if protocol.max_objects is None else protocol.max_objects,
        "crop": np.array(protocol.crop or (), dtype=np.int64),  # (top, bottom, left, right)
        "resize": np.array(protocol.resize or (), dtype=np.int64),  # (H, W)
        "records_read": read,
        "records_kept": kept,
        "records_filtered": read - kept,
        "mask": "label map: 0 = background (entity 0), k = entity k",
        "semantic": info.semantic,
        "num_semantic_classes": classes,  # background included
        "visibility": "as stored" if stored else "derived: 1 where the entity's mask is non-empty",
        "converter": "dti_sprites.datamodules.pipeline.convert",
        "converter_version": CONVERTER_VERSION,
    }

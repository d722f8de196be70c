"""TFRecord -> HDF5 conversion: layouts, protocols, provenance and bad input."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dti_sprites.datamodules.catalog import SCHEMAS, dataset_info, get_schema
from dti_sprites.datamodules.pipeline import convert as convert_module
from dti_sprites.datamodules.pipeline.convert import convert
from dti_sprites.datamodules.pipeline.decode import decode_example, entity_classes
from dti_sprites.datamodules.pipeline.synth import synthesize, write_examples, write_synthetic
from dti_sprites.datamodules.pipeline.tf_example import iter_examples
from dti_sprites.datamodules.pipeline.tfrecord import TFRecordError

# (converter dataset, variant, generator dataset, expected image side)
CASES = [("tetrominoes", None, "tetrominoes", 35), ("clevr6", None, "clevr6", 128)]
CASES += [("clevr10", None, "clevr10", 128)]
CASES += [("multi_dsprites", v, "multi_dsprites", 64) for d, v in SCHEMAS if d == "multi_dsprites"]
CASES += [("objects_room", v, "objects_room", 64) for d, v in SCHEMAS if d == "objects_room"]


def _entity_first(dataset: str, mask: np.ndarray) -> np.ndarray:
    """(E, H, W) from a stored mask, written out independently of the converter."""
    if dataset == "multi_dsprites":
        return mask[..., 0].transpose(2, 0, 1)  # (H, W, E, 1) -> (E, H, W)
    return mask[..., 0]


def _crop_resize_label(label: np.ndarray) -> np.ndarray:
    """CLEVR protocol on a (240, 320) label map: crop, then nearest = source floor(1.5 i)."""
    crop = label[29:221, 64:256]
    index = np.floor(np.arange(128) * 1.5).astype(int)
    return crop[index][:, index]


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


# ------------------------------------------------------------------------------------------
# Every dataset and variant
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dataset", "variant", "generator", "side"), CASES)
def test_synth_convert_h5(
    tmp_path: Path, dataset: str, variant: str | None, generator: str, side: int
) -> None:
    n = 8 if generator.startswith("clevr") else 24
    src = write_synthetic(generator, tmp_path / "src.tfrecords", n, seed=11, variant=variant)
    out = tmp_path / dataset_info(dataset).h5_name(variant)
    summary = convert(dataset, src, out, variant=variant, progress=False)
    rows, attrs = _read(out)
    schema = get_schema(dataset, variant)
    records = [decode_example(schema, e, src, i) for i, e in enumerate(iter_examples(src))]
    keep = [
        i for i, r in enumerate(records) if dataset != "clevr6" or r["visibility"][1:].sum() <= 6
    ]
    assert (summary.read, summary.kept, summary.written) == (n, len(keep), len(keep))
    assert summary.filtered == n - len(keep)
    np.testing.assert_array_equal(rows["source_index"], keep)
    assert rows["image"].shape == (len(keep), side, side, 3) and rows["image"].dtype == np.uint8
    assert rows["mask"].shape == (len(keep), side, side) and rows["mask"].dtype == np.uint8
    assert rows["visibility"].shape == (len(keep), schema.num_entities)
    for row, i in enumerate(keep):
        record = records[i]
        label = _entity_first(schema.dataset, record["mask"]).argmax(axis=0)  # (H, W)
        if generator.startswith("clevr"):
            label = _crop_resize_label(label)
        np.testing.assert_array_equal(rows["mask"][row], label)
        if not generator.startswith("clevr"):
            image = record["image"]
            np.testing.assert_array_equal(
                rows["image"][row], np.broadcast_to(image, (side, side, 3))
            )
        if schema.class_feature is not None:
            classes = entity_classes(schema, {k: v[None] for k, v in record.items()})[0]
            np.testing.assert_array_equal(rows["semantic"][row], classes[label])
        for name in schema.factor_names:
            np.testing.assert_array_equal(rows[name][row], record[name])
    if schema.class_feature is None:
        assert "semantic" not in rows  # Objects Room has no classes
        visible = (_entity_first(schema.dataset, records[0]["mask"]) > 0).any(axis=(1, 2))
        np.testing.assert_array_equal(rows["visibility"][0], visible)
    assert attrs["dataset"] == dataset and attrs["variant"] == (schema.variant or "")
    assert attrs["source_file"] == "src.tfrecords"
    assert attrs["source_bytes"] == src.stat().st_size
    assert attrs["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert attrs["records_kept"] == len(keep) and attrs["converter_version"]
    assert not list(tmp_path.glob("*.partial"))


def test_multi_dsprites_entity_last_masks_are_transposed(tmp_path: Path) -> None:
    schema = get_schema("multi_dsprites", "colored_on_grayscale")  # E = 6, (64, 64, 6, 1)
    label = np.zeros((64, 64), dtype=np.int64)
    for k in range(1, 6):
        label[10 * k : 10 * k + 8, 5 * k : 5 * k + 30] = k  # each entity its own band
    masks_last = (label[..., None] == np.arange(6)).astype(np.uint8)[..., None] * 255
    # a reader that ignored the layout would see other label maps:
    naive = masks_last.reshape(6, 64, 64).argmax(axis=0)
    assert (naive != label).any()
    record = {s.name: np.zeros(s.shape, s.dtype) for s in schema.features}
    record["image"] = np.full((64, 64, 3), 9, np.uint8)
    record["mask"] = masks_last
    record["shape"] = np.array([0, 3, 1, 2, 3, 1], np.float32)
    record["visibility"] = np.ones(6, np.float32)
    src = tmp_path / "md.tfrecords"
    write_examples(src, [record])
    convert("multi_dsprites", src, tmp_path / "md.h5", progress=False)
    rows, attrs = _read(tmp_path / "md.h5")
    np.testing.assert_array_equal(rows["mask"][0], label)
    np.testing.assert_array_equal(rows["semantic"][0], record["shape"].astype(int)[label])
    assert attrs["source_mask_layout"] == "entity_last"


# ------------------------------------------------------------------------------------------
# CLEVR6 protocol on hand-made scenes
# ------------------------------------------------------------------------------------------


def _clevr_scene(objects: int, label: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A CLEVR record with ``objects`` objects and a ramp image: R = row, G = column − 64."""
    schema = get_schema("clevr_with_masks")
    record = {s.name: np.zeros(s.shape, s.dtype) for s in schema.features}
    rows, cols = np.mgrid[0:240, 0:320]
    record["image"] = np.stack(
        [rows, np.clip(cols - 64, 0, 255), np.full_like(rows, 77)], axis=-1
    ).astype(np.uint8)
    label = np.zeros((240, 320), dtype=np.int64) if label is None else label
    record["mask"] = ((label == np.arange(11)[:, None, None]) * 255).astype(np.uint8)[..., None]
    record["visibility"][: objects + 1] = 1
    record["shape"][1 : objects + 1] = np.arange(objects) % 3 + 1
    record["material"][1 : objects + 1] = 2  # metal
    record["x"][1 : objects + 1] = np.arange(objects)
    return record


def test_clevr6_filter_keeps_at_most_six_objects(tmp_path: Path, capsys) -> None:
    counts = [3, 6, 7, 10, 6, 2]
    src = tmp_path / "clevr.tfrecords"
    write_examples(src, [_clevr_scene(c) for c in counts])
    summary = convert("clevr6", src, tmp_path / "clevr6.h5")
    rows, attrs = _read(tmp_path / "clevr6.h5")
    np.testing.assert_array_equal(rows["source_index"], [0, 1, 4, 5])
    np.testing.assert_array_equal(rows["visibility"][:, 1:].sum(axis=1), [3, 6, 6, 2])
    np.testing.assert_array_equal(rows["x"][2, 1:7], np.arange(6))  # factors follow their rows
    assert (summary.read, summary.kept, summary.filtered, summary.written) == (6, 4, 2, 4)
    assert (attrs["records_read"], attrs["records_kept"], attrs["max_objects"]) == (6, 4, 6)
    assert attrs["first_n"] == 70_000 and list(attrs["crop"]) == [29, 221, 64, 256]
    err = capsys.readouterr().err
    assert "kept 4" in err and "4 of 6 scenes passed the filter" in err
    ten = convert("clevr10", src, tmp_path / "clevr10.h5", progress=False)
    assert (ten.kept, ten.filtered) == (6, 0)


def test_clevr_crop_and_resize(tmp_path: Path) -> None:
    label = np.zeros((240, 320), dtype=np.int64)
    label[40:90, 70:120] = 1  # inside the crop
    label[100:150, 0:50] = 2  # left of column 64: cropped away
    label[150:200, 230:300] = 3  # straddles the right edge (column 256)
    label[0:29, 100:200] = 4  # above row 29: cropped away
    src = tmp_path / "clevr.tfrecords"
    write_examples(src, [_clevr_scene(4, label)])
    convert("clevr6", src, tmp_path / "clevr6.h5", progress=False)
    rows, _ = _read(tmp_path / "clevr6.h5")
    image, mask = rows["image"][0], rows["mask"][0]
    assert image.shape == (128, 128, 3)
    # bilinear, align_corners=False: output i samples source 1.5 i + 0.25 (never a tie)
    expected = np.round(1.5 * np.arange(128) + 0.25)
    np.testing.assert_array_equal(image[:, 5, 0], 29 + expected)  # rows start at 29
    np.testing.assert_array_equal(image[7, :, 1], expected)  # columns start at 64
    assert (image[..., 2] == 77).all()
    # nearest: output i takes source floor(1.5 i)
    np.testing.assert_array_equal(mask, _crop_resize_label(label))
    assert set(np.unique(mask)) == {0, 1, 3}
    # shape × material: shapes 1, 2, 3, 1 in metal (2) are classes 2, 4, 6, 2
    np.testing.assert_array_equal(rows["semantic"][0], np.array([0, 2, 4, 6, 2])[mask])


# ------------------------------------------------------------------------------------------
# Bad input: clear error, nothing left behind, a re-run succeeds
# ------------------------------------------------------------------------------------------


def _tetrominoes(tmp_path: Path, n: int = 20) -> Path:
    return write_synthetic("tetrominoes", tmp_path / "tetro.tfrecords", n, seed=0)


def _assert_failed_cleanly(tmp_path: Path, out: Path, error: TFRecordError, src: Path) -> None:
    assert str(src) in str(error)
    assert f"record {error.index}" in str(error)
    assert not out.exists()
    assert not list(tmp_path.glob("*.partial"))


def _convert_error(dataset: str, src: Path, out: Path, **options: object) -> TFRecordError:
    with pytest.raises(TFRecordError) as info:
        convert(dataset, src, out, progress=False, **options)  # type: ignore[arg-type]
    return info.value


def test_truncated_source(tmp_path: Path) -> None:
    src = _tetrominoes(tmp_path)
    good = src.read_bytes()
    src.write_bytes(good[: len(good) * 2 // 3])
    out = tmp_path / "tetrominoes.h5"
    error = _convert_error("tetrominoes", src, out)
    assert "truncated" in str(error) and 0 < error.index < 20
    _assert_failed_cleanly(tmp_path, out, error, src)
    src.write_bytes(good)  # re-run after the failure
    assert convert("tetrominoes", src, out, progress=False).written == 20


def _flip(src: Path, record: int) -> None:
    data = bytearray(gzip.decompress(src.read_bytes()))
    pos = 0
    for _ in range(record):
        pos += 16 + struct.unpack_from("<Q", data, pos)[0]
    data[pos + 12 + 1000] ^= 0x10
    src.write_bytes(gzip.compress(bytes(data)))


def test_flipped_byte_after_rows_were_written(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(convert_module, "_BATCH_BYTES", 1)  # batches of 8 records
    src = _tetrominoes(tmp_path)
    good = src.read_bytes()
    _flip(src, 13)
    out = tmp_path / "tetrominoes.h5"
    out.write_bytes(b"an earlier conversion")
    error = _convert_error("tetrominoes", src, out)
    assert error.index == 13 and "CRC mismatch" in str(error)
    assert out.read_bytes() == b"an earlier conversion"  # left untouched
    assert not list(tmp_path.glob("*.partial"))
    src.write_bytes(good)
    assert convert("tetrominoes", src, out, progress=False).written == 20
    assert _read(out)[0]["image"].shape[0] == 20


def test_wrong_compression(tmp_path: Path) -> None:
    src = _tetrominoes(tmp_path)
    src.write_bytes(bz2.compress(gzip.decompress(src.read_bytes())))
    out = tmp_path / "tetrominoes.h5"
    error = _convert_error("tetrominoes", src, out)
    assert error.index == 0 and "not a TFRecord file" in str(error) and "GZIP" in str(error)
    _assert_failed_cleanly(tmp_path, out, error, src)


def test_missing_feature(tmp_path: Path) -> None:
    src = _tetrominoes(tmp_path)
    out = tmp_path / "md.h5"
    error = _convert_error("multi_dsprites", src, out)
    assert error.index == 0 and "missing feature 'orientation'" in str(error)
    _assert_failed_cleanly(tmp_path, out, error, src)


def test_wrong_image_size(tmp_path: Path) -> None:
    records = list(synthesize("tetrominoes", 4, seed=0))
    records[2]["image"] = records[2]["image"][:34]  # 34×35×3
    src = tmp_path / "tetro.tfrecords"
    write_examples(src, records)
    out = tmp_path / "tetrominoes.h5"
    error = _convert_error("tetrominoes", src, out)
    assert error.index == 2
    assert "'image' has 3570 values" in str(error) and "35×35×3 = 3675" in str(error)
    _assert_failed_cleanly(tmp_path, out, error, src)


def test_stale_partial_file_is_replaced(tmp_path: Path) -> None:
    src = _tetrominoes(tmp_path, 5)
    out = tmp_path / "tetrominoes.h5"
    (tmp_path / "tetrominoes.h5.partial").write_bytes(b"left by a killed run")
    assert convert("tetrominoes", src, out, progress=False).written == 5
    assert not list(tmp_path.glob("*.partial"))


def test_limit_reads_only_the_first_records(tmp_path: Path) -> None:
    src = _tetrominoes(tmp_path, 12)
    _flip(src, 8)  # beyond the limit: never read
    out = tmp_path / "tetrominoes.h5"
    summary = convert("tetrominoes", src, out, limit=8, progress=False)
    rows, attrs = _read(out)
    assert (summary.read, summary.written) == (8, 8)
    np.testing.assert_array_equal(rows["source_index"], np.arange(8))
    assert attrs["first_n"] == 8 and "first 8 records" in attrs["protocol"]
    assert attrs["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_usage_errors(tmp_path: Path) -> None:
    src = _tetrominoes(tmp_path, 2)
    with pytest.raises(ValueError, match="unknown dataset"):
        convert("mnist", src, tmp_path / "x.h5", progress=False)
    with pytest.raises(ValueError, match=r"unknown variant 'grey'.*colored_on_grayscale"):
        convert("multi_dsprites", src, tmp_path / "x.h5", variant="grey", progress=False)
    with pytest.raises(FileNotFoundError):
        convert("tetrominoes", tmp_path / "absent.tfrecords", tmp_path / "x.h5", progress=False)
    with pytest.raises(ValueError, match="overwrite the source"):
        convert("tetrominoes", src, src, progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_label_map_falls_back_to_argmax_for_non_partitions() -> None:
    masks = np.zeros((1, 3, 2, 2), np.uint8)
    masks[0, 1, 0, 0] = masks[0, 2, 0, 0] = 255  # two entities claim a pixel
    masks[0, 0, 1] = 255
    label = convert_module._label_map(masks)
    np.testing.assert_array_equal(label[0], masks[0].argmax(axis=0))


def test_bilinear_reference_matches_torch() -> None:
    # the expected values of test_clevr_crop_and_resize are torch's bilinear, not a guess
    ramp = torch.arange(192, dtype=torch.float32).view(1, 1, 192, 1).expand(1, 1, 192, 4)
    out = F.interpolate(ramp, size=(128, 4), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out[0, 0, :, 0].numpy(), 1.5 * np.arange(128) + 0.25)


def test_semantic_class_count_attribute(tmp_path: Path) -> None:
    src = tmp_path / "clevr.tfrecords"
    scene = _clevr_scene(2, np.where(np.arange(320) < 160, 1, 2)[None].repeat(240, 0))
    scene["shape"][2] = 9  # an unexpected code widens the class count instead of hiding it
    write_examples(src, [scene])
    convert("clevr10", src, tmp_path / "c.h5", progress=False)
    rows, attrs = _read(tmp_path / "c.h5")
    # shape 9, metal (2): class 1 + 2·8 + 1 = 18
    assert rows["semantic"].max() == 18 and attrs["num_semantic_classes"] == 19
    tetro = write_synthetic("tetrominoes", tmp_path / "t.tfrecords", 3, seed=0)
    convert("tetrominoes", tetro, tmp_path / "t.h5", progress=False)
    assert _read(tmp_path / "t.h5")[1]["num_semantic_classes"] == 20


def test_clevr_semantic_classes_are_shape_times_material():
    schema = get_schema("clevr_with_masks")
    shape = np.array([[0, 1, 1, 2, 3, 3, 0]], dtype=np.uint8)  # entity 0 is the background
    material = np.array([[0, 1, 2, 1, 1, 2, 0]], dtype=np.uint8)
    classes = entity_classes(schema, {"shape": shape, "material": material})
    assert classes.tolist() == [[0, 1, 2, 3, 5, 6, 0]]

"""tf.train.Example codec: DeepMind's real records, round trips, wire variants, bad data."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from dti_sprites.datamodules.catalog import get_schema
from dti_sprites.datamodules.pipeline.decode import decode_example
from dti_sprites.datamodules.pipeline.synth import TFRecordWriter
from dti_sprites.datamodules.pipeline.tf_example import encode_example, iter_examples, parse_example
from dti_sprites.datamodules.pipeline.tfrecord import TFRecordError, iter_records

# 10 real DeepMind records, kept in the repository (tests/data/README.md) so that CI has them.
REAL = Path(__file__).resolve().parents[3] / "tests" / "data" / "tetrominoes_mini.tfrecords"

Y, G, B, C, M, R = (1, 1, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 0, 0)
# tests/data/README.md: objects 1-3 of each real record.
README = [
    ([6, 5, 15], [22, 11, 24], [0, 19, 20], [Y, G, B], 63600),
    ([9, 14, 5], [12, 17, 0], [3, 20, 19], [Y, C, Y], 95400),
    ([13, 5, 2], [12, 22, 4], [3, 4, 22], [M, G, M], 79500),
    ([14, 11, 16], [14, 20, 2], [19, 0, 1], [Y, M, B], 79500),
    ([18, 17, 13], [3, 15, 15], [2, 4, 19], [C, R, B], 63600),
    ([7, 19, 16], [16, 9, 2], [25, 7, 20], [C, G, B], 63600),
    ([12, 7, 18], [2, 13, 0], [0, 1, 23], [G, C, M], 79500),
    ([9, 16, 16], [14, 1, 18], [25, 8, 8], [R, G, M], 63600),
    ([15, 15, 3], [25, 5, 17], [12, 5, 7], [R, Y, C], 79500),
    ([10, 3, 2], [16, 25, 1], [5, 16, 25], [G, M, C], 79500),
]


def test_real_records_decode_to_the_readme_values() -> None:
    schema = get_schema("tetrominoes")
    examples = list(iter_examples(REAL))  # CRCs checked (default)
    assert len(examples) == len(README)
    for index, (example, row) in enumerate(zip(examples, README, strict=True)):
        shapes, xs, ys, colors, image_sum = row
        record = decode_example(schema, example, REAL, index)
        assert record["image"].shape == (35, 35, 3) and record["image"].dtype == np.uint8
        assert record["mask"].shape == (4, 35, 35, 1)
        np.testing.assert_array_equal(record["shape"], [0, *shapes])
        np.testing.assert_array_equal(record["x"], [0, *xs])
        np.testing.assert_array_equal(record["y"], [0, *ys])
        np.testing.assert_array_equal(record["color"], [(0, 0, 0), *colors])
        np.testing.assert_array_equal(record["visibility"], [1, 1, 1, 1])
        assert int(record["image"].sum(dtype=np.int64)) == image_sum
        on = record["mask"][..., 0] == 255
        assert set(np.unique(record["mask"])) <= {0, 255}
        np.testing.assert_array_equal(on.sum(axis=(1, 2))[1:], [100, 100, 100])
        np.testing.assert_array_equal(on.sum(axis=0), 1)  # a partition
        # x is the row and y the column of each piece's bounding-box top-left
        for k in range(1, 4):
            rows, cols = np.nonzero(on[k])
            assert (rows.min(), cols.min()) == (xs[k - 1], ys[k - 1])


def test_real_records_reencode_byte_for_byte() -> None:
    for record in iter_records(REAL):
        assert encode_example(parse_example(record)) == record


def _features() -> dict:
    rng = np.random.default_rng(1)
    return {
        "image": rng.integers(0, 256, (5, 4, 3), dtype=np.uint8),
        "floats": np.array([0.0, -1.5, 3.25, np.inf], dtype=np.float32),
        "ints": np.array([0, 1, -1, 2**62, -(2**63), 2**63 - 1, 300], dtype=np.int64),
        "strings": [b"cube", b"", b"a longer string"],
        "empty_floats": np.zeros(0, dtype=np.float32),
        "empty_ints": np.zeros(0, dtype=np.int64),
    }


def _assert_features_equal(got: dict, features: dict) -> None:
    assert list(got) == list(features)
    for name, value in features.items():
        if isinstance(value, list):
            assert got[name] == value
        else:
            assert got[name].dtype == value.dtype
            np.testing.assert_array_equal(got[name], value.reshape(-1))


def test_example_round_trip() -> None:
    features = _features()
    decoded = parse_example(encode_example(features))
    assert set(decoded) == set(features)
    _assert_features_equal(decoded, features)


def test_per_byte_bytes_list_is_encoded_as_deepmind_does() -> None:
    encoded = encode_example({"image": np.array([7, 0, 255], dtype=np.uint8)})
    assert b"\x0a\x01\x07\x0a\x01\x00\x0a\x01\xff" in encoded


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def _ld(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def test_parse_accepts_unpacked_lists_and_value_before_key() -> None:
    unpacked_floats = b"".join(b"\x0d" + struct.pack("<f", v) for v in (1.5, -2.0))
    unpacked_ints = b"".join(b"\x08" + _varint(v) for v in (-5, 7, 2**40))
    mixed_floats = _ld(0x0A, struct.pack("<2f", 1, 2)) + b"\x0d" + struct.pack("<f", 3)
    entries = [
        _ld(0x12, _ld(0x12, unpacked_floats)) + _ld(0x0A, b"f"),  # value first, then key
        _ld(0x0A, b"i") + _ld(0x12, _ld(0x1A, unpacked_ints)),
        _ld(0x0A, b"m") + _ld(0x12, _ld(0x12, mixed_floats)),
        _ld(0x0A, b"s") + _ld(0x12, _ld(0x0A, _ld(0x0A, b"x") + _ld(0x0A, b"y"))),
    ]
    data = _ld(0x0A, b"".join(_ld(0x0A, e) for e in entries))
    parsed = parse_example(data)
    np.testing.assert_array_equal(parsed["f"], np.array([1.5, -2.0], np.float32))
    np.testing.assert_array_equal(parsed["i"], np.array([-5, 7, 2**40], np.int64))
    np.testing.assert_array_equal(parsed["m"], np.array([1, 2, 3], np.float32))
    np.testing.assert_array_equal(parsed["s"], np.frombuffer(b"xy", np.uint8))


def test_parse_rejects_malformed_data() -> None:
    with pytest.raises(ValueError, match="runs past"):
        parse_example(b"\x0a\x10\x0a")
    with pytest.raises(ValueError, match="varint"):
        parse_example(b"\x0a\x02\x0a\xff")


def test_malformed_example_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.tfrecords"
    with TFRecordWriter(path) as writer:
        writer.write(encode_example({"a": np.ones(3, np.float32)}))
        writer.write(b"\x0a\x10\x0a")
    with pytest.raises(TFRecordError) as info:
        list(iter_examples(path))
    assert info.value.index == 1 and str(path) in str(info.value)
    assert "malformed tf.train.Example" in str(info.value)

"""TFRecord container, CRC-32C and tf.train.Example codec, against real DeepMind records."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from dti_sprites.datamodules.schemas import decode_example, get_schema
from dti_sprites.datamodules.tfrecord import (
    TFRecordError,
    TFRecordWriter,
    crc32c,
    crc32c_numpy,
    crc32c_reference,
    detect_compression,
    encode_example,
    frame_record,
    iter_examples,
    iter_records,
    masked_crc32c,
    parse_example,
    write_examples,
)

_REPO = Path(__file__).resolve().parents[2]
# 10 real DeepMind records, kept in the repository (tests/data/README.md) so that CI has them.
REAL = _REPO / "tests" / "data" / "tetrominoes_mini.tfrecords"

Y, G, B, C, M, R = (1, 1, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 0, 0)
# tests/data/README.md (from ../shared/data/README.md): objects 1-3 of each real record.
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


@pytest.fixture
def real() -> Path:
    return REAL


def _frames(data: bytes) -> list[tuple[bytes, int, bytes, int]]:
    """(length bytes, length crc, data, data crc) of every frame, parsed independently."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        body = data[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        out.append((data[pos : pos + 8], length_crc, body, data_crc))
        pos += 16 + length
    return out


# ------------------------------------------------------------------------------------------
# CRC-32C
# ------------------------------------------------------------------------------------------

# RFC 3720 (iSCSI) B.4 and the classic check value.
VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("function", [crc32c_reference, crc32c_numpy, crc32c])
@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_crc32c_known_vectors(function, data: bytes, expected: int) -> None:
    assert function(data) == expected


@pytest.mark.parametrize("repeat", [1, 8, 300])
def test_crc32c_numpy_equals_reference_on_long_inputs(repeat: int) -> None:
    data = b"123456789" * repeat + bytes(range(256)) * repeat
    assert crc32c_numpy(data) == crc32c_reference(data)


def test_crc32c_numpy_matches_reference_at_chunk_boundaries() -> None:
    rng = np.random.default_rng(0)
    lengths = [4, 127, 128, 129, 255, 256, 257, 259, 260, 511, 4096, 16384, 16385, 32768]
    lengths += [32769, 32771, 32772, 70_001, 300_000]
    for n in lengths:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c_numpy(data) == crc32c_reference(data), n
        assert crc32c_numpy(memoryview(data)) == crc32c_reference(data), n


def test_masked_crc_matches_the_real_files_frames(real: Path) -> None:
    frames = _frames(gzip.decompress(real.read_bytes()))
    assert len(frames) == 10
    for length, length_crc, body, data_crc in frames:
        assert masked_crc32c(length) == length_crc
        assert masked_crc32c(body) == data_crc


# ------------------------------------------------------------------------------------------
# Real records
# ------------------------------------------------------------------------------------------


def test_real_file_is_detected_as_gzip(real: Path) -> None:
    assert detect_compression(real.read_bytes()[:16]) == "gzip"


def test_real_records_decode_to_the_readme_values(real: Path) -> None:
    schema = get_schema("tetrominoes")
    examples = list(iter_examples(real))  # CRCs checked (default)
    assert len(examples) == len(README)
    for index, (example, row) in enumerate(zip(examples, README, strict=True)):
        shapes, xs, ys, colors, image_sum = row
        record = decode_example(schema, example, real, index)
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


def test_real_records_reencode_byte_for_byte(real: Path) -> None:
    decompressed = gzip.decompress(real.read_bytes())
    records = list(iter_records(real))
    assert b"".join(frame_record(r) for r in records) == decompressed
    for record in records:
        assert encode_example(parse_example(record)) == record


def test_real_records_survive_our_writer(real: Path, tmp_path: Path) -> None:
    originals = list(iter_examples(real))
    copy = tmp_path / "copy.tfrecords"
    assert write_examples(copy, originals) == len(originals)
    assert detect_compression(copy.read_bytes()[:16]) == "gzip"
    assert gzip.decompress(copy.read_bytes()) == gzip.decompress(real.read_bytes())
    for original, again in zip(originals, iter_examples(copy), strict=True):
        assert list(again) == list(original)
        for name in original:
            np.testing.assert_array_equal(again[name], original[name])


# ------------------------------------------------------------------------------------------
# Codec
# ------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("compression", ["gzip", "zlib", "none"])
def test_writer_reader_round_trip(tmp_path: Path, compression: str) -> None:
    path = tmp_path / f"data.{compression}"
    records = [encode_example(_features()), b"", b"raw bytes, not an Example" * 50]
    with TFRecordWriter(path, compression) as writer:
        for record in records:
            writer.write(record)
    assert detect_compression(path.read_bytes()[:16]) == compression
    assert list(iter_records(path)) == records  # auto-detected
    assert list(iter_records(path, compression=compression)) == records


def test_concatenated_gzip_members_are_read(tmp_path: Path) -> None:
    one, two = tmp_path / "1.tfrecords", tmp_path / "2.tfrecords"
    write_examples(one, [{"a": np.array([1], np.int64)}])
    write_examples(two, [{"a": np.array([2], np.int64)}, {"a": np.array([3], np.int64)}])
    both = tmp_path / "both.tfrecords"
    both.write_bytes(one.read_bytes() + two.read_bytes())
    assert [int(e["a"][0]) for e in iter_examples(both)] == [1, 2, 3]


def _peak_while_reading(path: Path) -> tuple[int, int]:
    """(records, peak traced bytes) of one pass over ``path``."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_records(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return count, peak


def test_reading_streams_with_flat_memory(tmp_path: Path) -> None:
    record = encode_example({"image": np.full(3 * 64 * 64 * 2, 7, np.uint8)})  # ~74 KB
    peaks = []
    for n in (150, 600):  # ~11 MB and ~44 MB decompressed
        path = tmp_path / f"{n}.tfrecords"
        with TFRecordWriter(path, "gzip", level=1) as writer:
            for _ in range(n):
                writer.write(record)
        count, peak = _peak_while_reading(path)
        assert count == n
        peaks.append(peak)
    assert peaks[1] < 8 * 2**20, f"peak {peaks[1] / 2**20:.1f} MiB while streaming 44 MB"
    assert peaks[1] < 1.25 * peaks[0]  # does not grow with the file


# ------------------------------------------------------------------------------------------
# Bad input: each error names the file, the record and what was expected
# ------------------------------------------------------------------------------------------


def _write_plain(path: Path, n: int = 5) -> list[int]:
    """n uncompressed records; returns the byte offset of each frame."""
    offsets, pos = [], 0
    with TFRecordWriter(path, "none") as writer:
        for i in range(n):
            offsets.append(pos)
            record = encode_example({"v": np.arange(100 + i, dtype=np.float32)})
            writer.write(record)
            pos += 16 + len(record)
    return offsets


def _error(path: Path, **options: object) -> TFRecordError:
    with pytest.raises(TFRecordError) as info:
        list(iter_examples(path, **options))  # type: ignore[arg-type]
    error = info.value
    assert str(path) in str(error)
    return error


def test_truncated_uncompressed_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.tfrecords"
    offsets = _write_plain(path)
    path.write_bytes(path.read_bytes()[: offsets[3] + 40])  # inside record 3's data
    error = _error(path)
    assert error.index == 3 and "record 3" in str(error)
    assert "truncated" in str(error) and "expected" in str(error)
    path.write_bytes(path.read_bytes()[: offsets[3] + 5])  # inside record 3's header
    assert _error(path).index == 3


def test_truncated_gzip_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.tfrecords"
    write_examples(path, ({"v": np.full(5000, i, np.float32)} for i in range(20)))
    cut = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(cut)
    available = zlib.decompressobj(31).decompress(cut)  # what any reader can recover
    complete, pos = 0, 0  # whole records in the recoverable prefix
    while pos + 12 <= len(available):
        (length,) = struct.unpack_from("<Q", available, pos)
        if pos + 16 + length > len(available):
            break
        pos += 16 + length
        complete += 1
    assert 0 < complete < 20
    error = _error(path)
    assert error.index == complete
    assert "truncated" in str(error)


def test_flipped_data_byte_is_a_crc_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "flip.tfrecords"
    offsets = _write_plain(path)
    data = bytearray(path.read_bytes())
    data[offsets[2] + 12 + 50] ^= 0x01  # inside record 2's data
    path.write_bytes(bytes(data))
    error = _error(path)
    assert error.index == 2 and "CRC mismatch" in str(error)
    assert len(list(iter_records(path, check_crc=False))) == 5  # the check can be switched off


def test_flipped_byte_inside_gzip_data_is_a_crc_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "flip.tfrecords"
    offsets = _write_plain(path)
    data = bytearray(path.read_bytes())
    data[offsets[4] + 12 + 7] ^= 0x80
    path.write_bytes(gzip.compress(bytes(data)))
    error = _error(path)
    assert error.index == 4 and "CRC mismatch" in str(error)


def test_flipped_length_byte_is_a_header_crc_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "flip.tfrecords"
    offsets = _write_plain(path)
    data = bytearray(path.read_bytes())
    data[offsets[1]] ^= 0x04
    path.write_bytes(bytes(data))
    error = _error(path)
    assert error.index == 1 and "header CRC mismatch" in str(error)


def test_wrong_compression(tmp_path: Path) -> None:
    plain, packed = tmp_path / "plain.tfrecords", tmp_path / "packed.tfrecords"
    _write_plain(plain)
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    error = _error(plain, compression="gzip")
    assert error.index == 0 and "expected GZIP" in str(error)
    error = _error(packed, compression="none")
    assert error.index == 0 and "GZIP" in str(error) and "wrong compression" in str(error)
    error = _error(packed, compression="zlib")
    assert "expected ZLIB" in str(error) and "GZIP" in str(error)


def test_not_a_tfrecord_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.tfrecords"
    path.write_bytes(b"these are not the records you are looking for")
    error = _error(path)
    assert error.index == 0 and "not a TFRecord file" in str(error)


def test_malformed_example_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.tfrecords"
    with TFRecordWriter(path) as writer:
        writer.write(encode_example({"a": np.ones(3, np.float32)}))
        writer.write(b"\x0a\x10\x0a")
    error = _error(path)
    assert error.index == 1 and "malformed tf.train.Example" in str(error)


def test_corrupt_gzip_stream_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.tfrecords"
    rng = np.random.default_rng(0)  # incompressible data: the deflate body is long
    write_examples(path, ({"v": rng.random(4000).astype(np.float32)} for _ in range(10)))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    error = _error(path)
    assert error.index is not None and 0 < error.index < 10
    assert "CRC mismatch" in str(error) or "corrupt GZIP stream" in str(error)


def test_errors_survive_pickling() -> None:
    import pickle

    error = TFRecordError("a.tfrecords", 3, "truncated file")
    again = pickle.loads(pickle.dumps(error))
    assert (again.path, again.index, again.reason, str(again)) == (
        "a.tfrecords",
        3,
        "truncated file",
        "a.tfrecords, record 3: truncated file",
    )

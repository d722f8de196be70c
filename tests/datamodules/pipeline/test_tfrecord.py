"""TFRecord container reader: framing, CRC-32C, compression and errors, on real and new files."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from dti_sprites.datamodules.pipeline.synth import TFRecordWriter, write_examples
from dti_sprites.datamodules.pipeline.tf_example import encode_example, iter_examples
from dti_sprites.datamodules.pipeline.tfrecord import (
    TFRecordError,
    crc32c,
    detect_compression,
    frame_record,
    iter_records,
    masked_crc32c,
)

_REPO = Path(__file__).resolve().parents[3]
# 10 real DeepMind records, kept in the repository (tests/data/README.md) so that CI has them.
REAL = _REPO / "tests" / "data" / "tetrominoes_mini.tfrecords"


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


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_crc32c_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    assert crc32c(bytearray(data)) == crc32c(memoryview(data)) == expected


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


def test_real_records_reframe_byte_for_byte(real: Path) -> None:
    decompressed = gzip.decompress(real.read_bytes())
    records = list(iter_records(real))  # CRCs checked (default)
    assert len(records) == 10
    assert b"".join(frame_record(r) for r in records) == decompressed


# ------------------------------------------------------------------------------------------
# Compression and streaming
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zlib", "none"])
def test_writer_reader_round_trip(tmp_path: Path, compression: str) -> None:
    path = tmp_path / f"data.{compression}"
    records = [bytes(range(256)) * 3, b"", b"raw bytes, not an Example" * 50]
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
        list(iter_records(path, **options))  # type: ignore[arg-type]
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

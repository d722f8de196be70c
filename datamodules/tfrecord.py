"""TensorFlow-free TFRecord container and ``tf.train.Example`` codec (SPEC §8).

Container: every record is ``uint64 length | uint32 masked_crc32c(length) | data[length] |
uint32 masked_crc32c(data)``, little-endian, where ``crc32c`` is CRC-32C (Castagnoli, reflected
polynomial 0x82F63B78) and ``masked(c) = ((c >> 15 | c << 17) + 0xA282EAD8) mod 2**32``. A file is
uncompressed, one (or several concatenated) GZIP member(s), or one ZLIB stream.

``data`` is a serialised ``tf.train.Example``::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      # entries in any order
    Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                            Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

Decoded feature values (``FeatureValue``):

- a ``BytesList`` whose strings are all one byte long (the DeepMind per-byte encoding of images
  and masks, ``0A 01 b0 0A 01 b1 ...`` on the wire) -> ``np.ndarray`` uint8 (n,);
  any other ``BytesList`` -> ``list[bytes]``;
- a ``FloatList`` (packed or not) -> ``np.ndarray`` float32 (n,);
- an ``Int64List`` (packed or not, negative values as 10-byte varints) -> ``np.ndarray`` int64 (n,).

The writer encodes uint8 arrays as per-byte BytesLists, float arrays as packed FloatLists and
other integer arrays as packed Int64Lists: exactly the DeepMind encoding.

CRC-32C uses the ``crc32c`` package when it is importable and otherwise a vectorised numpy
implementation (about 1.5 ns per byte on one core, see ``crc32c_numpy``).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Literal, TypeAlias

import numpy as np

from dti_sprites.io import atomic_write

__all__ = [
    "CRC32C_BACKEND",
    "Compression",
    "FeatureValue",
    "TFRecordError",
    "TFRecordWriter",
    "crc32c",
    "crc32c_numpy",
    "crc32c_reference",
    "detect_compression",
    "encode_example",
    "frame_record",
    "iter_examples",
    "iter_records",
    "masked_crc32c",
    "parse_example",
    "write_examples",
]

Compression: TypeAlias = Literal["auto", "gzip", "zlib", "none"]
FeatureValue: TypeAlias = np.ndarray | list[bytes]

_READ_SIZE = 1 << 20  # compressed bytes read per call
_MAX_INFLATE = 1 << 20  # decompressed bytes produced per call (bounds memory on zip bombs)
_FEED = 1 << 16  # compressed bytes given to the inflater per call
_MAX_RECORD = 1 << 32  # a record longer than this is a corrupt header, not data
_GZIP_MAGIC = b"\x1f\x8b"


class TFRecordError(ValueError):
    """Bad TFRecord input: ``str()`` names the file, the record index and what was expected.

    Attributes:
        path: the file.
        index: 0-based record index, or ``None`` for an error about the whole file.
        reason: what was wrong and what was expected.
    """

    def __init__(self, path: str | os.PathLike[str], index: int | None, reason: str) -> None:
        self.path = str(path)
        self.index = index
        self.reason = reason
        where = self.path if index is None else f"{self.path}, record {index}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[type[TFRecordError], tuple[str, int | None, str]]:
        return type(self), (self.path, self.index, self.reason)  # picklable across workers


# --------------------------------------------------------------------------------------------
# CRC-32C
# --------------------------------------------------------------------------------------------

_POLY = 0x82F63B78
_MASK_DELTA = 0xA282EAD8


def _byte_table() -> np.ndarray:
    """(256,) uint32: CRC register after one byte ``b`` from register 0."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1)
    return table.astype(np.uint32)


_TABLE = _byte_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def crc32c_reference(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of ``data``, one table lookup per byte in pure Python (slow, for short inputs)."""
    crc = 0xFFFFFFFF
    table = _TABLE_LIST
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _shift_one_byte(values: np.ndarray) -> np.ndarray:
    """Registers after feeding one zero byte, vectorised over ``values`` (uint32)."""
    return _TABLE[values & 0xFF] ^ (values >> 8)


_BITS = np.arange(32, dtype=np.uint32)


def _apply_linear(columns: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Apply the GF(2) 32×32 matrix with columns ``columns`` (32,) to ``values`` (n,) uint32."""
    on = (values[:, None] >> _BITS) & 1  # (n, 32)
    return np.bitwise_xor.reduce(on * columns, axis=1).astype(np.uint32)  # (n,)


class _NumpyCrc32c:
    """Chunked, table-driven CRC-32C in numpy (CRC is linear over GF(2)).

    ``raw(m)`` is the register after ``m`` from register 0 with no final xor; prepending zero
    bytes leaves it unchanged, so the message is left-padded to whole chunks. Level 1 turns each
    256-byte chunk into its raw CRC with one gather from a (256 positions × 256 values) table and
    an xor-reduction, 128 chunks at a time so the work stays in cache. Each further level merges
    groups of 64 values (block size D) the same way, with a table that maps a value's 4 bytes at
    group position t to the value shifted by ``D·(63 − t)`` zero bytes, until one value is left.
    The initial register 0xFFFFFFFF is the same as xor-ing the first 4 bytes with 0xFF.
    """

    chunk = 256
    group = 64
    rows_per_block = 128

    def __init__(self) -> None:
        tables = np.empty((self.chunk, 256), dtype=np.uint32)
        tables[-1] = _TABLE
        for p in range(self.chunk - 2, -1, -1):
            tables[p] = _shift_one_byte(tables[p + 1])
        self._level1 = tables.ravel()
        self._offsets1 = np.arange(self.chunk, dtype=np.int32) * 256
        self._offsets_n = np.arange(self.group * 4, dtype=np.int32) * 256
        self._shift_byte = _shift_one_byte(np.uint32(1) << _BITS)  # (32,) one zero byte
        self._merge: dict[int, np.ndarray] = {}

    def _shift_columns(self, nbytes: int) -> np.ndarray:
        """(32,) columns of the linear map "feed ``nbytes`` zero bytes" (square-and-multiply)."""
        result = np.uint32(1) << _BITS
        power = self._shift_byte
        while nbytes:
            if nbytes & 1:
                result = _apply_linear(power, result)
            power = _apply_linear(power, power)
            nbytes >>= 1
        return result

    def _merge_table(self, block: int) -> np.ndarray:
        """Flat (group·4·256,) table merging the values of ``group`` consecutive blocks."""
        table = self._merge.get(block)
        if table is None:
            step = self._shift_columns(block)
            columns = np.uint32(1) << _BITS  # shift by block·0
            table = np.zeros((self.group, 4, 256), dtype=np.uint32)
            byte_values = np.arange(256, dtype=np.uint32)
            for t in range(self.group - 1, -1, -1):  # position t is shifted by block·(63 − t)
                for k in range(4):
                    table[t, k] = _apply_linear(columns, byte_values << np.uint32(8 * k))
                columns = _apply_linear(step, columns)
            table = table.ravel()
            self._merge[block] = table
        return table

    def _chunk_values(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Raw CRC of each row of ``rows`` (n, 256) uint8 into ``out`` (n,) uint32."""
        step = self.rows_per_block
        index = np.empty((min(step, len(rows)), self.chunk), dtype=np.int32)
        gathered = np.empty(index.shape, dtype=np.uint32)
        for start in range(0, len(rows), step):
            block = rows[start : start + step]
            n = len(block)
            np.add(self._offsets1, block, out=index[:n])
            np.take(self._level1, index[:n], out=gathered[:n])
            np.bitwise_xor.reduce(gathered[:n], axis=1, out=out[start : start + n])

    def __call__(self, data: bytes | bytearray | memoryview) -> int:
        """CRC-32C of ``data`` (at least 4 bytes)."""
        raw = np.frombuffer(data, dtype=np.uint8)
        c = self.chunk
        if raw.size <= self.rows_per_block * c:  # small: one padded copy, one gather
            padded = np.zeros(-(-raw.size // c) * c, dtype=np.uint8)
            pad = padded.size - raw.size
            padded[pad:] = raw
            padded[pad : pad + 4] ^= 0xFF  # initial register 0xFFFFFFFF
            index = self._offsets1 + padded.reshape(-1, c)  # (m, 256) int32
            values = np.bitwise_xor.reduce(np.take(self._level1, index), axis=1)  # (m,)
        else:  # large: the body is read in place, block by block
            lead = raw.size % c  # the left part that is not a whole chunk, with the first 4 bytes
            if lead < 4:
                lead += c
            first = np.zeros(2 * c, dtype=np.uint8)
            first[2 * c - lead :] = raw[:lead]
            first[2 * c - lead : 2 * c - lead + 4] ^= 0xFF
            body = raw[lead:].reshape(-1, c)  # (m, 256), no copy
            values = np.empty(2 + len(body), dtype=np.uint32)
            self._chunk_values(first.reshape(2, c), values[:2])
            self._chunk_values(body, values[2:])
        block = c
        while values.size > 8:
            g = -(-values.size // self.group)
            merged = np.zeros(g * self.group, dtype=np.uint32)
            merged[merged.size - values.size :] = values
            as_bytes = merged.view(np.uint8).reshape(g, self.group * 4)  # little-endian bytes
            index = self._offsets_n + as_bytes  # (g, 256) int32
            values = np.bitwise_xor.reduce(np.take(self._merge_table(block), index), axis=1)
            block *= self.group
        return self._merge_few(values, block) ^ 0xFFFFFFFF

    def _merge_few(self, values: np.ndarray, block: int) -> int:
        """Merge up to 64 values of ``block``-byte blocks with table lookups in Python."""
        if values.size == 1:
            return int(values[0])
        table = self._merge_table(block)
        first = self.group - values.size  # the last value is at position group - 1
        out = 0
        for j, value in enumerate(values.tolist()):
            base = (first + j) * 4 * 256
            for k in range(4):
                out ^= int(table[base + k * 256 + ((value >> (8 * k)) & 0xFF)])
        return out


_numpy_crc = _NumpyCrc32c()
_SHORT = 128  # below this many bytes the pure-Python loop is faster than numpy


def crc32c_numpy(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of ``data`` with the vectorised numpy fallback (pure Python for short inputs)."""
    if len(data) < _SHORT:
        return crc32c_reference(data)
    return _numpy_crc(data)


def _load_accelerator() -> Callable[[bytes | bytearray | memoryview], int] | None:
    try:
        import crc32c as package  # optional accelerator, never required
    except ImportError:
        return None
    function = getattr(package, "crc32c", None)
    return function if callable(function) else None


_accelerated = _load_accelerator()
CRC32C_BACKEND: str = "crc32c" if _accelerated is not None else "numpy"


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    if _accelerated is not None:
        return _accelerated(data)
    return crc32c_numpy(data)


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """The TFRecord masked CRC: ``((c >> 15 | c << 17) + 0xA282EAD8) mod 2**32``."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Container: reading
# --------------------------------------------------------------------------------------------


class _StreamError(Exception):
    """A problem of the compressed stream; the record reader adds file and record index."""


def _is_zlib_header(head: bytes) -> bool:
    return len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0


def _valid_header(head: bytes) -> bool:
    return len(head) >= 12 and masked_crc32c(head[:8]) == int.from_bytes(head[8:12], "little")


def detect_compression(head: bytes) -> Literal["gzip", "zlib", "none"] | None:
    """Compression of a file from its first bytes, or ``None`` when it is not a TFRecord file.

    An uncompressed file is recognised by a valid first record header (length + its CRC), so a
    record length whose bytes happen to look like a ZLIB header is not mistaken for one.
    """
    if len(head) == 0 or _valid_header(head):
        return "none"
    if head[:2] == _GZIP_MAGIC:
        return "gzip"
    if _is_zlib_header(head):
        return "zlib"
    return None


def _describe_start(head: bytes) -> str:
    kind = detect_compression(head)
    found = {"gzip": "GZIP data", "zlib": "ZLIB data", "none": "an uncompressed TFRecord"}
    return f"the file starts with {head[:4].hex(' ')} ({found.get(kind, 'unknown data')})"


def _raw_chunks(
    handle: BinaryIO, head: bytes, on_raw: Callable[[bytes], None] | None
) -> Iterator[bytes]:
    chunk = head
    while chunk:
        if on_raw is not None:
            on_raw(chunk)
        yield chunk
        chunk = handle.read(_READ_SIZE)


def _small_pieces(raw: Iterator[bytes]) -> Iterator[bytes]:
    """Re-cut compressed input into pieces of at most ``_FEED`` bytes."""
    for chunk in raw:
        view = memoryview(chunk)
        for start in range(0, len(view), _FEED):
            yield view[start : start + _FEED].tobytes()


def _inflate(raw: Iterator[bytes], kind: Literal["gzip", "zlib"]) -> Iterator[bytes]:
    """Decompressed pieces of a GZIP (possibly multi-member) or ZLIB stream, bounded in size.

    The input is fed in small pieces so that records are yielded (and CRC-checked) as soon as
    they are inflated: a corruption is reported at the record it hits, not at the stream end.
    """
    raw = _small_pieces(raw)
    wbits = 31 if kind == "gzip" else 15
    name = kind.upper()
    inflater = zlib.decompressobj(wbits)
    in_stream = False
    pending = b""
    while True:
        if not pending:
            pending = next(raw, b"")
            if not pending:
                if in_stream and not inflater.eof:
                    raise _StreamError(f"file ends inside the {name} stream (truncated file)")
                return
        in_stream = True
        try:
            out = inflater.decompress(pending, _MAX_INFLATE)
        except zlib.error as exc:
            raise _StreamError(f"corrupt {name} stream ({exc})") from None
        if out:
            yield out
        if not inflater.eof:
            pending = inflater.unconsumed_tail
            continue
        pending = inflater.unused_data
        while len(pending) < 2:  # is another GZIP member following?
            more = next(raw, b"")
            if not more:
                break
            pending += more
        if not pending:
            return
        if kind == "zlib" or pending[:2] != _GZIP_MAGIC:
            raise _StreamError(f"unexpected data after the end of the {name} stream")
        inflater = zlib.decompressobj(wbits)


class _ByteStream:
    """Exact-size reads over an iterator of byte pieces, holding at most ~one record."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes, or fewer at the end of the stream."""
        end = self._pos + n
        if end <= len(self._buf):
            out = self._buf[self._pos : end]
            self._pos = end
            return out
        parts = [self._buf[self._pos :]]
        have = len(parts[0])
        while have < n:
            piece = next(self._pieces, None)
            if piece is None:
                break
            parts.append(piece)
            have += len(piece)
        self._buf = b"".join(parts)
        self._pos = min(n, len(self._buf))
        return self._buf[: self._pos]


def _header_error(head: bytes, index: int) -> str:
    reason = "record header CRC mismatch (expected masked CRC-32C of the 8-byte length)"
    if index == 0 and detect_compression(head) in ("gzip", "zlib"):
        reason += f"; {_describe_start(head)}: wrong compression? use compression='auto'"
    return reason


def iter_records(
    path: str | os.PathLike[str],
    compression: Compression = "auto",
    check_crc: bool = True,
    on_raw_chunk: Callable[[bytes], None] | None = None,
) -> Iterator[bytes]:
    """Stream the records of a TFRecord file; memory stays flat whatever the file size.

    Args:
        path: the ``.tfrecords`` file.
        compression: ``"auto"`` (detected from the first bytes), ``"gzip"``, ``"zlib"`` or
            ``"none"``.
        check_crc: verify the masked CRC-32C of every length field and every record.
        on_raw_chunk: called with every chunk of the file as read from disk (e.g. to hash it in
            the same pass).

    Yields:
        The data of each record (a serialised ``tf.train.Example`` for DeepMind files).

    Raises:
        TFRecordError: truncated file, CRC mismatch, wrong or corrupt compression.
    """
    with open(path, "rb") as handle:
        head = handle.read(_READ_SIZE)
        kind = _resolve_compression(path, head, compression)
        raw = _raw_chunks(handle, head, on_raw_chunk)
        pieces = raw if kind == "none" else _inflate(raw, kind)
        yield from _frame_records(path, _ByteStream(pieces), head, check_crc)


def _resolve_compression(
    path: str | os.PathLike[str], head: bytes, compression: Compression
) -> Literal["gzip", "zlib", "none"]:
    if compression == "auto":
        detected = detect_compression(head)
        if detected is None:
            raise TFRecordError(
                path,
                0,
                "not a TFRecord file: expected a valid record header or GZIP/ZLIB data, "
                f"but {_describe_start(head)}",
            )
        return detected
    if compression == "gzip" and head and head[:2] != _GZIP_MAGIC:
        raise TFRecordError(
            path, 0, f"expected GZIP data (compression='gzip'), {_describe_start(head)}"
        )
    if compression == "zlib" and head and not _is_zlib_header(head):
        raise TFRecordError(
            path, 0, f"expected ZLIB data (compression='zlib'), {_describe_start(head)}"
        )
    if compression not in ("gzip", "zlib", "none"):
        raise ValueError(f"compression must be auto, gzip, zlib or none, not {compression!r}")
    return compression


def _frame_records(
    path: str | os.PathLike[str], stream: _ByteStream, head: bytes, check_crc: bool
) -> Iterator[bytes]:
    index = 0
    while True:
        try:
            header = stream.take(12)
            if not header:
                return
            if len(header) < 12:
                raise TFRecordError(
                    path,
                    index,
                    f"truncated file: expected a 12-byte record header, found {len(header)} bytes",
                )
            length, length_crc = struct.unpack("<QI", header)
            if check_crc and masked_crc32c(header[:8]) != length_crc:
                raise TFRecordError(path, index, _header_error(head, index))
            if length > _MAX_RECORD:
                raise TFRecordError(
                    path, index, f"implausible record length {length} (corrupt header)"
                )
            body = stream.take(length + 4)
        except _StreamError as exc:
            raise TFRecordError(path, index, str(exc)) from None
        if len(body) < length + 4:
            raise TFRecordError(
                path,
                index,
                f"truncated file: expected {length} bytes of record data and a 4-byte "
                f"CRC, found {len(body)} bytes",
            )
        data = body[:length]
        if check_crc and masked_crc32c(data) != int.from_bytes(body[length:], "little"):
            raise TFRecordError(path, index, "record data CRC mismatch (corrupt or modified data)")
        yield data
        index += 1


def iter_examples(
    path: str | os.PathLike[str],
    compression: Compression = "auto",
    check_crc: bool = True,
    on_raw_chunk: Callable[[bytes], None] | None = None,
) -> Iterator[dict[str, FeatureValue]]:
    """Stream the parsed ``tf.train.Example`` records of a file (see ``iter_records``).

    Raises:
        TFRecordError: as ``iter_records``, and for a malformed Example (naming the record).
    """
    records = iter_records(path, compression, check_crc, on_raw_chunk)
    for index, data in enumerate(records):
        try:
            yield parse_example(data)
        except _ProtoError as exc:
            raise TFRecordError(path, index, f"malformed tf.train.Example: {exc}") from None


# --------------------------------------------------------------------------------------------
# tf.train.Example: parsing
# --------------------------------------------------------------------------------------------


class _ProtoError(ValueError):
    """Malformed protobuf wire data."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """(value, next position) of the unsigned varint at ``pos``."""
    try:
        byte = buf[pos]
        if byte < 0x80:
            return byte, pos + 1
        result = byte & 0x7F
        shift = 7
        while True:
            pos += 1
            byte = buf[pos]
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, pos + 1
            shift += 7
            if shift > 63:
                raise _ProtoError("varint longer than 10 bytes")
    except IndexError:
        raise _ProtoError("truncated varint") from None


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of every field of a message; skips nothing."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise _ProtoError(f"field {field}: {size}-byte value runs past the message end")
            yield field, wire, buf[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise _ProtoError(f"field {field}: truncated fixed{size * 8} value")
            yield field, wire, buf[pos : pos + size]
            pos += size
        else:
            raise _ProtoError(f"field {field}: unsupported wire type {wire}")


_PATTERN_CACHE: list[np.ndarray] = [np.zeros(0, np.uint8), np.zeros(0, np.uint8)]


def _per_byte_patterns(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask, expected) such that ``payload & mask == expected`` iff it is ``0A 01 b``*n."""
    if _PATTERN_CACHE[0].size < size:
        n = max(size, 2 * _PATTERN_CACHE[0].size)
        n += -n % 3
        _PATTERN_CACHE[0] = np.tile(np.array([0xFF, 0xFF, 0x00], np.uint8), n // 3)
        _PATTERN_CACHE[1] = np.tile(np.array([0x0A, 0x01, 0x00], np.uint8), n // 3)
    return _PATTERN_CACHE[0][:size], _PATTERN_CACHE[1][:size]


def _parse_bytes_list(payload: memoryview) -> FeatureValue:
    size = len(payload)
    if size % 3 == 0:
        wire = np.frombuffer(payload, dtype=np.uint8)
        mask, expected = _per_byte_patterns(size)
        if ((wire & mask) == expected).all():  # fast path: H*W*C one-byte strings
            return wire[2::3].copy()
    values: list[bytes] = []
    for field, wire_type, value in _fields(payload):
        if field == 1 and wire_type == 2:
            values.append(bytes(value))  # type: ignore[arg-type]
    if all(len(v) == 1 for v in values):
        return np.frombuffer(b"".join(values), dtype=np.uint8).copy()
    return values


def _parse_float_list(payload: memoryview) -> np.ndarray:
    size = len(payload)
    if size and payload[0] == 0x0A:  # fast path: one packed run
        length, pos = _varint(payload, 1)
        if pos + length == size and length % 4 == 0:
            return np.frombuffer(payload[pos:], dtype="<f4").astype(np.float32)
    if size % 5 == 0:  # fast path: unpacked, tag 0x0D before every float
        wire = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 5)
        if np.all(wire[:, 0] == 0x0D):
            return np.ascontiguousarray(wire[:, 1:]).view("<f4").ravel().astype(np.float32)
    pieces: list[np.ndarray] = []
    for field, wire_type, value in _fields(payload):
        if field != 1:
            continue
        if wire_type == 2 and len(value) % 4 == 0:  # type: ignore[arg-type]
            pieces.append(np.frombuffer(value, dtype="<f4"))  # type: ignore[arg-type]
        elif wire_type == 5:
            pieces.append(np.frombuffer(value, dtype="<f4"))  # type: ignore[arg-type]
        else:
            raise _ProtoError(f"FloatList value with wire type {wire_type}")
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(pieces).astype(np.float32)


def _to_int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_int64_list(payload: memoryview) -> np.ndarray:
    values: list[int] = []
    for field, wire_type, value in _fields(payload):
        if field != 1:
            continue
        if wire_type == 0:
            values.append(_to_int64(value))  # type: ignore[arg-type]
        elif wire_type == 2:
            pos = 0
            while pos < len(value):  # type: ignore[arg-type]
                item, pos = _varint(value, pos)  # type: ignore[arg-type]
                values.append(_to_int64(item))
        else:
            raise _ProtoError(f"Int64List value with wire type {wire_type}")
    return np.array(values, dtype=np.int64)


_LIST_PARSERS: dict[int, Callable[[memoryview], FeatureValue]] = {
    1: _parse_bytes_list,
    2: _parse_float_list,
    3: _parse_int64_list,
}


def _parse_feature(feature: memoryview) -> FeatureValue:
    """One ``Feature``: repeated occurrences of the same list merge (protobuf semantics)."""
    if len(feature) > 1 and feature[0] in (0x0A, 0x12, 0x1A):  # fast path: one list
        size, pos = _varint(feature, 1)
        if pos + size == len(feature):
            return _LIST_PARSERS[feature[0] >> 3](feature[pos:])
    kind = 0
    parts: list[memoryview] = []
    for field, wire_type, value in _fields(feature):
        if field in _LIST_PARSERS and wire_type == 2:
            if field != kind:
                kind, parts = field, []
            parts.append(value)  # type: ignore[arg-type]
    if not kind:
        raise _ProtoError("Feature without bytes_list, float_list or int64_list")
    payload = parts[0] if len(parts) == 1 else memoryview(b"".join(bytes(p) for p in parts))
    return _LIST_PARSERS[kind](payload)


def _map_entry(entry: memoryview) -> tuple[str, memoryview]:
    if len(entry) > 2 and entry[0] == 0x0A and entry[1] < 0x80:  # fast path: key, then value
        key_end = 2 + entry[1]
        if key_end < len(entry) and entry[key_end] == 0x12:
            size, pos = _varint(entry, key_end + 1)
            if pos + size == len(entry):
                try:
                    return str(entry[2:key_end], "utf-8"), entry[pos:]
                except UnicodeDecodeError:
                    raise _ProtoError(
                        f"feature name {bytes(entry[2:key_end])!r} is not UTF-8"
                    ) from None
    key = b""
    value = memoryview(b"")
    for field, wire_type, item in _fields(entry):  # key and value in any order
        if wire_type != 2:
            continue
        if field == 1:
            key = bytes(item)  # type: ignore[arg-type]
        elif field == 2:
            value = item  # type: ignore[assignment]
    try:
        return key.decode("utf-8"), value
    except UnicodeDecodeError:
        raise _ProtoError(f"feature name {key!r} is not UTF-8") from None


def parse_example(data: bytes | bytearray | memoryview) -> dict[str, FeatureValue]:
    """Parse a serialised ``tf.train.Example`` into ``{name: value}`` in wire order.

    Values follow the module docstring (uint8 array for per-byte BytesLists, float32 / int64
    arrays, ``list[bytes]`` otherwise). Unknown fields are skipped; a repeated name keeps its last
    value, as protobuf maps do.

    Raises:
        ValueError: malformed wire data (``iter_examples`` turns it into a ``TFRecordError``).
    """
    buf = memoryview(data).cast("B")
    out: dict[str, FeatureValue] = {}
    for field, wire_type, features in _fields(buf):
        if field != 1 or wire_type != 2:
            continue
        for entry_field, entry_wire, entry in _fields(features):  # type: ignore[arg-type]
            if entry_field != 1 or entry_wire != 2:
                continue
            name, feature = _map_entry(entry)  # type: ignore[arg-type]
            out.pop(name, None)
            out[name] = _parse_feature(feature)
    return out


# --------------------------------------------------------------------------------------------
# tf.train.Example: encoding
# --------------------------------------------------------------------------------------------


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _encode_varint(len(payload)) + payload


def _encode_per_byte(values: np.ndarray) -> bytes:
    """BytesList of one-byte strings: ``0A 01 b0 0A 01 b1 ...`` (uint8 values, any shape)."""
    flat = values.reshape(-1)
    wire = np.empty((flat.size, 3), dtype=np.uint8)
    wire[:, 0] = 0x0A
    wire[:, 1] = 0x01
    wire[:, 2] = flat
    return wire.tobytes()


def _encode_feature(name: str, value: FeatureValue) -> bytes:
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint8:
            return _length_delimited(0x0A, _encode_per_byte(value))
        if np.issubdtype(value.dtype, np.floating):
            packed = value.astype("<f4").tobytes()
            return _length_delimited(0x12, _length_delimited(0x0A, packed) if packed else b"")
        if np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
            varints = b"".join(_encode_varint(int(v)) for v in value.reshape(-1))
            return _length_delimited(0x1A, _length_delimited(0x0A, varints) if varints else b"")
        raise TypeError(f"feature {name!r}: cannot encode dtype {value.dtype}")
    if isinstance(value, list | tuple) and all(isinstance(v, bytes) for v in value):
        return _length_delimited(0x0A, b"".join(_length_delimited(0x0A, v) for v in value))
    raise TypeError(f"feature {name!r}: expected a numpy array or a list of bytes")


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
    """Serialise ``{name: value}`` as a ``tf.train.Example`` in the DeepMind encoding.

    uint8 arrays -> per-byte BytesList (flattened in C order); float arrays -> packed float32
    FloatList; other integer or bool arrays -> packed Int64List; ``list[bytes]`` -> BytesList.
    Map entries are written in the mapping's order, key before value.
    """
    entries = []
    for name, value in features.items():
        feature = _encode_feature(name, value)
        entry = _length_delimited(0x0A, name.encode("utf-8")) + _length_delimited(0x12, feature)
        entries.append(_length_delimited(0x0A, entry))
    return _length_delimited(0x0A, b"".join(entries))


# --------------------------------------------------------------------------------------------
# Container: writing
# --------------------------------------------------------------------------------------------


def frame_record(data: bytes) -> bytes:
    """One TFRecord frame: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return b"".join(
        (
            length,
            struct.pack("<I", masked_crc32c(length)),
            data,
            struct.pack("<I", masked_crc32c(data)),
        )
    )


class TFRecordWriter:
    """Write records to a TFRecord file, whole-file GZIP by default (as DeepMind's files).

    Use as a context manager; ``close()`` finishes the compressed stream.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        compression: Literal["gzip", "zlib", "none"] = "gzip",
        level: int = 6,
    ) -> None:
        if compression not in ("gzip", "zlib", "none"):
            raise ValueError(f"compression must be gzip, zlib or none, not {compression!r}")
        self.path = Path(path)
        self._handle: BinaryIO | None = open(self.path, "wb")
        wbits = {"gzip": 31, "zlib": 15, "none": 0}[compression]
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, wbits) if wbits else None
        self.count = 0

    def write(self, data: bytes) -> None:
        """Append one record (raw bytes, e.g. ``encode_example(...)``)."""
        if self._handle is None:
            raise ValueError(f"{self.path}: writer is closed")
        frame = frame_record(data)
        if self._compressor is not None:
            frame = self._compressor.compress(frame)
        self._handle.write(frame)
        self.count += 1

    def write_example(self, features: Mapping[str, FeatureValue]) -> None:
        """Append one ``tf.train.Example`` (see ``encode_example``)."""
        self.write(encode_example(features))

    def close(self) -> None:
        """Flush the compressor, fsync and close the file."""
        if self._handle is None:
            return
        try:
            if self._compressor is not None:
                self._handle.write(self._compressor.flush())
            self._handle.flush()
            os.fsync(self._handle.fileno())
        finally:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_examples(
    path: str | os.PathLike[str],
    examples: Iterable[Mapping[str, FeatureValue]],
    compression: Literal["gzip", "zlib", "none"] = "gzip",
) -> int:
    """Atomically write ``examples`` as a TFRecord file; returns the number of records."""
    with atomic_write(path) as temporary, TFRecordWriter(temporary, compression) as writer:
        for example in examples:
            writer.write_example(example)
    return writer.count

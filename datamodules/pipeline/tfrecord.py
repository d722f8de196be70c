"""TFRecord container reader (docs/method.md §8): record framing, CRC-32C checks, GZIP / ZLIB.

Every record is ``uint64 length | uint32 masked_crc32c(length) | data[length] |
uint32 masked_crc32c(data)``, little-endian, where ``crc32c`` is CRC-32C (Castagnoli) and
``masked(c) = ((c >> 15 | c << 17) + 0xA282EAD8) mod 2**32``. A file is uncompressed, one (or
several concatenated) GZIP member(s), or one ZLIB stream. The records' contents are not
interpreted here (``tf_example`` parses DeepMind's ``tf.train.Example`` records); the writer of
generated files is ``synth.TFRecordWriter``.

CRC-32C comes from google-crc32c (a C implementation with wheels for the usual platforms).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO, Literal, TypeAlias

import google_crc32c

__all__ = [
    "CRC32C_BACKEND",
    "Compression",
    "TFRecordError",
    "crc32c",
    "detect_compression",
    "frame_record",
    "iter_records",
    "masked_crc32c",
]

Compression: TypeAlias = Literal["auto", "gzip", "zlib", "none"]

CRC32C_BACKEND = f"google-crc32c ({google_crc32c.implementation})"
"""Which CRC-32C implementation runs (``c`` unless the package fell back to pure Python)."""

_READ_SIZE = 1 << 20  # compressed bytes read per call
_MAX_INFLATE = 1 << 20  # decompressed bytes produced per call (bounds memory on zip bombs)
_FEED = 1 << 16  # compressed bytes given to the inflater per call
_MAX_RECORD = 1 << 32  # a record longer than this is a corrupt header, not data
_GZIP_MAGIC = b"\x1f\x8b"
_MASK_DELTA = 0xA282EAD8


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


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    return google_crc32c.value(data if isinstance(data, bytes) else bytes(data))


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """The TFRecord masked CRC: ``((c >> 15 | c << 17) + 0xA282EAD8) mod 2**32``."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


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

"""Resumable download of DeepMind's multi-object TFRecords, then conversion to HDF5.

``download("tetrominoes", "data")`` fetches
``<base_url>tetrominoes/tetrominoes_train.tfrecords`` to ``data/tetrominoes_train.tfrecords`` and
converts it to ``data/tetrominoes.h5``. Only the standard library is used (``urllib``).

Files on disk, for a final name ``F``:

- ``F.part``       bytes received so far; a later call continues from its size (HTTP Range).
- ``F.part.json``  what the partial transfer is a prefix of: URL, expected size, ETag /
                   Last-Modified (sent as ``If-Range`` so a changed remote file restarts the
                   transfer), and the server's MD5 when it publishes one (``x-goog-hash``).
- ``F``            the complete file, renamed from ``F.part`` only once every byte arrived.
- ``F.json``       its record: URL, size, sha256 (computed while streaming), MD5 if known.
                   A file whose size matches its record is never downloaded again
                   (``sha256_of(F)`` re-checks the content against the record).
- ``F.lock``       an exclusive ``flock`` held during the transfer, so concurrent calls (several
                   processes, or nodes on a shared file system) wait and then find the file.

A server that ignores ``Range`` (answers 200 to a ranged request) restarts the transfer from byte
0. A connection dropped mid-transfer is retried from the bytes already on disk (``retries``
times); if every retry fails the ``.part`` file stays for the next call.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from dti_sprites.datamodules.schemas import get_schema
from dti_sprites.io import atomic_write

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
    fcntl = None  # type: ignore[assignment]

DatasetName = Literal["tetrominoes", "multi_dsprites", "clevr6", "clevr10", "objects_room"]

DEFAULT_BASE_URL = "https://storage.googleapis.com/multi-object-datasets/"

_CHUNK = 1 << 20  # bytes read per call while streaming
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


class DownloadError(RuntimeError):
    """A transfer that cannot complete: HTTP error, unreachable host, checksum mismatch."""


class _Interrupted(Exception):
    """The connection ended before the expected number of bytes arrived (retryable)."""


@dataclass
class _PartRecord:
    """What a ``.part`` file is a prefix of (written before the first byte is appended)."""

    url: str
    size: int | None
    etag: str | None
    last_modified: str | None
    md5: str | None  # base64, as in x-goog-hash


def remote_path(dataset: DatasetName, variant: str | None = None) -> str:
    """Path of ``dataset``'s public TFRecord file below the base URL (SPEC §8).

    CLEVR6 and CLEVR10 are two filters of ``clevr_with_masks_train``; ``variant=None`` is the
    default variant (Multi-dSprites ``colored_on_grayscale``, Objects Room ``train``).

    Raises:
        ValueError: unknown dataset or variant.
    """
    return get_schema(dataset, variant).source


def download(
    dataset: DatasetName,
    root: str | Path,
    variant: str | None = None,
    base_url: str = DEFAULT_BASE_URL,
    convert_after: bool = True,
    progress: bool = True,
) -> Path:
    """Fetch ``dataset``'s public TFRecord into ``root`` and convert it to HDF5.

    Args:
        dataset: which DeepMind multi-object dataset.
        root: folder for the TFRecord (kept after conversion) and the HDF5 file.
        variant: Multi-dSprites variant (default ``colored_on_grayscale``) or Objects Room
            variant (default ``train``); None for the others.
        base_url: where the files live (a mirror, or a local server in tests).
        convert_after: convert to ``<root>/<h5_name(dataset, variant)>``. An HDF5 file that
            already exists is kept as it is (the converter writes atomically, so an existing
            file is complete); delete it to convert again.
        progress: print progress to stderr.

    Returns:
        The HDF5 path when ``convert_after``, else the TFRecord path.
    """
    rel = remote_path(dataset, variant)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    url = base_url.rstrip("/") + "/" + rel
    tfrecord = fetch(url, root / Path(rel).name, progress=progress)
    if not convert_after:
        return tfrecord

    from dti_sprites.datamodules.convert import convert, h5_name

    out = root / h5_name(dataset, variant)
    if out.exists():
        _say(progress, f"{out} exists; not converting again")
        return out
    convert(dataset, tfrecord, out, variant=variant, progress=progress)
    return out


def fetch(
    url: str,
    dest: str | Path,
    *,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` resumably; return ``dest``.

    Args:
        url: http(s) URL of the file.
        dest: final path; ``dest.part`` / ``dest.part.json`` hold an unfinished transfer and
            ``dest.json`` the record of the finished one.
        retries: how many times a dropped connection is resumed within this call (the first
            resume is immediate, then ``retry_wait``·(2^k − 1) seconds of back-off).
        retry_wait: back-off unit in seconds.
        timeout: socket timeout in seconds.
        progress: print progress to stderr.

    Raises:
        DownloadError: HTTP error status, unreachable host, a file that changed size or
            checksum, or a transfer still incomplete after ``retries`` resumes (its ``.part``
            file is kept, so calling again continues it).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest.with_name(dest.name + ".lock")):
        return _fetch_locked(url, dest, retries, retry_wait, timeout, progress)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``: one transfer per file at a time, also
    across processes (e.g. several nodes' ``prepare_data`` on a shared file system)."""
    with open(lock_path, "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _fetch_locked(
    url: str, dest: Path, retries: int, retry_wait: float, timeout: float, progress: bool
) -> Path:
    record_path = _sidecar(dest)
    if dest.exists() and record_path.exists():
        record = _read_json(record_path)
        if record is not None and record.get("size") == dest.stat().st_size:
            _say(progress, f"{dest} already downloaded ({dest.stat().st_size:,} bytes)")
            return dest
    part = dest.with_name(dest.name + ".part")
    if dest.exists() and not part.exists():
        # A complete-looking file without a (matching) record, e.g. fetched by hand: treat it as
        # a prefix; the server then confirms it is complete (416) or sends the rest.
        os.replace(dest, part)
        _sidecar(part).unlink(missing_ok=True)

    attempt = 0
    while True:
        try:
            _transfer(url, part, timeout=timeout, progress=progress)
            break
        except _Interrupted as err:
            if attempt >= retries:
                raise DownloadError(
                    f"{url}: transfer interrupted ({err}); {part} keeps "
                    f"{_size(part):,} bytes, call again to resume"
                ) from err
            wait = retry_wait * (2**attempt - 1)
            _say(progress, f"{url}: {err}; resuming from byte {_size(part):,} in {wait:.0f} s")
            time.sleep(wait)
            attempt += 1
    _finalise(url, part, dest, progress=progress)
    return dest


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file (to check a downloaded file against its ``.json`` record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        _hash_into(f, [digest])
    return digest.hexdigest()


# --- one HTTP request ----------------------------------------------------------------------------


def _transfer(url: str, part: Path, *, timeout: float, progress: bool) -> None:
    """Append the missing bytes of ``url`` to ``part``; return when it holds the whole file."""
    part_record_path = _sidecar(part)
    state = _load_part_record(part_record_path) if part.exists() else None
    if part.exists() and state is None:
        # A prefix of unknown origin: resumed without validators (the server's MD5 still guards
        # the result when it publishes one). A record from another URL (a mirror) keeps its
        # validators, so a prefix of a different file restarts through If-Range.
        state = _PartRecord(url=url, size=None, etag=None, last_modified=None, md5=None)
    offset = _size(part)
    if state is not None and state.size is not None:
        if offset == state.size:
            return  # every byte is already here (interrupted before the rename)
        if offset > state.size:
            offset = _restart(part, progress, f"{part} is larger than the remote file")

    headers = {"User-Agent": "dti-sprites-download", "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
        validator = (state.etag or state.last_modified) if state is not None else None
        if validator:
            headers["If-Range"] = validator
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset > 0:
            total = _unsatisfied_total(err.headers.get("Content-Range"))
            err.close()
            if total == offset:
                _save_part_record(part_record_path, _merge(state, url, total))
                return  # the prefix is the whole file
            _restart(part, progress, f"range {offset}- not satisfiable (remote size {total})")
            raise _Interrupted("restarting after HTTP 416") from err
        if err.code in _RETRYABLE_STATUS:
            raise _Interrupted(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise DownloadError(f"{url}: {err.reason}") from err
    except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
        raise _Interrupted(f"{type(err).__name__}: {err}") from err

    with response:
        status = response.status
        if status == 206 and offset > 0:
            start, total = _parse_content_range(url, response.headers.get("Content-Range"))
            if start != offset:
                offset = _restart(part, progress, f"server resumed at {start}, not {offset}")
                raise _Interrupted("restarting after a misplaced range")
            if state is not None and state.size is not None and total != state.size:
                _restart(part, progress, f"remote size changed ({state.size} -> {total})")
                raise _Interrupted("restarting: remote file changed")
        elif status == 200:
            if offset > 0:
                offset = _restart(part, progress, "server ignored the Range request")
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status} {response.reason}")
        state = _merge(
            state if offset > 0 else None,
            url,
            total,
            etag=response.headers.get("ETag"),
            last_modified=response.headers.get("Last-Modified"),
            md5=_goog_md5(response.headers.get_all("x-goog-hash") or []),
        )
        _save_part_record(part_record_path, state)
        _stream(response, part, offset, total, url=url, progress=progress)


def _stream(
    response: Any, part: Path, offset: int, total: int | None, *, url: str, progress: bool
) -> None:
    """Append the response body to ``part``; raise _Interrupted when it ends short."""
    received = offset
    shown = time.monotonic()
    with open(part, "ab") as f:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
                f.flush()
                raise _Interrupted(f"{type(err).__name__} after {received:,} bytes") from err
            if not chunk:
                break
            f.write(chunk)
            received += len(chunk)
            if progress and time.monotonic() - shown > 2.0:
                shown = time.monotonic()
                of = f" / {total:,}" if total else ""
                _say(True, f"{url}: {received:,}{of} bytes")
        f.flush()
        os.fsync(f.fileno())
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received:,} of {total:,} bytes")
    if total is not None and received > total:
        _restart(part, progress, f"received {received} bytes, more than announced ({total})")
        raise _Interrupted("restarting after an oversized body")


def _finalise(url: str, part: Path, dest: Path, *, progress: bool) -> None:
    """Check the complete ``part``, write ``dest.json``, rename ``part`` to ``dest``."""
    state = _load_part_record(_sidecar(part))
    sha256 = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False)
    with open(part, "rb") as f:
        _hash_into(f, [sha256, md5])
    size = _size(part)
    expected_md5 = state.md5 if state is not None else None
    got_md5 = base64.b64encode(md5.digest()).decode()
    if expected_md5 is not None and got_md5 != expected_md5:
        part.unlink()
        _sidecar(part).unlink(missing_ok=True)
        raise DownloadError(
            f"{url}: MD5 mismatch (server {expected_md5}, received {got_md5}); "
            "the partial file was deleted, call again to restart"
        )
    record = {"url": url, "size": size, "sha256": sha256.hexdigest(), "md5": got_md5}
    _write_json_atomic(_sidecar(dest), record)
    os.replace(part, dest)
    _sidecar(part).unlink(missing_ok=True)
    _say(progress, f"{dest}: {size:,} bytes, sha256 {record['sha256']}")


# --- helpers -------------------------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _restart(part: Path, progress: bool, why: str) -> int:
    """Empty ``part`` and forget its record; return the new offset (0)."""
    _say(progress, f"{why}; restarting {part.name} from byte 0")
    part.unlink(missing_ok=True)
    _sidecar(part).unlink(missing_ok=True)
    return 0


def _merge(
    state: _PartRecord | None,
    url: str,
    size: int | None,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    md5: str | None = None,
) -> _PartRecord:
    """The record of a transfer: validators of the first response win over later ones."""
    if state is None:
        return _PartRecord(url=url, size=size, etag=etag, last_modified=last_modified, md5=md5)
    return _PartRecord(
        url=url,
        size=state.size if state.size is not None else size,
        etag=state.etag or etag,
        last_modified=state.last_modified or last_modified,
        md5=state.md5 or md5,
    )


def _parse_content_range(url: str, value: str | None) -> tuple[int, int | None]:
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        raise DownloadError(f"{url}: HTTP 206 with an unreadable Content-Range {value!r}")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _unsatisfied_total(value: str | None) -> int | None:
    match = _UNSATISFIED_RANGE.fullmatch((value or "").strip())
    return int(match.group(1)) if match else None


def _goog_md5(values: list[str]) -> str | None:
    """The MD5 in Google Cloud Storage's ``x-goog-hash: crc32c=…,md5=…`` header, if any."""
    for value in values:
        for item in value.split(","):
            key, _, digest = item.strip().partition("=")
            if key == "md5" and digest:
                return digest
    return None


def _hash_into(f: BinaryIO, digests: list[Any]) -> None:
    while chunk := f.read(_CHUNK):
        for digest in digests:
            digest.update(chunk)


def _load_part_record(path: Path) -> _PartRecord | None:
    data = _read_json(path)
    if data is None:
        return None
    try:
        return _PartRecord(**data)
    except TypeError:
        return None


def _save_part_record(path: Path, state: _PartRecord) -> None:
    _write_json_atomic(path, asdict(state))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)

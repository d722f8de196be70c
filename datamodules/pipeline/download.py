"""Resumable download of DeepMind's multi-object TFRecords (requests), then conversion to HDF5.

``download("tetrominoes", "data")`` fetches
``<base_url>tetrominoes/tetrominoes_train.tfrecords`` to ``data/tetrominoes_train.tfrecords`` and
converts it to ``data/tetrominoes.h5``.

``fetch`` is made for files of up to ~10 GB (CLEVR): for a final name ``F``,

- the bytes go to ``F.part``; a dropped connection is resumed from its size with an HTTP Range
  request, ``retries`` times within the call and by any later call; a server that ignores the
  Range (answers 200) restarts the transfer from byte 0;
- the complete file is checked against the expected SHA-256 when one is known and against the
  MD5 that Google Cloud Storage publishes (``x-goog-hash``); on a mismatch ``F.part`` is deleted;
- only then is ``F.part`` renamed to ``F``: an existing ``F`` is complete and is not fetched again
  (a file fetched by hand can be put there too: the converter checks every record's CRC anyway);
- ``F.lock`` (filelock) makes concurrent calls, e.g. several nodes' ``prepare_data`` on a shared
  file system, wait for one transfer and then find the file.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import time
from pathlib import Path

import requests
import urllib3
from filelock import FileLock
from tqdm import tqdm

from dti_sprites.datamodules.catalog import BASE_URL, dataset_info
from dti_sprites.io import commit

__all__ = ["DownloadError", "download", "fetch"]

_CHUNK = 1 << 20  # bytes written per step while streaming, and hashed per step
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_DROPPED = (requests.ConnectionError, requests.Timeout)


class DownloadError(RuntimeError):
    """A transfer that cannot complete: HTTP error, unreachable host, checksum mismatch."""


class _Interrupted(Exception):
    """The transfer stopped before the last byte (retryable)."""


def download(
    dataset: str,
    root: str | Path,
    variant: str | None = None,
    base_url: str = BASE_URL,
    convert_after: bool = True,
    progress: bool = True,
) -> Path:
    """Fetch ``dataset``'s public TFRecord into ``root`` and convert it to HDF5.

    Args:
        dataset: a name of ``catalog.DATASETS`` (CLEVR6 and CLEVR10 read the same file).
        root: folder for the TFRecord (kept after conversion) and the HDF5 file.
        variant: Multi-dSprites variant (default ``colored_on_grayscale``) or Objects Room
            variant (default ``train``); None for the others.
        base_url: where the files live (a mirror, or a local server in tests).
        convert_after: convert to ``<root>/<h5 name>`` (``DatasetInfo.h5_name``). An HDF5 file
            that already exists is kept as it is (the converter writes atomically, so an
            existing file is complete); delete it to convert again.
        progress: show progress bars on stderr.

    Returns:
        The HDF5 path when ``convert_after``, else the TFRecord path.

    Raises:
        ValueError: unknown dataset or variant.
        DownloadError: see ``fetch``.
    """
    info = dataset_info(dataset)
    schema = info.schema(variant)
    root = Path(root)
    tfrecord = fetch(
        schema.url(base_url),
        root / Path(schema.source).name,
        sha256=schema.sha256,
        progress=progress,
    )
    if not convert_after:
        return tfrecord

    from dti_sprites.datamodules.pipeline.convert import convert

    out = root / info.h5_name(variant)
    if out.exists():
        _say(progress, f"{out} exists; not converting again")
        return out
    convert(dataset, tfrecord, out, variant=variant, progress=progress)
    return out


def fetch(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` resumably (see the module docstring); return ``dest``.

    Args:
        url: http(s) URL of the file.
        dest: final path; ``dest.part`` holds an unfinished transfer.
        sha256: expected hex SHA-256 of the file, or None.
        retries: how many times a dropped connection is resumed within this call (the first
            resume is immediate, then ``retry_wait``·(2^k − 1) seconds of back-off).
        retry_wait: back-off unit in seconds.
        timeout: connect and read timeout in seconds.
        progress: show a progress bar on stderr.

    Raises:
        DownloadError: HTTP error status, a checksum mismatch (``dest.part`` is deleted), or a
            transfer still incomplete after ``retries`` resumes (``dest.part`` is kept, so
            calling again continues it).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.with_name(dest.name + ".lock")):
        if dest.exists():
            _say(progress, f"{dest} already downloaded ({dest.stat().st_size:,} bytes)")
            return dest
        part = dest.with_name(dest.name + ".part")
        with requests.Session() as session:
            session.headers.update({"User-Agent": "dti-sprites", "Accept-Encoding": "identity"})
            for attempt in range(retries + 1):
                try:
                    md5 = _transfer(session, url, part, timeout, progress)
                    break
                except _Interrupted as err:
                    held = part.stat().st_size if part.exists() else 0
                    if attempt == retries:
                        raise DownloadError(
                            f"{url}: transfer interrupted ({err}); {part} keeps {held:,} bytes, "
                            "call again to resume"
                        ) from err
                    wait = retry_wait * (2**attempt - 1)
                    _say(progress, f"{url}: {err}; resuming from byte {held:,} in {wait:.0f} s")
                    time.sleep(wait)
        _verify(url, part, sha256, md5)
        commit(part, dest)  # atomic_write's rename; not atomic_write, whose failure deletes .part
    return dest


def _transfer(
    session: requests.Session, url: str, part: Path, timeout: float, progress: bool
) -> str | None:
    """Append the missing bytes of ``url`` to ``part``; the server's MD5 (hex) if it gives one."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except _DROPPED as err:
        raise _Interrupted(f"{type(err).__name__}: {err}") from err
    with response:
        status = response.status_code
        md5 = _goog_md5(response.headers.get("x-goog-hash", ""))
        if status == 416 and offset:  # nothing after ``offset``: complete, or a longer prefix
            if response.headers.get("Content-Range", "").endswith(f"/{offset}"):
                return md5
            part.unlink()
            raise _Interrupted(f"{part.name} is longer than the remote file; restarting")
        if status in _RETRYABLE_STATUS:
            raise _Interrupted(f"HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise DownloadError(f"{url}: HTTP {status} {response.reason}")
        if status == 206 and not response.headers.get("Content-Range", "").startswith(
            f"bytes {offset}-"
        ):
            part.unlink()
            raise _Interrupted(f"the server sent another range than {offset}-; restarting")
        if status == 200:
            offset = 0  # the whole file (the server ignores Range): start again
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.stem,
            disable=not progress,
            file=sys.stderr,
            mininterval=0.5,
        )
        with bar, open(part, "ab" if offset else "wb") as f:
            while True:
                try:  # read1: every byte that arrived is kept when the connection drops
                    chunk = response.raw.read1(_CHUNK, decode_content=False)
                except (urllib3.exceptions.HTTPError, OSError) as err:
                    raise _Interrupted(f"connection dropped after {bar.n:,} bytes") from err
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise _Interrupted(f"connection closed after {part.stat().st_size:,} of {total:,} bytes")
    return md5


def _verify(url: str, part: Path, sha256: str | None, md5: str | None) -> None:
    """Compare ``part`` with the expected hex digests; delete it on a mismatch."""
    expected = {name: value for name, value in (("sha256", sha256), ("md5", md5)) if value}
    digests = {name: hashlib.new(name) for name in expected}
    if not digests:
        return
    with open(part, "rb") as f:
        while chunk := f.read(_CHUNK):
            for digest in digests.values():
                digest.update(chunk)
    for name, digest in digests.items():
        if digest.hexdigest() != expected[name]:
            part.unlink()
            raise DownloadError(
                f"{url}: {name.upper()} mismatch (expected {expected[name]}, received "
                f"{digest.hexdigest()}); the partial file was deleted, call again to restart"
            )


def _goog_md5(header: str) -> str | None:
    """The hex MD5 from Google Cloud Storage's ``x-goog-hash: crc32c=…,md5=<base64>``, if any."""
    for item in header.split(","):
        key, _, digest = item.strip().partition("=")
        if key == "md5" and digest:
            try:
                return base64.b64decode(digest, validate=True).hex()
            except ValueError:  # not base64: no usable checksum
                return None
    return None


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)

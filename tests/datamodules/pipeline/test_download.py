"""Resumable download against a local HTTP server on 127.0.0.1 (never the real host)."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest

from dti_sprites.datamodules.catalog import get_schema
from dti_sprites.datamodules.pipeline.download import DownloadError, download, fetch


@dataclass
class FileServer:
    """Serves ``files`` (URL path -> bytes); optional Range support and a dropped first reply."""

    files: dict[str, bytes]
    ranges: bool = True
    drop_after: int | None = None  # the first GET sends only this many body bytes, then hangs up
    md5: str | None = None  # value of ``x-goog-hash: md5=...`` (None: header absent)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of every GET of ``path``."""
        return [r for p, r in self.requests if p == path]


def _handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.lstrip("/")
            range_header = self.headers.get("Range")
            server.requests.append((path, range_header))
            first = len(server.requests) == 1
            if path not in server.files:
                self.send_error(404, "Not Found")
                return
            data = server.files[path]
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
            if_range = self.headers.get("If-Range")
            if server.ranges and match and (if_range is None or if_range == etag):
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            if server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if server.md5 is not None:
                self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={server.md5}")
            self.end_headers()
            if first and server.drop_after is not None:
                self.wfile.write(body[: server.drop_after])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def serve(server: FileServer) -> Iterator[FileServer]:
    """Run ``server`` on a free port of 127.0.0.1 in a thread for the duration of the block."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests honours *_proxy variables; the local server must be reached directly."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
NAME = "blob.bin"


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def test_complete_download(tmp_path: Path) -> None:
    with serve(FileServer({NAME: PAYLOAD})) as server:
        out = fetch(server.base_url + NAME, tmp_path / NAME, progress=False)
    assert out == tmp_path / NAME
    assert out.read_bytes() == PAYLOAD
    assert server.gets(NAME) == [None]
    assert not (tmp_path / f"{NAME}.part").exists()


def test_interrupted_transfer_resumes_within_the_call(tmp_path: Path) -> None:
    with serve(FileServer({NAME: PAYLOAD}, drop_after=100_000)) as server:
        out = fetch(server.base_url + NAME, tmp_path / NAME, retry_wait=0, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert server.gets(NAME) == [None, "bytes=100000-"]


def test_interrupted_transfer_resumes_on_the_next_call(tmp_path: Path) -> None:
    """A dropped 10 GB transfer is never a whole-looking file, and the next call continues it."""
    with serve(FileServer({NAME: PAYLOAD}, drop_after=123_457)) as server:
        url = server.base_url + NAME
        with pytest.raises(DownloadError, match=r"interrupted.*123,457 bytes.*call again"):
            fetch(url, tmp_path / NAME, retries=0, progress=False)
        part = tmp_path / f"{NAME}.part"
        assert part.read_bytes() == PAYLOAD[:123_457]
        assert not (tmp_path / NAME).exists()
        sha256 = hashlib.sha256(PAYLOAD).hexdigest()
        fetch(url, tmp_path / NAME, sha256=sha256, retries=0, progress=False)
    assert (tmp_path / NAME).read_bytes() == PAYLOAD
    assert server.gets(NAME) == [None, "bytes=123457-"]
    assert not part.exists()


def test_second_call_does_not_download_again(tmp_path: Path) -> None:
    with serve(FileServer({NAME: PAYLOAD})) as server:
        fetch(server.base_url + NAME, tmp_path / NAME, progress=False)
        mtime = (tmp_path / NAME).stat().st_mtime_ns
        fetch(server.base_url + NAME, tmp_path / NAME, progress=False)
    assert len(server.requests) == 1
    assert (tmp_path / NAME).stat().st_mtime_ns == mtime


def test_concurrent_calls_transfer_once(tmp_path: Path) -> None:
    """Two callers (threads here; processes or nodes alike): one transfer, both get the file."""
    results: list[Path] = []
    with serve(FileServer({NAME: PAYLOAD})) as server:
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    fetch(server.base_url + NAME, tmp_path / NAME, progress=False)
                )
            )
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == [tmp_path / NAME] * 2
    assert len(server.requests) == 1
    assert (tmp_path / NAME).read_bytes() == PAYLOAD


def test_complete_part_is_confirmed_by_the_server(tmp_path: Path) -> None:
    """Every byte arrived but the process stopped before the rename: one 416 reply, no body."""
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD)
    with serve(FileServer({NAME: PAYLOAD})) as server:
        fetch(server.base_url + NAME, tmp_path / NAME, progress=False)
    assert server.gets(NAME) == [f"bytes={len(PAYLOAD)}-"]
    assert (tmp_path / NAME).read_bytes() == PAYLOAD
    assert not (tmp_path / f"{NAME}.part").exists()


def test_part_longer_than_the_remote_file_restarts(tmp_path: Path) -> None:
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD + b"stale tail")
    with serve(FileServer({NAME: PAYLOAD})) as server:
        fetch(server.base_url + NAME, tmp_path / NAME, retry_wait=0, progress=False)
    assert server.gets(NAME) == [f"bytes={len(PAYLOAD) + 10}-", None]
    assert (tmp_path / NAME).read_bytes() == PAYLOAD


def test_server_without_range_support_restarts(tmp_path: Path) -> None:
    with serve(FileServer({NAME: PAYLOAD}, ranges=False, drop_after=50_000)) as server:
        out = fetch(server.base_url + NAME, tmp_path / NAME, retry_wait=0, progress=False)
    assert out.read_bytes() == PAYLOAD
    # The resume asked for a range, got the whole file with 200, and started again from byte 0.
    assert server.gets(NAME) == [None, "bytes=50000-"]


def test_changed_remote_file_fails_the_checksum_and_restarts(tmp_path: Path) -> None:
    """A prefix of an older version completed with new bytes is caught, deleted, then redone."""
    old = PAYLOAD[::-1]  # same size, other content
    sha256 = hashlib.sha256(PAYLOAD).hexdigest()
    with serve(FileServer({NAME: old}, drop_after=80_000)) as server:
        url = server.base_url + NAME
        with pytest.raises(DownloadError, match="interrupted"):
            fetch(url, tmp_path / NAME, sha256=sha256, retries=0, progress=False)
    with serve(FileServer({NAME: PAYLOAD})) as server:
        with pytest.raises(DownloadError, match=rf"SHA256 mismatch \(expected {sha256}"):
            fetch(server.base_url + NAME, tmp_path / NAME, sha256=sha256, progress=False)
        assert not (tmp_path / NAME).exists() and not (tmp_path / f"{NAME}.part").exists()
        out = fetch(server.base_url + NAME, tmp_path / NAME, sha256=sha256, progress=False)
        assert server.gets(NAME) == ["bytes=80000-", None]
    assert out.read_bytes() == PAYLOAD


def test_server_md5_is_verified(tmp_path: Path) -> None:
    with serve(FileServer({NAME: PAYLOAD}, md5=_md5_b64(PAYLOAD), drop_after=7)) as server:
        out = fetch(server.base_url + NAME, tmp_path / NAME, retry_wait=0, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert len(server.requests) == 2  # resumed after 7 bytes, then checked

    other = tmp_path / "other"
    with serve(FileServer({NAME: PAYLOAD}, md5=_md5_b64(b"something else"))) as server:
        with pytest.raises(DownloadError, match=r"blob\.bin: MD5 mismatch"):
            fetch(server.base_url + NAME, other / NAME, progress=False)
    assert not (other / NAME).exists()
    assert not (other / f"{NAME}.part").exists()


def test_http_error_names_url_and_status(tmp_path: Path) -> None:
    with serve(FileServer({})) as server:
        url = server.base_url + "missing.tfrecords"
        with pytest.raises(DownloadError, match=re.escape(url) + r": HTTP 404"):
            fetch(url, tmp_path / "missing.tfrecords", progress=False)
    assert not (tmp_path / "missing.tfrecords").exists()


def test_unreachable_host_names_url(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.bin"
    with pytest.raises(DownloadError, match=re.escape(url)):
        fetch(url, tmp_path / "x.bin", retries=0, progress=False)


def test_download_without_conversion_places_the_tfrecord_in_root(tmp_path: Path) -> None:
    rel = get_schema("tetrominoes").source
    with serve(FileServer({rel: PAYLOAD})) as server:
        out = download(
            "tetrominoes",
            tmp_path / "data",
            base_url=server.base_url,
            convert_after=False,
            progress=False,
        )
    assert out == tmp_path / "data" / "tetrominoes_train.tfrecords"
    assert out.read_bytes() == PAYLOAD


def test_download_converts_and_a_second_call_is_free(tmp_path: Path) -> None:
    from dti_sprites.datamodules.pipeline.synth import write_synthetic

    tfrecord = write_synthetic("tetrominoes", tmp_path / "src.tfrecords", n=12, seed=1)
    rel = get_schema("tetrominoes").source
    with serve(FileServer({rel: tfrecord.read_bytes()}, drop_after=1000)) as server:
        root = tmp_path / "data"
        out = download("tetrominoes", root, base_url=server.base_url, progress=False)
        assert download("tetrominoes", root, base_url=server.base_url, progress=False) == out
    assert out == root / "tetrominoes.h5"
    assert server.gets(rel) == [None, "bytes=1000-"]  # resumed once, nothing on the 2nd call
    assert (root / "tetrominoes_train.tfrecords").read_bytes() == tfrecord.read_bytes()
    with h5py.File(out) as f:
        assert f.attrs["dataset"] == "tetrominoes" and f["image"].shape == (12, 35, 35, 3)
        assert f.attrs["source_sha256"] == hashlib.sha256(tfrecord.read_bytes()).hexdigest()

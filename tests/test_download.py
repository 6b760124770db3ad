"""Downloads against a local HTTP server on 127.0.0.1, checksums and the cache location."""

import contextlib
import hashlib
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from overparam.data.download import (
    ChecksumMismatchError,
    DownloadError,
    download_file,
    resolve_cache_dir,
    sha256_of,
    write_atomically,
)

BODY = bytes(range(256)) * 5000  # 1.28 MB, so the download takes more than one 1 MiB chunk
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()


def _send_body(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(BODY)))
    handler.end_headers()
    handler.wfile.write(BODY)


def _send_truncated_body(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(BODY)))
    handler.end_headers()
    handler.wfile.write(BODY[:1000])
    handler.close_connection = True


def _send_late(handler: BaseHTTPRequestHandler) -> None:
    time.sleep(1.0)
    _send_body(handler)


ROUTES = {"/file.bin": _send_body, "/truncated.bin": _send_truncated_body, "/slow.bin": _send_late}


@contextlib.contextmanager
def _serve(routes):
    """Serve ``routes`` (path -> function of the request handler) on 127.0.0.1 and yield the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
            else:
                route(self)

        def log_message(self, format, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server_url():
    with _serve(ROUTES) as url:
        yield url


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.bin"


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_download_writes_verified_file(server_url, tmp_path):
    destination = tmp_path / "sub" / "file.bin"

    result = download_file(f"{server_url}/file.bin", destination, sha256=BODY_SHA256.upper())

    assert result == destination
    assert destination.read_bytes() == BODY
    assert _leftovers(destination.parent) == ["file.bin"]


def test_download_without_checksum_logs_warning(server_url, tmp_path, caplog):
    destination = tmp_path / "file.bin"

    download_file(f"{server_url}/file.bin", destination)

    assert destination.read_bytes() == BODY
    assert BODY_SHA256 in caplog.text
    assert "without a checksum" in caplog.text


def test_checksum_mismatch_keeps_nothing(server_url, tmp_path):
    destination = tmp_path / "file.bin"
    destination.write_bytes(b"previous version")
    wrong = "0" * 64

    with pytest.raises(ChecksumMismatchError) as caught:
        download_file(f"{server_url}/file.bin", destination, sha256=wrong)

    message = str(caught.value)
    assert str(destination) in message
    assert wrong in message
    assert BODY_SHA256 in message
    assert "Retry the download" in message
    assert caught.value.actual == BODY_SHA256
    assert destination.read_bytes() == b"previous version"
    assert _leftovers(tmp_path) == ["file.bin"]


def test_http_error_raises_download_error(server_url, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server_url}/missing.bin", tmp_path / "file.bin")

    assert _leftovers(tmp_path) == []


def test_closed_port_raises_download_error(tmp_path):
    url = _closed_port_url()

    with pytest.raises(DownloadError, match="Check the network connection") as caught:
        download_file(url, tmp_path / "file.bin")

    assert url in str(caught.value)
    assert _leftovers(tmp_path) == []


def test_truncated_body_raises_download_error(server_url, tmp_path):
    with pytest.raises(DownloadError, match=f"received 1000 of {len(BODY)} bytes"):
        download_file(f"{server_url}/truncated.bin", tmp_path / "file.bin")

    assert _leftovers(tmp_path) == []


def test_timeout_raises_download_error(server_url, tmp_path):
    with pytest.raises(DownloadError, match="timed out"):
        download_file(f"{server_url}/slow.bin", tmp_path / "file.bin", timeout=0.2)

    assert _leftovers(tmp_path) == []


def test_download_uses_given_opener(server_url, tmp_path):
    calls = []
    opener = urllib.request.build_opener()

    def recording_opener(url, timeout):
        calls.append((url, timeout))
        return opener.open(url, timeout=timeout)

    download_file(
        f"{server_url}/file.bin", tmp_path / "file.bin", sha256=BODY_SHA256, opener=recording_opener, timeout=7.5
    )

    assert calls == [(f"{server_url}/file.bin", 7.5)]
    assert (tmp_path / "file.bin").read_bytes() == BODY


def test_sha256_of_matches_hashlib(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(BODY * 2)

    assert sha256_of(path) == hashlib.sha256(BODY * 2).hexdigest()


def test_write_atomically_keeps_old_file_on_error(tmp_path):
    destination = tmp_path / "table.csv"
    destination.write_bytes(b"old")

    def fail_halfway(file):
        file.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(destination, fail_halfway)

    assert destination.read_bytes() == b"old"
    assert _leftovers(tmp_path) == ["table.csv"]


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERPARAM_CACHE", str(tmp_path / "from-env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    assert resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_cache_dir() == tmp_path / "from-env"

    monkeypatch.delenv("OVERPARAM_CACHE")
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "overparam"

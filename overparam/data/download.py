"""Download files atomically, verify their sha256, and locate the download cache."""

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "OVERPARAM_CACHE"
DEFAULT_TIMEOUT_S = 60.0
CHUNK_SIZE = 1 << 20


class DownloadError(OSError):
    """A download failed because of the network or the server."""


class ChecksumMismatchError(ValueError):
    """A file's sha256 differs from the expected one.

    ``subject`` names the file or download, and ``fix`` states what to do next.
    """

    def __init__(self, subject: str, expected: str, actual: str, fix: str) -> None:
        self.subject = subject
        self.expected = expected
        self.actual = actual
        super().__init__(f"{subject} has sha256 {actual}, expected {expected}. {fix}")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return ``cache_dir``, else ``$OVERPARAM_CACHE``, else ``~/.cache/overparam``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "overparam"


def sha256_of(path: str | os.PathLike) -> str:
    """Return the hex sha256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    destination: str | os.PathLike,
    sha256: str | None = None,
    opener: Callable = urllib.request.urlopen,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Download ``url`` to ``destination`` and return the destination path.

    The body streams into a temporary file in the destination's folder and is hashed on the way.
    Only a complete body with the expected sha256 (when ``sha256`` is given) is renamed to
    ``destination`` with ``os.replace``, so an interrupted or rejected download never leaves a
    partial file under that name. The temporary file is removed on any error.

    Args:
        url: Address to fetch.
        destination: Final path of the file; its folder is created when missing.
        sha256: Expected hex digest; None skips the check and logs a warning.
        opener: Callable with the signature of ``urllib.request.urlopen(url, timeout=...)``.
        timeout: Socket timeout in seconds for connecting and for each read.

    Raises:
        DownloadError: The connection failed, timed out, returned an HTTP error or closed early.
        ChecksumMismatchError: The downloaded body has another sha256 than ``sha256``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s to %s", url, destination)

    def fetch_and_verify(temp_file: BinaryIO) -> None:
        actual, size = _stream_to_file(url, temp_file, opener, timeout)
        if sha256 is None:
            log.warning("Downloaded %s without a checksum to verify; its sha256 is %s", url, actual)
        elif actual != sha256.lower():
            raise ChecksumMismatchError(
                f"The download of {url} for {destination}",
                sha256.lower(),
                actual,
                "Nothing was saved. Retry the download; if the mismatch persists, the file on the server "
                "has changed, so check it and pass its new sha256.",
            )
        log.info("Downloaded %d bytes from %s (sha256 %s)", size, url, actual)

    write_atomically(destination, fetch_and_verify)
    return destination


def _stream_to_file(url: str, file: BinaryIO, opener: Callable, timeout: float) -> tuple[str, int]:
    """Copy the response body into ``file`` and return its sha256 and size."""
    digest = hashlib.sha256()
    size = 0

    try:
        response = opener(url, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"Download of {url} failed with HTTP {err.code} {err.reason}; check the URL.") from err
    except (OSError, http.client.HTTPException) as err:
        # URLError, ConnectionError and TimeoutError are all OSError subclasses.
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise DownloadError(
            f"Download of {url} failed: {reason}. Check the network connection and the URL."
        ) from err

    with response:
        headers = getattr(response, "headers", None)
        expected_size = headers.get("Content-Length") if headers is not None else None
        while True:
            try:
                chunk = response.read(CHUNK_SIZE)
            except (OSError, http.client.HTTPException) as err:
                raise DownloadError(f"Download of {url} failed after {size} bytes: {err}. Retry the download.") from err
            if not chunk:
                break
            digest.update(chunk)
            file.write(chunk)
            size += len(chunk)

    # http.client returns a short body without error when the server closes the connection early.
    if expected_size is not None and expected_size.isdigit() and int(expected_size) != size:
        raise DownloadError(
            f"Download of {url} failed: received {size} of {expected_size} bytes before the connection "
            "closed. Retry the download."
        )
    return digest.hexdigest(), size


def write_atomically(destination: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temporary file next to ``destination``, then rename it to ``destination``.

    The rename is atomic on one file system, so readers see the old file or the complete new one.
    The temporary file is removed if ``write`` raises.
    """
    fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as temp_file:
            write(temp_file)
        os.replace(temp_name, destination)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise

"""AbaloneDataModule on the real UCI files, malformed copies, and ucimlrepo against a local server."""

import contextlib
import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import ucimlrepo.fetch

from overparam.data import AbaloneDataModule
from overparam.data.abalone import CACHE_FILE_NAME, CACHE_SUBDIR, COLUMNS, FEATURE_NAMES, read_abalone_file

ROWS = 4177
HEADER = ",".join(COLUMNS)


@pytest.fixture
def reference(abalone_dir) -> tuple[np.ndarray, np.ndarray]:
    """Features and rings read from UCI's original abalone.data."""
    return read_abalone_file(abalone_dir / "abalone.data")


def test_both_files_give_same_arrays(abalone_dir, reference):
    features, rings = reference
    csv_features, csv_rings = read_abalone_file(abalone_dir / "data.csv")

    assert features.shape == (ROWS, 10)
    assert rings.shape == (ROWS,)
    np.testing.assert_array_equal(csv_features, features)
    np.testing.assert_array_equal(csv_rings, rings)


def test_sex_is_one_hot(reference):
    features, rings = reference

    assert len(FEATURE_NAMES) == 10
    np.testing.assert_array_equal(features[:, :3].sum(axis=1), np.ones(ROWS))
    # Counts of male, female and infant rows in UCI's abalone.data.
    assert features[:, :3].sum(axis=0).tolist() == [1528, 1307, 1342]
    assert rings.min() == 1
    assert rings.max() == 29


def test_first_row_values(reference):
    features, rings = reference

    # abalone.data line 1: M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,15
    assert features[0].tolist() == [1, 0, 0, 0.455, 0.365, 0.095, 0.514, 0.2245, 0.101, 0.15]
    assert rings[0] == 15


def test_module_reads_data_dir(abalone_dir):
    module = AbaloneDataModule(data_dir=str(abalone_dir))
    x, y = module.train_tensors()

    assert x.shape == (ROWS, 10)
    assert y.shape == (ROWS, 1)
    assert module.num_features == 10
    assert x.double().mean(dim=0).abs().max().item() < 1e-5
    assert (x.double().std(dim=0, unbiased=False) - 1).abs().max().item() < 1e-5


def test_module_reads_data_csv_alone(abalone_dir, reference, tmp_path):
    shutil.copyfile(abalone_dir / "data.csv", tmp_path / "data.csv")

    features, rings = AbaloneDataModule(data_dir=str(tmp_path)).load_arrays()

    np.testing.assert_array_equal(features, reference[0])
    np.testing.assert_array_equal(rings, reference[1])


def test_data_dir_without_files(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        AbaloneDataModule(data_dir=str(tmp_path)).load_arrays()

    assert str(tmp_path) in str(caught.value)
    assert "abalone.data nor data.csv" in str(caught.value)


MALFORMED = {
    "too few columns": ("M,0.455,0.365,0.095,0.514,0.2245,0.101,15", "expected 9 comma-separated columns"),
    "bad sex": ("X,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,15", "invalid Sex 'X'"),
    "non-numeric": ("F,0.455,0.365,abc,0.514,0.2245,0.101,0.15,15", "non-numeric Height 'abc'"),
    "non-finite": ("F,0.455,0.365,0.095,inf,0.2245,0.101,0.15,15", "non-finite Whole_weight 'inf'"),
    "bad header": ("Sex,Length,Diameter", "does not list the columns"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_line_reported(tmp_path, case):
    bad_line, problem = MALFORMED[case]
    path = tmp_path / "abalone.data"
    path.write_text("\n" + bad_line + "\nM,0.35,0.265,0.09,0.2255,0.0995,0.0485,0.07,7\n")

    with pytest.raises(ValueError) as caught:
        read_abalone_file(path)

    assert str(caught.value).startswith(f"{path}, line 2: ")
    assert problem in str(caught.value)


def test_header_only_file_rejected(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(HEADER + "\r\n")

    with pytest.raises(ValueError, match="contains no data rows"):
        read_abalone_file(path)


# Fetching through ucimlrepo from a local server


def _api_response(base_url: str) -> bytes:
    """Minimal UCI API response for data set 1, in the shape ucimlrepo 0.0.7 reads."""
    roles = ["Feature"] * 8 + ["Target"]
    return json.dumps({
        "status": 200,
        "data": {
            "uci_id": 1,
            "name": "Abalone",
            "data_url": f"{base_url}/static/public/1/data.csv",
            "variables": [{"name": name, "role": role} for name, role in zip(COLUMNS, roles)],
            "additional_info": None,
            "intro_paper": None,
        },
    }).encode()


@contextlib.contextmanager
def _serve_uci(data_csv: bytes):
    """Serve the UCI API for data set 1 and its data.csv on 127.0.0.1; yield the base URL and request paths."""
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path == "/api/dataset?id=1":
                body = _api_response(base_url)
            elif self.path == "/static/public/1/data.csv":
                body = data_csv
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base_url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield base_url, requests
    finally:
        server.shutdown()
        server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/dataset"


def test_fetch_saves_cache(abalone_dir, reference, tmp_path, monkeypatch):
    with _serve_uci((abalone_dir / "data.csv").read_bytes()) as (base_url, requests):
        monkeypatch.setattr(ucimlrepo.fetch, "API_BASE_URL", f"{base_url}/api/dataset")
        module = AbaloneDataModule(cache_dir=str(tmp_path))
        module.prepare_data()
        features, rings = module.load_arrays()

    cache_file = tmp_path / CACHE_SUBDIR / CACHE_FILE_NAME
    assert requests == ["/api/dataset?id=1", "/static/public/1/data.csv"]
    np.testing.assert_array_equal(features, reference[0])
    np.testing.assert_array_equal(rings, reference[1])
    assert cache_file.read_text().splitlines()[0] == HEADER
    assert sorted(path.name for path in cache_file.parent.iterdir()) == [CACHE_FILE_NAME]

    # The server is gone, so the second instance can only read the cache.
    cached_features, _ = AbaloneDataModule(cache_dir=str(tmp_path), download=False).load_arrays()
    np.testing.assert_array_equal(cached_features, reference[0])


def test_fetch_failure_gives_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ucimlrepo.fetch, "API_BASE_URL", _closed_port_url())

    with pytest.raises(FileNotFoundError) as caught:
        AbaloneDataModule(cache_dir=str(tmp_path)).prepare_data()

    message = str(caught.value)
    assert "Fetching it failed: ConnectionError" in message
    assert "https://archive.ics.uci.edu/dataset/1/abalone" in message
    assert "--data.init_args.data_dir" in message
    assert not (tmp_path / CACHE_SUBDIR / CACHE_FILE_NAME).exists()


def test_malformed_fetch_saves_nothing(tmp_path, monkeypatch):
    bad_csv = (HEADER + "\r\nM,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,abc\r\n").encode()
    with _serve_uci(bad_csv) as (base_url, _):
        monkeypatch.setattr(ucimlrepo.fetch, "API_BASE_URL", f"{base_url}/api/dataset")
        with pytest.raises(ValueError, match="non-numeric Rings 'abc'"):
            AbaloneDataModule(cache_dir=str(tmp_path)).prepare_data()

    assert not (tmp_path / CACHE_SUBDIR / CACHE_FILE_NAME).exists()


def test_download_off_without_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Downloading is off \(download=False\)"):
        AbaloneDataModule(cache_dir=str(tmp_path), download=False).load_arrays()


def test_corrupt_cache_names_fix(tmp_path):
    cache_file = tmp_path / CACHE_SUBDIR / CACHE_FILE_NAME
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(HEADER + "\nM,1,2\n")

    with pytest.raises(ValueError, match=f"Delete the cached file {cache_file}"):
        AbaloneDataModule(cache_dir=str(tmp_path)).load_arrays()

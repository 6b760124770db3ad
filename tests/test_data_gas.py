"""GasSensorDataModule and the .dat parser on the real UCI files, malformed copies and a local server."""

import contextlib
import hashlib
import io
import logging
import shutil
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from overparam.data import GasSensorDataModule
from overparam.data.download import ChecksumMismatchError, sha256_of
from overparam.data.gas_sensor import (
    ARCHIVE_NAME,
    CACHE_SUBDIR,
    KNOWN_SHA256,
    MANIFEST_NAME,
    REBUILT_FILE,
    UCI_PAGE_URL,
    DataFormatError,
    _select_files,
    parse_dat_file,
)

GAS_DIR = SHARED_DATA / "gas-sensor-drift"
ETHANOL_ROWS = 2565
# The first line of batch1.dat starts "1;10.000000 1:15596.162100 2:1.868245 3:2.371604".
FIRST_LINE_START = (1, 10.0, [15596.1621, 1.868245, 2.371604])


def _real_gas_dir() -> Path:
    if not GAS_DIR.is_dir():
        pytest.skip(f"real UCI data not found at {GAS_DIR}")
    return GAS_DIR


@pytest.fixture(scope="module")
def ethanol():
    module = GasSensorDataModule(data_dir=str(_real_gas_dir()), gas=1)
    module.setup("fit")
    return module


def _line(gas="1", concentration="10.5", values=None, indices=None) -> str:
    values = values if values is not None else [f"{0.5 * k:.6f}" for k in range(1, 129)]
    indices = indices if indices is not None else list(range(1, len(values) + 1))
    return f"{gas};{concentration} " + " ".join(f"{index}:{value}" for index, value in zip(indices, values)) + " "


# Data modules and parser on the real files


def test_ethanol_has_2565_rows(ethanol):
    x, y = ethanol.train_tensors()

    assert x.shape == (ETHANOL_ROWS, 128)
    assert y.shape == (ETHANOL_ROWS, 1)
    assert x.dtype == torch.float32
    assert ethanol.num_features == 128
    assert ethanol.num_targets == 1


def test_ethanol_tensors_are_z_scored(ethanol):
    x, y = ethanol.train_tensors()

    assert x.double().mean(dim=0).abs().max().item() < 1e-5
    assert (x.double().std(dim=0, unbiased=False) - 1).abs().max().item() < 1e-5
    assert abs(y.double().mean().item()) < 1e-5
    assert y.double().std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    # Mean concentration of all 2565 ethanol rows, in ppmv.
    assert ethanol.target_mean[0] == pytest.approx(114.9503, abs=1e-4)


def test_load_logs_each_file(caplog):
    module = GasSensorDataModule(data_dir=str(_real_gas_dir()))

    with caplog.at_level(logging.INFO, logger="overparam.data.gas_sensor"):
        module.load_arrays()

    assert "batch1.dat: 445 rows, 90 Ethanol rows kept" in caplog.text
    assert f"Loaded {ETHANOL_ROWS} Ethanol rows" in caplog.text


def test_ethylene_rows_load(caplog):
    module = GasSensorDataModule(data_dir=str(_real_gas_dir()), gas=2, dtype="float64")

    with caplog.at_level(logging.WARNING):
        features, target = module.load_arrays()

    # 1664 Ethylene rows in batches 1-6, 8 and 9; the rebuilt file contains no Ethylene rows.
    assert features.shape == (1664, 128)
    assert target.shape == (1664,)
    assert target.min() > 0
    assert "their Ethylene rows are missing" in caplog.text


def test_parse_real_batch1():
    gas_ids, concentrations, features = parse_dat_file(_real_gas_dir() / "batch1.dat")

    assert features.shape == (445, 128)
    assert (gas_ids == 1).sum() == 90
    assert set(np.unique(gas_ids)) <= set(range(1, 7))
    assert gas_ids[0] == FIRST_LINE_START[0]
    assert concentrations[0] == FIRST_LINE_START[1]
    assert features[0, :3].tolist() == FIRST_LINE_START[2]


def test_validation_split_reproducible():
    folder = str(_real_gas_dir())
    first = GasSensorDataModule(data_dir=folder, val_fraction=0.2, split_seed=5)
    second = GasSensorDataModule(data_dir=folder, val_fraction=0.2, split_seed=5)
    first.setup("fit")
    second.setup("fit")

    assert first.x_val.shape == (513, 128)
    assert first.x_train.shape == (ETHANOL_ROWS - 513, 128)
    assert torch.equal(first.x_val, second.x_val)
    assert torch.equal(first.y_train, second.y_train)


# Parser on written files


def test_parse_skips_blank_lines(tmp_path):
    path = tmp_path / "batch1.dat"
    path.write_text("\n" + _line(gas="2", concentration="50") + "\n\n" + _line(gas="6") + "\n   \n")

    gas_ids, concentrations, features = parse_dat_file(path)

    assert gas_ids.tolist() == [2, 6]
    assert concentrations.tolist() == [50.0, 10.5]
    assert features.shape == (2, 128)
    assert features[0, -1] == 64.0


def test_parse_accepts_tabs_and_crlf(tmp_path):
    canonical = tmp_path / "canonical.dat"
    canonical.write_text(_line() + "\n" + _line(gas="3", concentration="1e2") + "\n")
    loose = tmp_path / "loose.dat"
    loose.write_bytes(canonical.read_bytes().replace(b" ", b"\t ").replace(b"\n", b"\r\n"))

    expected = parse_dat_file(canonical)
    actual = parse_dat_file(loose)

    for expected_array, actual_array in zip(expected, actual):
        np.testing.assert_array_equal(actual_array, expected_array)


def test_parse_empty_file(tmp_path):
    path = tmp_path / "batch1.dat"
    path.write_text("\n\n")

    gas_ids, concentrations, features = parse_dat_file(path)

    assert gas_ids.shape == (0,)
    assert concentrations.shape == (0,)
    assert features.shape == (0, 128)


MALFORMED_LINES = {
    "bad label": (_line().replace("1;10.5", "1:10.5", 1), "bad label '1:10.5'"),
    "gas not integer": (_line(gas="x"), "bad label 'x;10.5'"),
    "unknown gas": (_line(gas="7"), "unknown gas id 7"),
    "non-numeric concentration": (_line(concentration="ten"), "non-numeric concentration in label '1;ten': 'ten'"),
    "too few features": (_line(values=["1.0"] * 127), "expected 128 features, found 127"),
    "too many features": (_line(values=["1.0"] * 129), "expected 128 features, found 129"),
    "index out of order": (
        _line(indices=[1, 2, 4, 3] + list(range(5, 129))),
        "feature index 4 out of order; expected 3",
    ),
    "missing colon": (
        _line().replace(" 5:2.500000", " 5=2.500000"),
        "feature 5 token '5=2.500000' is not '<index>:<value>'",
    ),
    "non-numeric value": (_line().replace(" 9:4.500000", " 9:abc"), "non-numeric value for feature 9: 'abc'"),
    "non-finite value": (_line().replace(" 9:4.500000", " 9:nan"), "non-finite value for feature 9: 'nan'"),
}


@pytest.mark.parametrize("case", MALFORMED_LINES, ids=list(MALFORMED_LINES))
def test_parse_reports_malformed_line(tmp_path, case):
    bad_line, problem = MALFORMED_LINES[case]
    path = tmp_path / "batch1.dat"
    path.write_text(_line() + "\n\n" + bad_line + "\n" + _line() + "\n")

    with pytest.raises(DataFormatError) as caught:
        parse_dat_file(path)

    message = str(caught.value)
    assert message.startswith(f"{path}, line 3: ")
    assert problem in message


def test_parse_reports_invalid_byte(tmp_path):
    path = tmp_path / "batch1.dat"
    path.write_bytes(_line().encode() + b"\n" + _line().encode().replace(b"0.5", b"0\xff5", 1) + b"\n")

    with pytest.raises(DataFormatError, match=r"line 2: invalid byte 0xff"):
        parse_dat_file(path)


def test_parse_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="batch1.dat"):
        parse_dat_file(tmp_path / "batch1.dat")


# Folder contents and checksums


def _copy_files(source: Path, target: Path, names: list[str]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, target / name)
    return target


def test_altered_known_file_fails_checksum(tmp_path):
    folder = _copy_files(_real_gas_dir(), tmp_path / "data", ["batch1.dat", "batch4.dat"])
    altered = folder / "batch4.dat"
    altered.write_bytes(altered.read_bytes().replace(b"1:", b"1:9", 1))

    with pytest.raises(ChecksumMismatchError) as caught:
        GasSensorDataModule(data_dir=str(folder)).load_arrays()

    message = str(caught.value)
    assert str(altered) in message
    assert KNOWN_SHA256["batch4.dat"] in message
    assert sha256_of(altered) in message
    assert "Replace it with batch4.dat from the UCI archive" in message


def test_unknown_file_reads_unverified(tmp_path, caplog):
    folder = _copy_files(_real_gas_dir(), tmp_path / "data", ["batch4.dat"])
    shutil.copyfile(folder / "batch4.dat", folder / "batch11.dat")

    with caplog.at_level(logging.WARNING):
        features, _ = GasSensorDataModule(data_dir=str(folder)).load_arrays()

    # batch4.dat contains 64 Ethanol rows; the copy under an unknown name adds them again.
    assert features.shape == (128, 128)
    assert "batch11.dat is not a known file of the UCI archive; reading it unverified" in caplog.text
    assert "lacks batch1.dat, batch2.dat, batch3.dat, batch5.dat" in caplog.text


def test_data_dir_without_dat_files(tmp_path):
    (tmp_path / "notes.txt").write_text("no data here")

    with pytest.raises(FileNotFoundError) as caught:
        GasSensorDataModule(data_dir=str(tmp_path)).load_arrays()

    assert str(tmp_path) in str(caught.value)
    assert "batch1.dat ... batch10.dat" in str(caught.value)


def test_data_dir_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        GasSensorDataModule(data_dir=str(tmp_path / "absent")).load_arrays()


def test_gas_without_rows(tmp_path):
    folder = _copy_files(_real_gas_dir(), tmp_path / "data", [REBUILT_FILE])

    with pytest.raises(ValueError) as caught:
        GasSensorDataModule(data_dir=str(folder), gas=5).load_arrays()

    assert "No rows of gas 5 (Acetone)" in str(caught.value)
    assert REBUILT_FILE in str(caught.value)


def test_invalid_gas_id():
    with pytest.raises(ValueError, match="gas must be one of 1 Ethanol, .* 6 Toluene; got 0"):
        GasSensorDataModule(gas=0)


def test_rebuilt_file_with_one_original_is_rejected(tmp_path):
    (tmp_path / "batch7.dat").write_text(_line() + "\n")
    (tmp_path / REBUILT_FILE).write_text(_line() + "\n")

    with pytest.raises(ValueError, match=f"contains batch7.dat and {REBUILT_FILE}"):
        GasSensorDataModule(data_dir=str(tmp_path)).load_arrays()


def test_rebuilt_file_ignored_next_to_originals(tmp_path):
    names = ["batch7.dat", "batch10.dat", REBUILT_FILE]
    files = [tmp_path / name for name in names]

    kept = _select_files(tmp_path, files, gas=1)

    assert [path.name for path in kept] == ["batch7.dat", "batch10.dat"]


# Download into the cache from a local server


@contextlib.contextmanager
def _serve_file(path: str, body: bytes):
    """Serve ``body`` at ``path`` on 127.0.0.1 and yield the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != path:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def archive_bytes() -> bytes:
    """Zip of the real .dat files under ``Dataset/``, laid out like the UCI archive."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(_real_gas_dir().glob("batch*.dat")):
            archive.write(path, f"Dataset/{path.name}")
        archive.writestr("Dataset/readme.txt", "not a batch file")
    return buffer.getvalue()


def _sha256_of_bytes(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/gas.zip"


def _download_module(cache_dir: Path, url: str, sha256: str | None, **kwargs) -> GasSensorDataModule:
    return GasSensorDataModule(cache_dir=str(cache_dir), download_url=url, download_sha256=sha256, **kwargs)


def test_download_fills_cache_once(tmp_path, archive_bytes):
    archive_sha256 = _sha256_of_bytes(archive_bytes)
    with _serve_file("/gas.zip", archive_bytes) as base_url:
        url = f"{base_url}/gas.zip"
        module = _download_module(tmp_path, url, archive_sha256)
        module.prepare_data()
        module.setup("fit")

    cache = tmp_path / CACHE_SUBDIR
    assert module.x_train.shape == (ETHANOL_ROWS, 128)
    assert sha256_of(cache / ARCHIVE_NAME) == archive_sha256
    assert (cache / "batch1.dat").read_bytes() == (GAS_DIR / "batch1.dat").read_bytes()
    assert not (cache / "readme.txt").exists()
    assert not list(cache.glob("*.part"))
    assert "batch9.dat" in (cache / MANIFEST_NAME).read_text()

    # The server is gone, so the second instance can only read the cache.
    second = _download_module(tmp_path, url, archive_sha256)
    second.setup("fit")
    assert torch.equal(second.x_train, module.x_train)


def test_interrupted_extraction_reextracts_offline(tmp_path, archive_bytes):
    archive_sha256 = _sha256_of_bytes(archive_bytes)
    with _serve_file("/gas.zip", archive_bytes) as base_url:
        _download_module(tmp_path, f"{base_url}/gas.zip", archive_sha256).prepare_data()
    cache = tmp_path / CACHE_SUBDIR
    (cache / MANIFEST_NAME).unlink()
    (cache / "batch3.dat").unlink()

    module = _download_module(tmp_path, _closed_port_url(), archive_sha256, download=False)
    features, _ = module.load_arrays()

    assert features.shape == (ETHANOL_ROWS, 128)
    assert (cache / "batch3.dat").is_file()


def test_wrong_archive_checksum_leaves_nothing(tmp_path, archive_bytes):
    wrong = "f" * 64
    with _serve_file("/gas.zip", archive_bytes) as base_url:
        module = _download_module(tmp_path, f"{base_url}/gas.zip", wrong)
        with pytest.raises(ChecksumMismatchError) as caught:
            module.prepare_data()

    cache = tmp_path / CACHE_SUBDIR
    assert wrong in str(caught.value)
    assert _sha256_of_bytes(archive_bytes) in str(caught.value)
    assert not (cache / ARCHIVE_NAME).exists()
    assert list(cache.iterdir()) == []


def test_unreachable_server_gives_offline_error(tmp_path):
    module = _download_module(tmp_path, _closed_port_url(), "0" * 64)

    with pytest.raises(FileNotFoundError) as caught:
        module.prepare_data()

    message = str(caught.value)
    assert "The download failed" in message
    _assert_offline_help(message)
    assert not (tmp_path / CACHE_SUBDIR / ARCHIVE_NAME).exists()


def test_download_off_gives_offline_error(tmp_path):
    module = GasSensorDataModule(cache_dir=str(tmp_path), download=False)

    with pytest.raises(FileNotFoundError) as caught:
        module.load_arrays()

    assert "download=False" in str(caught.value)
    _assert_offline_help(str(caught.value))


def _assert_offline_help(message: str) -> None:
    assert "batch1.dat" in message
    assert "batch10.dat" in message
    assert UCI_PAGE_URL in message
    assert "--data.init_args.data_dir" in message
    assert "data_dir under data.init_args in the YAML config" in message

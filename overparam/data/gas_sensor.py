"""UCI Gas Sensor Array Drift Dataset at Different Concentrations (UCI id 270) for regression.

Each row contains 128 features of a gas sensor array's response to one of six gases at a known
concentration in ppmv. The data module keeps the rows of one gas and predicts the concentration from
the 128 features. The measurements come in 10 batches, ``batch1.dat`` ... ``batch10.dat``. The data
set was published by Vergara et al., "Chemical gas sensor drift compensation using classifier
ensembles", Sensors and Actuators B 166-167 (2012) 320-329.
"""

import fnmatch
import functools
import io
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from overparam.data.base import FullBatchRegressionDataModule
from overparam.data.download import (
    ChecksumMismatchError,
    DownloadError,
    download_file,
    resolve_cache_dir,
    sha256_of,
    write_atomically,
)

log = logging.getLogger(__name__)

GAS_NAMES = {1: "Ethanol", 2: "Ethylene", 3: "Ammonia", 4: "Acetaldehyde", 5: "Acetone", 6: "Toluene"}
NUM_SENSOR_FEATURES = 128
BATCH_FILES = tuple(f"batch{number}.dat" for number in range(1, 11))
DAT_PATTERN = "batch*.dat"

# Ethanol rows of batch7.dat and batch10.dat, rebuilt to about 5 significant digits from a derived
# copy of the data set for setups that lack the two original files.
REBUILT_FILE = "batch7-10-ethanol-rebuilt.dat"
REBUILT_REPLACES = ("batch7.dat", "batch10.dat")

# sha256 of the files in the official UCI archive, and of the rebuilt file.
KNOWN_SHA256 = {
    "batch1.dat": "6b62f3e71b90f95dd9c2157fa91ffce32571faa7f474dd52f29a4ae769144625",
    "batch2.dat": "4ea9490068457badf9efd0c22f359fbfce12c208cdd440526b97ac91d31b9002",
    "batch3.dat": "aabf06bf8b8200740156235dc59458e06d99aa8faba4d6764a22c6b6c2674ff4",
    "batch4.dat": "ffc87c5146001bbe8ce90c4b2f7dad5b390ca3079f51b559032df53ffe5ff0af",
    "batch5.dat": "dcad4939c300a6c7d9f41b9470a9253eecc0ebc5c2c4e940d8ae20b8fc4240d0",
    "batch6.dat": "297d3a8b594dee4e2f4d7d2c4f5c485939fa708c10b5a11ed5cce95e05049afb",
    "batch7.dat": "eb5801d38a59beaae4a2412195d8ded790175ed1611159e083649ee9fe03d150",
    "batch8.dat": "58146b3e2dd68b125b2d5432cdd4968ec1fff47464ceb04282382181932d49be",
    "batch9.dat": "51f368ae8dee5d285be7f2029770e10eb12f342578830bc40ea852db19d19c9b",
    "batch10.dat": "b8309e8ff205b9d0350761989809f31f8feaefb8582aecb05f1d0f694b91184e",
    REBUILT_FILE: "43e12add8525100681b89bf02672bc42e05e54e5328ef45a9f07c3dbb6c6fad2",
}

UCI_PAGE_URL = "https://archive.ics.uci.edu/dataset/270/gas+sensor+array+drift+dataset+at+different+concentrations"
DEFAULT_DOWNLOAD_URL = (
    "https://archive.ics.uci.edu/static/public/270/gas+sensor+array+drift+dataset+at+different+concentrations.zip"
)
DEFAULT_DOWNLOAD_SHA256 = "98fe3a30981a222dd4518fbcc3dddd45d5c0ce9b03ef6dc6fe5cf7a04cfbff5e"

CACHE_SUBDIR = "gas-sensor-drift"
ARCHIVE_NAME = "gas-sensor-drift.zip"
# Written after every batch file of the archive is extracted, so its presence marks a complete cache.
MANIFEST_NAME = "SHA256SUMS"

# A line in the canonical format: "<gas>;<concentration>" and 128 "<index>:<value>" tokens separated
# by single spaces, with plain decimal numbers. Files whose lines all match are parsed in bulk.
_CANONICAL_LINE = re.compile(r"[0-9]+;[-+.0-9eE]+(?: [0-9]+:[-+.0-9eE]+){%d}" % NUM_SENSOR_FEATURES, re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_SEPARATORS_TO_SPACE = str.maketrans(";:", "  ")


class DataFormatError(ValueError):
    """A data file does not have the expected format. The message names the file and line."""


class _LineError(ValueError):
    """Problem in one line, reported without the file name and line number."""


def parse_dat_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse one ``batch*.dat`` file into gas ids, concentrations (ppmv) and features ``(n, 128)``.

    Every non-blank line must read ``<gas>;<concentration> 1:<f1> 2:<f2> ... 128:<f128>``, with the
    indices in order and finite numbers. Tokens may be separated by any whitespace, and blank lines
    are skipped.

    Raises:
        DataFormatError: A line is malformed; the message names the file, the 1-based line number
            and the problem.
        FileNotFoundError: The file does not exist.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_number = raw[: err.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path}, line {line_number}: invalid byte {raw[err.start]:#04x}; expected ASCII text."
        ) from err

    numbered_lines = [(number, line.strip()) for number, line in enumerate(text.split("\n"), start=1)]
    numbered_lines = [(number, line) for number, line in numbered_lines if line]
    if not numbered_lines:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros((0, NUM_SENSOR_FEATURES))

    parsed = _parse_canonical_lines([line for _, line in numbered_lines])
    if parsed is not None:
        return parsed

    # Slow path: parse line by line, which accepts any whitespace and names the first bad line.
    rows = []
    for number, line in numbered_lines:
        try:
            rows.append(_parse_line(line))
        except _LineError as err:
            raise DataFormatError(f"{path}, line {number}: {err}.") from None
    gas_ids = np.array([gas_id for gas_id, _, _ in rows], dtype=np.int64)
    concentrations = np.array([concentration for _, concentration, _ in rows])
    features = np.array([values for _, _, values in rows])
    return gas_ids, concentrations, features


def _parse_canonical_lines(lines: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Parse lines in the canonical format with pandas' C parser; return None if any line deviates."""
    if not all(_CANONICAL_LINE.fullmatch(line) for line in lines):
        return None

    text = "\n".join(lines).translate(_SEPARATORS_TO_SPACE)
    try:
        table = pd.read_csv(io.StringIO(text), sep=" ", header=None, dtype=np.float64).to_numpy()
    except ValueError:
        return None

    if table.shape != (len(lines), 2 + 2 * NUM_SENSOR_FEATURES) or not np.isfinite(table).all():
        return None
    if not (table[:, 2::2] == np.arange(1, NUM_SENSOR_FEATURES + 1)).all():
        return None
    gas_ids = table[:, 0].astype(np.int64)
    if not np.isin(gas_ids, list(GAS_NAMES)).all():
        return None
    return gas_ids, table[:, 1].copy(), np.ascontiguousarray(table[:, 3::2])


def _parse_line(line: str) -> tuple[int, float, list[float]]:
    """Parse one non-blank line into gas id, concentration and features, or raise _LineError."""
    label, *feature_tokens = line.split()

    gas_text, separator, concentration_text = label.partition(";")
    if not separator or not _DIGITS.fullmatch(gas_text):
        raise _LineError(f"bad label {label!r}; expected '<gas>;<concentration>' with an integer gas id")
    gas_id = int(gas_text)
    if gas_id not in GAS_NAMES:
        raise _LineError(f"unknown gas id {gas_text} in label {label!r}; expected 1 to {len(GAS_NAMES)}")
    concentration = _parse_float(concentration_text, f"concentration in label {label!r}")

    if len(feature_tokens) != NUM_SENSOR_FEATURES:
        raise _LineError(f"expected {NUM_SENSOR_FEATURES} features, found {len(feature_tokens)}")
    values = []
    for position, token in enumerate(feature_tokens, start=1):
        index_text, separator, value_text = token.partition(":")
        if not separator or not _DIGITS.fullmatch(index_text):
            raise _LineError(f"feature {position} token {token!r} is not '<index>:<value>'")
        if int(index_text) != position:
            raise _LineError(f"feature index {index_text} out of order; expected {position}")
        values.append(_parse_float(value_text, f"value for feature {position}"))
    return gas_id, concentration, values


def _parse_float(text: str, field_name: str) -> float:
    # Python's float() also accepts underscores and non-ASCII digits, which no UCI file contains.
    try:
        if not text.isascii() or "_" in text:
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise _LineError(f"non-numeric {field_name}: {text!r}") from None
    if not np.isfinite(value):
        raise _LineError(f"non-finite {field_name}: {text!r}")
    return value


def verify_dat_file(path: Path, fix: str | None = None) -> None:
    """Check a file with a known name against its sha256; log a warning for an unknown name.

    Raises:
        ChecksumMismatchError: The file's sha256 differs from the known one. The message ends with
            ``fix``, by default an instruction to replace the file with the UCI original.
    """
    expected = KNOWN_SHA256.get(path.name)
    if expected is None:
        log.warning("%s is not a known file of the UCI archive; reading it unverified", path)
        return

    actual = sha256_of(path)
    if actual != expected:
        if fix is None:
            fix = f"Replace it with {path.name} from the UCI archive {DEFAULT_DOWNLOAD_URL}."
        raise ChecksumMismatchError(str(path), expected, actual, f"The file is corrupt or was edited. {fix}")


def list_dat_files(folder: Path) -> list[Path]:
    """Return the ``batch*.dat`` files of a folder in batch order."""
    return sorted(folder.glob(DAT_PATTERN), key=_batch_sort_key)


def _batch_sort_key(path: Path) -> tuple[list[int], str]:
    return [int(number) for number in re.findall(r"[0-9]+", path.name)], path.name


class GasSensorDataModule(FullBatchRegressionDataModule):
    """Rows of one gas from the UCI gas sensor drift data; target is the concentration in ppmv.

    The data comes from ``data_dir`` when given, else from the cache folder, else from the official
    UCI archive. The archive is downloaded once, checked against its sha256 and kept in the cache
    next to the extracted files. Files with a known name must match the UCI file's sha256.

    Args:
        data_dir: Folder with the ``batch*.dat`` files; None uses the cache and downloads when needed.
        gas: Gas whose rows are kept: 1 Ethanol, 2 Ethylene, 3 Ammonia, 4 Acetaldehyde, 5 Acetone, 6 Toluene.
        cache_dir: Cache root, ``$OVERPARAM_CACHE`` or ``~/.cache/overparam`` when None; the files go to
            its ``gas-sensor-drift/`` folder.
        download: Download the archive when neither ``data_dir`` nor the cache has the files.
        download_url: Address of the zip archive that contains the ``batch*.dat`` files.
        download_sha256: Expected sha256 of the archive; None skips the check.
        val_fraction: Fraction of rows held out for validation; 0 trains on every row.
        split_seed: Seed of the permutation that draws the validation rows.
        standardize: Z-score features and target with the training split's mean and standard deviation.
        dtype: Floating-point type of the tensors, ``float32`` or ``float64``.
        batches_per_epoch: Full batches per Lightning epoch; an epoch has no meaning in full-batch training.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        gas: int = 1,
        cache_dir: str | None = None,
        download: bool = True,
        download_url: str = DEFAULT_DOWNLOAD_URL,
        download_sha256: str | None = DEFAULT_DOWNLOAD_SHA256,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        standardize: bool = True,
        dtype: str = "float32",
        batches_per_epoch: int = 1000,
    ) -> None:
        super().__init__(
            val_fraction=val_fraction,
            split_seed=split_seed,
            standardize=standardize,
            dtype=dtype,
            batches_per_epoch=batches_per_epoch,
        )
        if gas not in GAS_NAMES:
            choices = ", ".join(f"{gas_id} {name}" for gas_id, name in GAS_NAMES.items())
            raise ValueError(f"gas must be one of {choices}; got {gas!r}.")
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.gas = gas
        self.cache_folder = resolve_cache_dir(cache_dir) / CACHE_SUBDIR
        self.download = download
        self.download_url = download_url
        self.download_sha256 = download_sha256

    @property
    def gas_name(self) -> str:
        """Name of the selected gas, such as ``Ethanol``."""
        return GAS_NAMES[self.gas]

    def prepare_data(self) -> None:
        self.locate_data()

    def locate_data(self) -> Path:
        """Return the folder to read, downloading the archive into the cache when needed.

        ``load_arrays`` calls this too, because LightningCLI reads ``num_features`` before
        ``prepare_data`` runs.

        Raises:
            FileNotFoundError: ``data_dir`` has no ``batch*.dat`` files, or the cache is empty and
                downloading is off or failed.
            ChecksumMismatchError: The downloaded archive has another sha256 than ``download_sha256``.
        """
        if self.data_dir is not None:
            if not self.data_dir.is_dir():
                raise FileNotFoundError(
                    f"data_dir {self.data_dir} is not a folder; pass the folder that contains the UCI files "
                    f"{BATCH_FILES[0]} ... {BATCH_FILES[-1]}."
                )
            if not list_dat_files(self.data_dir):
                raise FileNotFoundError(
                    f"data_dir {self.data_dir} contains no {DAT_PATTERN} files; expected the UCI files "
                    f"{BATCH_FILES[0]} ... {BATCH_FILES[-1]} there."
                )
            return self.data_dir

        if _cache_is_complete(self.cache_folder):
            return self.cache_folder

        archive = self.cache_folder / ARCHIVE_NAME
        if not self._archive_is_valid(archive):
            if not self.download:
                raise FileNotFoundError(self._missing_data_message("Downloading is off (download=False)."))
            try:
                download_file(self.download_url, archive, sha256=self.download_sha256)
            except DownloadError as err:
                raise FileNotFoundError(self._missing_data_message(f"The download failed: {err}")) from err

        _extract_dat_files(archive, self.cache_folder)
        return self.cache_folder

    def _archive_is_valid(self, archive: Path) -> bool:
        if not archive.is_file():
            return False
        if self.download_sha256 is not None and sha256_of(archive) != self.download_sha256.lower():
            log.warning("Cached archive %s has another sha256 than %s; ignoring it", archive, self.download_sha256)
            return False
        return True

    def _missing_data_message(self, reason: str) -> str:
        return (
            f"Gas sensor data not found: no data_dir was given and the cache {self.cache_folder} has no "
            f"complete copy. "
            f"{reason} Download the archive from {UCI_PAGE_URL}, unpack the files {', '.join(BATCH_FILES)} "
            "into a folder and pass it as --data.init_args.data_dir on the command line or as data_dir "
            "under data.init_args in the YAML config."
        )

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        folder = self.locate_data()
        files = _select_files(folder, list_dat_files(folder), self.gas)

        concentrations = []
        features = []
        if folder == self.data_dir:
            fix = None
        else:
            fix = f"Delete the cache folder {folder} so that the next run downloads the archive again."
        for path in files:
            verify_dat_file(path, fix)
            gas_ids, file_concentrations, file_features = parse_dat_file(path)
            keep = gas_ids == self.gas
            log.info("%s: %d rows, %d %s rows kept", path.name, len(gas_ids), keep.sum(), self.gas_name)
            concentrations.append(file_concentrations[keep])
            features.append(file_features[keep])

        target = np.concatenate(concentrations)
        if len(target) == 0:
            raise ValueError(
                f"No rows of gas {self.gas} ({self.gas_name}) in {folder} (files: "
                f"{', '.join(path.name for path in files)}); choose another gas or add the batch files that contain it."
            )
        log.info("Loaded %d %s rows with %d features from %s", len(target), self.gas_name, NUM_SENSOR_FEATURES, folder)
        return np.concatenate(features), target


def _select_files(folder: Path, files: list[Path], gas: int) -> list[Path]:
    """Drop the rebuilt file where it would duplicate rows, and log which batches are missing."""
    names = {path.name for path in files}
    missing = [name for name in BATCH_FILES if name not in names]

    if REBUILT_FILE in names:
        present = [name for name in REBUILT_REPLACES if name in names]
        if len(present) == len(REBUILT_REPLACES):
            log.warning(
                "%s has %s and %s, so %s, which rebuilds their Ethanol rows, is ignored", folder, *present, REBUILT_FILE
            )
            files = [path for path in files if path.name != REBUILT_FILE]
        elif present:
            raise ValueError(
                f"{folder} contains {present[0]} and {REBUILT_FILE}, which repeats its Ethanol rows; "
                f"remove {REBUILT_FILE} and add {' and '.join(REBUILT_REPLACES)}, or remove {present[0]}."
            )
        else:
            missing = [name for name in missing if name not in REBUILT_REPLACES]
            if gas != 1:
                log.warning(
                    "%s replaces %s only for Ethanol, so their %s rows are missing",
                    REBUILT_FILE, " and ".join(REBUILT_REPLACES), GAS_NAMES[gas],
                )

    if missing:
        log.warning("%s lacks %s; the rows of those batches are left out", folder, ", ".join(missing))
    return files


def _cache_is_complete(folder: Path) -> bool:
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return False
    names = [line.split()[-1] for line in manifest.read_text().splitlines() if line.strip()]
    return bool(names) and all((folder / name).is_file() for name in names)


def _extract_dat_files(archive: Path, folder: Path) -> None:
    """Extract every ``batch*.dat`` member of the archive into ``folder``, then write the manifest.

    Members are matched by file name wherever they sit in the archive. Each file and the manifest
    are written to a temporary file first and renamed into place, so an interrupted extraction
    leaves no partial file and no manifest, and the next run extracts again.

    NOTE: the tests use archives laid out like the UCI one, with the files under ``Dataset/``. The
    real download has not been run here. An archive that nests the files in an inner zip raises
    the "contains no batch*.dat files" error.
    """
    try:
        with zipfile.ZipFile(archive) as zip_file:
            members = [
                info
                for info in zip_file.infolist()
                if not info.is_dir() and fnmatch.fnmatch(Path(info.filename).name, DAT_PATTERN)
            ]
            names = [Path(info.filename).name for info in members]
            if not members:
                raise FileNotFoundError(
                    f"Archive {archive} contains no {DAT_PATTERN} files; check download_url, then delete the archive."
                )
            if len(set(names)) != len(names):
                raise ValueError(f"Archive {archive} contains several files with the same name among {names}.")

            for info in members:
                destination = folder / Path(info.filename).name
                with zip_file.open(info) as source:
                    write_atomically(destination, functools.partial(shutil.copyfileobj, source))
    except zipfile.BadZipFile as err:
        raise ValueError(
            f"{archive} is not a valid zip archive ({err}); delete it so that it is downloaded again."
        ) from err

    manifest_lines = [f"{sha256_of(folder / name)}  {name}\n" for name in names]
    write_atomically(folder / MANIFEST_NAME, lambda target: target.writelines(line.encode() for line in manifest_lines))
    log.info("Extracted %s from %s into %s", ", ".join(sorted(names)), archive, folder)


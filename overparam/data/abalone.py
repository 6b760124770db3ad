"""UCI Abalone data set (UCI id 1) for regression: predict the number of shell rings.

Nash, Sellers, Talbot, Cawthorn & Ford (1994), *Abalone*, UCI Machine Learning Repository,
https://doi.org/10.24432/C55C7W. 4177 rows of one categorical and seven numeric measurements.
"""

import logging
import math
import os
from pathlib import Path

import numpy as np

from overparam.data.base import FullBatchRegressionDataModule
from overparam.data.download import resolve_cache_dir, write_atomically

log = logging.getLogger(__name__)

UCI_ID = 1
UCI_PAGE_URL = "https://archive.ics.uci.edu/dataset/1/abalone"
COLUMNS = (
    "Sex", "Length", "Diameter", "Height", "Whole_weight", "Shucked_weight", "Viscera_weight", "Shell_weight", "Rings",
)
# Fixed one-hot order, so the feature columns do not depend on which category comes first in a file.
SEX_CATEGORIES = ("M", "F", "I")
FEATURE_NAMES = tuple(f"Sex_{sex}" for sex in SEX_CATEGORIES) + COLUMNS[1:-1]

# abalone.data is UCI's original file without a header; data.csv is the file that ucimlrepo
# downloads, with a header line and CRLF line endings. Both contain the same rows.
LOCAL_FILE_NAMES = ("abalone.data", "data.csv")
CACHE_SUBDIR = "abalone"
CACHE_FILE_NAME = "data.csv"


def read_abalone_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read ``abalone.data`` or ``data.csv`` into features ``(n, 10)`` and rings ``(n,)``.

    The features are the one-hot sex (M, F, I) followed by the seven measurements, in the order of
    ``FEATURE_NAMES``. A header line, if present, must list ``COLUMNS``.

    Raises:
        ValueError: The file is malformed; the message names the file and the 1-based line number.
        FileNotFoundError: The file does not exist.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); expected the comma-separated UCI Abalone file.") from err
    return parse_abalone_text(text, str(path))


def parse_abalone_text(text: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse the text of an Abalone file; ``source`` names it in error messages."""
    features = []
    rings = []
    header_seen = False
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        fields = [field.strip() for field in line.split(",")]

        if not header_seen and not features and fields[0] == COLUMNS[0]:
            if tuple(fields) != COLUMNS:
                raise ValueError(f"{source}, line {line_number}: header {line!r} does not list the columns {COLUMNS}.")
            header_seen = True
            continue

        row = _parse_row(fields, f"{source}, line {line_number}")
        features.append(row[:-1])
        rings.append(row[-1])

    if not rings:
        raise ValueError(f"{source} contains no data rows; expected {len(COLUMNS)} comma-separated columns {COLUMNS}.")
    return np.array(features), np.array(rings)


def _parse_row(fields: list[str], where: str) -> list[float]:
    """Return the one-hot sex, the seven measurements and the rings of one row."""
    if len(fields) != len(COLUMNS):
        raise ValueError(f"{where}: expected {len(COLUMNS)} comma-separated columns {COLUMNS}, found {len(fields)}.")
    if fields[0] not in SEX_CATEGORIES:
        raise ValueError(f"{where}: invalid Sex {fields[0]!r}; expected one of {SEX_CATEGORIES}.")

    row = [float(fields[0] == sex) for sex in SEX_CATEGORIES]
    for name, field in zip(COLUMNS[1:], fields[1:]):
        try:
            value = float(field)
        except ValueError:
            raise ValueError(f"{where}: non-numeric {name} {field!r}.") from None
        if not math.isfinite(value):
            raise ValueError(f"{where}: non-finite {name} {field!r}.")
        row.append(value)
    return row


class AbaloneDataModule(FullBatchRegressionDataModule):
    """UCI Abalone: 10 features (one-hot sex and seven measurements), target is the number of rings.

    The data comes from ``abalone.data`` or ``data.csv`` in ``data_dir`` when given, else from the
    cached ``data.csv``, else from UCI through ``ucimlrepo.fetch_ucirepo(id=1)``. The fetched table is
    saved into the cache, so later runs need no network.

    Args:
        data_dir: Folder with ``abalone.data`` (UCI's file) or ``data.csv`` (ucimlrepo's file); None uses the cache.
        cache_dir: Cache root, ``$OVERPARAM_CACHE`` or ``~/.cache/overparam`` when None; the file goes to
            its ``abalone/`` folder.
        download: Fetch the data from UCI when neither ``data_dir`` nor the cache has it.
        val_fraction: Fraction of rows held out for validation; 0 trains on every row.
        split_seed: Seed of the permutation that draws the validation rows.
        standardize: Z-score features and target with the training split's mean and standard deviation.
        dtype: Floating-point type of the tensors, ``float32`` or ``float64``.
        batches_per_epoch: Full batches per Lightning epoch; an epoch has no meaning in full-batch training.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        cache_dir: str | None = None,
        download: bool = True,
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
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.cache_file = resolve_cache_dir(cache_dir) / CACHE_SUBDIR / CACHE_FILE_NAME
        self.download = download

    def prepare_data(self) -> None:
        self.locate_data()

    def locate_data(self) -> Path:
        """Return the file to read, fetching it into the cache when needed.

        ``load_arrays`` calls this too, because LightningCLI reads ``num_features`` before
        ``prepare_data`` runs.

        Raises:
            FileNotFoundError: ``data_dir`` has neither file, or the cache has no copy and fetching
                is off or failed.
        """
        if self.data_dir is not None:
            for name in LOCAL_FILE_NAMES:
                if (self.data_dir / name).is_file():
                    return self.data_dir / name
            raise FileNotFoundError(
                f"data_dir {self.data_dir} contains neither {' nor '.join(LOCAL_FILE_NAMES)}; put UCI's abalone.data "
                f"from {UCI_PAGE_URL} there."
            )

        if self.cache_file.is_file():
            return self.cache_file
        if not self.download:
            raise FileNotFoundError(self._missing_data_message("Downloading is off (download=False)."))
        self._fetch_into_cache()
        return self.cache_file

    def _fetch_into_cache(self) -> None:
        # Imported here because ucimlrepo is needed only for this one download.
        from ucimlrepo import DatasetNotFoundError, fetch_ucirepo

        # NOTE: ucimlrepo 0.0.7 opens its URLs without a timeout, so a stalled server blocks this call.
        log.info("Fetching Abalone (UCI id %d) with ucimlrepo into %s", UCI_ID, self.cache_file)
        try:
            dataset = fetch_ucirepo(id=UCI_ID)
        except (OSError, ValueError, KeyError, DatasetNotFoundError) as err:
            # ConnectionError is an OSError; malformed API responses raise ValueError or KeyError.
            raise FileNotFoundError(
                self._missing_data_message(f"Fetching it failed: {type(err).__name__}: {err}")
            ) from err

        text = dataset.data.original.to_csv(index=False, lineterminator="\n")
        features, _ = parse_abalone_text(text, f"the table that ucimlrepo fetched for UCI id {UCI_ID}")

        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.cache_file, lambda file: file.write(text.encode("utf-8")))
        log.info("Saved %d Abalone rows to %s", len(features), self.cache_file)

    def _missing_data_message(self, reason: str) -> str:
        return (
            f"Abalone data not found: no data_dir was given and the cache has no {self.cache_file}. {reason} "
            f"Download abalone.data from {UCI_PAGE_URL} into a folder and pass it as --data.init_args.data_dir "
            "on the command line or as data_dir under data.init_args in the YAML config."
        )

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        path = self.locate_data()
        try:
            features, rings = read_abalone_file(path)
        except ValueError as err:
            if path != self.cache_file:
                raise
            raise ValueError(f"{err} Delete the cached file {path} so that the next run fetches it again.") from err
        log.info("Loaded %d Abalone rows with %d features from %s", len(rings), features.shape[1], path)
        return features, rings

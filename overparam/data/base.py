"""Shared base for full-batch tabular regression data modules.

The whole training set lives in memory as two tensors and every training step uses all of it.
There is no per-sample ``Dataset`` and no collation, because a per-sample ``DataLoader`` makes a
full-batch step on 2565 rows tens of times slower than the arithmetic it feeds.
"""

import logging
from abc import abstractmethod
from collections.abc import Iterator

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class FullBatchLoader:
    """Iterable that yields the same full batch ``num_batches`` times per epoch.

    Lightning accepts any sized iterable as a dataloader. Yielding the same tensors avoids copying
    and collating rows, and a long epoch keeps Lightning's per-epoch hooks off the hot path.
    """

    def __init__(self, tensors: tuple[Tensor, ...], num_batches: int) -> None:
        self.tensors = tensors
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for _ in range(self.num_batches):
            yield self.tensors

    def __len__(self) -> int:
        return self.num_batches


class FullBatchRegressionDataModule(LightningDataModule):
    """Base class for regression data sets trained by full-batch gradient descent.

    A subclass implements ``load_arrays`` (and ``prepare_data`` when it downloads). This class
    z-scores features and target with statistics of the training split, keeps those statistics,
    optionally holds out a validation split drawn with a fixed seed, and serves each split as one
    batch of tensors.

    Args:
        val_fraction: Fraction of rows held out for validation; 0 trains on every row.
        split_seed: Seed of the permutation that draws the validation rows.
        standardize: Z-score features and target with the training split's mean and standard deviation.
        dtype: Floating-point type of the tensors, ``float32`` or ``float64``.
        batches_per_epoch: Full batches per Lightning epoch; an epoch has no meaning in full-batch training.
    """

    def __init__(
        self,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        standardize: bool = True,
        dtype: str = "float32",
        batches_per_epoch: int = 1000,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be at least 1, got {batches_per_epoch}.")
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.standardize = standardize
        self.dtype = DTYPES[dtype]
        self.batches_per_epoch = batches_per_epoch

        self.x_train: Tensor | None = None
        self.y_train: Tensor | None = None
        self.x_val: Tensor | None = None
        self.y_val: Tensor | None = None
        self.feature_mean: np.ndarray | None = None
        self.feature_std: np.ndarray | None = None
        self.target_mean: np.ndarray | None = None
        self.target_std: np.ndarray | None = None

    @abstractmethod
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Load the raw features ``(n, d)`` and target ``(n,)`` or ``(n, k)`` as float64 arrays."""

    @property
    def num_features(self) -> int:
        """Input size of the model; loads the data on first use so LightningCLI can link it."""
        self.setup("fit")
        return self.x_train.shape[1]

    @property
    def num_targets(self) -> int:
        """Output size of the model."""
        self.setup("fit")
        return self.y_train.shape[1]

    def setup(self, stage: str | None = None) -> None:
        if self.x_train is not None:
            return

        features, target = self.load_arrays()
        features = np.asarray(features, dtype=np.float64)
        target = np.asarray(target, dtype=np.float64)
        if target.ndim == 1:
            target = target[:, None]
        if features.ndim != 2 or features.shape[0] != target.shape[0]:
            raise ValueError(
                f"{type(self).__name__}.load_arrays returned features {features.shape} and target "
                f"{target.shape}; expected (n, d) and (n,) or (n, k) with the same n."
            )

        train_rows, val_rows = self._split_rows(features.shape[0])
        if self.standardize:
            self.feature_mean, self.feature_std = _mean_and_std(features[train_rows], "feature")
            self.target_mean, self.target_std = _mean_and_std(target[train_rows], "target")
            features = (features - self.feature_mean) / self.feature_std
            target = (target - self.target_mean) / self.target_std

        self.x_train = torch.as_tensor(features[train_rows], dtype=self.dtype)
        self.y_train = torch.as_tensor(target[train_rows], dtype=self.dtype)
        if len(val_rows):
            self.x_val = torch.as_tensor(features[val_rows], dtype=self.dtype)
            self.y_val = torch.as_tensor(target[val_rows], dtype=self.dtype)
        log.info(
            "%s: %d training rows, %d validation rows, %d features",
            type(self).__name__, len(train_rows), len(val_rows), features.shape[1],
        )

    def _split_rows(self, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        if self.val_fraction == 0.0:
            return np.arange(num_rows), np.arange(0)
        num_val = int(round(self.val_fraction * num_rows))
        if num_val == 0 or num_val == num_rows:
            raise ValueError(
                f"val_fraction={self.val_fraction} leaves {num_val} of {num_rows} rows for validation; "
                "choose a fraction that keeps rows in both splits."
            )
        permutation = np.random.default_rng(self.split_seed).permutation(num_rows)
        return np.sort(permutation[num_val:]), np.sort(permutation[:num_val])

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """Return the standardized training features ``(n, d)`` and target ``(n, k)``."""
        self.setup("fit")
        return self.x_train, self.y_train

    def train_dataloader(self) -> FullBatchLoader:
        self.setup("fit")
        return FullBatchLoader((self.x_train, self.y_train), self.batches_per_epoch)

    def val_dataloader(self) -> FullBatchLoader | list:
        self.setup("validate")
        if self.x_val is None:
            return []
        return FullBatchLoader((self.x_val, self.y_val), 1)

    def test_dataloader(self) -> FullBatchLoader | list:
        # NOTE: full-batch training experiments have no test split, so testing evaluates the validation rows, or the
        # training rows when there is no validation split.
        self.setup("test")
        if self.x_val is None:
            return FullBatchLoader((self.x_train, self.y_train), 1)
        return FullBatchLoader((self.x_val, self.y_val), 1)


def _mean_and_std(values: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    mean = values.mean(axis=0)
    std = values.std(axis=0)
    constant = std == 0
    if constant.any():
        log.warning("%d %s column(s) are constant; they are centred but not scaled", constant.sum(), what)
        std = np.where(constant, 1.0, std)
    return mean, std

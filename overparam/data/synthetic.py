"""Seeded linear teacher problem, and the example of adding a data set.

A data set is one subclass of ``FullBatchRegressionDataModule``. Its ``__init__`` takes the data set's
own arguments plus the base class's, which it passes to ``super().__init__``. Its ``load_arrays``
returns float64 features ``(n, d)`` and target ``(n,)``. The base class z-scores, splits and serves
the arrays, and its ``num_features`` property gives the model's input size. A subclass that downloads
also implements ``prepare_data`` (see ``GasSensorDataModule``). A config then names the class by
its import path::

    data:
      class_path: overparam.data.SyntheticRegressionDataModule
      init_args:
        num_samples: 1000
        input_size: 20
        condition_number: 100.0
"""

import numpy as np

from overparam.data.base import FullBatchRegressionDataModule


class SyntheticRegressionDataModule(FullBatchRegressionDataModule):
    """Targets ``y = X w + noise`` of a random unit teacher ``w``, with a chosen feature conditioning.

    The rows are drawn so that every feature has mean 0 and variance 1. The covariance
    ``X^T X / n`` of the generated rows has eigenvalues spread log-uniformly, that is evenly spaced
    on a log scale, with mean 1 and largest / smallest equal to ``condition_number``. Z-scoring
    therefore leaves the features unchanged, and a model trains on exactly the requested conditioning.

    NOTE: fixing the sample covariance exactly makes the rows dependent, unlike i.i.d. Gaussian rows.

    Args:
        num_samples: Number of rows; must exceed ``input_size``.
        input_size: Number of features.
        condition_number: Ratio of the largest to the smallest eigenvalue of ``X^T X / n``; at least 1.
        noise_std: Standard deviation of the Gaussian noise added to the targets.
        seed: Seed of the features, teacher and noise; equal seeds give equal data.
        val_fraction: Fraction of rows held out for validation; 0 trains on every row.
        split_seed: Seed of the permutation that draws the validation rows.
        standardize: Z-score features and target with the training split's mean and standard deviation.
        dtype: Floating-point type of the tensors, ``float32`` or ``float64``.
        batches_per_epoch: Full batches per Lightning epoch; an epoch has no meaning in full-batch training.
    """

    def __init__(
        self,
        num_samples: int = 1000,
        input_size: int = 20,
        condition_number: float = 100.0,
        noise_std: float = 0.1,
        seed: int = 0,
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
        if input_size < 1:
            raise ValueError(f"input_size must be at least 1, got {input_size}.")
        if num_samples <= input_size:
            raise ValueError(
                f"num_samples must exceed input_size ({input_size}) to fix the feature covariance, got {num_samples}."
            )
        if condition_number < 1.0 or (input_size == 1 and condition_number != 1.0):
            raise ValueError(
                f"condition_number must be at least 1, and exactly 1 for a single feature; got {condition_number}."
            )
        if noise_std < 0.0:
            raise ValueError(f"noise_std must be non-negative, got {noise_std}.")

        # The input size is stored as input_size because the base class defines num_features as a property.
        self.num_samples = num_samples
        self.input_size = input_size
        self.condition_number = condition_number
        self.noise_std = noise_std
        self.seed = seed
        self.teacher: np.ndarray | None = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)

        eigenvalues = np.geomspace(self.condition_number, 1.0, self.input_size)
        eigenvalues *= self.input_size / eigenvalues.sum()
        covariance = random_correlation_matrix(eigenvalues, rng)
        features = sample_rows_with_covariance(covariance, self.num_samples, rng)

        teacher = rng.standard_normal(self.input_size)
        self.teacher = teacher / np.linalg.norm(teacher)
        target = features @ self.teacher + self.noise_std * rng.standard_normal(self.num_samples)
        return features, target


def random_correlation_matrix(eigenvalues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw a correlation matrix (unit diagonal) with the given eigenvalues, which must average 1.

    Starts from ``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` and applies Givens
    rotations, which keep the eigenvalues, each setting one diagonal entry to 1. This is the method of
    Bendel & Mickey, "Population correlation matrices for sampling experiments" (1978), also used by
    ``scipy.stats.random_correlation``.
    """
    size = len(eigenvalues)
    if not np.isclose(eigenvalues.mean(), 1.0):
        raise ValueError(f"eigenvalues of a correlation matrix must average 1, got a mean of {eigenvalues.mean()}.")

    orthogonal = random_orthogonal_matrix(size, rng)
    matrix = (orthogonal * eigenvalues) @ orthogonal.T
    for i in range(size - 1):
        # Diagonal entries 0..i-1 are already 1 and the trace is still ``size``, so if entry i is off 1,
        # a later entry lies on the other side of 1.
        excess = np.diag(matrix) - 1.0
        partners = np.flatnonzero(excess[i + 1 :] * excess[i] < 0)
        if len(partners) == 0:
            continue
        j = i + 1 + partners[0]
        cos, sin = _givens_to_unit_diagonal(matrix[i, i], matrix[j, j], matrix[i, j])
        _rotate_symmetric(matrix, i, j, cos, sin)
    return matrix


def _givens_to_unit_diagonal(a_ii: float, a_jj: float, a_ij: float) -> tuple[float, float]:
    """Return the cosine and sine of the rotation in plane ``(i, j)`` that makes entry ``(i, i)`` equal 1.

    The tangent solves ``(a_jj - 1) t^2 - 2 a_ij t + (a_ii - 1) = 0``. The root with the sign of
    ``a_ij`` avoids cancellation, and the discriminant is positive because ``a_ii - 1`` and
    ``a_jj - 1`` have opposite signs.
    """
    root = np.sqrt(max(a_ij**2 - (a_ii - 1.0) * (a_jj - 1.0), 0.0))
    tangent = (a_ij + np.copysign(root, a_ij)) / (a_jj - 1.0)
    cos = 1.0 / np.sqrt(1.0 + tangent**2)
    return cos, cos * tangent


def _rotate_symmetric(matrix: np.ndarray, i: int, j: int, cos: float, sin: float) -> None:
    """Replace ``matrix`` by ``G^T matrix G`` in place, for the Givens rotation ``G`` in plane ``(i, j)``."""
    column_i = matrix[:, i].copy()
    matrix[:, i] = cos * column_i - sin * matrix[:, j]
    matrix[:, j] = sin * column_i + cos * matrix[:, j]
    row_i = matrix[i].copy()
    matrix[i] = cos * row_i - sin * matrix[j]
    matrix[j] = sin * row_i + cos * matrix[j]


def random_orthogonal_matrix(size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a Haar-distributed orthogonal matrix (QR of a Gaussian matrix with the signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    return q * np.sign(np.diag(r))


def sample_rows_with_covariance(covariance: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``num_samples`` rows whose column means are 0 and whose ``X^T X / n`` equals ``covariance``.

    The columns of centred Gaussian noise are orthonormalized (so they stay orthogonal to the
    all-ones vector) and mixed by the Cholesky factor ``L`` of the covariance:
    ``X = sqrt(n) Q L^T`` gives ``X^T X / n = L L^T``.
    """
    noise = rng.standard_normal((num_samples, covariance.shape[0]))
    noise -= noise.mean(axis=0)
    orthonormal, _ = np.linalg.qr(noise)
    return np.sqrt(num_samples) * orthonormal @ np.linalg.cholesky(covariance).T

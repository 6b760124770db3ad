"""Full-batch regression data modules: UCI gas sensor drift, UCI Abalone and a synthetic teacher problem."""

from overparam.data.abalone import AbaloneDataModule
from overparam.data.base import FullBatchLoader, FullBatchRegressionDataModule
from overparam.data.gas_sensor import GasSensorDataModule
from overparam.data.synthetic import SyntheticRegressionDataModule

__all__ = [
    "AbaloneDataModule",
    "FullBatchLoader",
    "FullBatchRegressionDataModule",
    "GasSensorDataModule",
    "SyntheticRegressionDataModule",
]

from overparam.models.linear_stack import LinearStack, balanced_factors
from overparam.models.losses import LpLoss
from overparam.models.optimum import LpOptimum, lp_optimum
from overparam.models.regressor import LinearStackRegressor

__all__ = ["LinearStack", "LinearStackRegressor", "LpLoss", "LpOptimum", "balanced_factors", "lp_optimum"]

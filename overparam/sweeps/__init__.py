"""Train many small deep linear networks at once, one member per sweep point."""

from overparam.sweeps.batched_optim import (
    BATCHED_OPTIMIZERS,
    BatchedAdadelta,
    BatchedAdagrad,
    BatchedAdam,
    BatchedOptimizer,
    BatchedRMSprop,
    BatchedSGD,
    make_batched_optimizer,
    resolve_batched_optimizer,
)
from overparam.sweeps.batched_stack import BatchedLinearStack, BatchedLpLoss
from overparam.sweeps.trainer import BatchedTrainingResult, train_batched

__all__ = [
    "BATCHED_OPTIMIZERS",
    "BatchedAdadelta",
    "BatchedAdagrad",
    "BatchedAdam",
    "BatchedLinearStack",
    "BatchedLpLoss",
    "BatchedOptimizer",
    "BatchedRMSprop",
    "BatchedSGD",
    "BatchedTrainingResult",
    "make_batched_optimizer",
    "resolve_batched_optimizer",
    "train_batched",
]

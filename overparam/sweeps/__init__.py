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
from overparam.sweeps.runner import (
    BatchSpec,
    MemberOutcome,
    SweepMember,
    SweepResult,
    available_memory,
    estimate_member_bytes,
    member_name,
    members_per_batch,
    run_sweep,
    write_logs,
)
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
    "BatchSpec",
    "MemberOutcome",
    "SweepMember",
    "SweepResult",
    "available_memory",
    "estimate_member_bytes",
    "make_batched_optimizer",
    "member_name",
    "members_per_batch",
    "resolve_batched_optimizer",
    "run_sweep",
    "train_batched",
    "write_logs",
]

"""A plain full-batch training loop for ``BatchedLinearStack`` with per-member divergence handling."""

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from overparam.sweeps.batched_optim import BatchedOptimizer
from overparam.sweeps.batched_stack import BatchedLinearStack, BatchedLpLoss

log = logging.getLogger(__name__)
# Progress lines of long runs have their own logger, so a caller can keep them while it silences
# the rest of this module.
progress_log = logging.getLogger(f"{__name__}.progress")


@dataclass
class BatchedTrainingResult:
    """Loss curves and divergence record of one ``train_batched`` run; tensors are on the features' device.

    Attributes:
        iterations: Logged iteration indices, shape ``(num_logged,)``.
        losses: Loss of each member at the start of each logged iteration, shape ``(num_logged, M)``;
            NaN once the member was frozen before that iteration, and for rows not reached after an early stop.
        final_losses: Loss of the parameters after the last iteration run, shape ``(M,)``; NaN for diverged members.
        diverged: Members that were frozen, shape ``(M,)``.
        diverged_at: Iteration of this call at which each member was frozen, -1 for members still active, shape ``(M,)``.
        iterations_run: Iterations actually run; fewer than requested when every member diverged.
    """

    iterations: Tensor
    losses: Tensor
    final_losses: Tensor
    diverged: Tensor
    diverged_at: Tensor
    iterations_run: int


def train_batched(
    model: BatchedLinearStack,
    features: Tensor,
    target: Tensor,
    p: float,
    optimizer: BatchedOptimizer,
    num_iterations: int,
    log_every: int = 1,
    inverse_p_factor: bool = False,
    divergence_bound: float | None = None,
    stop_when_all_diverged: bool = True,
    progress_seconds: float = 60.0,
) -> BatchedTrainingResult:
    """Train all members by full-batch steps on ``features`` and ``target`` with the per-member l_p loss.

    Iteration ``t`` computes every member's loss, freezes members whose loss is NaN, infinite or
    above ``divergence_bound``, backpropagates the sum of the other members' losses and steps the
    optimizer, which also freezes members whose update is not finite. The loop reads nothing back
    from the device except one check per log interval whether any member is still active, and only
    when ``stop_when_all_diverged`` is set.

    Args:
        model: Members to train, on the device and dtype of ``features``.
        features: Inputs of shape ``(n, input_size)``.
        target: Targets of shape ``(n, output_size)``, or ``(n,)`` for one output.
        p: Exponent of the l_p loss.
        optimizer: Batched optimizer over ``model.parameters()``.
        num_iterations: Number of full-batch steps.
        log_every: Record the losses of iterations ``0, log_every, 2 * log_every, ...``.
        inverse_p_factor: Multiply the loss by ``1/p``.
        divergence_bound: Freeze a member once its loss exceeds this value.
        stop_when_all_diverged: End early once every member is frozen.
        progress_seconds: Log the iteration, the active members and the time left this often, to
            the ``overparam.sweeps.trainer.progress`` logger, checked at logged iterations.
    """
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1, got {num_iterations}.")
    if log_every < 1:
        raise ValueError(f"log_every must be at least 1, got {log_every}.")
    device = features.device
    weight = model.weights[0]
    if weight.device != device or weight.dtype != features.dtype:
        raise ValueError(
            f"model is {weight.dtype} on {weight.device} but features are {features.dtype} on {device}; "
            "move the model before building its optimizer."
        )
    if optimizer.num_members != model.num_members:
        raise ValueError(f"optimizer has {optimizer.num_members} members but model has {model.num_members}.")
    target = target.to(device=device, dtype=features.dtype)

    loss_fn = BatchedLpLoss(p, inverse_p_factor)
    active = optimizer.active
    num_logged = math.ceil(num_iterations / log_every)
    curves = torch.full((num_logged, model.num_members), math.nan, dtype=features.dtype, device=device)
    iterations_active = torch.zeros(model.num_members, dtype=torch.int64, device=device)
    nan = features.new_full((), math.nan)
    zero = features.new_zeros(())
    log.info(
        "Training %d members for %d iterations on %s (%d rows, p=%g).",
        model.num_members, num_iterations, device, features.shape[0], p,
    )

    iterations_run = 0
    start = last_report = time.monotonic()
    for iteration in range(num_iterations):
        losses = loss_fn(model(features), target)
        detached = losses.detach()
        if iteration % log_every == 0:
            curves[iteration // log_every] = torch.where(active, detached, nan)
            if iteration > 0 and time.monotonic() - last_report >= progress_seconds:
                last_report = time.monotonic()
                _log_progress(iteration, num_iterations, int(active.sum()), model.num_members, last_report - start)

        healthy = torch.isfinite(detached)
        if divergence_bound is not None:
            healthy = healthy.logical_and_(detached <= divergence_bound)
        optimizer.freeze_unless(healthy)

        # Masking frozen members out of the sum keeps their NaN or infinite losses out of the total.
        # Their gradients may still be NaN, but the optimizer does not apply them.
        total = torch.where(active, losses, zero).sum()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        iterations_active.add_(active)
        iterations_run = iteration + 1

        if stop_when_all_diverged and iterations_run % log_every == 0 and not bool(active.any()):
            log.info("Every member diverged by iteration %d; stopping early.", iteration)
            break

    with torch.no_grad():
        final_losses = torch.where(active, loss_fn(model(features), target), nan)
    diverged = ~active
    diverged_at = torch.where(diverged, iterations_active, -1)
    log.info("Finished %d iterations; %d of %d members diverged.", iterations_run, int(diverged.sum()), model.num_members)
    return BatchedTrainingResult(
        iterations=torch.arange(0, num_iterations, log_every, device=device),
        losses=curves,
        final_losses=final_losses,
        diverged=diverged,
        diverged_at=diverged_at,
        iterations_run=iterations_run,
    )


def _log_progress(iteration: int, num_iterations: int, active: int, num_members: int, elapsed: float) -> None:
    rate = iteration / elapsed
    progress_log.info(
        "Iteration %s of %s (%.0f%%), %d of %d members active, %.0f it/s, about %.0f min left.",
        f"{iteration:,}", f"{num_iterations:,}", 100 * iteration / num_iterations, active, num_members,
        rate, (num_iterations - iteration) / rate / 60,
    )

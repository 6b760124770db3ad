"""Trial objectives computed from a run's training curve; every one is lower-is-better.

The curve is ``LinearStackRegressor.curve``: ``(iteration, train/loss)`` at every logged iteration
(``trainer.log_every_n_steps``) plus the loss after the last update. The gap is the training loss
minus ``loss_optimum``, the minimum over linear maps. When the optimum is unknown (networks with
bias), the gap is the training loss itself.

- ``final_gap``: the gap after the last iteration.
- ``iterations_to_gap``: the first logged iteration whose gap is at or below ``gap_threshold``. A run
  that never reaches it scores ``max_steps + 1``, so all such runs tie behind every run that does.
  With ``max_steps`` unset (-1), the penalty is the last logged iteration + 1. The resolution is
  ``log_every_n_steps``.
- ``auc_log_gap``: the mean of ``log10(gap)`` over the logged iterations, an area under the
  log-gap curve that rewards the fastest convergence; gaps below ``gap_floor`` (float rounding can
  give a gap at or below zero) count as ``gap_floor``. With an even ``log_every_n_steps`` this is
  the area divided by the number of points.
"""

import math
from collections.abc import Sequence

from overparam.tuning.search_space import DEFAULT_GAP_FLOOR, OBJECTIVES


def compute_objective(
    name: str,
    curve: Sequence[tuple[int, float]],
    loss_optimum: float | None,
    *,
    max_steps: int = -1,
    gap_threshold: float | None = None,
    gap_floor: float = DEFAULT_GAP_FLOOR,
) -> float:
    """Return objective ``name`` of ``curve``; raise ``ValueError`` on an empty or non-finite curve."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}.")
    if not curve:
        raise ValueError("The training curve is empty; the run logged no iteration.")
    gaps = [(iteration, _gap(loss, loss_optimum)) for iteration, loss in curve]
    bad = next(((iteration, gap) for iteration, gap in gaps if not math.isfinite(gap)), None)
    if bad is not None:
        raise ValueError(f"The training loss at iteration {bad[0]} is {bad[1]}; a diverged run has no objective.")

    if name == "final_gap":
        return gaps[-1][1]
    if name == "iterations_to_gap":
        if gap_threshold is None:
            raise ValueError("Objective iterations_to_gap needs gap_threshold.")
        for iteration, gap in gaps:
            if gap <= gap_threshold:
                return float(iteration)
        penalty = max_steps if max_steps > 0 else gaps[-1][0]
        return float(penalty + 1)
    return sum(math.log10(max(gap, gap_floor)) for _, gap in gaps) / len(gaps)


def _gap(loss: float, loss_optimum: float | None) -> float:
    return loss if loss_optimum is None else loss - loss_optimum

"""Learning-rate choice, gap levels, crossovers and claim verdicts on loss-gap curves.

Everything here works on plain arrays of the training loss minus its optimum (the gap) at logged
iterations, so it runs on synthetic curves as well as on training results. The central curve of a
model is the geometric mean of its seeds' gaps (the mean of log10 gaps) and its band is the
minimum and maximum over seeds, matching a log-y plot.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from overparam.reproduce.spec import ClaimSpec

REPRODUCED = "reproduced"
PARTLY = "partly reproduced"
NOT_REPRODUCED = "not reproduced"

# Gaps below this fraction of the optimum L* are float32 rounding (the loss is a float32 mean over
# the rows), so they are clipped there before taking logarithms.
GAP_FLOOR_RELATIVE = 1e-6
# Two central curves closer than this many decades count as equal when looking for crossovers.
CROSSOVER_TIE_DECADES = 0.01
DEFAULT_GAP_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4)
# The verdict rule of each claim kind, as ``evaluate_claim`` applies it, for reports.
RULES = {
    "ends_below": "reproduced when every seed of the model ends below every seed of the baseline and the geometric "
    "means are `factor` apart; partly when only the geometric mean is lower; otherwise not reproduced.",
    "overtakes": "as ends_below, and the model's central curve must first be above the baseline's and then cross "
    "below it; clearly lower without such a crossover is partly.",
    "not_faster": "reproduced when the model's final geometric mean is at most `tolerance` times below the "
    "baseline's; not reproduced when every seed is below every baseline seed by more; otherwise partly.",
    "tracks": "reproduced when the central curves stay within `tolerance` decades at every logged iteration; partly "
    "when that holds for the first half of the horizon or at the median iteration; not reproduced otherwise or "
    "when a seed diverged.",
    "stalls": "reproduced when every seed ends, without diverging, at `min_ratio` of its starting gap or above; partly for some seeds.",
}


def gap_floor(loss_optimum: float) -> float:
    """Return the smallest gap that is resolved for an optimum ``loss_optimum``."""
    return max(GAP_FLOOR_RELATIVE * abs(loss_optimum), 1e-12)


def lr_grid(low: float, high: float, points_per_decade: int) -> list[float]:
    """Return the log-spaced rates ``10**(k / points_per_decade)`` from ``low`` to ``high``, rounded to 3 digits.

    The ends snap to the nearest grid point, so ``[1e-4, 1e-1]`` at 2 per decade gives
    1e-4, 3.16e-4, ..., 1e-1.
    """
    if not 0 < low <= high:
        raise ValueError(f"lr_grid needs 0 < low <= high, got low={low} and high={high}.")
    if points_per_decade < 1:
        raise ValueError(f"points_per_decade must be at least 1, got {points_per_decade}.")
    first = round(math.log10(low) * points_per_decade)
    last = round(math.log10(high) * points_per_decade)
    return [_grid_point(k, points_per_decade) for k in range(first, max(first, last) + 1)]


def widen_grid(grid: Sequence[float], side: str, points_per_decade: int) -> float:
    """Return the next grid point beyond the ``low`` or ``high`` end of ``grid``."""
    if side == "low":
        return _grid_point(round(math.log10(min(grid)) * points_per_decade) - 1, points_per_decade)
    if side == "high":
        return _grid_point(round(math.log10(max(grid)) * points_per_decade) + 1, points_per_decade)
    raise ValueError(f"side must be 'low' or 'high', got {side!r}.")


def _grid_point(exponent: int, points_per_decade: int) -> float:
    return float(f"{10.0 ** (exponent / points_per_decade):.3g}")


def log_gaps(gaps: np.ndarray, floor: float) -> np.ndarray:
    """Return log10 of the gaps clipped at ``floor``; NaN (a diverged run) stays NaN."""
    gaps = np.asarray(gaps, dtype=float)
    return np.log10(np.where(np.isnan(gaps), np.nan, np.maximum(gaps, floor)))


def curve_score(gaps: np.ndarray, floor: float) -> float:
    """Return the mean log10 gap over the logged iterations, the normalized area under the log-gap curve.

    Logged iterations are equally spaced (except the final point), so the mean is the area divided
    by the horizon. A curve with a NaN (it diverged) scores infinity.
    """
    logs = log_gaps(gaps, floor)
    if logs.size == 0 or np.isnan(logs).any():
        return math.inf
    return float(logs.mean())


@dataclass
class LrCandidate:
    """The runs of one learning rate: one score, final gap and divergence iteration per seed."""

    lr: float
    scores: list[float]
    final_gaps: list[float]
    diverged_at: list[int | None]

    @property
    def diverged(self) -> bool:
        return any(at is not None for at in self.diverged_at)

    @property
    def score(self) -> float:
        return math.inf if self.diverged else float(np.mean(self.scores))


@dataclass
class LrChoice:
    """The chosen rate (None when every candidate diverged) and the edge of the grid it sits on, if any."""

    lr: float | None
    edge: str | None
    grid: list[float]


def choose_lr(candidates: Sequence[LrCandidate]) -> LrChoice:
    """Choose the rate with the lowest mean score over seeds among rates where no seed diverged.

    Ties go to the smaller rate. ``edge`` is ``low`` or ``high`` when the choice is the smallest or
    largest rate of the grid, and ``low`` when every rate diverged, since only smaller rates can help.
    """
    if not candidates:
        raise ValueError("choose_lr needs at least one candidate learning rate.")
    grid = sorted(candidate.lr for candidate in candidates)
    stable = [candidate for candidate in candidates if not candidate.diverged]
    if not stable:
        return LrChoice(None, "low", grid)
    best = min(stable, key=lambda candidate: (candidate.score, candidate.lr))
    edge = None
    if len(grid) == 1:
        edge = "both"
    elif best.lr == grid[0]:
        edge = "low"
    elif best.lr == grid[-1]:
        edge = "high"
    return LrChoice(best.lr, edge, grid)


@dataclass
class ModelCurves:
    """Gap curves of one model at its chosen rate: ``gaps`` has shape (iterations, seeds), NaN after divergence."""

    key: str
    label: str
    iterations: np.ndarray
    gaps: np.ndarray
    seeds: list[int]
    diverged_at: list[int | None]
    floor: float

    @property
    def horizon(self) -> int:
        return int(self.iterations[-1])

    def central(self) -> np.ndarray:
        """Return the geometric mean over seeds at each iteration; NaN where any seed has diverged."""
        return 10.0 ** log_gaps(self.gaps, self.floor).mean(axis=1)

    def band(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the minimum and maximum gap over the seeds that have not diverged, clipped at the floor."""
        clipped = np.where(np.isnan(self.gaps), np.nan, np.maximum(self.gaps, self.floor))
        with np.errstate(all="ignore"):
            if np.isnan(clipped).all(axis=1).any():
                low = np.full(len(clipped), np.nan)
                high = np.full(len(clipped), np.nan)
                rows = ~np.isnan(clipped).all(axis=1)
                low[rows] = np.nanmin(clipped[rows], axis=1)
                high[rows] = np.nanmax(clipped[rows], axis=1)
                return low, high
            return np.nanmin(clipped, axis=1), np.nanmax(clipped, axis=1)

    def index_at(self, iteration: int) -> int:
        """Return the index of the last logged iteration at or before ``iteration``."""
        index = int(np.searchsorted(self.iterations, iteration, side="right")) - 1
        return max(index, 0)

    def gaps_at(self, iteration: int | None = None) -> np.ndarray:
        """Return every seed's gap at ``iteration`` (default: the horizon); a diverged seed gives infinity."""
        row = self.gaps[-1 if iteration is None else self.index_at(iteration)]
        return np.where(np.isnan(row), np.inf, np.maximum(row, self.floor))

    def final_stats(self) -> dict[str, float]:
        """Return the mean, minimum, maximum and geometric mean over seeds of the final gap."""
        final = self.gaps_at()
        finite = final[np.isfinite(final)]
        if finite.size < final.size:
            return {"mean": math.inf, "min": float(final.min()), "max": math.inf, "geometric_mean": math.inf}
        return {
            "mean": float(final.mean()),
            "min": float(final.min()),
            "max": float(final.max()),
            "geometric_mean": float(10.0 ** np.log10(final).mean()),
        }


def first_reach(iterations: np.ndarray, curve: np.ndarray, level: float) -> int | None:
    """Return the first logged iteration where ``curve`` is at or below ``level``, or None."""
    below = np.flatnonzero(np.asarray(curve) <= level)
    return int(iterations[below[0]]) if below.size else None


@dataclass(frozen=True)
class Crossover:
    """The iteration at which curve ``a`` crosses curve ``b``, and whether ``a`` is below ``b`` after it."""

    iteration: int
    a_below_after: bool


def crossovers(iterations: np.ndarray, a: np.ndarray, b: np.ndarray, tie: float = CROSSOVER_TIE_DECADES) -> list[Crossover]:
    """Return the iterations where the log10 difference of two curves changes sign.

    Points where either curve is NaN are skipped, and differences within ``tie`` decades keep the
    previous sign, so two curves that run together (two stalled models) do not produce crossings
    from rounding noise.
    """
    with np.errstate(all="ignore"):
        difference = np.log10(np.asarray(a, dtype=float)) - np.log10(np.asarray(b, dtype=float))
    found = []
    sign = 0
    for iteration, value in zip(iterations, difference):
        if not np.isfinite(value) or abs(value) <= tie:
            continue
        current = 1 if value > 0 else -1
        if sign != 0 and current != sign:
            found.append(Crossover(int(iteration), current < 0))
        sign = current
    return found


@dataclass
class ClaimResult:
    """Verdict on one claim with the sentence and numbers that support it."""

    claim: ClaimSpec
    verdict: str
    evidence: str
    numbers: dict[str, float | int | None] = field(default_factory=dict)


def evaluate_claim(claim: ClaimSpec, curves: dict[str, ModelCurves], scale: float = 1.0) -> ClaimResult:
    """Test ``claim`` on the chosen-rate curves of its models with the rule of its kind.

    Rules ("clearly" means that every seed of one model is beyond every seed of the other):

    - ``ends_below``: at the common horizon (or ``at`` times ``scale``), the model is clearly below
      the baseline with geometric means ``factor`` apart: reproduced. Lower geometric mean only: partly.
    - ``overtakes``: as ``ends_below`` and, in addition, the model's central curve was above the
      baseline's before a crossover. Clearly below but never above: partly.
    - ``not_faster``: the model's final geometric mean is no more than ``tolerance`` times below
      the baseline's: reproduced. Clearly below by more: not reproduced. Otherwise partly.
    - ``tracks``: the central curves stay within ``tolerance`` decades over the common horizon:
      reproduced. Within it for the first half, or at the median logged iteration: partly. A
      diverged seed: not reproduced.
    - ``stalls``: every seed ends at ``min_ratio`` of its starting gap or above: reproduced; some seeds: partly.
    """
    missing = [key for key in (claim.model, claim.baseline) if key is not None and key not in curves]
    if missing:
        return ClaimResult(claim, NOT_REPRODUCED, f"every learning rate of {', '.join(missing)} diverged")
    model = curves[claim.model]
    baseline = curves.get(claim.baseline) if claim.baseline else None
    kind = claim.kind
    if kind == "ends_below":
        at = claim.params.get("at")
        return _ends_below(claim, model, baseline, None if at is None else int(round(at * scale)))
    if kind == "overtakes":
        return _overtakes(claim, model, baseline)
    if kind == "not_faster":
        return _not_faster(claim, model, baseline)
    if kind == "tracks":
        return _tracks(claim, model, baseline)
    if kind == "stalls":
        return _stalls(claim, model)
    raise ValueError(f"unknown claim kind {kind!r}")


def _comparison(model: ModelCurves, baseline: ModelCurves, at: int | None) -> dict:
    iteration = min(model.horizon, baseline.horizon) if at is None else min(at, model.horizon, baseline.horizon)
    model_gaps = model.gaps_at(iteration)
    baseline_gaps = baseline.gaps_at(iteration)
    with np.errstate(all="ignore"):
        model_mean = float(10.0 ** np.log10(model_gaps).mean())
        baseline_mean = float(10.0 ** np.log10(baseline_gaps).mean())
    return {
        "iteration": int(model.iterations[model.index_at(iteration)]),
        "model_gmean": model_mean,
        "baseline_gmean": baseline_mean,
        "model_max": float(model_gaps.max()),
        "model_min": float(model_gaps.min()),
        "baseline_min": float(baseline_gaps.min()),
        "baseline_max": float(baseline_gaps.max()),
        "ratio": baseline_mean / model_mean if model_mean > 0 else math.inf,
    }


def _describe(numbers: dict, model: ModelCurves, baseline: ModelCurves) -> str:
    return (
        f"at iteration {numbers['iteration']:,}: {model.label} gap {_fmt(numbers['model_gmean'])} "
        f"(seeds {_fmt(numbers['model_min'])} to {_fmt(numbers['model_max'])}) vs {baseline.label} "
        f"{_fmt(numbers['baseline_gmean'])} (seeds {_fmt(numbers['baseline_min'])} to {_fmt(numbers['baseline_max'])}); "
        f"ratio {_fmt(numbers['ratio'])}"
    )


def _ends_below(claim: ClaimSpec, model: ModelCurves, baseline: ModelCurves, at: int | None) -> ClaimResult:
    factor = claim.params.get("factor", 1.0)
    numbers = _comparison(model, baseline, at)
    clearly = numbers["model_max"] < numbers["baseline_min"] and numbers["ratio"] >= factor
    if clearly:
        verdict = REPRODUCED
    elif numbers["model_gmean"] < numbers["baseline_gmean"]:
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    evidence = _describe(numbers, model, baseline)
    if factor > 1:
        evidence += f" (required: every seed lower and a ratio of at least {factor:g})"
    return ClaimResult(claim, verdict, evidence, numbers)


def _overtakes(claim: ClaimSpec, model: ModelCurves, baseline: ModelCurves) -> ClaimResult:
    result = _ends_below(claim, model, baseline, None)
    horizon = result.numbers["iteration"]
    end_a = model.index_at(horizon) + 1
    end_b = baseline.index_at(horizon) + 1
    common = np.intersect1d(model.iterations[:end_a], baseline.iterations[:end_b])
    a = model.central()[np.searchsorted(model.iterations, common)]
    b = baseline.central()[np.searchsorted(baseline.iterations, common)]
    crossings = crossovers(common, a, b)
    downward = [crossing.iteration for crossing in crossings if crossing.a_below_after]
    result.numbers["last_crossover"] = downward[-1] if downward else None
    result.numbers["crossovers"] = len(crossings)

    if downward:
        result.evidence += f"; {model.label} crosses below {baseline.label} at iteration {downward[-1]:,}"
    else:
        result.evidence += f"; no crossover: {model.label} is never above {baseline.label} and then below it"
    if result.verdict == REPRODUCED and not downward:
        result.verdict = PARTLY
    return result


def _not_faster(claim: ClaimSpec, model: ModelCurves, baseline: ModelCurves) -> ClaimResult:
    tolerance = claim.params.get("tolerance", 1.5)
    numbers = _comparison(model, baseline, None)
    clearly_lower = numbers["model_max"] < numbers["baseline_min"] and numbers["ratio"] > tolerance
    if numbers["ratio"] <= tolerance:
        verdict = REPRODUCED
    elif clearly_lower:
        verdict = NOT_REPRODUCED
    else:
        verdict = PARTLY
    evidence = _describe(numbers, model, baseline) + f" (depth counts as helping above a ratio of {tolerance:g})"
    return ClaimResult(claim, verdict, evidence, numbers)


def _tracks(claim: ClaimSpec, model: ModelCurves, reference: ModelCurves) -> ClaimResult:
    tolerance = claim.params.get("tolerance", 0.1)
    diverged = [
        f"{curves.label} seed {seed} diverged at iteration {at:,}"
        for curves in (model, reference)
        for seed, at in zip(curves.seeds, curves.diverged_at)
        if at is not None
    ]
    common, model_index, reference_index = np.intersect1d(model.iterations, reference.iterations, return_indices=True)
    with np.errstate(all="ignore"):
        deviation = np.abs(
            np.log10(model.central()[model_index]) - np.log10(reference.central()[reference_index])
        )
    finite = np.isfinite(deviation)
    numbers: dict[str, float | int | None] = {
        "max_deviation_decades": float(deviation[finite].max()) if finite.any() else None,
        "median_deviation_decades": float(np.median(deviation[finite])) if finite.any() else None,
        "first_exceeds_at": None,
    }
    beyond = np.flatnonzero(finite & (deviation > tolerance))
    if beyond.size:
        numbers["first_exceeds_at"] = int(common[beyond[0]])

    if diverged:
        verdict = NOT_REPRODUCED
        evidence = "; ".join(diverged)
        if numbers["max_deviation_decades"] is not None:
            evidence += f"; before that the curves differ by up to {numbers['max_deviation_decades']:.3f} decades"
        return ClaimResult(claim, verdict, evidence, numbers)

    half = common[-1] / 2 if common.size else 0
    evidence = (
        f"{model.label} vs {reference.label}: largest difference {numbers['max_deviation_decades']:.3f} decades "
        f"(median {numbers['median_deviation_decades']:.3f}; tolerance {tolerance:g})"
    )
    if not beyond.size:
        verdict = REPRODUCED
    elif common[beyond[0]] > half:
        verdict = PARTLY
        evidence += f"; first beyond the tolerance at iteration {int(common[beyond[0]]):,}, after half the horizon"
    elif numbers["median_deviation_decades"] <= tolerance:
        verdict = PARTLY
        evidence += (
            f"; beyond the tolerance from iteration {int(common[beyond[0]]):,} at "
            f"{beyond.size} of {int(finite.sum())} logged iterations"
        )
    else:
        verdict = NOT_REPRODUCED
        evidence += f"; first beyond the tolerance at iteration {int(common[beyond[0]]):,}"
    return ClaimResult(claim, verdict, evidence, numbers)


def _stalls(claim: ClaimSpec, model: ModelCurves) -> ClaimResult:
    min_ratio = claim.params.get("min_ratio", 0.9)
    start = np.maximum(model.gaps[0], model.floor)
    end = model.gaps_at()
    ratios = end / start
    # A diverged seed (infinite end) left its start, so it does not count as stalled.
    stalled = int(((ratios >= min_ratio) & np.isfinite(end)).sum())
    diverged = int((~np.isfinite(end)).sum())
    numbers = {
        "start_gmean": float(10.0 ** np.log10(start).mean()),
        "end_gmean": float(10.0 ** np.log10(end).mean()) if np.isfinite(end).all() else math.inf,
        "min_ratio_end_to_start": float(ratios.min()),
        "stalled_seeds": stalled,
    }
    if stalled == len(ratios):
        verdict = REPRODUCED
    elif stalled:
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    evidence = (
        f"{model.label}: gap {_fmt(numbers['start_gmean'])} at iteration 0, {_fmt(numbers['end_gmean'])} at "
        f"iteration {model.horizon:,}; {stalled} of {len(ratios)} seeds end at {min_ratio:g} of their start or above "
        f"(lowest end/start ratio {ratios.min():.3g})"
    )
    if diverged:
        evidence += f"; {diverged} of {len(ratios)} seeds diverged"
    return ClaimResult(claim, verdict, evidence, numbers)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return "diverged" if value > 0 else str(value)
    return f"{value:.3g}"

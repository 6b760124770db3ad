import math

import numpy as np
import pytest

from overparam.reproduce.analysis import (
    NOT_REPRODUCED,
    PARTLY,
    REPRODUCED,
    LrCandidate,
    ModelCurves,
    choose_lr,
    crossovers,
    curve_score,
    evaluate_claim,
    first_reach,
    lr_grid,
    widen_grid,
)
from overparam.reproduce.spec import CLAIM_KINDS, ClaimSpec

ITERATIONS = np.arange(0, 1001, 10)


def curves(key: str, per_seed: list[np.ndarray], diverged_at=None, iterations=ITERATIONS) -> ModelCurves:
    gaps = np.stack(per_seed, axis=1)
    return ModelCurves(
        key=key,
        label=key,
        iterations=iterations,
        gaps=gaps,
        seeds=list(range(len(per_seed))),
        diverged_at=diverged_at or [None] * len(per_seed),
        floor=1e-9,
    )


def decay(rate: float, start: float = 1.0, iterations=ITERATIONS) -> np.ndarray:
    return start * np.exp(-rate * iterations)


def claim(kind: str, model: str = "a", baseline: str | None = "b", **params) -> ClaimSpec:
    return ClaimSpec("c", "text", kind, model, baseline, {**CLAIM_KINDS[kind], **params})


def test_lr_grid_half_decades():
    grid = lr_grid(1e-4, 1e-1, 2)
    assert grid == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1]
    assert lr_grid(3.16e-6, 1e-4, 2) == [3.16e-6, 1e-5, 3.16e-5, 1e-4]
    assert lr_grid(1e-3, 1e-3, 2) == [1e-3]
    with pytest.raises(ValueError, match="low <= high"):
        lr_grid(1e-1, 1e-3, 2)


def test_widen_grid_adds_one_step():
    grid = [1e-4, 3.16e-4, 1e-3]
    assert widen_grid(grid, "low", 2) == 3.16e-5
    assert widen_grid(grid, "high", 2) == 3.16e-3
    assert widen_grid([1e-2], "high", 1) == 1e-1
    with pytest.raises(ValueError, match="side"):
        widen_grid(grid, "middle", 2)


def test_curve_score_mean_log10():
    assert curve_score(np.array([1.0, 0.1, 0.01]), 1e-9) == pytest.approx(-1.0)
    assert curve_score(np.array([1.0, np.nan]), 1e-9) == math.inf
    # Negative gaps from rounding are clipped at the floor.
    assert curve_score(np.array([-1e-12, 1e-12]), 1e-9) == pytest.approx(-9.0)


def test_choose_lr_lowest_score_without_divergence():
    candidates = [
        LrCandidate(1e-3, [-1.0, -1.2], [0.1, 0.1], [None, None]),
        LrCandidate(1e-2, [-2.0, -2.2], [0.01, 0.01], [None, None]),
        LrCandidate(1e-1, [-5.0, math.inf], [1e-5, math.nan], [None, 900]),
    ]
    choice = choose_lr(candidates)
    assert choice.lr == 1e-2
    assert choice.edge is None
    assert choice.grid == [1e-3, 1e-2, 1e-1]


def test_choose_lr_edges():
    high = [LrCandidate(1e-3, [-1.0], [0.1], [None]), LrCandidate(1e-2, [-2.0], [0.01], [None])]
    assert choose_lr(high).edge == "high"
    low = [LrCandidate(1e-3, [-3.0], [0.1], [None]), LrCandidate(1e-2, [-2.0], [0.01], [None])]
    assert choose_lr(low).edge == "low"
    diverged = [LrCandidate(1e-3, [math.inf], [math.nan], [5]), LrCandidate(1e-2, [math.inf], [math.nan], [2])]
    choice = choose_lr(diverged)
    assert choice.lr is None
    assert choice.edge == "low"
    assert choose_lr([LrCandidate(1e-3, [-1.0], [0.1], [None])]).edge == "both"


def test_choose_lr_ties_go_to_smaller_rate():
    tied = [LrCandidate(1e-2, [-1.0], [0.1], [None]), LrCandidate(1e-3, [-1.0], [0.1], [None]),
            LrCandidate(1e-4, [0.0], [1.0], [None])]
    assert choose_lr(tied).lr == 1e-3


def test_model_curves_central_and_band():
    model = curves("a", [np.full(ITERATIONS.shape, 1e-2), np.full(ITERATIONS.shape, 1e-4)])
    np.testing.assert_allclose(model.central(), 1e-3)
    low, high = model.band()
    np.testing.assert_allclose(low, 1e-4)
    np.testing.assert_allclose(high, 1e-2)
    stats = model.final_stats()
    assert stats["min"] == pytest.approx(1e-4)
    assert stats["max"] == pytest.approx(1e-2)
    assert stats["mean"] == pytest.approx(0.00505)
    assert stats["geometric_mean"] == pytest.approx(1e-3)


def test_first_reach_levels():
    gap = decay(0.01)
    assert first_reach(ITERATIONS, gap, 1e-1) == 240  # exp(-2.4) = 0.0907, exp(-2.3) = 0.1003
    assert first_reach(ITERATIONS, gap, 1e-9) is None


def test_crossovers_finds_sign_change_and_ignores_ties():
    slow_start = 10.0 * decay(0.02)
    steady = decay(0.005)
    found = crossovers(ITERATIONS, slow_start, steady)
    assert len(found) == 1
    # 10 exp(-0.02 t) = exp(-0.005 t) at t = ln(10) / 0.015 = 153.5, so the first logged point below is 160.
    assert found[0].iteration == 160
    assert found[0].a_below_after
    assert crossovers(ITERATIONS, steady, steady * (1 + 1e-4)) == []


def test_ends_below_verdicts():
    base = curves("b", [decay(0.001), decay(0.001) * 1.1, decay(0.001) * 0.9])
    clearly = curves("a", [decay(0.004), decay(0.004) * 1.1, decay(0.004) * 0.9])
    result = evaluate_claim(claim("ends_below", factor=2), {"a": clearly, "b": base})
    assert result.verdict == REPRODUCED
    assert result.numbers["ratio"] == pytest.approx(math.exp(3), rel=1e-6)

    overlapping = curves("a", [decay(0.001) * 0.5, decay(0.001) * 0.5, decay(0.001) * 1.05])
    assert evaluate_claim(claim("ends_below"), {"a": overlapping, "b": base}).verdict == PARTLY
    assert evaluate_claim(claim("ends_below"), {"a": base, "b": clearly}).verdict == NOT_REPRODUCED
    # Clearly lower but not by the required factor.
    near = curves("a", [decay(0.001) * 0.7] * 3)
    assert evaluate_claim(claim("ends_below", factor=2), {"a": near, "b": curves("b", [decay(0.001)] * 3)}).verdict == PARTLY


def test_ends_below_at_common_horizon_and_scaled_iteration():
    short_iterations = np.arange(0, 201, 10)
    fast_short = curves("a", [decay(0.02, iterations=short_iterations)] * 3, iterations=short_iterations)
    slow_long = curves("b", [decay(0.001)] * 3)
    result = evaluate_claim(claim("ends_below"), {"a": fast_short, "b": slow_long})
    assert result.numbers["iteration"] == 200
    assert result.verdict == REPRODUCED

    # at = 5000 at scale 0.01 compares at iteration 50.
    result = evaluate_claim(claim("ends_below", at=5000), {"a": fast_short, "b": slow_long}, scale=0.01)
    assert result.numbers["iteration"] == 50


def test_ends_below_diverged_model_is_not_reproduced():
    gaps = decay(0.004)
    broken = gaps.copy()
    broken[50:] = np.nan
    model = curves("a", [gaps, gaps, broken], diverged_at=[None, None, 495])
    result = evaluate_claim(claim("ends_below"), {"a": model, "b": curves("b", [decay(0.001)] * 3)})
    assert result.verdict == NOT_REPRODUCED
    assert "diverged" in result.evidence


def test_overtakes_needs_a_crossover():
    baseline = curves("b", [decay(0.002)] * 3)
    late_fast = curves("a", [3.0 * decay(0.006)] * 3)
    result = evaluate_claim(claim("overtakes", factor=2), {"a": late_fast, "b": baseline})
    assert result.verdict == REPRODUCED
    # The curves meet at t = ln(3) / 0.004 = 274.7; at 280 they are still within the 0.01-decade tie.
    assert result.numbers["last_crossover"] == 290

    always_below = curves("a", [0.5 * decay(0.006)] * 3)
    result = evaluate_claim(claim("overtakes", factor=2), {"a": always_below, "b": baseline})
    assert result.verdict == PARTLY
    assert "no crossover" in result.evidence


def test_not_faster_verdicts():
    baseline = curves("b", [decay(0.003) * s for s in (0.9, 1.0, 1.1)])
    slower = curves("a", [decay(0.0025)] * 3)
    assert evaluate_claim(claim("not_faster"), {"a": slower, "b": baseline}).verdict == REPRODUCED
    much_faster = curves("a", [decay(0.006)] * 3)
    assert evaluate_claim(claim("not_faster"), {"a": much_faster, "b": baseline}).verdict == NOT_REPRODUCED
    # Twice as low on average, but one seed overlaps the baseline's band.
    mixed = curves("a", [decay(0.003) * 0.2, decay(0.003) * 0.2, decay(0.003) * 1.0])
    assert evaluate_claim(claim("not_faster"), {"a": mixed, "b": baseline}).verdict == PARTLY


def test_tracks_verdicts():
    reference = curves("b", [decay(0.003)] * 3)
    close = curves("a", [decay(0.003) * 1.1] * 3)
    result = evaluate_claim(claim("tracks", tolerance=0.1), {"a": close, "b": reference})
    assert result.verdict == REPRODUCED
    assert result.numbers["max_deviation_decades"] == pytest.approx(math.log10(1.1))

    # Drifts apart only in the second half of the horizon.
    late = decay(0.003) * np.where(ITERATIONS > 800, 2.0, 1.0)
    result = evaluate_claim(claim("tracks", tolerance=0.1), {"a": curves("a", [late] * 3), "b": reference})
    assert result.verdict == PARTLY
    assert result.numbers["first_exceeds_at"] == 810

    early = decay(0.003) * np.where(ITERATIONS > 100, 2.0, 1.0)
    assert evaluate_claim(claim("tracks"), {"a": curves("a", [early] * 3), "b": reference}).verdict == NOT_REPRODUCED

    # An early transient only: beyond the tolerance for 10 of 101 points, close at the median.
    transient = decay(0.003) * np.where((ITERATIONS > 50) & (ITERATIONS <= 150), 2.0, 1.0)
    result = evaluate_claim(claim("tracks"), {"a": curves("a", [transient] * 3), "b": reference})
    assert result.verdict == PARTLY
    assert "at 10 of 101 logged iterations" in result.evidence

    broken = decay(0.003).copy()
    broken[20:] = np.nan
    diverged = curves("a", [broken] * 3, diverged_at=[195, 196, 197])
    result = evaluate_claim(claim("tracks"), {"a": diverged, "b": reference})
    assert result.verdict == NOT_REPRODUCED
    assert "seed 0 diverged at iteration 195" in result.evidence


def test_stalls_verdicts():
    flat = curves("a", [np.full(ITERATIONS.shape, 5.0) * (1 - 1e-6 * ITERATIONS)] * 3)
    assert evaluate_claim(claim("stalls", baseline=None), {"a": flat}).verdict == REPRODUCED
    some = curves("a", [np.full(ITERATIONS.shape, 5.0), np.full(ITERATIONS.shape, 5.0), 5.0 * decay(0.01)])
    assert evaluate_claim(claim("stalls", baseline=None), {"a": some}).verdict == PARTLY
    moving = curves("a", [decay(0.01)] * 3)
    result = evaluate_claim(claim("stalls", baseline=None), {"a": moving})
    assert result.verdict == NOT_REPRODUCED
    assert result.numbers["stalled_seeds"] == 0


def test_diverged_seed_does_not_stall():
    blown_up = np.full(ITERATIONS.shape, 5.0)
    blown_up[-10:] = np.nan
    model = curves("a", [np.full(ITERATIONS.shape, 5.0)] * 2 + [blown_up], diverged_at=[None, None, 190])
    result = evaluate_claim(claim("stalls", baseline=None), {"a": model})

    assert result.verdict == PARTLY
    assert result.numbers["stalled_seeds"] == 2
    assert "1 of 3 seeds diverged" in result.evidence


def test_claim_on_model_without_curves():
    result = evaluate_claim(claim("ends_below"), {"b": curves("b", [decay(0.001)] * 3)})
    assert result.verdict == NOT_REPRODUCED
    assert "every learning rate of a diverged" in result.evidence

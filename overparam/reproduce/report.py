"""Output files of ``overparam reproduce``: curves, summary and tuning tables (CSV) and ``report.md``."""

import math
import platform
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from overparam.reproduce.analysis import (
    DEFAULT_GAP_LEVELS,
    GAP_FLOOR_RELATIVE,
    NOT_REPRODUCED,
    PARTLY,
    REPRODUCED,
    RULES,
    ClaimResult,
    crossovers,
    first_reach,
)
from overparam.reproduce.plot import BAND_DESCRIPTION
from overparam.reproduce.runs import ExperimentRuns, ModelResult

SUMMARY_COLUMNS = (
    "experiment", "scale", "panel", "model", "label", "p", "depth", "hidden_width", "init", "init_std",
    "optimizer", "iterations", "seeds", "lr_tuned", "lr", "lr_grid", "lr_on_edge", "lr_widened",
    "diverged_candidates", "final_gap_mean", "final_gap_min", "final_gap_max", "final_gap_geometric_mean",
    *(f"iterations_to_gap_{level:.0e}" for level in DEFAULT_GAP_LEVELS),
    "crossovers", "balancedness_initial", "end_to_end_norm_start", "relative_imbalance_start", "relative_imbalance_end",
    "train_seconds", "cached_runs",
)


@dataclass
class ReportTiming:
    """Wall time of one command, in seconds."""

    total: float


def model_crossovers(runs: ExperimentRuns) -> list[dict]:
    """Return every crossover between the central curves of two models of one panel."""
    rows = []
    for panel in runs.spec.panels:
        for a, b in combinations(panel.models, 2):
            curves_a = runs.models[a].curves
            curves_b = runs.models[b].curves
            if curves_a is None or curves_b is None:
                continue
            common, index_a, index_b = np.intersect1d(curves_a.iterations, curves_b.iterations, return_indices=True)
            for crossing in crossovers(common, curves_a.central()[index_a], curves_b.central()[index_b]):
                rows.append({
                    "panel": panel.name,
                    "model_a": a,
                    "model_b": b,
                    "iteration": crossing.iteration,
                    "a_below_after": crossing.a_below_after,
                })
    return rows


def balance_numbers(result: ModelResult) -> dict[str, float | None]:
    """Return the mean initial balancedness and the imbalance relative to ``||W_e||^(2/N)`` at start and end.

    A balanced depth-N network with a rank-1 end-to-end matrix ``W_e`` has ``||W_j||_F^2 = ||W_e||_F^(2/N)``
    for every layer, so the ratio compares the imbalance with the size of balanced layers.
    NOTE: the end value divides the initial balancedness by the final ``||W_e||^(2/N)``. Gradient
    flow conserves ``W_{j+1}^T W_{j+1} - W_j W_j^T`` exactly and gradient descent up to O(lr^2) per
    step, but the final layers themselves are not read back.
    """
    empty = {
        "balancedness_initial": None,
        "end_to_end_norm_start": None,
        "relative_imbalance_start": None,
        "relative_imbalance_end": None,
    }
    model = result.model
    if model.depth < 2 or not result.starts:
        return empty
    power = 2.0 / model.depth
    balanced = [start.balancedness for start in result.starts.values()]
    start_ratio = [
        start.balancedness / max(float(torch.linalg.matrix_norm(start.end_to_end.double())) ** power, 1e-300)
        for start in result.starts.values()
    ]
    end_ratio = []
    if result.choice is not None and result.choice.lr is not None:
        for seed, start in result.starts.items():
            run = result.runs.get((result.choice.lr, seed))
            if run is not None and run.diverged_at is None:
                end_ratio.append(start.balancedness / max(run.end_to_end_norm**power, 1e-300))
    norms = [float(torch.linalg.matrix_norm(start.end_to_end.double())) for start in result.starts.values()]
    return {
        "balancedness_initial": float(np.mean(balanced)),
        "end_to_end_norm_start": float(np.mean(norms)),
        "relative_imbalance_start": float(np.mean(start_ratio)),
        "relative_imbalance_end": float(np.mean(end_ratio)) if end_ratio else None,
    }


def summary_rows(runs: ExperimentRuns, crossings: list[dict]) -> list[dict]:
    rows = []
    for panel in runs.spec.panels:
        for key in panel.models:
            result = runs.models[key]
            model = result.model
            choice = result.choice
            row = {
                "experiment": runs.spec.name,
                "scale": runs.settings.scale,
                "panel": panel.name,
                "model": key,
                "label": model.label,
                "p": model.p,
                "depth": model.depth,
                "hidden_width": model.hidden_width,
                "init": model.init,
                "init_std": model.init_std,
                "optimizer": model.optimizer,
                "iterations": result.iterations,
                "seeds": " ".join(str(seed) for seed in runs.seeds),
                "lr_tuned": model.tuned,
                "lr": choice.lr if choice else None,
                "lr_grid": " ".join(f"{lr:g}" for lr in choice.grid) if choice else "",
                "lr_on_edge": (choice.edge or "") if model.tuned and choice else "",
                "lr_widened": " ".join(f"{lr:g}" for lr in result.widened),
                "diverged_candidates": sum(candidate.diverged for candidate in result.candidates),
                "train_seconds": round(result.seconds, 2),
                "cached_runs": result.cached_runs,
            }
            curves = result.curves
            if curves is not None:
                stats = curves.final_stats()
                row.update({
                    "final_gap_mean": stats["mean"],
                    "final_gap_min": stats["min"],
                    "final_gap_max": stats["max"],
                    "final_gap_geometric_mean": stats["geometric_mean"],
                })
                central = curves.central()
                for level in DEFAULT_GAP_LEVELS:
                    row[f"iterations_to_gap_{level:.0e}"] = first_reach(curves.iterations, central, level)
            row["crossovers"] = _crossover_cell(key, crossings)
            row.update(balance_numbers(result))
            rows.append({column: row.get(column) for column in SUMMARY_COLUMNS})
    return rows


def _crossover_cell(key: str, crossings: list[dict]) -> str:
    """Summarize the crossings of model ``key`` with each other model as ``other: count, last at N (below|above)``."""
    by_other: dict[str, list[tuple[int, bool]]] = {}
    for crossing in crossings:
        if key not in (crossing["model_a"], crossing["model_b"]):
            continue
        is_a = crossing["model_a"] == key
        other = crossing["model_b"] if is_a else crossing["model_a"]
        below = crossing["a_below_after"] == is_a
        by_other.setdefault(other, []).append((crossing["iteration"], below))
    parts = []
    for other, events in by_other.items():
        iteration, below = events[-1]
        side = "below" if below else "above"
        count = f"{len(events)} crossings, last" if len(events) > 1 else "1 crossing"
        parts.append(f"{other}: {count} at {iteration} ({side} after)")
    return "; ".join(parts)


def curves_frame(runs: ExperimentRuns) -> pd.DataFrame:
    """Return every run's curve in long format, candidates of the tuning included."""
    frames = []
    for key, result in runs.models.items():
        chosen = result.choice.lr if result.choice else None
        for (lr, seed), run in sorted(result.runs.items()):
            frames.append(pd.DataFrame({
                "panel": result.model.panel,
                "model": key,
                "lr": lr,
                "seed": seed,
                "chosen": lr == chosen,
                "iteration": run.iterations,
                "loss": run.losses,
                "gap": run.gaps,
            }))
    return pd.concat(frames, ignore_index=True)


def tuning_frame(runs: ExperimentRuns) -> pd.DataFrame:
    """Return one row per (model, lr) with its score, final gaps and divergence iterations per seed."""
    rows = []
    for key, result in runs.models.items():
        chosen = result.choice.lr if result.choice else None
        for candidate in result.candidates:
            rows.append({
                "model": key,
                "lr": candidate.lr,
                "chosen": candidate.lr == chosen,
                "added_by_widening": candidate.lr in result.widened,
                "score_mean_log10_gap": candidate.score,
                "final_gap_mean": float(np.mean(candidate.final_gaps)),
                "diverged_seeds": sum(at is not None for at in candidate.diverged_at),
                "diverged_at": " ".join(
                    f"seed{seed}@{at}" for seed, at in zip(runs.seeds, candidate.diverged_at) if at is not None
                ),
            })
    return pd.DataFrame(rows)


def write_tables(runs: ExperimentRuns, folder: Path) -> dict[str, Path]:
    """Write ``curves.csv``, ``summary.csv``, ``crossovers.csv`` and ``tuning.csv`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    crossings = model_crossovers(runs)
    paths = {name: folder / f"{name}.csv" for name in ("curves", "summary", "crossovers", "tuning")}
    curves_frame(runs).to_csv(paths["curves"], index=False)
    summary = pd.DataFrame(summary_rows(runs, crossings), columns=list(SUMMARY_COLUMNS))
    for level in DEFAULT_GAP_LEVELS:
        column = f"iterations_to_gap_{level:.0e}"
        summary[column] = summary[column].astype("Int64")
    summary.to_csv(paths["summary"], index=False)
    pd.DataFrame(crossings, columns=["panel", "model_a", "model_b", "iteration", "a_below_after"]).to_csv(
        paths["crossovers"], index=False
    )
    tuning_frame(runs).to_csv(paths["tuning"], index=False)
    return paths


def write_report(
    runs: ExperimentRuns,
    claims: list[ClaimResult],
    timing: ReportTiming,
    command: str,
    folder: Path,
    figure: Path,
) -> Path:
    """Write ``report.md``: settings, claims with verdicts and numbers, models, tuning, balancedness and timing."""
    spec = runs.spec
    scale = runs.settings.scale
    lines = [f"# {spec.title}", ""]
    lines += [f"Command: `{command}`", ""]
    if scale != 1:
        lines += [
            f"**Scale {scale:g}: every horizon is {scale:g} times the paper's ({_horizons(runs)}). "
            "This is not the paper's horizon, so every verdict below is provisional.**",
            "",
        ]
    else:
        lines += [f"Scale 1: the paper's horizons ({_horizons(runs)}).", ""]
    lines += _timing_lines(runs, timing)
    if spec.description:
        lines += ["", spec.description]

    lines += ["", "## Setting", ""]
    lines += _setting_lines(runs)

    lines += ["", "## Claims and verdicts", ""]
    lines += [
        "Verdicts follow fixed rules (`overparam/reproduce/analysis.py`, `evaluate_claim`). \"Clearly\" "
        "means every seed of one model is beyond every seed of the other; gaps are compared at the "
        "common horizon of the two models unless stated.",
        "",
        *(f"- `{kind}`: {RULES[kind]}" for kind in sorted({claim.kind for claim in spec.claims})),
        "",
        "| claim | verdict | measured |",
        "| --- | --- | --- |",
    ]
    for result in claims:
        lines.append(f"| {result.claim.text} | **{result.verdict}** | {result.evidence} |")
    counts = {verdict: sum(result.verdict == verdict for result in claims) for verdict in (REPRODUCED, PARTLY, NOT_REPRODUCED)}
    lines += ["", ", ".join(f"{count} {verdict}" for verdict, count in counts.items()) + "."]

    lines += ["", "## Figure", "", f"![{spec.name}]({figure.name})", "", f"{BAND_DESCRIPTION}; {len(runs.seeds)} seeds."]

    lines += ["", "## Models at their chosen learning rates", ""]
    lines += _model_table(runs)

    lines += ["", "## Learning-rate tuning", ""]
    lines += _tuning_lines(runs)

    balance = _balance_lines(runs)
    if balance:
        lines += ["", "## Balancedness of the deep networks", ""] + balance

    if spec.notes:
        lines += ["", "## Notes", "", spec.notes]

    lines += [
        "",
        "## Files",
        "",
        "`curves.csv` (every run, long format), `summary.csv` (one row per model), `tuning.csv` (every "
        "candidate learning rate), `crossovers.csv`, `tuning.db` (Optuna studies, one per tuned model) "
        f"and `{figure.name}`.",
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def _horizons(runs: ExperimentRuns) -> str:
    pairs = sorted({(result.model.iterations, result.iterations) for result in runs.models.values()})
    return ", ".join(f"{ours:,} of {paper:,} iterations" for paper, ours in pairs)


def _timing_lines(runs: ExperimentRuns, timing: ReportTiming) -> list[str]:
    trained = sum(run.seconds for result in runs.models.values() for run in result.runs.values() if not run.cached)
    cached = sum(run.seconds for result in runs.models.values() for run in result.runs.values() if run.cached)
    num_cached = sum(result.cached_runs for result in runs.models.values())
    num_runs = sum(len(result.runs) for result in runs.models.values())
    machine = f"{platform.machine()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}"
    sources = []
    if num_runs > num_cached:
        sources.append(f"{num_runs - num_cached} trained by this command in {trained:.0f} s")
    if num_cached:
        sources.append(f"{num_cached} read from the run cache, whose training took {cached:.0f} s")
    lines = [
        f"Training time: {trained + cached:.0f} s for {num_runs} runs ({'; '.join(sources)}). "
        f"Wall time of this command: {timing.total:.0f} s. Machine: {machine}.",
    ]
    if runs.settings.scale != 1:
        estimate = (trained + cached) / runs.settings.scale
        lines.append(
            f"Estimated training time at scale 1 on the same machine: about {estimate / 60:.0f} min "
            "(training time grows linearly with the iterations; an estimate, not a measurement)."
        )
    return lines


def _setting_lines(runs: ExperimentRuns) -> list[str]:
    spec = runs.spec
    rows, features = runs.data_shape
    models = list(spec.models.values())
    widths = sorted({model.hidden_width for model in models if model.depth > 1})
    near_zero_stds = [model.init_std for model in models if model.init == "near_zero"]
    stds = sorted(set(near_zero_stds))
    if len(stds) > 1:
        # The value most models use reads as the rule, the others as the stated exceptions.
        usual = max(stds, key=near_zero_stds.count)
        others = ", ".join(f"{std:g}" for std in stds if std != usual)
        std_text = f"{usual:g} ({others} where a model states it)"
    else:
        std_text = ", ".join(f"{std:g}" for std in stds) or "n/a"
    scaling = "features and target z-scored" if runs.standardized else "features and target as read, not z-scored"
    optimum = ", ".join(f"l{p:g}: L* = {value:.6g}" for p, value in sorted(runs.loss_optimum.items()))
    return [
        f"- Data: {runs.data_name} ({rows} rows x {features} features), {scaling}, "
        f"no train/test split, {runs.dtype}.",
        "- Models: bias-free linear networks; hidden width "
        f"{', '.join(str(width) for width in widths) if widths else 'n/a (depth 1 only)'} "
        "(1 unless a model states otherwise); full-batch iterations.",
        "- Initialization: near-zero unless stated, meaning Gaussian entries in every layer with standard "
        f"deviation {std_text}. The paper does not state its standard "
        "deviation; this is our choice. `identity` sets every layer to the (rectangular) identity with no noise, "
        "so all seeds of an identity-initialized model start, and with gradient descent run, identically.",
        "- Loss: mean(|y_hat - y|^p). Plotted and compared: training loss minus its optimum L* over all "
        f"linear maps ({optimum}; from `lp_optimum`, float64), log-y against iterations.",
        f"- Gaps below {GAP_FLOOR_RELATIVE:g} x L* are at float32 rounding level and are clipped there.",
        f"- Seeds: {', '.join(str(seed) for seed in runs.seeds)} (`seed_everything`, which draws the initial "
        f"weights). Divergence: a NaN or infinite loss or update, or a loss above {spec.max_loss:g}, freezes a run.",
    ]


def _model_table(runs: ExperimentRuns) -> list[str]:
    levels = DEFAULT_GAP_LEVELS
    header = "| model | optimizer | lr | final gap: geometric mean [min, max] | " + " | ".join(
        f"iterations to {level:g}" for level in levels
    ) + " | diverged |"
    lines = [header, "| --- " * (5 + len(levels)) + "|"]
    for panel in runs.spec.panels:
        for key in panel.models:
            result = runs.models[key]
            model = result.model
            if result.curves is None:
                lines.append(f"| {key} | {model.optimizer} | every lr diverged | | " + " | " * len(levels) + "|")
                continue
            lr = f"{result.choice.lr:.3g}"
            if model.tuned:
                lr += " (tuned" + (f", on the {result.choice.edge} edge" if result.choice.edge else "") + ")"
            stats = result.curves.final_stats()
            central = result.curves.central()
            reach = []
            for level in levels:
                iteration = first_reach(result.curves.iterations, central, level)
                reach.append(f"{iteration:,}" if iteration is not None else f"> {result.iterations:,}")
            optimizer = model.optimizer if not model.is_end_to_end else f"end-to-end rule, N={model.depth}"
            diverged = ", ".join(
                f"seed {seed} at {at:,}" for seed, at in zip(result.curves.seeds, result.curves.diverged_at)
                if at is not None
            ) or "no"
            lines.append(
                f"| {key} ({model.label}) | {optimizer} | {lr} | {_g(stats['geometric_mean'])} "
                f"[{_g(stats['min'])}, {_g(stats['max'])}] | " + " | ".join(reach) + f" | {diverged} |"
            )
    return lines


def _tuning_lines(runs: ExperimentRuns) -> list[str]:
    if not any(result.model.tuned for result in runs.models.values()):
        return ["No model of this experiment is tuned: every model runs at the fixed learning rate of its spec."]
    max_widen = runs.spec.tuning.max_widen if runs.settings.max_widen is None else runs.settings.max_widen
    if max_widen > 0:
        widening = (
            "A choice on the smallest or largest rate of the grid adds the next rate on that side and runs "
            f"it, up to {max_widen} times per side."
        )
    else:
        widening = "Widening is off: a choice on the smallest or largest rate of the grid stays there."
    lines = [
        "Every candidate rate runs for every seed over the model's full horizon. Score: the mean over "
        "seeds of the mean log10 gap over the logged iterations (the normalized area under the log-gap "
        "curve). The chosen rate has the lowest score among rates where no seed diverged. " + widening,
        "",
    ]
    for key, result in runs.models.items():
        if not result.model.tuned:
            continue
        choice = result.choice
        status = f"chosen lr {choice.lr:g}" if choice.lr is not None else "every lr diverged"
        if choice.edge and result.widened:
            status += f", still on the {choice.edge} edge of the grid after widening"
        elif choice.edge:
            status += f", on the {choice.edge} edge of the grid"
        widened = f"; added by widening: {', '.join(f'{lr:g}' for lr in result.widened)}" if result.widened else ""
        lines += [f"**{key}** ({status}{widened})", "", "| lr | score | final gap (mean) | diverged |",
                  "| --- | --- | --- | --- |"]
        for candidate in result.candidates:
            diverged = ", ".join(
                f"seed {seed} at iteration {at:,}" for seed, at in zip(runs.seeds, candidate.diverged_at) if at is not None
            ) or "no"
            mark = " (chosen)" if candidate.lr == choice.lr else ""
            final = float(np.mean(candidate.final_gaps)) if not candidate.diverged else math.nan
            score = "excluded" if candidate.diverged else f"{candidate.score:.3f}"
            lines.append(f"| {candidate.lr:g}{mark} | {score} | {_g(final)} | {diverged} |")
        lines.append("")
    return lines


def _balance_lines(runs: ExperimentRuns) -> list[str]:
    rows = []
    for key, result in runs.models.items():
        if result.model.is_end_to_end:
            continue
        numbers = balance_numbers(result)
        if numbers["balancedness_initial"] is None:
            continue
        rows.append(
            f"| {key} | {result.model.init} | {_g(numbers['end_to_end_norm_start'])} | {_g(numbers['balancedness_initial'])} | "
            f"{_g(numbers['relative_imbalance_start'])} | {_g(numbers['relative_imbalance_end'])} |"
        )
    if not rows:
        return []
    lines = [
        "Balancedness: max_j ||W_{j+1}^T W_{j+1} - W_j W_j^T||_F of the initial layers; every number is a mean over seeds. "
        "The end-to-end rule is exact only from a balanced start (0). Relative imbalance: balancedness "
        "divided by ||W_e||_F^(2/N), the squared size of each layer of a balanced network with the same "
        "end-to-end matrix, at the start and at the end of the chosen-rate runs. The end value uses the initial "
        "balancedness, which gradient flow conserves (gradient descent approximately); the final layers are not read back.",
        "",
        "| model | init | norm of W_e at start | balancedness at start | relative imbalance at start | relative imbalance at end |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    emulations = [result for result in runs.models.values() if result.model.is_end_to_end]
    for result in emulations:
        mismatch = result.start_mismatch
        if mismatch is not None:
            lines.append("")
            lines.append(
                f"{result.model.key} starts from the initial end-to-end matrix of {result.model.emulates}; "
                f"their first losses differ by {mismatch:.1e} (relative)."
            )
    return lines


def _g(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "diverged"
    return f"{value:.3g}"

"""Results of a study: the trials table, the best trial's re-run command, and re-training the best."""

import csv
import logging
import shlex
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from overparam.cli import build_cli, divergence_of
from overparam.tuning.storage import dashboard_command
from overparam.tuning.study import SURPLUS_ATTR, budget_usage

log = logging.getLogger(__name__)

STALE_REASON = "the worker stopped without reporting (no heartbeat within the grace period)"
FIXED_COLUMNS = ["number", "state", "value", "duration_s", "seed"]
TRAILING_COLUMNS = ["reason", "diverged_at", "retry_of", "retried_as", "worker", "run_dir", "datetime_start", "datetime_complete"]


def trial_reason(trial: FrozenTrial, retried_as: dict[int, int]) -> str:
    """Return why a trial was pruned or failed; empty for other states."""
    if trial.state == TrialState.PRUNED:
        return trial.user_attrs.get("prune_reason", "pruned")
    if trial.state != TrialState.FAIL:
        return ""
    if trial.user_attrs.get(SURPLUS_ATTR):
        return "surplus: another worker took the last place in the budget"
    reason = trial.user_attrs.get("fail_reason", STALE_REASON)
    if trial.number in retried_as:
        reason += f"; retried as trial {retried_as[trial.number]}"
    return reason


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    """Write one row per trial: number, state, value, duration, seed, each parameter and the reason.

    ``value`` is the objective value of COMPLETE trials and empty for the others.
    """
    trials = study.get_trials(deepcopy=False)
    param_names = sorted({name for trial in trials for name in trial.params})
    retried_as = {}
    for trial in trials:
        history = trial.system_attrs.get("retry_history", [])
        if history:
            retried_as[history[-1]] = trial.number

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FIXED_COLUMNS + param_names + TRAILING_COLUMNS)
        for trial in trials:
            history = trial.system_attrs.get("retry_history", [])
            row = [
                trial.number,
                trial.state.name,
                # Optuna gives a pruned trial its last reported gap as value, which is no objective value.
                repr(trial.value) if trial.state == TrialState.COMPLETE else "",
                "" if trial.duration is None else f"{trial.duration.total_seconds():.3f}",
                trial.user_attrs.get("seed", ""),
            ]
            row += [_cell(trial.params.get(name)) for name in param_names]
            row += [
                trial_reason(trial, retried_as),
                _cell(trial.user_attrs.get("diverged_at")),
                history[-1] if history else "",
                _cell(retried_as.get(trial.number)),
                trial.user_attrs.get("worker", ""),
                trial.user_attrs.get("run_dir", ""),
                _cell(trial.datetime_start),
                _cell(trial.datetime_complete),
            ]
            writer.writerow(row)
    return path


def fit_command(trial: FrozenTrial) -> str:
    """Return the ``overparam fit`` command line that re-runs ``trial``."""
    return "overparam fit " + shlex.join(trial.user_attrs["fit_args"])


def summary(study: optuna.Study, budget: int, objective_name: str, storage_url: str, output_dir: Path, csv_path: Path) -> str:
    """Return a printable summary: counts, the best trial with its re-run command, and where results are."""
    trials = study.get_trials(deepcopy=False)
    usage = budget_usage(trials)
    states = {state: sum(trial.state == state for trial in trials) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines = [
        f"Study {study.study_name}: {usage.counted} of {budget} budgeted trials done "
        f"({states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} pruned, {states[TrialState.FAIL]} failed"
        + (f", {usage.in_flight} still running or queued" if usage.in_flight else "")
        + ")."
    ]
    best = best_trial(study)
    if best is None:
        lines.append("No trial completed, so there is no best trial; see the reasons in the trials table.")
    else:
        lines.append(f"Best trial {best.number}: {objective_name} = {best.value:.6g}")
        lines += [f"  {name} = {value!r}" for name, value in best.params.items()]
        lines.append("Re-run it with:")
        lines.append(f"  {fit_command(best)}")
        lines.append(f"Its TensorBoard run and config.yaml: {best.user_attrs.get('run_dir', '?')}")
    lines.append(f"Trials table: {csv_path}")
    lines.append(f"TensorBoard: tensorboard --logdir {output_dir / 'tb'}")
    lines.append(f"Dashboard: {dashboard_command(storage_url)}  (needs: pip install optuna-dashboard)")
    return "\n".join(lines)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """Return the best completed trial, or None when no trial completed."""
    try:
        return study.best_trial
    except ValueError:
        return None


def retrain(trial: FrozenTrial, tensorboard_dir: Path, study_name: str) -> Path:
    """Train ``trial``'s configuration again as TensorBoard run ``best`` and return its folder.

    The run keeps the config's checkpointing, so it saves the trained model unlike the trials.
    """
    fit_args = list(trial.user_attrs["fit_args"])
    placement = [
        "--trainer.logger.init_args.save_dir", str(tensorboard_dir),
        "--trainer.logger.init_args.name", study_name,
        "--trainer.logger.init_args.version", "best",
    ]
    cli = build_cli([*fit_args[:-2], *placement, *fit_args[-2:]], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    diverged = divergence_of(cli)
    if diverged is not None:
        log.error("The re-trained best trial diverged: %s", diverged.message())
    return Path(cli.trainer.log_dir)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)

"""A record of the learning-rate tuning as Optuna studies, one per tuned model, in SQLite.

The runs themselves are batched (every rate and seed at once), so the studies do not drive the
search: each grid rate becomes one real trial drawn by a ``GridSampler`` over the final grid,
with the objective (mean over seeds of the mean log10 gap) and per-seed results as user attributes.
A rate where a seed diverged is a PRUNED trial, as ``overparam tune`` records diverged trials.
"""

import logging
import math
from pathlib import Path

import optuna

from overparam.reproduce.runs import ExperimentRuns

log = logging.getLogger(__name__)


def study_name(experiment: str, model_key: str) -> str:
    return f"{experiment}:{model_key}"


def write_studies(runs: ExperimentRuns, path: Path) -> list[str]:
    """Write one study per tuned model into the SQLite file ``path``, replacing studies of the same name."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")
    names = []
    for key, result in runs.models.items():
        if not result.model.tuned or not result.candidates:
            continue
        name = study_name(runs.spec.name, key)
        if name in optuna.get_all_study_names(storage):
            optuna.delete_study(study_name=name, storage=storage)

        candidates = {candidate.lr: candidate for candidate in result.candidates}
        grid = sorted(candidates)
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction="minimize",
            sampler=optuna.samplers.GridSampler({"lr": grid}, seed=0),
        )
        study.set_user_attr("rule", "lowest mean over seeds of the mean log10 gap; rates with a diverged seed excluded")
        study.set_user_attr("chosen_lr", result.choice.lr)
        study.set_user_attr("edge", result.choice.edge)
        study.set_user_attr("iterations", result.iterations)
        study.set_user_attr("seeds", list(runs.seeds))

        def objective(trial: optuna.Trial) -> float:
            candidate = candidates[trial.suggest_categorical("lr", grid)]
            for seed, score, final_gap, diverged_at in zip(
                runs.seeds, candidate.scores, candidate.final_gaps, candidate.diverged_at
            ):
                trial.set_user_attr(f"seed_{seed}_score", score if math.isfinite(score) else None)
                trial.set_user_attr(f"seed_{seed}_final_gap", final_gap if math.isfinite(final_gap) else None)
                trial.set_user_attr(f"seed_{seed}_diverged_at", diverged_at)
            if candidate.diverged:
                raise optuna.TrialPruned(f"a seed diverged at lr {candidate.lr:g}")
            return candidate.score

        # GridSampler stops the study once every grid point has a trial, which Optuna 5.1 allows only
        # inside optimize (a plain ask/tell loop raises at the last tell).
        study.optimize(objective, n_trials=len(grid))
        names.append(name)
    log.info("Wrote %d Optuna studies to %s.", len(names), path)
    return names

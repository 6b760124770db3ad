"""The objective function: one Optuna trial is one ``overparam fit`` run built by ``build_cli``.

A trial's LightningCLI arguments are the config, the search file's divergence bound, the user's
overrides, one ``--PATH VALUE`` per searched value and ``--seed_everything SEED``. These are stored
as the trial user attribute ``fit_args``, so ``overparam fit`` with them (or with the run's saved
``config.yaml``) reproduces the trial. Trials add quiet trainer defaults before the overrides and
place the TensorBoard run at ``OUT/tb/STUDY/trial_NNNNN``, which do not change the result.

Outcomes:

- COMPLETE: the objective value (``overparam.tuning.objectives``).
- PRUNED by the pruner: user attribute ``prune_reason``.
- PRUNED by divergence (NaN, infinity, or a loss above ``divergence.max_loss``): user attributes
  ``prune_reason`` and ``diverged_at`` (the iteration). Pruned rather than failed because a pruned
  trial still informs the sampler: TPE ranks it behind every completed trial, by how far it got,
  while it ignores failed trials and could keep proposing a diverging learning rate.
- FAIL: any error, with user attribute ``fail_reason``. A trial interrupted by Ctrl-C fails and is
  re-queued, so the next run of the same command evaluates its parameters again.
"""

import logging
import math
import os
import signal
import socket
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch import Trainer
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerStatus
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._cached_storage import _CachedStorage

from overparam.cli import build_cli
from overparam.tuning.callbacks import (
    DIVERGED_AT_KEY,
    DIVERGENCE_REASON_KEY,
    OBJECTIVE_KEY,
    StepPruningCallback,
    TrialOutcomeCallback,
)
from overparam.tuning.search_space import SearchSpec
from overparam.tuning.study import SurplusTrial, check_budget_slot

log = logging.getLogger(__name__)

# Fail reason of a trial stopped by Ctrl-C and queued again.
INTERRUPTED_REASON = "interrupted (KeyboardInterrupt); re-queued"

# Defaults for every trial, placed before the user's overrides so those can change them.
QUIET_TRAINER_ARGS = [
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.enable_checkpointing", "false",
]
MAX_REASON_CHARS = 500


def format_value(value: Any) -> str:
    """Format ``value`` as a LightningCLI command-line value (floats round-trip exactly)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def run_name(trial_number: int) -> str:
    """Return the TensorBoard version folder of a trial."""
    return f"trial_{trial_number:05d}"


@dataclass
class TrialObjective:
    """Objective function of ``overparam tune``; works with ``optuna.Trial`` and ``FixedTrial``.

    Args:
        spec: The search file.
        config: LightningCLI config file of every trial.
        overrides: Extra LightningCLI arguments of every trial.
        output_dir: Study output folder; TensorBoard runs go to ``output_dir/tb/study_name``.
        study_name: Name of the study, used as the TensorBoard experiment name.
        budget: Total trial budget; a trial asked for past it fails as surplus. None checks nothing.
    """

    spec: SearchSpec
    config: str
    overrides: list[str] = field(default_factory=list)
    output_dir: Path = Path("runs/tune")
    study_name: str = "study"
    budget: int | None = None

    @property
    def tensorboard_dir(self) -> Path:
        return self.output_dir / "tb"

    def shared_args(self) -> list[str]:
        """Return the LightningCLI arguments that every trial shares: config, divergence bound and overrides."""
        args = ["--config", self.config]
        if self.spec.max_loss is not None:
            args += ["--divergence.max_loss", format_value(self.spec.max_loss)]
        return args + self.overrides

    def first_values(self) -> dict[str, Any]:
        """Return the first grid value, choice or lower bound of each searched parameter."""
        return {path: param.choices[0] if param.choices else param.low for path, param in self.spec.params.items()}

    def fit_args(self, values: dict[str, Any], seed: int) -> list[str]:
        """Return the LightningCLI arguments that reproduce a trial with ``values`` and ``seed``."""
        args = self.shared_args()
        for path, value in values.items():
            args += [f"--{path}", format_value(value)]
        return args + ["--seed_everything", str(seed)]

    def run_args(self, fit_args: list[str], version: str) -> list[str]:
        """Return ``fit_args`` with the quiet defaults and the trial's TensorBoard run placement."""
        config, rest = fit_args[:2], fit_args[2:]
        placement = [
            "--trainer.logger.init_args.save_dir", str(self.tensorboard_dir),
            "--trainer.logger.init_args.name", self.study_name,
            "--trainer.logger.init_args.version", version,
        ]
        return [*config, *QUIET_TRAINER_ARGS, *rest[:-2], *placement, *rest[-2:]]

    def run_dir(self, trial_number: int) -> Path:
        """Return the TensorBoard run folder of a trial: ``OUT/tb/STUDY/trial_NNNNN``."""
        return self.tensorboard_dir / self.study_name / run_name(trial_number)

    def start_trial(self, trial: optuna.trial.BaseTrial) -> tuple[dict[str, Any], int, list[str]]:
        """Sample the searched values, pick the seed and record them as user attributes.

        Returns the values by config path, the training seed and the ``overparam fit`` arguments.
        """
        values = {path: param.suggest(trial, grid=self.spec.is_grid) for path, param in self.spec.params.items()}
        # A retried trial keeps the seed of the trial it replaces.
        seed = trial.user_attrs.get("seed")
        if seed is None:
            seed = self.spec.training_seed_for(trial.number)
        fit_args = self.fit_args(values, seed)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("fit_args", fit_args)
        trial.set_user_attr("run_dir", str(self.run_dir(trial.number)))
        return values, seed, fit_args

    def __call__(self, trial: optuna.trial.BaseTrial) -> float:
        if isinstance(trial, optuna.Trial) and self.budget is not None:
            check_budget_slot(trial, self.budget)

        values, seed, fit_args = self.start_trial(trial)
        try:
            return self._train(trial, values, seed, self.run_args(fit_args, run_name(trial.number)))
        except optuna.TrialPruned as pruned:
            trial.set_user_attr("prune_reason", str(pruned))
            raise
        except SurplusTrial:
            raise
        except KeyboardInterrupt:
            _requeue(trial)
            trial.set_user_attr("fail_reason", INTERRUPTED_REASON)
            raise
        except Exception as error:
            trial.set_user_attr("fail_reason", f"{type(error).__name__}: {error}"[:MAX_REASON_CHARS])
            raise

    def _train(self, trial: optuna.trial.BaseTrial, values: dict[str, Any], seed: int, args: list[str]) -> float:
        cli = build_cli(args, run=False)
        trainer = cli.trainer
        pruning = StepPruningCallback(trial) if self.spec.pruner_name != "none" else None
        _check_distributed(trainer, trial, pruning is not None)
        if pruning is not None:
            trainer.callbacks.append(pruning)
        trainer.callbacks.append(TrialOutcomeCallback(self.spec.objective, values, trial.number, seed))

        try:
            trainer.fit(cli.model, datamodule=cli.datamodule)
        except SystemExit as exit_info:
            # Lightning turns Ctrl-C during fit into SystemExit(1) after a graceful shutdown, and
            # ignores SIGINT from then on. Raise it as KeyboardInterrupt so Optuna records the trial.
            if trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from exit_info

        metrics = trainer.callback_metrics
        if OBJECTIVE_KEY not in metrics:
            raise RuntimeError("Training ended without running on_train_end, so the trial has no objective value.")
        diverged_at = int(metrics[DIVERGED_AT_KEY])
        if diverged_at >= 0:
            trial.set_user_attr("diverged_at", diverged_at)
            raise optuna.TrialPruned(f"diverged at iteration {diverged_at}: {metrics[DIVERGENCE_REASON_KEY]}")
        if pruning is not None:
            pruning.raise_if_pruned(trainer)

        value = float(metrics[OBJECTIVE_KEY])
        if not math.isfinite(value):
            raise RuntimeError(f"Objective {self.spec.objective.name} is {value}.")
        return value


def _check_distributed(trainer: Trainer, trial: optuna.trial.BaseTrial, pruning: bool) -> None:
    """Reject DDP setups in which a trial cannot run or be pruned, before any process starts."""
    if isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher):
        raise ValueError(
            "Strategy 'ddp' starts each rank by re-running the command line, which would start new trials; "
            "use --trainer.strategy ddp_spawn for data-parallel trials."
        )
    if pruning and trainer.world_size > 1 and isinstance(trial, optuna.Trial):
        storage = trial.study._storage
        if not isinstance(storage, _CachedStorage):
            raise ValueError(
                "Pruning a data-parallel trial needs an RDB storage (sqlite:/// or postgresql://), because "
                "optuna-integration's pruning callback exchanges its decision through it; "
                "use such a --storage or set 'pruner: none' in the search file."
            )


def _requeue(trial: optuna.trial.BaseTrial) -> None:
    """Queue a WAITING copy of an interrupted trial, marked as its retry, so a resumed study reruns it."""
    if not isinstance(trial, optuna.Trial):
        return
    frozen = trial.study._storage.get_trial(trial._trial_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=None)(trial.study, frozen)

"""Lightning callbacks that connect a training run to its Optuna trial.

The pruning callback ends a run through ``trainer.should_stop`` rather than an exception inside
``fit``, so ``on_train_end`` still runs and writes the final loss and the TensorBoard hparams. The
objective function raises ``optuna.TrialPruned`` after ``fit`` returns.
"""

import logging
import math
from typing import Any

import optuna
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from optuna_integration import PyTorchLightningPruningCallback
from optuna_integration.pytorch_lightning.pytorch_lightning import _EPOCH_KEY, _INTERMEDIATE_VALUE, _PRUNED_KEY

from overparam.callbacks import DivergenceCallback
from overparam.tuning.objectives import compute_objective
from overparam.tuning.search_space import ObjectiveSpec

log = logging.getLogger(__name__)

# Keys of trainer.callback_metrics that carry a trial's outcome to the objective function. They
# travel through callback_metrics because the ddp_spawn launcher copies only those back from rank 0.
OBJECTIVE_KEY = "tune/objective"
DIVERGED_AT_KEY = "tune/diverged_at"
DIVERGENCE_REASON_KEY = "tune/divergence_reason"


class StepPruningCallback(PyTorchLightningPruningCallback):
    """Report the training loss gap to Optuna after every Lightning training step, and stop pruned runs.

    The stock callback reports on validation end with the epoch as step. Full-batch runs have no
    validation and one long epoch, so this one reports after each training step at
    ``trainer.global_step``, the iteration count, which rises strictly from one report to the next.
    It monitors ``train/loss_gap`` and falls back to ``train/loss`` when the module has no loss
    optimum. Diverged or non-finite steps are not reported; ``DivergenceCallback`` ends those runs.

    Under DDP (``trainer.world_size > 1``) rank 0 reports, decides and broadcasts the decision, as in
    the parent class, which accepts only RDB storages there.
    """

    def __init__(self, trial: optuna.trial.BaseTrial, monitor: str = "train/loss_gap", fallback_monitor: str = "train/loss") -> None:
        super().__init__(trial, monitor)
        self.fallback_monitor = fallback_monitor
        self.last_reported_step = -1
        self.pruned_at: int | None = None
        self.pruned_value: float | None = None
        self._warned_missing = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report nothing on validation; the training steps report."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.pruned_at is not None or step <= self.last_reported_step:
            return
        self.last_reported_step = step

        value = self._monitored_value(trainer, pl_module)
        if not self.is_ddp_backend:
            if value is None:
                return
            self._trial.report(value, step=step)
            should_stop = self._trial.should_prune()
        else:
            should_stop = self._report_on_rank_zero(trainer, step, value)
            # Every rank takes part in the broadcast, so no rank returns before it.
            should_stop = trainer.strategy.broadcast(should_stop)
        if not should_stop:
            return

        self.pruned_at = step
        self.pruned_value = value
        trainer.should_stop = True
        if self.is_ddp_backend and trainer.is_global_zero:
            self._trial.storage.set_trial_system_attr(self._trial._trial_id, _PRUNED_KEY, True)
            self._trial.storage.set_trial_system_attr(self._trial._trial_id, _EPOCH_KEY, step)

    def raise_if_pruned(self, trainer: Trainer) -> None:
        """Raise ``optuna.TrialPruned`` if the pruner stopped this run; call after ``trainer.fit``.

        With ddp_spawn the decision was taken in child processes, so it is read back from the
        trial's system attributes in the storage.
        """
        if trainer.world_size > 1 and self.pruned_at is None:
            try:
                self.check_pruned()
            except optuna.TrialPruned:
                step = self._trial.storage.get_trial_system_attrs(self._trial._trial_id).get(_EPOCH_KEY)
                raise optuna.TrialPruned(f"pruned by the pruner at iteration {step}") from None
        if self.pruned_at is not None:
            raise optuna.TrialPruned(
                f"pruned by the pruner at iteration {self.pruned_at} ({self.monitor} = {self.pruned_value:.6g})"
            )

    def _monitored_value(self, trainer: Trainer, pl_module: LightningModule) -> float | None:
        if getattr(pl_module, "diverged_at", None) is not None:
            return None
        metrics = trainer.callback_metrics
        value = metrics.get(self.monitor)
        if value is None:
            value = metrics.get(self.fallback_monitor)
        if value is None:
            if not self._warned_missing:
                log.warning("Neither %s nor %s is in the logged metrics; the trial cannot be pruned.", self.monitor, self.fallback_monitor)
                self._warned_missing = True
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    def _report_on_rank_zero(self, trainer: Trainer, step: int, value: float | None) -> bool:
        if not trainer.is_global_zero or value is None:
            return False
        self._trial.report(value, step=step)
        # Child processes cannot hand intermediate values to the main process through the cached
        # storage, so they are also stored as a system attribute (as the parent class does).
        storage = self._trial.study._storage
        intermediate_values = storage.get_trial_system_attrs(self._trial._trial_id).get(_INTERMEDIATE_VALUE) or {}
        intermediate_values[str(step)] = value
        self._trial.storage.set_trial_system_attr(self._trial._trial_id, _INTERMEDIATE_VALUE, intermediate_values)
        return self._trial.should_prune()


class TrialOutcomeCallback(Callback):
    """Compute the trial's objective when training ends and write it to TensorBoard's hparams.

    TensorBoard keeps only the first hparams summary of a run, so this callback writes its own
    before the module's: Lightning calls callbacks' ``on_train_end`` before the module's. It adds
    the final point that the module's ``on_train_end`` is about to append to ``model.curve`` (the
    loss after the last update), and writes the module's metrics plus ``hp/objective`` (only when
    the trial completes) and ``hp/pruned``. The hparams gain the trial number, the seed and any
    searched value that is not a module hyperparameter. The outcome goes into
    ``trainer.callback_metrics`` under the ``tune/`` keys.
    """

    def __init__(self, objective: ObjectiveSpec, searched: dict[str, Any], trial_number: int, seed: int) -> None:
        self.objective = objective
        self.searched = searched
        self.trial_number = trial_number
        self.seed = seed

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        divergence = next((c for c in trainer.callbacks if isinstance(c, DivergenceCallback) and c.diverged), None)
        pruning = next((c for c in trainer.callbacks if isinstance(c, StepPruningCallback)), None)
        pruned = pruning is not None and pruning.pruned_at is not None

        value = math.nan
        final_loss = pl_module.last_loss
        if divergence is None and pl_module.diverged_at is None:
            # The same final point as LinearStackRegressor.on_train_end appends after this hook.
            final_loss = pl_module.final_loss()
            curve = [*pl_module.curve, (trainer.global_step, final_loss)]
            value = compute_objective(
                self.objective.name,
                curve,
                pl_module.loss_optimum,
                max_steps=trainer.max_steps,
                gap_threshold=self.objective.gap_threshold,
                gap_floor=self.objective.gap_floor,
            )
        if divergence is not None:
            diverged_at, reason = divergence.diverged_at, divergence.reason
        elif pl_module.diverged_at is not None:
            diverged_at, reason = pl_module.diverged_at, pl_module.divergence_reason
        else:
            diverged_at, reason = -1, None
        trainer.callback_metrics[OBJECTIVE_KEY] = torch.tensor(value, dtype=torch.float64)
        trainer.callback_metrics[DIVERGED_AT_KEY] = torch.tensor(diverged_at)
        trainer.callback_metrics[DIVERGENCE_REASON_KEY] = reason

        metrics = {"hp/final_loss": final_loss}
        if pl_module.loss_optimum is not None:
            metrics["hp/final_loss_gap"] = final_loss - pl_module.loss_optimum
        metrics["hp/diverged"] = float(diverged_at >= 0)
        metrics["hp/pruned"] = float(pruned)
        if not pruned and math.isfinite(value):
            metrics["hp/objective"] = value
        for logger in trainer.loggers:
            params = dict(getattr(logger, "hparams", {}) or {})
            params.update(pl_module.hparams_for_logging())
            params.update(extra_hparams(params, self.searched, self.trial_number, self.seed))
            logger.log_hyperparams(params, metrics)


def extra_hparams(params: dict[str, Any], searched: dict[str, Any], trial_number: int, seed: int) -> dict[str, Any]:
    """Return the trial number, the seed and each searched value that ``params`` lacks under its short name.

    ``model.X`` appears in ``params`` as ``X`` and ``model.optimizer.init_args.X`` as ``optimizer_X``.
    """
    extra = {"trial": trial_number, "seed": seed}
    for path, value in searched.items():
        parts = path.split(".")
        if parts[0] == "model" and len(parts) == 2 and parts[1] in params:
            continue
        if parts[:3] == ["model", "optimizer", "init_args"] and len(parts) == 4 and f"optimizer_{parts[3]}" in params:
            continue
        extra[path] = value
    return extra

"""Batched mode of ``overparam tune`` (``--batch-size M``): up to M trials trained together.

In each round a worker asks Optuna for up to M trials (``study.ask``), builds one
``overparam.sweeps.run_sweep`` member per trial from its sampled values and seed, trains the
members together and tells each result. Budget, surplus trials, heartbeats, retries, user
attributes, the trials table and the TensorBoard run ``OUT/tb/STUDY/trial_NNNNN`` work as with one
``overparam fit`` run per trial. A member's objective comes from ``compute_objective`` on the same
curve that ``overparam fit`` records, so it equals the sequential trial's value up to float
rounding. Each trial also gets the user attribute ``batch``: the numbers of the trials trained with
it, its own included.

Differences from one trial at a time:

- No pruning. A member runs to ``trainer.max_steps`` unless it diverges, and reports no
  intermediate values, so the search file's pruner is ignored.
- The engine checks divergence at every iteration, while ``overparam fit`` checks a non-finite loss
  at logged iterations and ``divergence.max_loss`` once per Lightning step. A diverged member's
  ``diverged_at`` can therefore be earlier, and a loss that exceeds ``max_loss`` only between two
  of ``overparam fit``'s checks prunes the member but not the fit run.
- The sampler proposes the M trials of a round before any of them has a result.
- Searched values must be settings that ``run_sweep`` members may change: ``model.*`` (except the
  linked ``model.input_size`` and ``model.output_size``), ``seed_everything``,
  ``trainer.max_steps``, ``trainer.log_every_n_steps`` and ``divergence.max_loss``. Members that
  differ in anything but learning rate, seed and ``model.init_std`` train in separate batches.
- Members train on CUDA when available, else on the CPU, whatever ``trainer.accelerator`` says.
- TensorBoard runs contain ``train/loss`` and ``train/loss_gap``, not ``train/e2e_norm`` or
  ``train/balancedness``.
"""

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.loggers import TensorBoardLogger
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from overparam.cli import print_config
from overparam.sweeps.runner import (
    BATCHED_KEYS,
    GROUPED_KEYS,
    LINKED_KEYS,
    SEED_KEY,
    MemberOutcome,
    SweepMember,
    run_sweep,
)
from overparam.tuning.callbacks import extra_hparams
from overparam.tuning.objectives import compute_objective
from overparam.tuning.search_space import SearchSpec
from overparam.tuning.study import (
    BudgetUsage,
    SurplusTrial,
    check_budget_slot,
    count_errors_in_a_row,
    wait_for_places,
)
from overparam.tuning.trial import INTERRUPTED_REASON, MAX_REASON_CHARS, TrialObjective, _requeue, run_name

log = logging.getLogger(__name__)


@dataclass
class _BatchTrial:
    trial: optuna.Trial
    values: dict[str, Any]
    seed: int
    fit_args: list[str]


def check_batchable(spec: SearchSpec) -> None:
    """Raise ``ValueError`` naming the first searched parameter that ``run_sweep`` members cannot change."""
    for path in spec.params:
        allowed = path in BATCHED_KEYS or path in GROUPED_KEYS or path.startswith("model.")
        if path in LINKED_KEYS or not allowed:
            raise ValueError(
                f"--batch-size cannot search {path!r} (search file {spec.path}): the trials of a batch share one "
                "data set and trainer, and may differ only in model.* settings (except model.input_size and "
                f"model.output_size), {', '.join(key for key in BATCHED_KEYS + GROUPED_KEYS if not key.startswith('model.'))}. "
                "Remove --batch-size to train one trial at a time."
            )


def check_batched_args(objective: TrialObjective) -> None:
    """Train one iteration of a trial with the batched engine, so a config it cannot run fails before the study.

    The trial takes the first choice or the lower bound of each searched parameter.
    NOTE: other values of a searched parameter (``model.bias: [false, true]``) are not checked; a
    batch with a value the engine rejects fails all its trials.
    """
    member = objective.first_values()
    member.pop("trainer.max_steps", None)
    member[SEED_KEY] = objective.spec.training_seed
    try:
        run_sweep([*objective.shared_args(), "--trainer.max_steps", "1"], [member])
    except ValueError as error:
        raise ValueError(
            f"The batched engine cannot train these trials: {error} Fix the config or the overrides after '--', "
            "or remove --batch-size to train one trial at a time."
        ) from None


class TrialHeartbeats:
    """Record the heartbeat of every trial of a batch from a background thread, while the ``with`` block runs.

    Optuna records heartbeats only inside ``study.optimize``, so trials started with ``study.ask``
    need this. ``add`` records a heartbeat at once; then each trial gets one every heartbeat
    interval of the storage until ``remove``. Without heartbeats in the storage this does nothing.
    """

    def __init__(self, storage: BaseStorage) -> None:
        self.storage = storage
        self.enabled = is_heartbeat_enabled(storage)
        self.interval = float(storage.get_heartbeat_interval()) if self.enabled else math.inf
        self._trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0

    def __enter__(self) -> "TrialHeartbeats":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="trial-heartbeats", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._failures:
            log.warning("%d heartbeats could not be recorded during this batch.", self._failures)

    def add(self, trial_id: int) -> None:
        with self._lock:
            self._trial_ids.add(trial_id)
        self._record(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self._trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                trial_ids = sorted(self._trial_ids)
            for trial_id in trial_ids:
                self._record(trial_id)

    def _record(self, trial_id: int) -> None:
        if not self.enabled:
            return
        try:
            self.storage.record_heartbeat(trial_id)
        except Exception as error:  # noqa: BLE001 - a lost heartbeat must not stop training; the next one may succeed.
            self._failures += 1
            if self._failures == 1:
                log.warning("Recording the heartbeat of trial id %d failed: %s", trial_id, error)


def run_batched_worker(
    study: optuna.Study,
    objective: TrialObjective,
    budget: int,
    batch_size: int,
    poll_interval: float,
    on_progress: Callable[[BudgetUsage], None] | None = None,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
    max_consecutive_errors: int = 3,
) -> BudgetUsage:
    """Run trials of ``study`` in batches of up to ``batch_size`` until ``budget`` trials count.

    Like ``overparam.tuning.study.run_worker``, but each round asks for as many trials as the
    budget leaves open, at most ``batch_size``, and trains them together. ``callbacks`` run on each
    finished trial. After ``max_consecutive_errors`` trials in a row failed with errors this
    worker raises ``RuntimeError``; a batch that fails as a whole fails all its trials.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if objective.spec.pruner_name != "none":
        log.warning(
            "Batched trials are not pruned: each runs to trainer.max_steps unless it diverges, so pruner %r is ignored.",
            objective.spec.pruner_name,
        )

    consecutive_errors = 0
    while True:
        usage, places = wait_for_places(study, budget, poll_interval, on_progress)
        if places is None:
            return usage

        finished = run_batch(study, objective, min(batch_size, places))
        for trial in finished:
            for callback in callbacks or []:
                callback(study, trial)
        for trial in finished:
            consecutive_errors = count_errors_in_a_row(consecutive_errors, trial, max_consecutive_errors)


def run_batch(study: optuna.Study, objective: TrialObjective, size: int) -> list[FrozenTrial]:
    """Ask for ``size`` trials, train them together and tell their results; return the finished trials.

    On ``KeyboardInterrupt`` every trial of the batch that has not been told yet fails and is
    queued again, as an interrupted sequential trial is, before the interrupt propagates.
    """
    finished: list[FrozenTrial] = []
    asked: list[optuna.Trial] = []
    with _ask_and_tell_loop(study), TrialHeartbeats(study._storage) as heartbeats:
        try:
            for _ in range(size):
                trial = study.ask()
                heartbeats.add(trial._trial_id)
                asked.append(trial)
            _train_and_tell(study, objective, asked, heartbeats, finished)
        except KeyboardInterrupt:
            told = {trial.number for trial in finished}
            for trial in asked:
                if trial.number not in told:
                    _requeue(trial)
                    trial.set_user_attr("fail_reason", INTERRUPTED_REASON)
                    _tell(study, trial, heartbeats, state=TrialState.FAIL)
            raise
    return finished


@contextlib.contextmanager
def _ask_and_tell_loop(study: optuna.Study) -> Iterator[None]:
    """Mark this thread as inside an optimization loop while a batch runs, as ``study.optimize`` does.

    ``GridSampler.after_trial`` calls ``study.stop()`` once every grid point has a result, and
    ``Study.stop`` raises ``RuntimeError`` outside an optimization loop. ``Study.ask`` also warns
    there that heartbeats need ``study.optimize``, while ``TrialHeartbeats`` records them here.
    """
    # NOTE: relies on Optuna's private Study._thread_local.in_optimize_loop (checked with optuna 5.1).
    state = study._thread_local
    previous = state.in_optimize_loop
    state.in_optimize_loop = True
    try:
        yield
    finally:
        state.in_optimize_loop = previous


def _train_and_tell(
    study: optuna.Study,
    objective: TrialObjective,
    trials: list[optuna.Trial],
    heartbeats: TrialHeartbeats,
    finished: list[FrozenTrial],
) -> None:
    """Start each trial, train the batch and tell each result, appending every finished trial to ``finished``."""
    batch: list[_BatchTrial] = []
    for trial in trials:
        try:
            if objective.budget is not None:
                check_budget_slot(trial, objective.budget)
            values, seed, fit_args = objective.start_trial(trial)
        except SurplusTrial:
            finished.append(_tell(study, trial, heartbeats, state=TrialState.FAIL))
            continue
        except Exception as error:  # noqa: BLE001 - as study.optimize does, an error fails only this trial.
            _set_fail_reason(trial, error)
            finished.append(_tell(study, trial, heartbeats, state=TrialState.FAIL))
            continue
        batch.append(_BatchTrial(trial, values, seed, fit_args))
    if not batch:
        return

    for item in batch:
        item.trial.set_user_attr("batch", [other.trial.number for other in batch])
    members = [SweepMember({**item.values, SEED_KEY: item.seed}, run_name(item.trial.number)) for item in batch]
    log.info("Training trials %s together.", ", ".join(str(item.trial.number) for item in batch))
    try:
        sweep = run_sweep(objective.shared_args(), members)
    except Exception as error:  # noqa: BLE001 - the batch fails, the worker goes on.
        log.error("The batch of trials %s failed: %s", [item.trial.number for item in batch], error)
        for item in batch:
            _set_fail_reason(item.trial, error)
            finished.append(_tell(study, item.trial, heartbeats, state=TrialState.FAIL))
        return

    for item, outcome in zip(batch, sweep.outcomes):
        finished.append(_report(study, objective, item, outcome, heartbeats))


def _report(
    study: optuna.Study, objective: TrialObjective, item: _BatchTrial, outcome: MemberOutcome, heartbeats: TrialHeartbeats
) -> FrozenTrial:
    """Compute the trial's value, write its TensorBoard run and ``config.yaml``, and tell the result."""
    trial = item.trial
    try:
        value = None
        if outcome.diverged:
            reason = divergence_reason(outcome, objective.spec.max_loss)
            trial.set_user_attr("diverged_at", outcome.diverged_at)
            trial.set_user_attr("prune_reason", f"diverged at iteration {outcome.diverged_at}: {reason}")
        else:
            value = member_objective(objective.spec, outcome)
        write_run(objective, item, outcome, value)
    except UpdateFinishedTrialError:
        # Another worker failed the trial as stale; its result cannot be stored.
        log.warning("Trial %d was failed by another worker while it trained; its result is dropped.", trial.number)
        return _tell(study, trial, heartbeats, state=TrialState.FAIL)
    except Exception as error:  # noqa: BLE001 - as study.optimize does, an error fails only this trial.
        _set_fail_reason(trial, error)
        return _tell(study, trial, heartbeats, state=TrialState.FAIL)

    if value is None:
        return _tell(study, trial, heartbeats, state=TrialState.PRUNED)
    return _tell(study, trial, heartbeats, value=value)


def member_objective(spec: SearchSpec, outcome: MemberOutcome) -> float:
    """Return the search file's objective of a member that did not diverge, as ``TrialOutcomeCallback`` computes it."""
    # The engine stops early only when every member has diverged, so this member ran
    # ``trainer.max_steps`` iterations.
    value = compute_objective(
        spec.objective.name,
        outcome.curve,
        outcome.loss_optimum,
        max_steps=outcome.iterations,
        gap_threshold=spec.objective.gap_threshold,
        gap_floor=spec.objective.gap_floor,
    )
    if not math.isfinite(value):
        raise RuntimeError(f"Objective {spec.objective.name} is {value}.")
    return value


def divergence_reason(outcome: MemberOutcome, max_loss: float | None) -> str:
    """Describe why a member diverged, in the words ``overparam fit`` uses where the curve shows it.

    The engine freezes a member at the first iteration whose loss is not finite or above
    ``max_loss``, or whose update is not finite. The curve has that loss only at logged iterations.
    """
    if outcome.curve and outcome.curve[-1][0] == outcome.diverged_at:
        loss = outcome.curve[-1][1]
        if not math.isfinite(loss):
            return f"train/loss is {loss}"
        if max_loss is not None and loss > max_loss:
            return f"train/loss {loss:.6g} exceeded max_loss {max_loss:g}"
        return "the update was not finite"
    bound = "" if max_loss is None else f" or above max_loss {max_loss:g}"
    return f"train/loss or its update was not finite{bound} (the iteration was not logged)"


def write_run(objective: TrialObjective, item: _BatchTrial, outcome: MemberOutcome, value: float | None) -> Path:
    """Write the trial's TensorBoard run and ``config.yaml`` to ``OUT/tb/STUDY/trial_NNNNN``, as a fit run does.

    The run contains ``train/loss`` and ``train/loss_gap`` at the logged iterations and after the
    last one. Its hparams are the member's, plus the trial number, the seed and each searched value.
    Its metrics are those of ``TrialOutcomeCallback``, with ``hp/objective`` only for a completed trial.
    """
    number = item.trial.number
    logger = TensorBoardLogger(
        save_dir=str(objective.tensorboard_dir), name=objective.study_name, version=run_name(number), default_hp_metric=False
    )
    optimum = outcome.loss_optimum
    for iteration, loss in outcome.curve:
        metrics = {"train/loss": loss}
        if optimum is not None:
            metrics["train/loss_gap"] = loss - optimum
        logger.log_metrics(metrics, step=iteration)

    params = {key: param for key, param in outcome.hparams.items() if key != "name"}
    params.update(extra_hparams(params, item.values, number, item.seed))
    metrics = {"hp/final_loss": outcome.final_loss}
    if optimum is not None:
        metrics["hp/final_loss_gap"] = outcome.final_gap
    metrics["hp/diverged"] = float(outcome.diverged)
    metrics["hp/pruned"] = 0.0
    if value is not None:
        metrics["hp/objective"] = value
    logger.log_hyperparams(params, metrics, step=outcome.iterations)
    logger.save()
    logger.finalize("success")

    run_dir = Path(logger.log_dir)
    args = objective.run_args(item.fit_args, run_name(number))
    try:
        config = print_config(args)
    except ValueError as error:
        raise ValueError(f"LightningCLI rejected the trial's arguments: {error}") from None
    (run_dir / "config.yaml").write_text(config)
    return run_dir


def _set_fail_reason(trial: optuna.Trial, error: BaseException) -> None:
    try:
        trial.set_user_attr("fail_reason", f"{type(error).__name__}: {error}"[:MAX_REASON_CHARS])
    except UpdateFinishedTrialError:
        pass


def _tell(
    study: optuna.Study,
    trial: optuna.Trial,
    heartbeats: TrialHeartbeats,
    value: float | None = None,
    state: TrialState | None = None,
) -> FrozenTrial:
    """Tell a result and stop the trial's heartbeat; a trial another worker already failed stays as it is."""
    heartbeats.remove(trial._trial_id)
    return study.tell(trial, value, state=state, skip_if_finished=True)

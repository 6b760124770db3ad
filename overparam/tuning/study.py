"""Study creation, the total trial budget, and the worker loop that runs trials until it is spent.

Budget: ``n_trials`` is a total over every worker and restart of a study. A trial counts toward it
when it is COMPLETE, PRUNED (pruned by the pruner, or diverged) or FAIL, with two exceptions:

- a FAIL trial that a retry replaced (its number is in another trial's ``retry_history``, written
  by ``RetryHeartbeatStaleTrialCallback``) does not count, because its retry takes its place;
- a surplus trial (user attribute ``surplus``) does not count. Two workers can both ask for the
  last trial at the same moment; the one whose trial sorts later fails it at once as surplus.

A trial that failed with an error (user attribute ``fail_reason``) counts. Each new run of
``overparam tune`` re-queues it (``requeue_errored_trials``) as a retry that takes its place in the
budget, so a grid point whose trials all failed with errors trains again once the cause is fixed.

Trials in flight (RUNNING and WAITING) take a place too. A worker whose remaining budget is all
taken by other workers' running trials polls the storage instead of exiting, so that it can retry
one of those trials if its worker dies.
"""

import logging
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, fail_stale_trials
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from overparam.tuning.search_space import SearchSpec

log = logging.getLogger(__name__)

SEARCH_ATTR = "overparam:search"
SURPLUS_ATTR = "surplus"
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
IN_FLIGHT_STATES = (TrialState.RUNNING, TrialState.WAITING)


class StudyMismatchError(ValueError):
    """An existing study was created with other search settings than the ones given now."""


class SurplusTrial(Exception):
    """A trial beyond the budget, asked for by two workers at once; it fails without counting."""


@dataclass(frozen=True)
class BudgetUsage:
    counted: int
    running: int
    waiting: int

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Return the numbers of failed trials that a retry replaced."""
    return {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}


def budget_slots(trials: list[FrozenTrial]) -> list[int]:
    """Return the trials that hold a place in the budget, as their original trial numbers, sorted.

    A retry's original number is that of the first trial it replaces, so a retry keeps the place of
    the trial its worker lost.
    """
    retried = retried_numbers(trials)
    slots = []
    for trial in trials:
        if trial.user_attrs.get(SURPLUS_ATTR):
            continue
        if trial.state == TrialState.FAIL and trial.number in retried:
            continue
        if trial.state in COUNTED_STATES or trial.state in IN_FLIGHT_STATES:
            slots.append(trial.system_attrs.get("failed_trial", trial.number))
    return sorted(slots)


def budget_usage(trials: list[FrozenTrial]) -> BudgetUsage:
    """Count finished trials that use the budget and trials still in flight."""
    retried = retried_numbers(trials)
    counted = running = waiting = 0
    for trial in trials:
        if trial.user_attrs.get(SURPLUS_ATTR):
            continue
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            counted += 1
        elif trial.state == TrialState.FAIL and trial.number not in retried:
            counted += 1
        elif trial.state == TrialState.RUNNING:
            running += 1
        elif trial.state == TrialState.WAITING:
            waiting += 1
    return BudgetUsage(counted, running, waiting)


def check_budget_slot(trial: optuna.Trial, budget: int) -> None:
    """Raise ``SurplusTrial`` (after marking the trial) if ``trial`` sorts past the budget."""
    trials = trial.study.get_trials(deepcopy=False)
    slots = budget_slots(trials)
    original = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial", trial.number)
    if original in slots and slots.index(original) < budget:
        return
    trial.set_user_attr(SURPLUS_ATTR, True)
    raise SurplusTrial(f"trial {trial.number} exceeds the budget of {budget} trials (another worker took the last place)")


def requeue_errored_trials(study: optuna.Study) -> list[int]:
    """Queue a WAITING retry of each trial that failed with an error and was not retried yet.

    The retry keeps the parameters and the seed, and records the failed trial in ``retry_history``
    as ``RetryHeartbeatStaleTrialCallback`` does, so it takes that trial's place in the budget. A
    grid point that has a COMPLETE, PRUNED or in-flight trial is not queued again. Trials failed by
    the heartbeat (no ``fail_reason``) keep their own ``--max-retry`` limit. Returns the numbers of
    the re-queued trials.
    """
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    covered_grid_ids = {
        trial.system_attrs["grid_id"]
        for trial in trials
        if "grid_id" in trial.system_attrs and trial.state != TrialState.FAIL
    }

    requeued = []
    for trial in trials:
        errored = trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs
        if not errored or trial.user_attrs.get(SURPLUS_ATTR) or trial.number in retried:
            continue
        grid_id = trial.system_attrs.get("grid_id")
        if grid_id is not None and grid_id in covered_grid_ids:
            continue
        if grid_id is not None:
            covered_grid_ids.add(grid_id)

        system_attrs = {"failed_trial": trial.number, "retry_history": [], **trial.system_attrs}
        system_attrs["retry_history"] = [*system_attrs["retry_history"], trial.number]
        user_attrs = {key: value for key, value in trial.user_attrs.items() if key != "fail_reason"}
        study.add_trial(
            optuna.create_trial(
                state=TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs=user_attrs,
                system_attrs=system_attrs,
            )
        )
        requeued.append(trial.number)
    return requeued


def open_study(
    storage: BaseStorage,
    study_name: str,
    spec: SearchSpec,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    metadata: dict[str, Any],
) -> optuna.Study:
    """Create the study or load it, and check that an existing study searches the same space.

    ``metadata`` (config, overrides) is stored as study user attributes on creation, for the record.
    """
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        sampler=sampler,
        pruner=pruner,
        direction=spec.direction,
        load_if_exists=True,
    )
    fingerprint = spec.fingerprint()
    stored = study.user_attrs.get(SEARCH_ATTR)
    if stored is None:
        study.set_user_attr(SEARCH_ATTR, fingerprint)
        for key, value in metadata.items():
            study.set_user_attr(f"overparam:{key}", value)
    else:
        _warn_other_config(study, metadata)
    if stored is not None and stored != fingerprint:
        differences = sorted(key for key in set(stored) | set(fingerprint) if stored.get(key) != fingerprint.get(key))
        raise StudyMismatchError(
            f"Study {study_name!r} exists in this storage with other search settings ({', '.join(differences)} "
            f"differ from {spec.path}); pass the search file it was created with, or a new --study-name."
        )
    return study


def _warn_other_config(study: optuna.Study, metadata: dict[str, Any]) -> None:
    # Paths and overrides may differ between machines of one study, so this only warns.
    for key, value in metadata.items():
        stored = study.user_attrs.get(f"overparam:{key}")
        if stored is not None and stored != value:
            log.warning("Study %s was created with %s %r; this run uses %r.", study.study_name, key, stored, value)


def run_worker(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    budget: int,
    poll_interval: float,
    on_progress: Callable[[BudgetUsage], None] | None = None,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
    max_consecutive_errors: int = 3,
) -> BudgetUsage:
    """Run trials of ``study`` one at a time until ``budget`` trials count (see the module docstring).

    Each trial runs through ``study.optimize(n_trials=1)``, which fails stale trials first and keeps
    the trial's heartbeat while it runs; Optuna's heartbeat does not work with ask and tell. A trial
    that raises an error fails and the study goes on, but after ``max_consecutive_errors`` such
    failures in a row this worker raises ``RuntimeError``, since later trials would most likely
    fail the same way.
    """
    last_trials: list[FrozenTrial] = []
    callbacks = [*(callbacks or []), lambda _study, trial: last_trials.append(trial)]
    consecutive_errors = 0
    while True:
        usage, places = wait_for_places(study, budget, poll_interval, on_progress)
        if places is None:
            return usage

        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks)
        if last_trials:
            consecutive_errors = count_errors_in_a_row(consecutive_errors, last_trials[-1], max_consecutive_errors)


def wait_for_places(
    study: optuna.Study, budget: int, poll_interval: float, on_progress: Callable[[BudgetUsage], None] | None = None
) -> tuple[BudgetUsage, int | None]:
    """Return ``open_places`` once this worker may start a trial or the study is done.

    While the rest of the budget runs in other workers, poll every ``poll_interval`` seconds in case
    one of them dies and its trial is retried.
    """
    while True:
        usage, places = open_places(study, budget, on_progress)
        if places != 0:
            return usage, places
        time.sleep(poll_interval)


def open_places(
    study: optuna.Study, budget: int, on_progress: Callable[[BudgetUsage], None] | None = None
) -> tuple[BudgetUsage, int | None]:
    """Fail stale trials, then return the budget usage and how many trials this worker may start now.

    The count is None when the study is done (the budget is spent, or every grid point has been
    evaluated) and 0 when the rest of the budget is taken by trials running in other workers. It
    includes WAITING trials (retries and re-queued trials), which ``study.ask`` returns first, and
    is at least 1 while a WAITING trial exists.
    """
    if is_heartbeat_enabled(study._storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            fail_stale_trials(study)
    usage = budget_usage(study.get_trials(deepcopy=False))
    if on_progress is not None:
        on_progress(usage)
    if usage.counted >= budget:
        return usage, None
    grid_sampler = study.sampler if isinstance(study.sampler, optuna.samplers.GridSampler) else None
    if grid_sampler is not None and usage.in_flight == 0 and grid_sampler.is_exhausted(study):
        log.info("Every grid point has been evaluated; %d of %d budgeted trials count.", usage.counted, budget)
        return usage, None

    places = budget - usage.counted - usage.running
    if places <= 0 and usage.waiting > 0:
        places = 1
    return usage, max(places, 0)


def count_errors_in_a_row(count: int, trial: FrozenTrial, limit: int) -> int:
    """Return ``count`` plus one if ``trial`` failed with an error, else 0; raise ``RuntimeError`` at ``limit``.

    A surplus trial fails without an error, so it resets the count.
    """
    if trial.state == TrialState.FAIL and not trial.user_attrs.get(SURPLUS_ATTR):
        count += 1
    else:
        count = 0
    if count >= limit:
        raise RuntimeError(
            f"{count} trials in a row failed with errors, the last one with: "
            f"{trial.user_attrs.get('fail_reason', 'an unknown error')}. Fix the cause and run the same command to resume."
        )
    return count

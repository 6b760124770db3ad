"""``overparam tune``: learning-rate (or any config value) search with Optuna.

    overparam tune --config configs/ethanol/l4_depth2.yaml --search configs/search/lr_grid.yaml \\
        [--storage URL] [--study-name NAME] [--n-trials N] [--n-workers K] [--output DIR] \\
        [--batch-size M] [--retrain-best] [-- LIGHTNINGCLI OVERRIDES...]

The same command resumes a study: trials already counted are kept and ``n_trials`` is the total.
``--n-workers K`` starts K worker processes on this host (``python -m overparam tune ...`` with a
hidden ``--worker-index``), all on one study. With SQLite and K > 1 the workers wait on SQLite's
write lock; ``--storage journal:///path/study.log`` scales better on one host and PostgreSQL
across machines. When ``torch.cuda.device_count()`` (or the list in ``CUDA_VISIBLE_DEVICES``) is
at least K, each worker gets its own share of the GPUs through ``CUDA_VISIBLE_DEVICES``.
``--batch-size M`` trains up to M trials of each worker together (``overparam.tuning.batched``).
"""

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import overparam
from overparam.cli import build_cli, print_config
from overparam.tuning.batched import check_batchable, check_batched_args, run_batched_worker
from overparam.tuning.report import best_trial, retrain, summary, write_trials_csv
from overparam.tuning.search_space import SearchFileError, SearchSpec, load_search_file, make_pruner, make_sampler
from overparam.tuning.storage import default_storage_url, display_url, open_storage
from overparam.tuning.study import BudgetUsage, StudyMismatchError, budget_usage, open_study, requeue_errored_trials, run_worker
from overparam.tuning.trial import TrialObjective, _check_distributed

log = logging.getLogger("overparam.tuning")

QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "overparam.data", "overparam.models")
# The divergence callback logs an error per diverged run; here divergence is an expected outcome
# that log_finished_trial reports as a pruned trial.
SILENT_LOGGERS = ("overparam.callbacks",)
PARENT_POLL_INTERVAL_S = 2.0
# Seconds between checks of a worker that waits for other workers' last trials.
WORKER_POLL_INTERVAL_S = 2.0
# Characters of an error message kept in the one-line errors of the argument checks.
MAX_ERROR_CHARS = 500


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overparam tune",
        allow_abbrev=False,
        description=(
            "Search hyperparameters of an 'overparam fit' config with Optuna. Arguments after '--' are passed "
            "to every trial as LightningCLI overrides, e.g. -- --trainer.max_steps 2000."
        ),
    )

    parser.add_argument("--config", required=True, help="LightningCLI config file of every trial (as for 'overparam fit').")
    parser.add_argument("--search", required=True, help="Search file (YAML): parameters, sampler, pruner, objective, budget.")

    parser.add_argument(
        "--storage",
        help=(
            "Optuna storage URL: sqlite:///PATH (default: OUTPUT/study.db), journal:///PATH for several processes "
            "on one host, or postgresql://USER:PASSWORD@HOST:PORT/DB for several machines."
        ),
    )
    parser.add_argument("--study-name", help="Study name (default: the search file's study_name, else CONFIG_SEARCH).")
    parser.add_argument(
        "--n-trials", type=int, help="Total trial budget over all workers and restarts (default: the search file's n_trials)."
    )
    parser.add_argument("--n-workers", type=int, default=1, help="Worker processes on this host (default: 1).")
    parser.add_argument("--output", help="Output folder for study.db, trials.csv and TensorBoard runs (default: runs/tune/STUDY).")
    parser.add_argument("--retrain-best", action="store_true", help="Train the best trial's configuration again as run 'best'.")
    parser.add_argument(
        "--batch-size",
        type=int,
        help=(
            "Train up to this many trials of each worker together with the batched engine, without pruning "
            "(default: one 'overparam fit' run per trial)."
        ),
    )

    parser.add_argument(
        "--heartbeat-interval", type=int, default=60, help="Seconds between heartbeats of a running trial (default: 60)."
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        help="Seconds without a heartbeat after which a running trial counts as dead and is retried (default: 2 x interval).",
    )
    parser.add_argument(
        "--max-retry", type=int, default=3, help="Times one trial is retried after its worker died (default: 3)."
    )

    # Set by the parent process on each worker it starts with --n-workers.
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str]) -> None:
    """Run ``overparam tune`` with the arguments after ``tune``."""
    own_args, overrides = _split_overrides(argv)
    parser = build_parser()
    options = parser.parse_args(own_args)
    _setup_logging(options.worker_index)
    if options.n_workers < 1:
        parser.error(f"--n-workers must be at least 1, got {options.n_workers}.")
    if options.batch_size is not None and options.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {options.batch_size}.")
    if options.heartbeat_interval < 1:
        parser.error(f"--heartbeat-interval must be at least 1 second, got {options.heartbeat_interval}.")
    if options.grace_period is not None and options.grace_period <= options.heartbeat_interval:
        parser.error(
            f"--grace-period ({options.grace_period} s) must exceed --heartbeat-interval ({options.heartbeat_interval} s), "
            "or live trials are failed between two heartbeats."
        )
    if not Path(options.config).is_file():
        parser.error(f"config file {options.config} not found.")

    try:
        spec = load_search_file(options.search)
        budget = resolve_budget(options.n_trials, spec)
    except SearchFileError as error:
        raise SystemExit(f"overparam tune: {error}") from None
    study_name = options.study_name or spec.study_name or default_study_name(options.config, options.search)
    output_dir = Path(options.output or Path("runs") / "tune" / study_name)
    storage_url = options.storage or default_storage_url(output_dir)
    objective = TrialObjective(spec, options.config, overrides, output_dir, study_name, budget)

    is_worker = options.worker_index is not None
    if not is_worker:
        try:
            check_trial_args(objective)
            if options.batch_size is not None:
                check_batchable(spec)
                check_batched_args(objective)
            # Last, because it loads the data.
            check_trial_setup(objective)
        except ValueError as error:
            raise SystemExit(f"overparam tune: {error}") from None
    try:
        storage = open_storage(storage_url, options.heartbeat_interval, options.grace_period, options.max_retry)
        study = open_study(
            storage,
            study_name,
            spec,
            make_sampler(spec, options.worker_index or 0),
            make_pruner(spec),
            {"config": options.config, "overrides": overrides},
        )
    except (SearchFileError, StudyMismatchError, ValueError) as error:
        raise SystemExit(f"overparam tune: {error}") from None
    if not is_worker:
        requeued = requeue_errored_trials(study)
        if requeued:
            log.info("Re-queued trial(s) %s, which failed with errors, to train their parameters again.", requeued)
        log.info("Study %s in %s: budget %d trials, %d worker(s)", study_name, display_url(storage_url), budget, options.n_workers)

    failed = False
    try:
        if is_worker:
            failed = not _run_in_process(study, objective, budget, options, progress=False)
        elif options.n_workers > 1:
            failed = not _run_workers(study, own_args, overrides, options, study_name, output_dir, storage_url, budget)
        else:
            failed = not _run_in_process(study, objective, budget, options, progress=True)
    except KeyboardInterrupt:
        log.warning("Interrupted; the running trials are queued again. Run the same command to resume study %s.", study_name)
        raise SystemExit(130) from None
    if is_worker:
        raise SystemExit(1 if failed else 0)

    csv_path = write_trials_csv(study, output_dir / "trials.csv")
    print(summary(study, budget, spec.objective.name, storage_url, output_dir, csv_path))
    if options.retrain_best:
        best = best_trial(study)
        if best is None:
            log.error("No trial completed, so there is no best configuration to re-train.")
            failed = True
        else:
            run_dir = retrain(best, objective.tensorboard_dir, study_name)
            print(f"Re-trained the best configuration: {run_dir}")
    if failed:
        raise SystemExit(1)


def resolve_budget(n_trials: int | None, spec: SearchSpec) -> int:
    """Return the total trial budget from ``--n-trials``, the search file or the grid size."""
    budget = n_trials if n_trials is not None else spec.n_trials
    if budget is not None and budget < 1:
        raise SearchFileError(f"--n-trials must be at least 1, got {budget}.")
    if spec.is_grid:
        if budget is None:
            return spec.grid_size
        if budget > spec.grid_size:
            log.warning("The budget of %d trials exceeds the %d grid points; the study stops after the grid.", budget, spec.grid_size)
            return spec.grid_size
    if budget is None:
        raise SearchFileError(f"Search file {spec.path}: set 'n_trials' (the total budget) or pass --n-trials.")
    return budget


def default_study_name(config: str, search: str) -> str:
    """Return e.g. ``ethanol_l4_depth2_lr_grid`` for ``configs/ethanol/l4_depth2.yaml`` and ``lr_grid.yaml``."""
    config_path = Path(config)
    return f"{config_path.parent.name}_{config_path.stem}_{Path(search).stem}".lstrip("_")


def check_trial_args(objective: TrialObjective) -> None:
    """Parse one trial's arguments without training, so a wrong config path fails before the study starts.

    LightningCLI's ``--print_config`` parses and checks every argument, prints the config and exits.
    """
    args = objective.run_args(objective.fit_args(objective.first_values(), 0), "check")
    try:
        print_config(args)
    except ValueError as error:
        raise ValueError(
            f"The trial arguments are invalid: {error}. Check the overrides after '--', "
            f"then the parameter paths in {objective.spec.path}, against {objective.config}."
        ) from None


def check_trial_setup(objective: TrialObjective) -> None:
    """Build the first trial's model, data module and trainer, and load its data, without training.

    A wrong data folder or trainer setting then fails once, before any trial is created. The
    TensorBoard logger of this check writes to a temporary folder, which is deleted.
    """
    values = objective.first_values()
    with tempfile.TemporaryDirectory(prefix="overparam-tune-check-") as scratch:
        check_objective = dataclasses.replace(objective, output_dir=Path(scratch))
        args = check_objective.run_args(check_objective.fit_args(values, 0), "check")
        try:
            cli = build_cli(args, run=False)
            _check_distributed(cli.trainer, optuna.trial.FixedTrial(values), objective.spec.pruner_name != "none")
            cli.datamodule.prepare_data()
            cli.datamodule.setup("fit")
        except Exception as error:  # noqa: BLE001 - any error here would fail every trial the same way.
            detail = " ".join(f"{type(error).__name__}: {error}".split())[:MAX_ERROR_CHARS].rstrip(".")
            raise ValueError(
                f"The first trial could not be set up ({detail}). Fix the overrides after '--' or {objective.config}, "
                "then run the same command again; no trial was started."
            ) from None


def _run_in_process(study: optuna.Study, objective: TrialObjective, budget: int, options, progress: bool) -> bool:
    """Run trials in this process until the budget is spent; return False if the worker stopped on errors."""
    poll_interval = min(float(options.heartbeat_interval), WORKER_POLL_INTERVAL_S)
    bar = _ProgressBar(study.study_name, budget, enabled=progress)
    try:
        with logging_redirect_tqdm():
            if options.batch_size is None:
                run_worker(study, objective, budget, poll_interval, on_progress=bar.update_usage, callbacks=[log_finished_trial])
            else:
                run_batched_worker(
                    study,
                    objective,
                    budget,
                    options.batch_size,
                    poll_interval,
                    on_progress=bar.update_usage,
                    callbacks=[log_finished_trial],
                )
    except RuntimeError as error:
        log.error("Worker stopped: %s", error)
        return False
    finally:
        bar.close()
    return True


def _run_workers(study, own_args, overrides, options, study_name, output_dir, storage_url, budget) -> bool:
    """Start ``--n-workers`` worker processes on this study, show progress and wait for them."""
    if storage_url.startswith("sqlite:"):
        log.warning(
            "%d workers share one SQLite file, whose writes are serialized; use --storage journal:///PATH.log "
            "for many workers on one host.",
            options.n_workers,
        )
    devices = worker_devices(options.n_workers)
    command = [
        sys.executable, "-m", "overparam", "tune", *own_args,
        "--study-name", study_name, "--output", str(output_dir), "--storage", storage_url,
    ]
    # Workers import overparam from the same place as this process, installed or not.
    package_root = str(Path(overparam.__file__).resolve().parents[1])
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    workers = []
    for index in range(options.n_workers):
        env = {**os.environ, "PYTHONPATH": python_path}
        if devices[index] is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices[index]
        worker_command = [*command, "--worker-index", str(index), "--", *overrides]
        workers.append(subprocess.Popen(worker_command, env=env))
        log.info("Started worker %d (pid %d)%s", index, workers[-1].pid, f" on CUDA devices {devices[index]}" if devices[index] else "")

    bar = _ProgressBar(study_name, budget, enabled=True)
    try:
        while any(worker.poll() is None for worker in workers):
            bar.update_usage(_usage(study))
            time.sleep(PARENT_POLL_INTERVAL_S)
    except KeyboardInterrupt:
        log.warning("Interrupted; waiting for the workers to record their running trials.")
        for worker in workers:
            worker.wait()
    finally:
        bar.update_usage(_usage(study))
        bar.close()

    failures = [(index, worker.returncode) for index, worker in enumerate(workers) if worker.returncode != 0]
    for index, code in failures:
        log.error("Worker %d exited with code %d; run the same command to resume the study.", index, code)
    return not failures


def worker_devices(n_workers: int) -> list[str | None]:
    """Return each worker's ``CUDA_VISIBLE_DEVICES``, or None for all when there are fewer GPUs than workers.

    The GPUs are split into equal contiguous shares; a remainder stays unused.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [device.strip() for device in visible.split(",") if device.strip()]
    else:
        import torch

        devices = [str(index) for index in range(torch.cuda.device_count())]
    if len(devices) < n_workers:
        if devices:
            log.warning("%d GPUs for %d workers: the workers share all GPUs.", len(devices), n_workers)
        return [None] * n_workers
    share = len(devices) // n_workers
    return [",".join(devices[index * share:(index + 1) * share]) for index in range(n_workers)]


def log_finished_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Log one line per finished trial (an Optuna study callback)."""
    if trial.state == TrialState.COMPLETE:
        log.info("Trial %d complete: value %.6g with %s", trial.number, trial.value, trial.params)
    elif trial.state == TrialState.PRUNED:
        log.info("Trial %d pruned: %s (%s)", trial.number, trial.user_attrs.get("prune_reason", "pruned"), trial.params)
    else:
        log.warning("Trial %d failed: %s (%s)", trial.number, trial.user_attrs.get("fail_reason", "unknown error"), trial.params)


class _ProgressBar:
    """tqdm bar over the trial budget, counted as in ``overparam.tuning.study``."""

    def __init__(self, study_name: str, budget: int, enabled: bool) -> None:
        # disable=None turns the bar off when stderr is not a terminal.
        self.bar = tqdm(total=budget, desc=study_name, unit="trial", disable=None if enabled else True)

    def update_usage(self, usage: BudgetUsage) -> None:
        self.bar.n = min(usage.counted, self.bar.total)
        self.bar.set_postfix(running=usage.running, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _usage(study: optuna.Study) -> BudgetUsage:
    return budget_usage(study.get_trials(deepcopy=False))


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        index = argv.index("--")
        return list(argv[:index]), list(argv[index + 1:])
    return list(argv), []


def _setup_logging(worker_index: int | None) -> None:
    if not logging.getLogger().handlers:
        worker = "" if worker_index is None else f" worker {worker_index}"
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s{worker} %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Full-batch runs without a validation split return no validation batches on purpose.
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
    # Trials pass their arguments to LightningCLI while sys.argv contains the tune command.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python.*")
    # Raised inside Lightning 2.6 by a newer torch, once per trial.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

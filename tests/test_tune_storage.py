"""``overparam tune`` across processes: a killed worker on SQLite, two workers on a journal file and on
PostgreSQL, and data-parallel (ddp_spawn) trials.

Trials train on the synthetic data module, so these tests need no data files. The PostgreSQL test
starts its own server from the installed binaries (``bash .ci/postgres.sh`` installs them on
Debian) or uses the server at ``OVERPARAM_TEST_POSTGRES_URL``.
"""

import csv
import datetime
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage, fail_stale_trials
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from overparam.tuning.command import main as tune_main
from overparam.tuning.search_space import make_pruner, make_sampler, parse_search
from overparam.tuning.storage import open_storage
from overparam.tuning.study import budget_usage, open_study, run_worker
from overparam.tuning.trial import TrialObjective
from conftest import REPO_ROOT

LR = "model.optimizer.init_args.lr"
GRID = [1e-3, 3e-3, 1e-2, 3e-2]
SYNTHETIC_CONFIG = {
    "seed_everything": 0,
    "model": {
        "depth": 2,
        "hidden_widths": 4,
        "init": "near_zero",
        "init_std": 0.01,
        "p": 2,
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01}},
        "iterations_per_step": 100,
    },
    "data": {"class_path": "overparam.data.SyntheticRegressionDataModule", "init_args": {"num_samples": 400, "input_size": 16}},
    "trainer": {
        "max_steps": 1000,
        "log_every_n_steps": 50,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "default_hp_metric": False},
        },
    },
}


def _study_files(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump(SYNTHETIC_CONFIG))
    search = tmp_path / "grid.yaml"
    search.write_text(yaml.safe_dump({"objective": "final_gap", "sampler": "grid", "pruner": "none", "params": {LR: GRID}}))
    return config, search


def _tune_args(tmp_path: Path, storage: str, study_name: str, *options: str, max_steps: int = 1000) -> list[str]:
    config, search = _study_files(tmp_path)
    return [
        "--config", str(config), "--search", str(search), "--output", str(tmp_path / "out"),
        "--storage", storage, "--study-name", study_name, "--heartbeat-interval", "1", *options,
        "--", "--trainer.max_steps", str(max_steps),
    ]


def _worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def _assert_grid_done_once(trials: list[optuna.trial.FrozenTrial]) -> None:
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    assert budget_usage(trials).counted == len(GRID)
    assert sorted(trial.params[LR] for trial in complete) == GRID
    assert not [trial for trial in trials if trial.state in (TrialState.RUNNING, TrialState.WAITING)]


def _assert_only_surplus_failed(trials: list[optuna.trial.FrozenTrial]) -> None:
    # Two workers that ask for the last place at the same moment leave one surplus trial, failed at once.
    failed = [trial for trial in trials if trial.state == TrialState.FAIL]
    assert all(trial.user_attrs.get("surplus") for trial in failed)
    assert len(failed) <= 1


def _wait_for_running_trial(study_name: str, storage: str, worker: subprocess.Popen, timeout_s: float = 120.0):
    """Return the study once a trial has completed and another has run for 0.5 s."""
    deadline = time.monotonic() + timeout_s
    study = None
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker exited before it could be killed"
        if study is None:
            try:
                study = optuna.load_study(study_name=study_name, storage=storage)
            except KeyError:
                time.sleep(0.2)
                continue
        trials = study.get_trials()
        running = [trial for trial in trials if trial.state == TrialState.RUNNING]
        old_enough = [trial for trial in running if datetime.datetime.now() - trial.datetime_start > datetime.timedelta(seconds=0.5)]
        if any(trial.state == TrialState.COMPLETE for trial in trials) and old_enough:
            return study
        time.sleep(0.1)
    raise AssertionError(f"no trial was running after {timeout_s} s")


@pytest.mark.slow
def test_killed_worker_trial_is_retried(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [
        sys.executable, "-m", "overparam", "tune",
        *_tune_args(tmp_path, storage, "kill", "--grace-period", "2", max_steps=4000),
    ]
    with (tmp_path / "first.log").open("w") as log:
        worker = subprocess.Popen(command, cwd=REPO_ROOT, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            study = _wait_for_running_trial("kill", storage, worker)
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()

    before = study.get_trials()
    (killed,) = [trial for trial in before if trial.state == TrialState.RUNNING]
    completed = {trial.number: trial.value for trial in before if trial.state == TrialState.COMPLETE}
    assert completed

    second = subprocess.run(command, cwd=REPO_ROOT, env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]

    trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
    by_number = {trial.number: trial for trial in trials}
    for number, value in completed.items():
        assert by_number[number].state == TrialState.COMPLETE
        assert by_number[number].value == value
    assert by_number[killed.number].state == TrialState.FAIL
    (retry,) = [trial for trial in trials if trial.system_attrs.get("failed_trial") == killed.number]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == killed.params
    _assert_grid_done_once(trials)
    assert len(trials) == len(GRID) + 1

    with (tmp_path / "out" / "trials.csv").open() as handle:
        rows = {int(row["number"]): row for row in csv.DictReader(handle)}
    assert "no heartbeat" in rows[killed.number]["reason"]
    assert rows[killed.number]["retried_as"] == str(retry.number)
    assert rows[retry.number]["retry_of"] == str(killed.number)


@pytest.mark.slow
def test_interrupted_trial_is_requeued(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [sys.executable, "-m", "overparam", "tune", *_tune_args(tmp_path, storage, "interrupt", max_steps=4000)]
    with (tmp_path / "first.log").open("w") as log:
        worker = subprocess.Popen(command, cwd=REPO_ROOT, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            study = _wait_for_running_trial("interrupt", storage, worker)
            worker.send_signal(signal.SIGINT)
            assert worker.wait(timeout=60) == 130
        finally:
            worker.kill()
            worker.wait()

    (interrupted,) = [trial for trial in study.get_trials() if trial.state == TrialState.FAIL]
    (queued,) = [trial for trial in study.get_trials() if trial.state == TrialState.WAITING]
    assert interrupted.user_attrs["fail_reason"].startswith("interrupted")
    assert queued.params == interrupted.params
    assert queued.system_attrs["failed_trial"] == interrupted.number

    second = subprocess.run(command, cwd=REPO_ROOT, env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name="interrupt", storage=storage).get_trials()
    _assert_grid_done_once(trials)
    assert [trial.number for trial in trials if trial.state == TrialState.FAIL] == [interrupted.number]


def test_journal_heartbeat_fails_stale_trial(tmp_path):
    storage = open_storage(f"journal://{tmp_path / 'study.log'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="stale")
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)

    storage.record_heartbeat(trial._trial_id)
    fail_stale_trials(study)
    assert study.get_trials()[0].state == TrialState.RUNNING

    time.sleep(1.5)
    fail_stale_trials(study)
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL
    assert retry.state == TrialState.WAITING
    assert retry.params == failed.params
    assert retry.system_attrs["failed_trial"] == failed.number


@pytest.mark.slow
def test_two_workers_share_journal_file(tmp_path):
    journal = tmp_path / "study.log"

    tune_main(_tune_args(tmp_path, f"journal://{journal}", "journal", "--n-workers", "2"))

    trials = optuna.load_study(study_name="journal", storage=JournalStorage(JournalFileBackend(str(journal)))).get_trials()
    _assert_grid_done_once(trials)
    _assert_only_surplus_failed(trials)


def _postgres_bin_dir() -> Path | None:
    """Return the folder of pg_ctl, initdb and createdb: Debian's newest, else the one pg_ctl on PATH links to."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """URL of an empty database on a PostgreSQL server started for this test session."""
    if os.environ.get("OVERPARAM_TEST_POSTGRES_URL"):
        yield os.environ["OVERPARAM_TEST_POSTGRES_URL"]
        return
    bin_dir = _postgres_bin_dir()
    if bin_dir is None or not all((bin_dir / name).exists() for name in ("initdb", "createdb")):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; run `bash .ci/postgres.sh` as root to install them")

    # The server refuses to run as root, so root runs it as the postgres user.
    run_as = []
    base = Path(tempfile.mkdtemp(prefix="overparam-postgres-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip("running as root without a 'postgres' user to run the PostgreSQL server")
        os.chown(base, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]

    data = base / "data"
    port = _free_port()
    pg_ctl = [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data)]
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"], check=True, capture_output=True)
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*pg_ctl, "-l", str(base / "server.log"), "-w", "-t", "60", "-o", options, "start"], check=True, capture_output=True)
    try:
        subprocess.run(
            [*run_as, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "overparam_test"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/overparam_test"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_postgres(tmp_path, postgres_url):
    tune_main(_tune_args(tmp_path, postgres_url, "postgres", "--n-workers", "2"))

    trials = optuna.load_study(study_name="postgres", storage=open_storage(postgres_url)).get_trials()
    _assert_grid_done_once(trials)
    _assert_only_surplus_failed(trials)


DDP_OVERRIDES = ["--trainer.strategy", "ddp_spawn", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def _pruning_study(tmp_path: Path, storage: str):
    config, _ = _study_files(tmp_path)
    search = {
        "objective": "final_gap",
        "sampler": "tpe",
        "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        "params": {LR: {"low": 1e-5, "high": 1e-1, "log": True}},
    }
    spec = parse_search(search, tmp_path / "search.yaml")
    study = open_study(open_storage(storage), "ddp", spec, make_sampler(spec), make_pruner(spec), {})
    # A fast learning rate first, then one 100 times slower, whose gap is larger at every step.
    study.enqueue_trial({LR: 3e-2})
    study.enqueue_trial({LR: 3e-4})
    objective = TrialObjective(spec, str(config), ["--trainer.max_steps", "300", *DDP_OVERRIDES], tmp_path / "out", "ddp", budget=2)
    return study, objective


def test_ddp_pruning_rejects_journal(tmp_path):
    study, objective = _pruning_study(tmp_path, f"journal://{tmp_path / 'study.log'}")

    run_worker(study, objective, budget=2, poll_interval=1.0)

    for trial in study.get_trials():
        assert trial.state == TrialState.FAIL
        assert "needs an RDB storage" in trial.user_attrs["fail_reason"]


@pytest.mark.slow
def test_ddp_spawn_trial_is_pruned(tmp_path):
    study, objective = _pruning_study(tmp_path, f"sqlite:///{tmp_path / 'study.db'}")

    run_worker(study, objective, budget=2, poll_interval=1.0)

    fast, slow = study.get_trials()
    assert fast.state == TrialState.COMPLETE
    assert sorted(fast.intermediate_values) == [100, 200, 300]
    assert slow.state == TrialState.PRUNED
    assert slow.user_attrs["prune_reason"] == "pruned by the pruner at iteration 100"

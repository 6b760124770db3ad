"""``overparam tune --batch-size``: trials trained together by the batched engine, on the real Ethanol data."""

import csv
import datetime
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from overparam.cli import build_cli
from overparam.sweeps import MemberOutcome
from overparam.tuning.batched import TrialHeartbeats, divergence_reason
from overparam.tuning.command import main as tune_main
from overparam.tuning.storage import open_storage
from overparam.tuning.study import budget_usage
from conftest import REPO_ROOT

ETHANOL_CONFIG = REPO_ROOT / "configs" / "ethanol" / "l4_depth2.yaml"
LR = "model.optimizer.init_args.lr"
DEPTH = "model.depth"
# In float64, the batched engine and overparam fit differ only in the order of floating-point sums.
# test_sweep_runner bounds the effect on losses at 1e-8 relative.
FLOAT64_ARGS = ["--trainer.precision", "64-true", "--data.init_args.dtype", "float64"]


@pytest.fixture(autouse=True)
def single_thread():
    """Run on one intra-op thread: the matrices are tiny, and a second thread on a busy core only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_search(tmp_path: Path, search: dict, name: str = "search.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(search))
    return path


def _gas_overrides(gas_dir: Path, max_steps: int, log_every: int = 10) -> list[str]:
    return [
        "--data.init_args.data_dir", str(gas_dir),
        "--trainer.max_steps", str(max_steps),
        "--trainer.log_every_n_steps", str(log_every),
    ]


def _tune(search: Path, output: Path, study_name: str, *options: str, overrides: list[str]) -> None:
    tune_main([
        "--config", str(ETHANOL_CONFIG), "--search", str(search), "--output", str(output),
        "--study-name", study_name, *options, "--", *overrides,
    ])


def _load(output: Path, study_name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study_name, storage=f"sqlite:///{output / 'study.db'}").get_trials()


def _read_table(path: Path) -> dict[int, dict[str, str]]:
    with path.open() as handle:
        return {int(row["number"]): row for row in csv.DictReader(handle)}


def _hparams(run_dir: Path):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return events, experiment, session


def test_grid_matches_sequential(gas_dir, tmp_path):
    # Per-trial seeds, two learning rates and two depths: the engine trains each depth as its own
    # batch inside one round of four trials.
    search = _write_search(tmp_path, {
        "sampler": "grid",
        "pruner": "none",
        "objective": "auc_log_gap",
        "seeds": {"training": 7, "per_trial": True},
        "params": {LR: [5e-5, 1e-4], DEPTH: [2, 3]},
    })
    overrides = [*_gas_overrides(gas_dir, max_steps=60), *FLOAT64_ARGS]

    _tune(search, tmp_path / "sequential", "grid", overrides=overrides)
    _tune(search, tmp_path / "batched", "grid", "--batch-size", "4", overrides=overrides)

    sequential = {(trial.params[LR], trial.params[DEPTH]): trial for trial in _load(tmp_path / "sequential", "grid")}
    batched = {(trial.params[LR], trial.params[DEPTH]): trial for trial in _load(tmp_path / "batched", "grid")}
    assert sorted(batched) == sorted(sequential)
    assert len(sequential) == 4
    for point, expected in sequential.items():
        trial = batched[point]
        assert expected.state == TrialState.COMPLETE
        assert trial.state == TrialState.COMPLETE
        assert trial.user_attrs["seed"] == expected.user_attrs["seed"] == 7 + trial.number
        assert trial.user_attrs["fit_args"][-2:] == ["--seed_everything", str(7 + trial.number)]
        assert trial.value == pytest.approx(expected.value, rel=1e-9)
        assert trial.user_attrs["batch"] == [0, 1, 2, 3]
    assert len({trial.value for trial in batched.values()}) == 4


def test_budget_exact_across_restarts(gas_dir, tmp_path):
    # The gap threshold is out of reach, so every trial scores max_steps + 1.
    search = _write_search(tmp_path, {
        "sampler": "random",
        "pruner": "none",
        "objective": {"name": "iterations_to_gap", "gap_threshold": 1e-9},
        "params": {LR: {"low": 1e-5, "high": 1e-4, "log": True}},
    })
    overrides = _gas_overrides(gas_dir, max_steps=20)

    _tune(search, tmp_path, "budget", "--batch-size", "2", "--n-trials", "3", overrides=overrides)
    first = _load(tmp_path, "budget")
    _tune(search, tmp_path, "budget", "--batch-size", "2", "--n-trials", "5", overrides=overrides)
    _tune(search, tmp_path, "budget", "--batch-size", "2", "--n-trials", "5", overrides=overrides)
    trials = _load(tmp_path, "budget")

    assert [trial.user_attrs["batch"] for trial in first] == [[0, 1], [0, 1], [2]]
    assert [trial.user_attrs["batch"] for trial in trials] == [[0, 1], [0, 1], [2], [3, 4], [3, 4]]
    assert budget_usage(trials).counted == 5
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 5
    assert [trial.value for trial in trials] == [21.0] * 5


def test_diverging_lr_is_pruned(gas_dir, tmp_path):
    search = _write_search(tmp_path, {
        "sampler": "grid",
        "pruner": "none",
        "divergence": {"max_loss": 1e3},
        "params": {LR: [1e-4, 1.0]},
    })
    # Every iteration is logged, so the member's curve shows the loss that diverged.
    _tune(search, tmp_path, "diverge", "--batch-size", "2", overrides=_gas_overrides(gas_dir, max_steps=30, log_every=1))

    trials = {trial.params[LR]: trial for trial in _load(tmp_path, "diverge")}
    diverged = trials[1.0]
    assert trials[1e-4].state == TrialState.COMPLETE
    assert diverged.state == TrialState.PRUNED
    assert 0 <= diverged.user_attrs["diverged_at"] < 30
    reason = diverged.user_attrs["prune_reason"]
    assert re.fullmatch(
        rf"diverged at iteration {diverged.user_attrs['diverged_at']}: "
        r"train/loss (is (nan|inf)|\S+ exceeded max_loss 1000)",
        reason,
    ), reason

    row = _read_table(tmp_path / "trials.csv")[diverged.number]
    assert row["state"] == "PRUNED"
    assert row["value"] == ""
    assert row["reason"] == reason
    assert row["diverged_at"] == str(diverged.user_attrs["diverged_at"])

    events, experiment, _ = _hparams(Path(diverged.user_attrs["run_dir"]))
    assert events.Scalars("hp/diverged")[0].value == 1.0
    assert events.Scalars("hp/pruned")[0].value == 0.0
    assert "hp/objective" not in {info.name.tag for info in experiment.metric_infos}


def test_table_and_hparams_read_back(gas_dir, tmp_path, capsys):
    search = _write_search(tmp_path, {
        "sampler": "grid", "pruner": "none", "objective": "final_gap", "params": {LR: [1e-4, 3e-4]},
    })
    output = tmp_path / "out"

    _tune(search, output, "table", "--batch-size", "2", "--retrain-best", overrides=_gas_overrides(gas_dir, max_steps=40))

    printed = capsys.readouterr().out
    rows = _read_table(output / "trials.csv")
    assert sorted(float(row[LR]) for row in rows.values()) == [1e-4, 3e-4]
    for number, row in rows.items():
        lr = float(row[LR])
        run_dir = Path(row["run_dir"])
        assert row["state"] == "COMPLETE"
        assert row["seed"] == "0"
        assert float(row["duration_s"]) > 0
        assert run_dir == output / "tb" / "table" / f"trial_{number:05d}"

        events, experiment, session = _hparams(run_dir)
        assert {info.name.tag for info in experiment.metric_infos} >= {"hp/objective", "hp/final_loss", "hp/diverged"}
        assert session.hparams["trial"].number_value == number
        assert session.hparams["seed"].number_value == 0
        assert session.hparams["optimizer_lr"].number_value == pytest.approx(lr)
        assert session.hparams["depth"].number_value == 2
        assert events.Scalars("hp/objective")[0].value == pytest.approx(float(row["value"]), rel=1e-6)
        gaps = events.Scalars("train/loss_gap")
        assert [event.step for event in gaps] == [0, 10, 20, 30, 40]
        # final_gap is the gap after the last iteration.
        assert gaps[-1].value == pytest.approx(float(row["value"]), rel=1e-6)

        # The saved config.yaml runs the trial's settings.
        saved = build_cli(["--config", str(run_dir / "config.yaml")], run=False)
        assert saved.config["model"]["optimizer"]["init_args"]["lr"] == lr
        assert saved.config["seed_everything"] == 0
        assert saved.config["trainer"]["max_steps"] == 40

    best_number = min(rows, key=lambda number: float(rows[number]["value"]))
    best_lr = float(rows[best_number][LR])
    assert f"Best trial {best_number}" in printed
    assert f"overparam fit --config {ETHANOL_CONFIG}" in printed
    assert f"--model.optimizer.init_args.lr {best_lr!r} --seed_everything 0" in printed
    best_run = output / "tb" / "table" / "best"
    assert yaml.safe_load((best_run / "config.yaml").read_text())["model"]["optimizer"]["init_args"]["lr"] == best_lr


def test_rejects_unbatchable_param(tmp_path):
    search = _write_search(tmp_path, {"sampler": "grid", "params": {"data.init_args.gas": [1, 2]}})

    with pytest.raises(SystemExit) as exit_info:
        _tune(search, tmp_path / "out", "gas", "--batch-size", "2", overrides=[])
    message = str(exit_info.value.code)
    assert "'data.init_args.gas'" in message
    assert "Remove --batch-size" in message
    assert not (tmp_path / "out" / "study.db").exists()


def test_rejects_config_engine_cannot_run(gas_dir, tmp_path):
    search = _write_search(tmp_path, {"sampler": "grid", "params": {LR: [1e-4]}})
    overrides = [*_gas_overrides(gas_dir, max_steps=5), "--model.bias", "true"]

    with pytest.raises(SystemExit) as exit_info:
        _tune(search, tmp_path / "out", "bias", "--batch-size", "2", overrides=overrides)
    message = str(exit_info.value.code)
    assert "bias-free" in message
    assert "remove --batch-size" in message
    assert not (tmp_path / "out" / "study.db").exists()


def test_divergence_reason_wording():
    def outcome(curve, diverged_at):
        return MemberOutcome(
            settings={}, final_loss=math.nan, final_gap=math.nan, diverged=True, diverged_at=diverged_at,
            iterations=100, curve=curve, loss_optimum=0.2, end_to_end=torch.zeros(1, 1), batch=0,
        )

    assert divergence_reason(outcome([(0, 5.0), (10, math.inf)], 10), 1e3) == "train/loss is inf"
    assert divergence_reason(outcome([(0, 5.0), (10, 2e3)], 10), 1e3) == "train/loss 2000 exceeded max_loss 1000"
    assert divergence_reason(outcome([(0, 5.0), (10, 7.0)], 10), 1e3) == "the update was not finite"
    assert "was not logged" in divergence_reason(outcome([(0, 5.0)], 3), 1e3)
    assert "max_loss" not in divergence_reason(outcome([(0, 5.0)], 3), None)


def test_heartbeats_keep_trials_alive(tmp_path):
    storages = {
        "sqlite": open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=2, max_retry=0),
        "journal": open_storage(f"journal://{tmp_path / 'study.log'}", heartbeat_interval=1, grace_period=2, max_retry=0),
    }
    studies = {name: optuna.create_study(storage=storage, study_name=name) for name, storage in storages.items()}
    beating = {name: study.ask() for name, study in studies.items()}
    left = {name: study.ask() for name, study in studies.items()}
    for name, study in studies.items():
        # One heartbeat, as a worker records when its trial starts, and then none.
        storages[name].record_heartbeat(left[name]._trial_id)

    # SQLite stores heartbeats in whole seconds, so only 3 s without one is surely more than the 2 s grace period.
    with TrialHeartbeats(studies["sqlite"]._storage) as sqlite_beats, TrialHeartbeats(studies["journal"]._storage) as journal_beats:
        sqlite_beats.add(beating["sqlite"]._trial_id)
        journal_beats.add(beating["journal"]._trial_id)
        time.sleep(3.2)
        for study in studies.values():
            fail_stale_trials(study)

    for name, study in studies.items():
        states = {trial.number: trial.state for trial in study.get_trials()}
        assert states[beating[name].number] == TrialState.RUNNING, name
        assert states[left[name].number] == TrialState.FAIL, name


GRID = [2e-5, 5e-5, 1e-4, 2e-4]


def _worker_env() -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    # On the CPU with one thread, a batch takes long enough to be killed in the middle.
    return {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _wait_for_old_batch(study_name: str, storage: str, worker: subprocess.Popen, min_age_s: float, timeout_s: float = 180.0):
    """Return the study once a trial has completed and two others have run for ``min_age_s`` seconds."""
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
        ages = [datetime.datetime.now() - trial.datetime_start for trial in running]
        done = any(trial.state == TrialState.COMPLETE for trial in trials)
        if done and len(running) == 2 and min(ages) > datetime.timedelta(seconds=min_age_s):
            return study
        time.sleep(0.1)
    raise AssertionError(f"no batch had run for {min_age_s} s after {timeout_s} s")


@pytest.mark.slow
def test_killed_batch_is_retried(gas_dir, tmp_path):
    search = _write_search(tmp_path, {"sampler": "grid", "pruner": "none", "objective": "final_gap", "params": {LR: GRID}})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # A batch of two members trains 16000 iterations in about 9 s on one busy CPU core.
    command = [
        sys.executable, "-m", "overparam", "tune", "--config", str(ETHANOL_CONFIG), "--search", str(search),
        "--output", str(tmp_path / "out"), "--storage", url, "--study-name", "kill", "--batch-size", "2",
        "--heartbeat-interval", "1", "--grace-period", "2",
        "--", *_gas_overrides(gas_dir, max_steps=16000, log_every=1000),
    ]
    with (tmp_path / "first.log").open("w") as log:
        worker = subprocess.Popen(command, cwd=REPO_ROOT, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            # Without the worker's heartbeats these trials would be stale: SQLite stores heartbeats in
            # whole seconds, so 4 s is surely more than the 2 s grace period.
            _wait_for_old_batch("kill", url, worker, min_age_s=4.0)
            study = optuna.load_study(study_name="kill", storage=open_storage(url, heartbeat_interval=1, grace_period=2))
            fail_stale_trials(study)
            before = study.get_trials()
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()

    killed = [trial for trial in before if trial.state == TrialState.RUNNING]
    completed = {trial.number: trial.value for trial in before if trial.state == TrialState.COMPLETE}
    assert len(killed) == 2, "the live batch's trials were failed although the worker recorded heartbeats"
    assert len(completed) == 2

    second = subprocess.run(command, cwd=REPO_ROOT, env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]

    trials = optuna.load_study(study_name="kill", storage=url).get_trials()
    by_number = {trial.number: trial for trial in trials}
    for number, value in completed.items():
        assert by_number[number].state == TrialState.COMPLETE
        assert by_number[number].value == value
    retries = []
    for trial in killed:
        assert by_number[trial.number].state == TrialState.FAIL
        (retry,) = [other for other in trials if other.system_attrs.get("failed_trial") == trial.number]
        assert retry.state == TrialState.COMPLETE
        assert retry.params == trial.params
        assert retry.user_attrs["seed"] == trial.user_attrs["seed"]
        retries.append(retry.number)
    assert by_number[retries[0]].user_attrs["batch"] == sorted(retries)

    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    assert sorted(trial.params[LR] for trial in complete) == GRID
    assert budget_usage(trials).counted == len(GRID)
    assert len(trials) == len(GRID) + 2
    assert not [trial for trial in trials if trial.state in (TrialState.RUNNING, TrialState.WAITING)]

    rows = _read_table(tmp_path / "out" / "trials.csv")
    for trial, retry in zip(killed, retries):
        assert "no heartbeat" in rows[trial.number]["reason"]
        assert rows[trial.number]["retried_as"] == str(retry)
        assert rows[retry]["retry_of"] == str(trial.number)


@pytest.mark.slow
def test_two_batched_workers_share_journal(gas_dir, tmp_path, monkeypatch):
    # The worker processes inherit this: a second thread on a busy core only waits.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    search = _write_search(tmp_path, {"sampler": "grid", "pruner": "none", "objective": "final_gap", "params": {LR: GRID}})
    journal = tmp_path / "study.log"

    _tune(
        search, tmp_path, "journal", "--storage", f"journal://{journal}", "--n-workers", "2", "--batch-size", "3",
        overrides=_gas_overrides(gas_dir, max_steps=200),
    )

    trials = optuna.load_study(study_name="journal", storage=open_storage(f"journal://{journal}")).get_trials()
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    failed = [trial for trial in trials if trial.state == TrialState.FAIL]
    assert sorted(trial.params[LR] for trial in complete) == GRID
    assert budget_usage(trials).counted == len(GRID)
    # Two workers that ask for the last places at the same moment leave surplus trials, failed at once.
    assert all(trial.user_attrs.get("surplus") for trial in failed)

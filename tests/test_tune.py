"""``overparam tune`` in one process: search files, objectives, trials on real data, pruning, reports."""

import csv
import math
from pathlib import Path

import optuna
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from overparam.cli import build_cli
from overparam.tuning.command import main as tune_main
from overparam.tuning.command import worker_devices
from overparam.tuning.objectives import compute_objective
from overparam.tuning.search_space import SearchFileError, load_search_file, make_pruner, make_sampler, parse_search
from overparam.tuning.storage import open_storage
from overparam.tuning.study import (
    SURPLUS_ATTR,
    SurplusTrial,
    budget_slots,
    budget_usage,
    check_budget_slot,
    open_study,
    run_worker,
)
from overparam.tuning.trial import TrialObjective
from conftest import REPO_ROOT

ETHANOL_CONFIG = REPO_ROOT / "configs" / "ethanol" / "l4_depth2.yaml"
LR = "model.optimizer.init_args.lr"


def _write_search(tmp_path: Path, search: dict, name: str = "search.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(search))
    return path


def _gas_overrides(gas_dir: Path, max_steps: int = 300) -> list[str]:
    return [
        "--data.init_args.data_dir", str(gas_dir),
        "--trainer.max_steps", str(max_steps),
        "--trainer.log_every_n_steps", "10",
    ]


def _hparams(run_dir: Path):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return events, experiment, session


def test_shipped_grid_is_half_decades():
    spec = load_search_file(REPO_ROOT / "configs" / "search" / "lr_grid.yaml")

    lrs = spec.grid()[LR]
    assert spec.is_grid
    assert spec.pruner_name == "none"
    assert len(lrs) == 7
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[-1] == pytest.approx(1e-2)
    for low, high in zip(lrs, lrs[1:]):
        assert math.log10(high) - math.log10(low) == pytest.approx(0.5)
    assert isinstance(make_sampler(spec), optuna.samplers.GridSampler)


def test_shipped_tpe_search_builds():
    spec = load_search_file(REPO_ROOT / "configs" / "search" / "lr_tpe.yaml")

    assert spec.params[LR].log
    assert spec.n_trials == 30
    assert isinstance(make_sampler(spec), optuna.samplers.TPESampler)
    assert isinstance(make_pruner(spec), optuna.pruners.MedianPruner)


def test_search_reads_unquoted_exponents():
    # PyYAML reads 1e-5 (no dot) as a string.
    spec = parse_search(yaml.safe_load("sampler: grid\nparams:\n  model.optimizer.init_args.lr: [1e-5, 1e-4]\n"), Path("s.yaml"))

    assert spec.grid()[LR] == [1e-5, 1e-4]
    assert spec.grid_size == 2


@pytest.mark.parametrize(
    "search, message",
    [
        ({}, "'params' is missing"),
        ({"params": {LR: {"low": 1e-3}}}, "needs 'low' and 'high'"),
        ({"params": {LR: {"low": 0.0, "high": 1.0, "log": True}}}, "needs low > 0"),
        ({"params": {LR: {"low": 1.0, "high": 0.1}}}, "swap them"),
        ({"params": {LR: [0.1]}, "samplr": "tpe"}, "unknown key(s) samplr"),
        ({"params": {LR: {"low": 0.1, "high": 1.0}}, "sampler": "grid"}, "needs a list of values"),
        ({"params": {LR: [0.1]}, "sampler": "annealing"}, "unknown sampler 'annealing'"),
        ({"params": {LR: [0.1]}, "pruner": "early"}, "unknown pruner 'early'"),
        ({"params": {LR: [0.1]}, "objective": "best_loss"}, "unknown objective 'best_loss'"),
        ({"params": {LR: [0.1]}, "objective": "iterations_to_gap"}, "needs 'gap_threshold'"),
        ({"params": {LR: [0.1]}, "n_trials": 0}, "'n_trials' must be a positive integer"),
        ({"params": {LR: [0.1, 0.1]}}, "contain duplicates"),
        ({"params": {"--model.lr": [0.1]}}, "without leading dashes"),
        ({"params": {LR: [0.1]}, "seeds": {"trial": 1}}, "unknown key(s) trial at seeds"),
    ],
)
def test_search_file_errors_name_key(tmp_path, search, message):
    path = _write_search(tmp_path, search)

    with pytest.raises(SearchFileError) as error:
        load_search_file(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_invalid_pruner_argument_names_class(tmp_path):
    spec = load_search_file(_write_search(tmp_path, {"params": {LR: [0.1]}, "pruner": {"name": "median", "patience": 3}}))

    with pytest.raises(SearchFileError, match="MedianPruner"):
        make_pruner(spec)


def test_objectives_on_known_curve():
    curve = [(0, 1.5), (10, 0.6), (20, 0.51), (30, 0.5 + 1e-13)]

    assert compute_objective("final_gap", curve, 0.5) == pytest.approx(1e-13, abs=1e-15)
    assert compute_objective("iterations_to_gap", curve, 0.5, gap_threshold=0.1) == 10
    assert compute_objective("iterations_to_gap", curve, 0.5, max_steps=50, gap_threshold=1e-14) == 51
    assert compute_objective("iterations_to_gap", curve, 0.5, gap_threshold=1e-14) == 31
    # log10 of gaps 1, 0.1, 0.01 and a gap below the floor counted as 1e-12.
    expected = (0 - 1 - 2 - 12) / 4
    assert compute_objective("auc_log_gap", curve, 0.5, gap_floor=1e-12) == pytest.approx(expected)
    assert compute_objective("final_gap", curve, None) == pytest.approx(0.5)


def test_objective_rejects_diverged_curve():
    with pytest.raises(ValueError, match="iteration 10"):
        compute_objective("final_gap", [(0, 1.0), (10, math.nan)], 0.5)


def test_budget_skips_retried_and_surplus():
    distribution = optuna.distributions.FloatDistribution(0.0, 1.0)

    def trial(number, state, system_attrs=None, user_attrs=None):
        frozen = optuna.create_trial(
            state=state,
            value=1.0 if state == optuna.trial.TrialState.COMPLETE else None,
            params={"x": 0.5},
            distributions={"x": distribution},
            system_attrs=system_attrs or {},
            user_attrs=user_attrs or {},
        )
        frozen.number = number
        return frozen

    trials = [
        trial(0, optuna.trial.TrialState.COMPLETE),
        trial(1, optuna.trial.TrialState.FAIL),  # its worker died; trial 3 retries it
        trial(2, optuna.trial.TrialState.PRUNED),
        trial(3, optuna.trial.TrialState.RUNNING, {"failed_trial": 1, "retry_history": [1]}),
        trial(4, optuna.trial.TrialState.FAIL, user_attrs={SURPLUS_ATTR: True}),
        trial(5, optuna.trial.TrialState.FAIL, user_attrs={"fail_reason": "ValueError: x"}),
    ]

    usage = budget_usage(trials)
    assert usage.counted == 3
    assert usage.running == 1
    assert budget_slots(trials) == [0, 1, 2, 5]


def test_trial_past_budget_is_surplus(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}"), study_name="race")
    # Three workers asked for a trial at once with one place left after a finished trial.
    finished = study.ask()
    study.tell(finished, 1.0)
    first, second, third = study.ask(), study.ask(), study.ask()

    check_budget_slot(first, budget=2)
    for late in (second, third):
        with pytest.raises(SurplusTrial, match="exceeds the budget of 2 trials"):
            check_budget_slot(late, budget=2)
        assert late.user_attrs[SURPLUS_ATTR] is True
    study.tell(second, state=optuna.trial.TrialState.FAIL)
    assert budget_usage(study.get_trials()).counted == 1


def test_objective_runs_under_fixed_trial(gas_dir, tmp_path):
    spec = load_search_file(_write_search(tmp_path, {"objective": "final_gap", "params": {LR: {"low": 1e-5, "high": 1e-2, "log": True}}}))
    objective = TrialObjective(spec, str(ETHANOL_CONFIG), _gas_overrides(gas_dir), tmp_path / "out", "fixed")
    trial = optuna.trial.FixedTrial({LR: 1e-3}, number=4)

    value = objective(trial)

    run_dir = Path(trial.user_attrs["run_dir"])
    assert run_dir == tmp_path / "out" / "tb" / "fixed" / "trial_00004"
    assert trial.user_attrs["seed"] == 0
    assert math.isfinite(value)
    assert value > 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["optimizer"]["init_args"]["lr"] == 1e-3
    assert saved["seed_everything"] == 0

    # The recorded arguments and the saved config both reproduce the trial's value.
    for args in (trial.user_attrs["fit_args"], ["--config", str(run_dir / "config.yaml")]):
        rerun = build_cli([*args, "--trainer.logger.init_args.save_dir", str(tmp_path / "rerun")], run=False)
        rerun.trainer.fit(rerun.model, datamodule=rerun.datamodule)
        iteration, loss = rerun.model.curve[-1]
        assert iteration == 300
        assert loss - rerun.model.loss_optimum == pytest.approx(value, rel=1e-6)


def test_diverging_lr_is_pruned_with_reason(gas_dir, tmp_path):
    spec = load_search_file(_write_search(tmp_path, {"params": {LR: [1.0]}, "divergence": {"max_loss": 1e3}, "pruner": "none"}))
    objective = TrialObjective(spec, str(ETHANOL_CONFIG), _gas_overrides(gas_dir, max_steps=2000), tmp_path / "out", "diverge")
    trial = optuna.trial.FixedTrial({LR: 1.0})

    with pytest.raises(optuna.TrialPruned, match="diverged at iteration"):
        objective(trial)

    assert 0 <= trial.user_attrs["diverged_at"] < 2000
    assert "diverged at iteration" in trial.user_attrs["prune_reason"]
    assert "--divergence.max_loss" in trial.user_attrs["fit_args"]


def test_median_pruner_prunes_slow_lr(gas_dir, tmp_path):
    search = {
        "sampler": "tpe",
        "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        "params": {LR: {"low": 1e-6, "high": 1e-2, "log": True}},
    }
    spec = load_search_file(_write_search(tmp_path, search))
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = open_study(storage, "prune", spec, make_sampler(spec), make_pruner(spec), {})
    # A fast learning rate first, then one 100 times slower, whose gap is larger at every step.
    study.enqueue_trial({LR: 1e-3})
    study.enqueue_trial({LR: 1e-5})
    objective = TrialObjective(spec, str(ETHANOL_CONFIG), _gas_overrides(gas_dir, max_steps=500), tmp_path / "out", "prune", budget=2)

    usage = run_worker(study, objective, budget=2, poll_interval=1.0)

    fast, slow = study.get_trials()
    assert usage.counted == 2
    assert fast.state == optuna.trial.TrialState.COMPLETE
    assert sorted(fast.intermediate_values) == [100, 200, 300, 400, 500]
    assert slow.state == optuna.trial.TrialState.PRUNED
    assert list(slow.intermediate_values) == [100]
    assert slow.intermediate_values[100] > fast.intermediate_values[100]
    assert slow.user_attrs["prune_reason"].startswith("pruned by the pruner at iteration 100")

    events, experiment, _ = _hparams(Path(slow.user_attrs["run_dir"]))
    assert events.Scalars("hp/pruned")[0].value == 1.0
    assert "hp/objective" not in {info.name.tag for info in experiment.metric_infos}


def test_study_writes_table_and_hparams(gas_dir, tmp_path, capsys):
    search = _write_search(tmp_path, {"sampler": "grid", "pruner": "none", "objective": "auc_log_gap", "params": {LR: [1e-4, 1e-3, 1.0]}})
    output = tmp_path / "out"

    tune_main(
        ["--config", str(ETHANOL_CONFIG), "--search", str(search), "--output", str(output), "--study-name", "table",
         "--retrain-best", "--", *_gas_overrides(gas_dir)]
    )

    printed = capsys.readouterr().out
    with (output / "trials.csv").open() as handle:
        rows = {float(row[LR]): row for row in csv.DictReader(handle)}
    assert sorted(rows) == [1e-4, 1e-3, 1.0]
    assert rows[1.0]["state"] == "PRUNED"
    assert rows[1.0]["reason"].startswith("diverged at iteration")
    assert rows[1.0]["diverged_at"] != ""
    for lr in (1e-4, 1e-3):
        assert rows[lr]["state"] == "COMPLETE"
        assert rows[lr]["seed"] == "0"
        assert float(rows[lr]["duration_s"]) > 0
    best_lr = min((1e-4, 1e-3), key=lambda lr: float(rows[lr]["value"]))
    assert f"Best trial {rows[best_lr]['number']}" in printed
    assert f"overparam fit --config {ETHANOL_CONFIG}" in printed
    assert f"optuna-dashboard 'sqlite:///{(output / 'study.db').resolve()}'" in printed

    for lr, row in rows.items():
        events, experiment, session = _hparams(Path(row["run_dir"]))
        metric_tags = {info.name.tag for info in experiment.metric_infos}
        assert session.hparams["optimizer_lr"].number_value == pytest.approx(lr)
        assert session.hparams["trial"].number_value == int(row["number"])
        if row["state"] == "COMPLETE":
            assert "hp/objective" in metric_tags
            assert events.Scalars("hp/objective")[0].value == pytest.approx(float(row["value"]), rel=1e-6)
        else:
            assert events.Scalars("hp/diverged")[0].value == 1.0

    best_run = output / "tb" / "table" / "best"
    assert yaml.safe_load((best_run / "config.yaml").read_text())["model"]["optimizer"]["init_args"]["lr"] == best_lr


def test_resume_rejects_other_search(gas_dir, tmp_path):
    output = tmp_path / "out"
    first = _write_search(tmp_path, {"sampler": "grid", "pruner": "none", "params": {LR: [1e-4]}}, "first.yaml")
    second = _write_search(tmp_path, {"sampler": "grid", "pruner": "none", "params": {LR: [1e-3]}}, "second.yaml")
    common = ["--config", str(ETHANOL_CONFIG), "--output", str(output), "--study-name", "same", "--", *_gas_overrides(gas_dir, 20)]

    tune_main(["--search", str(first), *common])
    with pytest.raises(SystemExit) as exit_info:
        tune_main(["--search", str(second), *common])
    assert "other search settings (params differ" in str(exit_info.value.code)


def test_worker_devices_split_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4")

    assert worker_devices(2) == ["0,1", "2,3"]
    assert worker_devices(5) == ["0", "1", "2", "3", "4"]
    assert worker_devices(6) == [None] * 6


def test_wrong_parameter_path_fails_before_study(tmp_path):
    search = _write_search(tmp_path, {"params": {"model.learning_rate": [0.1]}, "n_trials": 1})

    with pytest.raises(SystemExit) as exit_info:
        tune_main(["--config", str(ETHANOL_CONFIG), "--search", str(search), "--output", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert "model.learning_rate" in message
    assert str(search) in message
    assert not (tmp_path / "out" / "study.db").exists()


def test_wrong_data_folder_fails_before_trials(gas_dir, tmp_path):
    search = _write_search(tmp_path, {"sampler": "grid", "pruner": "none", "params": {LR: [1e-4, 1e-3]}})
    output = tmp_path / "out"
    overrides = [*_gas_overrides(gas_dir, 20), "--data.init_args.data_dir", str(tmp_path / "missing")]

    with pytest.raises(SystemExit) as exit_info:
        tune_main(["--config", str(ETHANOL_CONFIG), "--search", str(search), "--output", str(output), "--", *overrides])
    message = str(exit_info.value.code)
    assert message.startswith("overparam tune: The first trial could not be set up")
    assert "\n" not in message
    assert str(tmp_path / "missing") in message
    assert "overrides after '--'" in message
    assert not (output / "study.db").exists()
    assert not (output / "tb").exists()


def test_invalid_override_keeps_parser_reason(tmp_path):
    search = _write_search(tmp_path, {"params": {LR: [0.1]}, "n_trials": 1})

    with pytest.raises(SystemExit) as exit_info:
        tune_main(
            ["--config", str(ETHANOL_CONFIG), "--search", str(search), "--output", str(tmp_path / "out"), "--",
             "--model.iterations_per_step", "abc"]
        )
    message = str(exit_info.value.code)
    assert "abc" in message
    assert message.index("overrides after '--'") < message.index(str(search))
    assert not (tmp_path / "out" / "study.db").exists()


def test_rerun_trains_errored_grid_points(gas_dir, tmp_path):
    search = _write_search(tmp_path, {"sampler": "grid", "pruner": "none", "params": {LR: [1e-4, 1e-3]}})
    output = tmp_path / "out"
    command = ["--config", str(ETHANOL_CONFIG), "--search", str(search), "--output", str(output), "--study-name", "errs",
               "--", *_gas_overrides(gas_dir, 20)]
    # A regular file where trial 1 writes its TensorBoard run makes that trial fail with an error.
    blocked = output / "tb" / "errs" / "trial_00001"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")

    tune_main(command)
    storage_url = f"sqlite:///{(output / 'study.db').resolve()}"
    first = optuna.load_study(study_name="errs", storage=storage_url).get_trials()
    assert [trial.state for trial in first] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert "fail_reason" in first[1].user_attrs

    tune_main(command)
    trials = optuna.load_study(study_name="errs", storage=storage_url).get_trials()
    completed = [trial for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3
    assert sorted(trial.params[LR] for trial in completed) == [1e-4, 1e-3]
    assert trials[2].system_attrs["failed_trial"] == 1
    assert trials[2].user_attrs["seed"] == first[1].user_attrs["seed"]
    assert budget_usage(trials).counted == 2

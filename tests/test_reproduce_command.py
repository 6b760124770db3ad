"""End-to-end runs of ``overparam reproduce`` on the real Ethanol data, at a tiny scale."""

import math
from pathlib import Path

import matplotlib.image
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from overparam.cli import main as cli_main
from overparam.reproduce.analysis import NOT_REPRODUCED, PARTLY, REPRODUCED
from overparam.reproduce.report import SUMMARY_COLUMNS
from overparam.reproduce.runs import MemberRun, RunCache, curve_on_grid, logged_iterations
from overparam.reproduce.spec import load_spec
from conftest import SHARED_DATA

REPO_ROOT = Path(__file__).resolve().parents[1]
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED)


def _small_spec(name: str, iterations: int, panels: list[dict], **fields) -> dict:
    """Return a user spec on the Ethanol l4 config with 3 seeds, logging every 10 iterations."""
    return {
        "name": name,
        "title": name.replace("_", " "),
        "config": str(REPO_ROOT / "configs" / "ethanol" / "l4_depth1.yaml"),
        "iterations": iterations,
        "log_every": 10,
        "seeds": [0, 1, 2],
        "panels": panels,
        **fields,
    }


def _reproduce_spec(tmp_path: Path, gas_dir: Path, spec: dict, *options: str) -> Path:
    """Write ``spec`` to a file, run ``overparam reproduce`` on it without the run cache and return the output folder."""
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    output = tmp_path / "out"
    cli_main([
        "reproduce", str(path), "--data-dir", str(gas_dir), "--output", str(output), "--no-cache", "--threads", "1",
        *options,
    ])
    return output


@pytest.fixture(scope="module")
def depth_output(tmp_path_factory) -> Path:
    """Run ``overparam reproduce depth`` at scale 0.001 (1,000 iterations) once for the module's tests."""
    gas_dir = SHARED_DATA / "gas-sensor-drift"
    if not gas_dir.is_dir():
        pytest.skip(f"real UCI data not found at {gas_dir}; set OVERPARAM_TEST_DATA to the folder that contains gas-sensor-drift/")
    output = tmp_path_factory.mktemp("reproduce") / "depth"
    cli_main([
        "reproduce", "depth", "--scale", "0.001", "--data-dir", str(gas_dir), "--output", str(output),
        "--points-per-decade", "1", "--max-widen", "1", "--threads", "1",
    ])
    return output


def test_depth_writes_every_file(depth_output):
    for name in ("curves.csv", "summary.csv", "tuning.csv", "crossovers.csv", "tuning.db", "depth.png", "report.md"):
        assert (depth_output / name).is_file(), name
    assert (depth_output.parent / ".run-cache").is_dir()


def test_depth_summary_columns_and_values(depth_output):
    summary = pd.read_csv(depth_output / "summary.csv")
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    spec = load_spec(REPO_ROOT / "configs" / "paper" / "depth.yaml")
    assert list(summary["model"]) == list(spec.models)
    assert (summary["iterations"] == 1000).all()
    assert (summary["scale"] == 0.001).all()
    assert summary["lr"].notna().all()
    assert (summary["final_gap_min"] <= summary["final_gap_mean"]).all()
    assert (summary["final_gap_mean"] <= summary["final_gap_max"]).all()
    assert (summary["final_gap_min"] > 0).all()
    deep = summary[summary["depth"] > 1]
    assert deep["balancedness_initial"].notna().all()
    assert summary[summary["depth"] == 1]["balancedness_initial"].isna().all()
    for _, row in summary.iterrows():
        grid = [float(value) for value in row["lr_grid"].split()]
        assert row["lr"] in grid


def test_depth_curves_cover_every_candidate(depth_output):
    curves = pd.read_csv(depth_output / "curves.csv")
    tuning = pd.read_csv(depth_output / "tuning.csv")
    runs = curves.groupby(["model", "lr", "seed"]).size()
    assert len(runs) == 3 * len(tuning)
    assert set(curves["seed"]) == {0, 1, 2}
    # 1,000 iterations logged every iteration plus the final loss.
    assert runs.max() == 1001
    chosen = curves[curves["chosen"]]
    assert chosen.groupby("model")["lr"].nunique().eq(1).all()
    # gap = loss - L*, with one L* per loss exponent (panel).
    # Runs that blow up reach losses where the subtraction loses every digit, so only moderate losses count.
    moderate = curves[curves["loss"] < 100]
    optimum = (moderate["loss"] - moderate["gap"]).groupby(moderate["panel"])
    assert (optimum.max() - optimum.min()).max() < 1e-9
    assert optimum.mean()["l2"] == pytest.approx(0.1, abs=1e-3)


def test_depth_tuning_study_matches_choice(depth_output):
    summary = pd.read_csv(depth_output / "summary.csv").set_index("model")
    tuning = pd.read_csv(depth_output / "tuning.csv")
    storage = f"sqlite:///{depth_output / 'tuning.db'}"
    names = optuna.get_all_study_names(storage)
    assert sorted(names) == sorted(f"depth:{model}" for model in summary.index)
    for model, row in summary.iterrows():
        study = optuna.load_study(study_name=f"depth:{model}", storage=storage)
        trials = study.get_trials(deepcopy=False)
        candidates = tuning[tuning["model"] == model]
        assert len(trials) == len(candidates)
        assert {trial.params["lr"] for trial in trials} == set(candidates["lr"])
        assert study.best_params["lr"] == row["lr"]
        pruned = [trial for trial in trials if trial.state == optuna.trial.TrialState.PRUNED]
        assert len(pruned) == int((candidates["diverged_seeds"] > 0).sum())
        for trial in pruned:
            assert any(trial.user_attrs[f"seed_{seed}_diverged_at"] is not None for seed in (0, 1, 2))


def test_depth_png_is_an_image(depth_output):
    path = depth_output / "depth.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    assert image.shape[0] > 300
    assert image.shape[1] > 2 * image.shape[0]  # two panels side by side
    assert image.std() > 0.01


def test_depth_report_has_a_verdict_per_claim(depth_output):
    report = (depth_output / "report.md").read_text()
    spec = load_spec(REPO_ROOT / "configs" / "paper" / "depth.yaml")
    for claim in spec.claims:
        line = next(line for line in report.splitlines() if line.startswith(f"| {claim.text} |"))
        assert any(f"**{verdict}**" in line for verdict in VERDICTS), line
    assert "Scale 0.001" in report
    assert "provisional" in report
    assert "Wall time of this command:" in report
    assert "Training time:" in report
    assert "Estimated training time at scale 1" in report
    assert "standard deviation 0.05 (0.01 where a model states it)" in report
    assert "features and target z-scored, no train/test split, float32" in report
    assert "![depth](depth.png)" in report


def test_list_prints_experiment_names(capsys):
    cli_main(["reproduce", "--list"])
    output = capsys.readouterr().out
    for name in ("abalone", "depth", "emulation", "init", "optimizers", "teaser"):
        assert name in output


def test_unknown_experiment_exits_with_names():
    with pytest.raises(SystemExit) as error:
        cli_main(["reproduce", "deepth"])
    assert "No experiment named 'deepth'" in str(error.value)
    assert "teaser" in str(error.value)


def test_emulation_variant_from_a_copied_spec(tmp_path, gas_dir):
    """A user's spec with a network, its end-to-end emulation and a tracks claim, trained for 300 iterations."""
    models = [
        {"name": "depth2", "depth": 2, "init": "balanced", "init_std": 0.05, "lr": 1e-3},
        {"name": "rule2", "optimizer": "end_to_end", "emulates": "depth2", "lr": 1e-3},
    ]
    claims = [{"id": "tracks", "text": "The rule tracks the network.", "kind": "tracks",
               "model": "l2/rule2", "baseline": "l2/depth2"}]
    spec = _small_spec("emulation_mini", 300, [{"name": "l2", "p": 2, "models": models}], claims=claims)
    output = _reproduce_spec(tmp_path, gas_dir, spec)

    curves = pd.read_csv(output / "curves.csv")
    network = curves[curves["model"] == "l2/depth2"].sort_values(["seed", "iteration"])
    rule = curves[curves["model"] == "l2/rule2"].sort_values(["seed", "iteration"])
    assert len(network) == len(rule) == 3 * 31
    first_network = network[network["iteration"] == 0]["loss"].to_numpy()
    first_rule = rule[rule["iteration"] == 0]["loss"].to_numpy()
    np.testing.assert_allclose(first_rule, first_network, rtol=1e-5)

    # From a balanced start at a small step the rule follows the network closely.
    report = (output / "report.md").read_text()
    assert "| The rule tracks the network. | **reproduced** |" in report
    assert "## Balancedness of the deep networks" in report
    assert not (output.parent / ".run-cache").exists()


def test_run_cache_round_trip(tmp_path):
    cache = RunCache(tmp_path / "cache")
    grid = logged_iterations(25, 10)
    assert grid.tolist() == [0, 10, 20, 25]
    losses = curve_on_grid([(0, 2.0), (10, 1.5), (20, math.inf)], 25, 10)
    assert np.isnan(losses[2])
    assert np.isnan(losses[3])
    run = MemberRun(grid, losses, 0.5, 20, 1.25, False, 3.0)
    key = RunCache.key({"model": "a", "lr": 1e-3})
    assert key != RunCache.key({"model": "a", "lr": 2e-3})
    assert cache.load(key) is None
    cache.store(key, run)
    loaded = cache.load(key)
    assert loaded.cached
    assert loaded.diverged_at == 20
    np.testing.assert_array_equal(loaded.iterations, grid)
    np.testing.assert_array_equal(np.isnan(loaded.losses), np.isnan(losses))
    np.testing.assert_allclose(loaded.gaps[:2], [1.5, 1.0])


def test_tensorboard_logs_of_trained_runs(tmp_path, gas_dir):
    spec = _small_spec("tb", 50, [{"name": "l2", "p": 2, "models": [{"name": "depth1", "lr": 1e-3}]}])
    output = _reproduce_spec(tmp_path, gas_dir, spec, "--tensorboard")

    event_files = sorted((output / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(event_files) == 3
    assert {file.parent.name for file in event_files} == {f"l2-depth1_lr=0.001_seed={seed}" for seed in (0, 1, 2)}
    report = (output / "report.md").read_text()
    assert "Scale 1: the paper's horizons" in report


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["depth", "--scale", "0"], "--scale must be positive"),
        (["depth", "--points-per-decade", "0"], "--points-per-decade must be at least 1"),
        (["depth", "--max-widen", "-1"], "--max-widen must be 0 or more"),
        (["depth", "--seeds", "1", "1", "2"], "--seeds repeats a seed"),
        ([], "give an experiment name"),
    ],
)
def test_invalid_options_are_rejected(arguments, message, capsys):
    with pytest.raises(SystemExit) as error:
        cli_main(["reproduce", *arguments])
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_wrong_data_folder_writes_nothing(tmp_path):
    output = tmp_path / "results" / "depth"
    with pytest.raises(SystemExit) as error:
        cli_main(["reproduce", "depth", "--scale", "0.001", "--data-dir", str(tmp_path / "missing"), "--output", str(output)])

    assert "is not a folder" in str(error.value)
    assert not output.exists()
    assert not (tmp_path / "results" / ".run-cache").exists()


def test_report_without_widening(tmp_path, gas_dir):
    panels = [{"name": "l2", "p": 2, "models": [{"name": "depth1", "depth": 1, "lr_grid": [1e-3, 1e-2]}]}]
    spec = _small_spec("no_widening", 50, panels, tuning={"points_per_decade": 1, "max_widen": 0})
    output = _reproduce_spec(tmp_path, gas_dir, spec)

    report = (output / "report.md").read_text()
    assert "Widening is off" in report
    assert "times per side" not in report
    assert "edge of the grid)" in report
    assert "after widening" not in report

"""End-to-end runs of ``overparam fit`` in-process on the real data."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from overparam.cli import build_cli, main
from overparam.models.linear_stack import LinearStack
from conftest import REPO_ROOT, SHARED_DATA

CONFIGS = sorted((REPO_ROOT / "configs").glob("**/*.yaml"))
FIT_CONFIGS = [path for path in CONFIGS if "search" not in path.parts and "paper" not in path.parts]
DATA_FOLDERS = {"GasSensorDataModule": "gas-sensor-drift", "AbaloneDataModule": "abalone"}


def _data_args(config: Path) -> list[str]:
    """Point a config's data module at the shared real data instead of the download cache."""
    data_class = yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[-1]
    if data_class not in DATA_FOLDERS:
        return []
    folder = SHARED_DATA / DATA_FOLDERS[data_class]
    if not folder.is_dir():
        pytest.skip(f"real UCI data not found at {folder}")
    return ["--data.init_args.data_dir", str(folder)]


def _fit_args(config: Path, save_dir: Path, *extra: str, checkpoint: bool = False) -> list[str]:
    return [
        "fit", "--config", str(config), *_data_args(config),
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_checkpointing", str(checkpoint).lower(), *extra,
    ]


def _scalars(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda path: str(path.relative_to(REPO_ROOT / "configs")))
def test_config_runs_fast_dev_run(config, tmp_path):
    cli = build_cli(_fit_args(config, tmp_path, "--trainer.fast_dev_run", "true"))

    assert cli.trainer.global_step >= 1
    assert math.isfinite(cli.model.last_loss)


def test_ethanol_l4_depth2_shrinks_gap(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l4_depth2.yaml"
    cli = build_cli(_fit_args(config, tmp_path, "--trainer.max_steps", "2000", "--trainer.log_every_n_steps", "100"))

    events = _scalars(cli.trainer.log_dir)
    gaps = {event.step: event.value for event in events.Scalars("train/loss_gap")}
    assert cli.trainer.global_step == 2000
    assert sorted(gaps)[:3] == [0, 100, 200]
    assert max(gaps) == 2000
    assert gaps[2000] > 0
    assert gaps[0] / gaps[2000] > 3


def test_tensorboard_holds_loss_and_hparams(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l2_depth2.yaml"
    cli = build_cli(_fit_args(config, tmp_path, "--trainer.max_steps", "300", "--trainer.log_every_n_steps", "50"))

    events = _scalars(cli.trainer.log_dir)
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/loss_gap", "train/e2e_norm", "train/balancedness", "hp/final_loss"):
        assert tag in tags
    losses = events.Scalars("train/loss")
    assert [event.step for event in losses] == list(range(0, 301, 50))
    final = events.Scalars("hp/final_loss")[0].value
    assert final == pytest.approx(losses[-1].value, rel=1e-6)
    assert final != -1

    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert {info.name for info in experiment.hparam_infos} >= {"depth", "p", "init_std", "optimizer_lr"}
    assert {info.name.tag for info in experiment.metric_infos} >= {"hp/final_loss", "hp/final_loss_gap"}
    assert session.hparams["depth"].number_value == 2
    assert session.hparams["optimizer_lr"].number_value == pytest.approx(3e-3)


def test_run_directory_has_config(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l4_depth1.yaml"
    cli = build_cli(_fit_args(config, tmp_path, "--trainer.max_steps", "10"))

    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["p"] == 4
    assert saved["seed_everything"] == 0
    assert saved["trainer"]["max_steps"] == 10


def test_saved_config_reruns_identically(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l4_depth2.yaml"
    first = build_cli(_fit_args(config, tmp_path / "a", "--trainer.max_steps", "150"))
    saved = Path(first.trainer.log_dir) / "config.yaml"

    second = build_cli(["fit", "--config", str(saved), "--trainer.logger.init_args.save_dir", str(tmp_path / "b")])
    torch.testing.assert_close(second.model.net.end_to_end(), first.model.net.end_to_end(), rtol=0, atol=0)


def test_print_config_is_runnable(tmp_path, capsys):
    config = REPO_ROOT / "configs" / "ethanol" / "l2_depth1.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(config, tmp_path, "--print_config"))
    assert exit_info.value.code in (None, 0)

    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert yaml.safe_load(printed.read_text())["model"]["depth"] == 1
    cli = build_cli(["fit", "--config", str(printed), "--trainer.fast_dev_run", "true"])
    assert cli.trainer.global_step >= 1


def test_iterations_per_step_does_not_change_result(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l4_depth3.yaml"
    results = []
    for iterations in ("1", "7", "100"):
        cli = build_cli(
            _fit_args(config, tmp_path / iterations, "--trainer.max_steps", "250", "--model.iterations_per_step", iterations)
        )
        assert cli.trainer.global_step == 250
        results.append(cli.model.net.end_to_end().detach())

    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=0)


def test_fit_matches_plain_loop(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l4_depth2.yaml"
    cli = build_cli(_fit_args(config, tmp_path, "--trainer.max_steps", "120"))

    torch.manual_seed(0)
    net = LinearStack(128, 1, depth=2, hidden_widths=1, init="near_zero", init_std=0.05)
    features, target = cli.datamodule.train_tensors()
    optimizer = torch.optim.SGD(net.parameters(), lr=3e-4)
    for _ in range(120):
        optimizer.zero_grad()
        (net(features) - target).pow(4).mean().backward()
        optimizer.step()

    torch.testing.assert_close(cli.model.net.end_to_end(), net.end_to_end(), rtol=1e-5, atol=1e-7)


def test_divergence_exits_with_one_line(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l4_depth1.yaml"
    args = _fit_args(config, tmp_path, "--trainer.max_steps", "5000", "--model.optimizer.init_args.lr", "10")

    with pytest.raises(SystemExit) as exit_info:
        main(args)

    message = str(exit_info.value.code)
    assert "\n" not in message
    assert "diverged at iteration" in message
    assert "model.optimizer.init_args.lr" in message


def test_max_loss_bound_stops_run(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l2_depth1.yaml"
    cli = build_cli(_fit_args(config, tmp_path, "--trainer.max_steps", "1000", "--divergence.max_loss", "0.05"))

    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "DivergenceCallback")
    assert callback.diverged
    assert "exceeded max_loss" in callback.reason
    assert cli.trainer.global_step < 1000


def test_float64_data_need_float64_model(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l2_depth1.yaml"
    with pytest.raises(ValueError, match="64-true"):
        build_cli(_fit_args(config, tmp_path, "--trainer.max_steps", "5", "--data.init_args.dtype", "float64"))

    cli = build_cli(
        _fit_args(config, tmp_path, "--trainer.max_steps", "5", "--data.init_args.dtype", "float64", "--trainer.precision", "64-true")
    )
    assert cli.model.net.end_to_end().dtype == torch.float64


def test_test_subcommand_loads_checkpoint(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l2_depth2.yaml"
    fitted = build_cli(_fit_args(config, tmp_path, "--trainer.max_steps", "200", checkpoint=True))
    checkpoint = next(Path(fitted.trainer.log_dir).glob("checkpoints/*.ckpt"))

    tested = build_cli(["test", "--config", str(config), *_data_args(config), "--ckpt_path", str(checkpoint),
                        "--trainer.logger.init_args.save_dir", str(tmp_path / "test")])

    expected = fitted.model.final_loss()
    assert tested.trainer.callback_metrics["test/loss"].item() == pytest.approx(expected, rel=1e-5)


def test_missing_data_exits_with_one_line(tmp_path):
    config = REPO_ROOT / "configs" / "ethanol" / "l4_depth1.yaml"
    args = ["fit", "--config", str(config), "--data.init_args.data_dir", str(tmp_path / "missing"),
            "--trainer.logger.init_args.save_dir", str(tmp_path)]

    with pytest.raises(SystemExit) as exit_info:
        main(args)

    message = str(exit_info.value.code)
    assert "\n" not in message
    assert str(tmp_path / "missing") in message
    assert "batch1.dat" in message


def test_predict_is_not_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict"])

    assert exit_info.value.code == 2
    assert "invalid choice: 'predict'" in capsys.readouterr().err


def test_option_prefix_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_ROOT / "configs/ethanol/l4_depth2.yaml"), "--model.dept", "3"])

    assert exit_info.value.code == 2
    assert "unrecognized arguments: --model.dept 3" in capsys.readouterr().err

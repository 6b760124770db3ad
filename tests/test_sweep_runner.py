"""run_sweep against independent ``overparam fit`` runs on the real Ethanol data, and its logs."""

import math

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from overparam.cli import build_cli
from overparam.data import GasSensorDataModule
from overparam.models.optimum import lp_optimum
from overparam.sweeps import (
    BatchedLinearStack,
    SweepMember,
    member_name,
    members_per_batch,
    run_sweep,
)
from conftest import REPO_ROOT

LR = "model.optimizer.init_args.lr"
SEED = "seed_everything"
INIT_STD = "model.init_std"
ITERATIONS = 40
# float64 runs of the same update rule differ only in the order of floating-point sums. Over 40
# iterations that rounding grows to about 1e-9 relative: with Adadelta at depth 3, two plain loops
# that differ only in the order of the layer products end 9e-10 apart. Small entries drift the most,
# so the absolute tolerance scales with the matrix.
RTOL = 1e-8
ATOL_SCALE = 1e-9

# (extra config arguments, one stable learning rate per member) on the l4 Ethanol problem.
OPTIMIZERS = {
    "sgd": ([], [5e-5, 1e-4]),
    "sgd_momentum": (["--model.optimizer.init_args.momentum", "0.9"], [2e-5, 5e-5]),
    "adam": (["--model.optimizer", "torch.optim.Adam"], [1e-3, 3e-3]),
    "adagrad": (["--model.optimizer", "torch.optim.Adagrad"], [3e-3, 1e-2]),
    "adadelta": (["--model.optimizer", "torch.optim.Adadelta"], [0.5, 1.0]),
    "rmsprop": (["--model.optimizer", "torch.optim.RMSprop"], [1e-4, 3e-4]),
}
# One case per optimizer that together cover depths 1 to 3; the rest of the product is marked slow.
FAST_CASES = {("sgd", 1), ("sgd_momentum", 2), ("adam", 3), ("adagrad", 1), ("adadelta", 2), ("rmsprop", 3)}
OPTIMIZER_DEPTH_CASES = [
    pytest.param(name, depth, marks=() if (name, depth) in FAST_CASES else pytest.mark.slow)
    for name in OPTIMIZERS
    for depth in (1, 2, 3)
]


@pytest.fixture(autouse=True)
def single_thread():
    """Run on one intra-op thread: the matrices are tiny, and a second thread on a busy core only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sweep_args(gas_dir, config: str, *extra: str, steps: int = ITERATIONS) -> list[str]:
    """Arguments of ``overparam fit`` for a short float64 run of an Ethanol config."""
    return [
        "--config", str(REPO_ROOT / "configs" / "ethanol" / config),
        "--data.init_args.data_dir", str(gas_dir),
        "--trainer.max_steps", str(steps),
        "--trainer.log_every_n_steps", "10",
        "--trainer.precision", "64-true",
        "--data.init_args.dtype", "float64",
        *extra,
    ]


def fit_run(args: list[str], overrides: dict, root) -> object:
    """Run ``overparam fit`` in-process with the member's overrides as command-line options.

    Without a logger, Lightning saves the run's config.yaml to ``trainer.default_root_dir``.
    """
    options = []
    for key, value in overrides.items():
        options += [f"--{key}", str(value)]
    return build_cli([
        "fit", *args, *options,
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_model_summary", "false",
    ])


def assert_close_matrix(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL_SCALE * expected.abs().max().item())


def assert_matches_fit(outcome, cli) -> None:
    model = cli.model
    assert not outcome.diverged
    assert model.diverged_at is None
    assert_close_matrix(outcome.end_to_end, model.net.end_to_end().detach())
    assert outcome.final_loss == pytest.approx(model.last_loss, rel=RTOL)
    assert [iteration for iteration, _ in outcome.curve] == [iteration for iteration, _ in model.curve]
    for (_, loss), (_, fit_loss) in zip(outcome.curve, model.curve):
        assert loss == pytest.approx(fit_loss, rel=RTOL)
    assert outcome.loss_optimum == pytest.approx(model.loss_optimum, rel=1e-12)


def initial_end_to_end(seed: int, init_std: float, depth: int) -> torch.Tensor:
    stack = BatchedLinearStack.from_seeds([seed], 128, init_std=init_std, depth=depth, dtype=torch.float64)
    return stack.end_to_end()[0].detach()


@pytest.mark.parametrize(("optimizer", "depth"), OPTIMIZER_DEPTH_CASES)
def test_sweep_matches_fit_runs(gas_dir, tmp_path, optimizer, depth):
    extra, lrs = OPTIMIZERS[optimizer]
    args = sweep_args(gas_dir, f"l4_depth{depth}.yaml", *extra)
    members = [{SEED: 1, LR: lrs[0]}, {SEED: 2, LR: lrs[1], INIT_STD: 0.03}]
    result = run_sweep(args, members, device="cpu")

    assert result.num_batches == 1
    for index, member in enumerate(members):
        outcome = result.outcomes[index]
        assert_matches_fit(outcome, fit_run(args, member, tmp_path))

        start = initial_end_to_end(member[SEED], member.get(INIT_STD, 0.05), depth)
        moved = (outcome.end_to_end - start).abs().max() / outcome.end_to_end.abs().max()
        assert moved > 1e-3, f"member {index} barely trained, so the comparison would prove little"


@pytest.mark.parametrize("depth", [1, 3])
def test_initial_weights_match_cli(gas_dir, depth):
    args = sweep_args(gas_dir, f"l4_depth{depth}.yaml", "--model.hidden_widths", "2")
    seeds, init_stds = [7, 123], [0.05, 0.2]
    batched = BatchedLinearStack.from_seeds(
        seeds, 128, init_std=init_stds, depth=depth, hidden_widths=2, dtype=torch.float64
    )
    for index, (seed, init_std) in enumerate(zip(seeds, init_stds)):
        cli = build_cli([*args, "--seed_everything", str(seed), "--model.init_std", str(init_std)], run=False)
        for batched_weight, weight in zip(batched.weights, cli.model.net.weights):
            assert torch.equal(batched_weight[index], weight.detach().to(torch.float64))


def test_logs_read_back(gas_dir, tmp_path):
    args = sweep_args(gas_dir, "l4_depth2.yaml", steps=30)
    # The third member repeats the first, so its name gets a suffix and its results equal the first's.
    members = [{SEED: 1, LR: 1e-4}, {SEED: 2, LR: 5e-5, INIT_STD: 0.03}, {SEED: 1, LR: 1e-4}]
    result = run_sweep(args, members, log_dir=tmp_path, log_every=10, device="cpu")

    names = ["seed=1_lr=1e-04", "seed=2_lr=5e-05_init_std=3e-02", "seed=1_lr=1e-04_2"]
    assert result.names == names
    assert result.outcomes[2].final_loss == result.outcomes[0].final_loss
    features, target = GasSensorDataModule(data_dir=str(gas_dir), dtype="float64").train_tensors()
    optimum = lp_optimum(features, target, 4).loss

    curves = pd.read_csv(tmp_path / "curves.csv")
    assert list(curves.columns) == ["member", "name", "iteration", "loss", "loss_gap"]
    for index, name in enumerate(names):
        rows = curves[curves["member"] == index]
        assert set(rows["name"]) == {name}
        assert rows["iteration"].tolist() == [0, 10, 20, 30]
        expected = [loss for _, loss in result.outcomes[index].curve]
        assert rows["loss"].tolist() == pytest.approx(expected, rel=1e-12)
        assert rows["loss_gap"].tolist() == pytest.approx([loss - optimum for loss in expected], rel=1e-9)
        assert rows["loss"].iloc[-1] == pytest.approx(result.outcomes[index].final_loss, rel=1e-12)

    table = pd.read_csv(tmp_path / "members.csv")
    assert table["name"].tolist() == names
    assert table[SEED].tolist() == [1, 2, 1]
    assert table[LR].tolist() == pytest.approx([1e-4, 5e-5, 1e-4])
    assert table[INIT_STD].tolist() == pytest.approx([0.05, 0.03, 0.05])
    assert table["final_loss"].tolist() == pytest.approx(result.final_loss, rel=1e-12)
    assert table["final_gap"].tolist() == pytest.approx([loss - optimum for loss in result.final_loss], rel=1e-9)
    assert table["diverged"].tolist() == [False, False, False]
    assert table["diverged_at"].isna().all()

    for index, name in enumerate(names):
        events = EventAccumulator(str(tmp_path / name), size_guidance={"scalars": 0})
        events.Reload()
        expected = result.outcomes[index].curve
        losses = events.Scalars("train/loss")
        assert [event.step for event in losses] == [0, 10, 20, 30]
        assert [event.value for event in losses] == pytest.approx([loss for _, loss in expected], rel=1e-6)
        gaps = events.Scalars("train/loss_gap")
        assert [event.value for event in gaps] == pytest.approx([loss - optimum for _, loss in expected], rel=1e-5)
        assert events.Scalars("hp/final_loss")[0].value == pytest.approx(result.final_loss[index], rel=1e-6)
        assert events.Scalars("hp/final_loss")[0].step == 30

        content = events.PluginTagToContent("hparams")
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        assert {info.name.tag for info in experiment.metric_infos} >= {"hp/final_loss", "hp/final_loss_gap", "hp/diverged"}
        assert session.hparams["name"].string_value == name
        assert session.hparams["seed"].number_value == members[index][SEED]
        assert session.hparams["optimizer_lr"].number_value == pytest.approx(members[index][LR])
        assert session.hparams["depth"].number_value == 2
        assert session.hparams["optimizer"].string_value == "SGD"


def test_log_dir_rejects_earlier_run(gas_dir, tmp_path):
    args = sweep_args(gas_dir, "l4_depth1.yaml", steps=5)
    run_sweep(args, [{SEED: 1}], log_dir=tmp_path, device="cpu")
    with pytest.raises(FileExistsError, match="seed=1"):
        run_sweep(args, [{SEED: 1}], log_dir=tmp_path, device="cpu")


def test_chunks_match_one_batch(gas_dir):
    args = sweep_args(gas_dir, "l4_depth2.yaml", "--model.optimizer", "torch.optim.Adam")
    members = [{SEED: seed, LR: lr} for seed, lr in zip(range(5), [1e-3, 2e-3, 3e-3, 5e-3, 1e-2])]
    whole = run_sweep(args, members, device="cpu")
    chunked = run_sweep(args, members, device="cpu", max_members=2)
    # A memory fraction far below one member's estimate leaves one member per batch.
    by_memory = run_sweep(args, members, device="cpu", memory_fraction=1e-15)

    assert whole.num_batches == 1
    assert [outcome.batch for outcome in chunked.outcomes] == [0, 0, 1, 1, 2]
    assert [outcome.batch for outcome in by_memory.outcomes] == [0, 1, 2, 3, 4]
    for other in (chunked, by_memory):
        for outcome, reference in zip(other.outcomes, whole.outcomes):
            torch.testing.assert_close(outcome.end_to_end, reference.end_to_end, rtol=1e-12, atol=1e-15)
            assert [iteration for iteration, _ in outcome.curve] == [iteration for iteration, _ in reference.curve]
            assert [loss for _, loss in outcome.curve] == pytest.approx([loss for _, loss in reference.curve], rel=1e-12)


def test_members_per_batch_limits():
    assert members_per_batch(1000, 10_000, 0.5) == 5
    assert members_per_batch(1000, 10_000, 0.5, max_members=3) == 3
    assert members_per_batch(1000, 100, 0.5) == 1


def test_diverging_member_is_marked(gas_dir, tmp_path):
    # The l4 config logs every iteration, so overparam fit detects divergence at the exact iteration.
    args = sweep_args(gas_dir, "l4_depth1.yaml", "--trainer.log_every_n_steps", "1")
    members = [{SEED: 1, LR: 5e-5}, {SEED: 2, LR: 1e-3, INIT_STD: 0.03}, {SEED: 3, LR: 1e-4}]
    result = run_sweep(args, members, device="cpu")

    assert result.diverged == [False, True, False]
    assert result.diverged_at[0] is None
    assert result.diverged_at[2] is None
    for index in (0, 2):
        assert_matches_fit(result.outcomes[index], fit_run(args, members[index], tmp_path))

    diverged = result.outcomes[1]
    solo = fit_run(args, members[1], tmp_path)
    assert solo.model.diverged_at is not None
    assert diverged.diverged_at == solo.model.diverged_at
    assert 0 < diverged.diverged_at < ITERATIONS
    assert math.isnan(diverged.final_loss)
    assert math.isnan(diverged.final_gap)
    assert diverged.curve[-1][0] == diverged.diverged_at
    assert not math.isfinite(diverged.curve[-1][1])
    assert all(math.isfinite(loss) for _, loss in diverged.curve[:-1])
    # Both stop before the update of the diverging iteration, so they hold the same finite weights.
    assert_close_matrix(diverged.end_to_end, solo.model.net.end_to_end().detach())

    frame = result.to_frame()
    assert frame["diverged"].tolist() == [False, True, False]
    assert frame["diverged_at"].iloc[1] == diverged.diverged_at


def test_different_architectures_form_batches(gas_dir, tmp_path):
    args = sweep_args(gas_dir, "l4_depth2.yaml", steps=30)
    members = [
        {"model.depth": 1, SEED: 1, LR: 5e-5},
        {SEED: 1, LR: 1e-4},
        {"model.optimizer.class_path": "torch.optim.Adam", SEED: 2, LR: 1e-3},
        {SEED: 3, LR: 5e-5},
        {"model.p": 2, SEED: 4, LR: 1e-3},
    ]
    result = run_sweep(args, members, device="cpu")

    batches = [outcome.batch for outcome in result.outcomes]
    assert result.num_batches == 4
    assert batches[1] == batches[3]
    assert len({batches[0], batches[1], batches[2], batches[4]}) == 4
    for member, outcome in zip(members, result.outcomes):
        assert_matches_fit(outcome, fit_run(args, member, tmp_path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.init_args.gas": 2}, "data.init_args.gas"),
        ({"trainer.precision": "32-true"}, "trainer.precision"),
        ({"model.input_size": 3}, "data's shape"),
        ({"model.bias": True}, "bias-free"),
        ({"model.optimizer.class_path": "torch.optim.LBFGS"}, "supported: torch.optim.SGD"),
        ({"model.optimizer.init_args.nesterov": True}, "Nesterov"),
        ({"model.depthh": 2}, "invalid overrides"),
        ({LR: "fast"}, "give a number"),
        ({SEED: False}, "integer seed"),
    ],
)
def test_rejects_unsupported_member(gas_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_sweep(sweep_args(gas_dir, "l4_depth2.yaml", steps=5), [{SEED: 1}, overrides], device="cpu")


def test_rejects_precision_mismatch(gas_dir):
    args = sweep_args(gas_dir, "l4_depth2.yaml", "--data.init_args.dtype", "float32", steps=5)
    with pytest.raises(ValueError, match="trainer.precision"):
        run_sweep(args, [{SEED: 1}], device="cpu")


def test_member_names():
    assert SweepMember({LR: 1e-3, SEED: 2}).name == "lr=1e-03_seed=2"
    assert member_name({INIT_STD: 0.05, "model.optimizer.class_path": "torch.optim.Adam"}) == "init_std=5e-02_optimizer=Adam"
    assert member_name({LR: 2.5e-4, "model.hidden_widths": [2, 3]}) == "lr=2.5e-04_hidden_widths=2x3"
    assert member_name({"model.p": 4.0, "model.bias": False}) == "p=4_bias=false"
    assert member_name({"model.init": "orthogonal/x"}) == "init=orthogonal-x"
    assert member_name({}) == "base"
    assert SweepMember({LR: 1e-3}, name="custom").name == "custom"

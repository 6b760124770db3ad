"""BatchedLinearStack, the batched optimizers and train_batched against independent torch.optim loops."""

import logging
import math

import pytest
import torch

from overparam.models.linear_stack import LinearStack
from overparam.models.losses import LpLoss
from overparam.sweeps import (
    BatchedAdadelta,
    BatchedAdagrad,
    BatchedAdam,
    BatchedLinearStack,
    BatchedLpLoss,
    BatchedRMSprop,
    BatchedSGD,
    make_batched_optimizer,
    resolve_batched_optimizer,
    train_batched,
)

DTYPE = torch.float64
INPUT_SIZE = 8
SEEDS = [11, 22, 33]
INIT_STDS = [0.3, 0.5, 0.7]
ITERATIONS = 50
TOLERANCE = {"rtol": 1e-10, "atol": 1e-13}

# (torch.optim class, shared keyword arguments, one learning rate per member)
OPTIMIZER_CASES = {
    "sgd": (torch.optim.SGD, {}, [0.005, 0.01, 0.02]),
    "sgd_momentum": (torch.optim.SGD, {"momentum": 0.9}, [0.001, 0.002, 0.004]),
    "adam": (torch.optim.Adam, {}, [0.003, 0.01, 0.03]),
    "adagrad": (torch.optim.Adagrad, {}, [0.01, 0.02, 0.05]),
    "adadelta": (torch.optim.Adadelta, {}, [0.3, 0.6, 1.0]),
    "rmsprop": (torch.optim.RMSprop, {}, [0.0005, 0.001, 0.003]),
}

# Non-default hyperparameters, each compared on depth 2 with the l2 loss.
OPTION_CASES = {
    "sgd_nesterov_decay": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, [0.002, 0.005, 0.01]),
    "sgd_dampening": (torch.optim.SGD, {"momentum": 0.5, "dampening": 0.3}, [0.005, 0.01, 0.02]),
    "sgd_maximize": (torch.optim.SGD, {"maximize": True}, [0.001, 0.002, 0.003]),
    "adam_amsgrad_decay": (torch.optim.Adam, {"amsgrad": True, "weight_decay": 0.01, "betas": (0.8, 0.99)}, [0.003, 0.01, 0.03]),
    "adam_eps": (torch.optim.Adam, {"eps": 1e-3}, [0.003, 0.01, 0.03]),
    "adagrad_decay_accumulator": (
        torch.optim.Adagrad,
        {"lr_decay": 0.05, "initial_accumulator_value": 0.1, "weight_decay": 0.01, "eps": 1e-6},
        [0.02, 0.05, 0.1],
    ),
    "adadelta_rho_decay": (torch.optim.Adadelta, {"rho": 0.8, "eps": 1e-5, "weight_decay": 0.01}, [0.5, 1.0, 2.0]),
    "rmsprop_centered_momentum": (
        torch.optim.RMSprop,
        {"centered": True, "momentum": 0.5, "alpha": 0.9},
        [0.001, 0.003, 0.01],
    ),
    "rmsprop_momentum_decay": (torch.optim.RMSprop, {"momentum": 0.9, "weight_decay": 0.01}, [0.0005, 0.001, 0.002]),
}


@pytest.fixture(autouse=True)
def single_thread():
    """Run on one intra-op thread. These matrices are tiny, and on a loaded machine a second OpenMP
    thread that loses its core can make each small matrix product wait for milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def regression() -> tuple[torch.Tensor, torch.Tensor]:
    """A 100 x 8 float64 linear regression with Gaussian noise and a target of shape (100, 1)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(100, INPUT_SIZE, generator=generator, dtype=DTYPE)
    weights = torch.randn(INPUT_SIZE, 1, generator=generator, dtype=DTYPE) / math.sqrt(INPUT_SIZE)
    target = features @ weights + 0.1 * torch.randn(100, 1, generator=generator, dtype=DTYPE)
    return features, target


def build_models(depth: int, width: int = 1, seeds=SEEDS, init_stds=INIT_STDS) -> list[LinearStack]:
    models = []
    for seed, init_std in zip(seeds, init_stds):
        torch.manual_seed(seed)
        models.append(LinearStack(INPUT_SIZE, depth=depth, hidden_widths=width, init_std=init_std).to(DTYPE))
    return models


def train_plain(model, optimizer_class, kwargs, lr, features, target, p, iterations, inverse_p_factor=False):
    """Train one model with torch.optim and LpLoss; return its losses per iteration and after the last one."""
    optimizer = optimizer_class(model.parameters(), lr=lr, **kwargs)
    loss_fn = LpLoss(p, inverse_p_factor)
    losses = []
    for _ in range(iterations):
        loss = loss_fn(model(features), target)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final_loss = loss_fn(model(features), target).item()
    return torch.tensor(losses, dtype=DTYPE), final_loss


def compare_with_plain_loops(regression, optimizer_class, kwargs, lrs, depth, p, width=1, inverse_p_factor=False):
    features, target = regression
    models = build_models(depth, width)
    initial = [[weight.detach().clone() for weight in model.weights] for model in models]
    batched = BatchedLinearStack.from_models(models)
    optimizer = make_batched_optimizer(optimizer_class, batched.parameters(), torch.tensor(lrs, dtype=DTYPE), **kwargs)
    result = train_batched(
        batched, features, target, p, optimizer, ITERATIONS, log_every=1, inverse_p_factor=inverse_p_factor
    )

    assert not result.diverged.any(), f"a member diverged at {result.diverged_at.tolist()}"
    assert result.iterations_run == ITERATIONS
    for index, (model, lr) in enumerate(zip(models, lrs)):
        plain_losses, plain_final = train_plain(
            model, optimizer_class, kwargs, lr, features, target, p, ITERATIONS, inverse_p_factor
        )
        torch.testing.assert_close(result.losses[:, index], plain_losses, **TOLERANCE)
        torch.testing.assert_close(result.final_losses[index].item(), plain_final, **TOLERANCE)

        member = batched.member(index)
        moved = max((after - before).abs().max().item() for after, before in zip(model.weights, initial[index]))
        assert moved > 1e-4, f"member {index} barely trained, so the comparison would prove little"
        for batched_weight, plain_weight in zip(member.weights, model.weights):
            torch.testing.assert_close(batched_weight, plain_weight.detach(), **TOLERANCE)


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
def test_batched_matches_plain_loops(regression, case, depth, p):
    optimizer_class, kwargs, lrs = OPTIMIZER_CASES[case]
    compare_with_plain_loops(regression, optimizer_class, kwargs, lrs, depth, p)


@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
def test_batched_matches_plain_width_three(regression, case):
    optimizer_class, kwargs, lrs = OPTIMIZER_CASES[case]
    compare_with_plain_loops(regression, optimizer_class, kwargs, lrs, depth=3, p=2, width=3)


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_batched_options_match_plain(regression, case):
    optimizer_class, kwargs, lrs = OPTION_CASES[case]
    compare_with_plain_loops(regression, optimizer_class, kwargs, lrs, depth=2, p=2)


def test_batched_general_p_inverse_factor(regression):
    optimizer_class, kwargs, lrs = OPTIMIZER_CASES["sgd"]
    compare_with_plain_loops(regression, optimizer_class, kwargs, lrs, depth=2, p=3, inverse_p_factor=True)


def test_diverging_member_is_isolated(regression):
    features, target = regression
    models = build_models(depth=2)
    # The middle member's learning rate makes the l4 loss blow up within a few iterations.
    lrs = [0.01, 5.0, 0.02]
    batched = BatchedLinearStack.from_models(models)
    optimizer = make_batched_optimizer("torch.optim.SGD", batched.parameters(), torch.tensor(lrs, dtype=DTYPE))
    result = train_batched(batched, features, target, 4, optimizer, ITERATIONS)

    survivors = BatchedLinearStack.from_models([models[0], models[2]])
    survivor_optimizer = make_batched_optimizer("SGD", survivors.parameters(), torch.tensor([lrs[0], lrs[2]], dtype=DTYPE))
    reference = train_batched(survivors, features, target, 4, survivor_optimizer, ITERATIONS)

    assert result.diverged.tolist() == [False, True, False]
    diverged_at = int(result.diverged_at[1])
    assert 0 < diverged_at < ITERATIONS
    assert result.diverged_at[0] == -1
    assert result.diverged_at[2] == -1
    torch.testing.assert_close(result.losses[:, [0, 2]], reference.losses, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(result.final_losses[[0, 2]], reference.final_losses, rtol=1e-13, atol=0.0)
    for weight, reference_weight in zip(batched.weights, survivors.weights):
        torch.testing.assert_close(weight[[0, 2]], reference_weight, rtol=1e-13, atol=0.0)

    # The diverged member logs its non-finite loss at the freezing iteration and NaN after it.
    assert torch.isfinite(result.losses[:diverged_at, 1]).all()
    assert not torch.isfinite(result.losses[diverged_at, 1])
    assert torch.isnan(result.losses[diverged_at + 1 :, 1]).all()
    assert torch.isnan(result.final_losses[1])

    # Its weights stay where a plain loop is after diverged_at steps, which are finite.
    train_plain(models[1], torch.optim.SGD, {}, lrs[1], features, target, 4, diverged_at)
    frozen = batched.member(1)
    for frozen_weight, plain_weight in zip(frozen.weights, models[1].weights):
        assert torch.isfinite(frozen_weight).all()
        torch.testing.assert_close(frozen_weight, plain_weight.detach(), rtol=1e-12, atol=0.0)


def test_overflowing_update_keeps_last_weights(regression):
    features, target = regression
    models = build_models(depth=1)
    initial = models[1].weights[0].detach().clone()
    # An update of 1e308 times the gradient overflows to infinity in the very first step.
    batched = BatchedLinearStack.from_models(models)
    optimizer = BatchedSGD(batched.parameters(), torch.tensor([0.01, 1e308, 0.02], dtype=DTYPE))
    result = train_batched(batched, features, target, 2, optimizer, 5)

    assert result.diverged.tolist() == [False, True, False]
    assert result.diverged_at[1] == 0
    assert torch.isfinite(result.losses[0, 1])
    assert torch.isnan(result.losses[1:, 1]).all()
    assert torch.equal(batched.weights[0][1], initial)


def test_frozen_member_state_stops_changing(regression):
    features, target = regression
    batched = BatchedLinearStack.from_models(build_models(depth=2))
    optimizer = BatchedAdam(batched.parameters(), torch.tensor([0.01, 0.01, 0.01], dtype=DTYPE))
    train_batched(batched, features, target, 2, optimizer, 10)

    optimizer.freeze_unless(torch.tensor([True, False, True]))
    weights_before = [weight.detach().clone() for weight in batched.weights]
    state_before = [{name: value.clone() for name, value in state.items()} for state in optimizer.state]
    result = train_batched(batched, features, target, 2, optimizer, 10)

    assert result.diverged.tolist() == [False, True, False]
    assert result.diverged_at[1] == 0
    for weight, before in zip(batched.weights, weights_before):
        assert torch.equal(weight[1], before[1])
        assert not torch.equal(weight[0], before[0])
    for state, before in zip(optimizer.state, state_before):
        for name, value in state.items():
            assert torch.equal(value[1], before[name][1]), f"state {name!r} of the frozen member changed"
            assert not torch.equal(value[0], before[name][0]), f"state {name!r} of an active member did not change"


def test_divergence_bound_freezes_member(regression):
    features, target = regression
    batched = BatchedLinearStack.from_models(build_models(depth=1))
    with torch.no_grad():
        initial_losses = BatchedLpLoss(2)(batched(features), target)
    initial_weights = batched.weights[0].detach().clone()
    # The bound sits between the smallest initial loss and the others, so only that member survives.
    smallest = int(initial_losses.argmin())
    bound = initial_losses[smallest].item() * 1.0001
    assert (initial_losses > bound).sum() == 2, "the members' initial losses are too close for this test"

    optimizer = BatchedSGD(batched.parameters(), torch.tensor([1e-3, 1e-3, 1e-3], dtype=DTYPE))
    result = train_batched(batched, features, target, 2, optimizer, 5, divergence_bound=bound)

    expected = [index != smallest for index in range(3)]
    assert result.diverged.tolist() == expected
    assert result.diverged_at.tolist() == [-1 if index == smallest else 0 for index in range(3)]
    for index in range(3):
        if index != smallest:
            assert torch.equal(batched.weights[0][index], initial_weights[index])


def test_all_diverged_stops_early(regression):
    features, target = regression
    batched = BatchedLinearStack.from_models(build_models(depth=1))
    optimizer = BatchedSGD(batched.parameters(), torch.tensor([1e308, 1e308, 1e308], dtype=DTYPE))
    result = train_batched(batched, features, target, 2, optimizer, 1000, log_every=10)

    assert result.diverged.all()
    assert result.iterations_run == 10
    assert result.losses.shape == (100, 3)
    assert torch.isnan(result.losses[1:]).all()


def test_progress_lines_report_iterations(regression, caplog):
    features, target = regression
    batched = BatchedLinearStack.from_models(build_models(depth=1))
    optimizer = BatchedSGD(batched.parameters(), torch.tensor([0.01, 0.01, 1e308], dtype=DTYPE))
    with caplog.at_level(logging.INFO, logger="overparam.sweeps.trainer.progress"):
        train_batched(batched, features, target, 2, optimizer, 40, log_every=10, progress_seconds=0.0)

    lines = [record.getMessage() for record in caplog.records if record.name == "overparam.sweeps.trainer.progress"]
    assert [line.split(" (")[0] for line in lines] == [f"Iteration {i} of 40" for i in (10, 20, 30)]
    for line in lines:
        assert "2 of 3 members active" in line
        assert "min left" in line


def test_from_models_member_round_trip(regression):
    features, _ = regression
    models = build_models(depth=3, width=3)
    batched = BatchedLinearStack.from_models(models)

    assert batched.num_members == 3
    assert batched.widths == [INPUT_SIZE, 3, 3, 1]
    assert [tuple(weight.shape) for weight in batched.weights] == [(3, 3, 8), (3, 3, 3), (3, 1, 3)]
    predictions = batched(features)
    assert predictions.shape == (100, 3, 1)
    for index, model in enumerate(models):
        member = batched.member(index)
        assert member.widths == model.widths
        assert member.init == model.init
        assert member.init_std == model.init_std
        for member_weight, model_weight in zip(member.weights, model.weights):
            assert member_weight.dtype == DTYPE
            assert torch.equal(member_weight, model_weight)
        torch.testing.assert_close(batched.end_to_end()[index], model.end_to_end(), rtol=1e-14, atol=1e-16)
        torch.testing.assert_close(predictions[:, index], model(features), rtol=1e-12, atol=1e-15)


def test_member_copies_weights(regression):
    batched = BatchedLinearStack.from_models(build_models(depth=2))
    member = batched.member(-1)
    with torch.no_grad():
        member.weights[0].zero_()
    assert batched.weights[0][2].abs().sum() > 0
    with pytest.raises(IndexError, match="out of range"):
        batched.member(3)


def test_from_seeds_matches_manual_seed():
    rng_before = torch.get_rng_state()
    batched = BatchedLinearStack.from_seeds(SEEDS, INPUT_SIZE, init_std=INIT_STDS, depth=3, hidden_widths=2, dtype=DTYPE)
    assert torch.equal(torch.get_rng_state(), rng_before)

    batched.member(0)
    assert torch.equal(torch.get_rng_state(), rng_before)

    expected = build_models(depth=3, width=2)
    for index, model in enumerate(expected):
        for weight, model_weight in zip(batched.weights, model.weights):
            assert torch.equal(weight[index], model_weight.detach())


def test_end_to_end_uneven_widths():
    torch.manual_seed(5)
    models = [LinearStack(6, output_size=2, depth=4, hidden_widths=[5, 1, 4], init_std=0.5).to(DTYPE) for _ in range(2)]
    batched = BatchedLinearStack.from_models(models)
    features = torch.randn(7, 6, dtype=DTYPE)
    target = torch.randn(7, 2, dtype=DTYPE)

    losses = BatchedLpLoss(4)(batched(features), target)
    for index, model in enumerate(models):
        torch.testing.assert_close(batched.end_to_end()[index], model.end_to_end(), rtol=1e-13, atol=1e-16)
        torch.testing.assert_close(losses[index], LpLoss(4)(model(features), target), rtol=1e-13, atol=0.0)


def test_from_models_rejects_mismatch():
    with pytest.raises(ValueError, match="widths"):
        BatchedLinearStack.from_models([LinearStack(4, depth=2), LinearStack(4, depth=3)])
    with pytest.raises(ValueError, match="bias"):
        BatchedLinearStack.from_models([LinearStack(4, bias=True)])
    with pytest.raises(ValueError, match="float64"):
        BatchedLinearStack.from_models([LinearStack(4), LinearStack(4).to(DTYPE)])
    with pytest.raises(ValueError, match="empty"):
        BatchedLinearStack.from_models([])


def test_lp_loss_rejects_target_shape():
    predictions = torch.zeros(5, 2, 1)
    with pytest.raises(ValueError, match="target has shape"):
        BatchedLpLoss(2)(predictions, torch.zeros(4))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torch.optim.SGD", BatchedSGD),
        ("SGD", BatchedSGD),
        ("adam", BatchedAdam),
        ("torch.optim.Adagrad", BatchedAdagrad),
        (torch.optim.Adadelta, BatchedAdadelta),
        (torch.optim.RMSprop, BatchedRMSprop),
        (BatchedAdam, BatchedAdam),
        ("BatchedRMSprop", BatchedRMSprop),
    ],
)
def test_resolve_optimizer_names(name, expected):
    assert resolve_batched_optimizer(name) is expected


def test_make_optimizer_rejects_invalid():
    params = [torch.zeros(3, 1, 4, requires_grad=True)]
    with pytest.raises(ValueError, match="supported"):
        make_batched_optimizer("torch.optim.LBFGS", params, [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="no batched version"):
        make_batched_optimizer(torch.optim.LBFGS, params, [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        make_batched_optimizer("SGD", params, [0.1, 0.1])
    with pytest.raises(ValueError, match="non-negative"):
        make_batched_optimizer("SGD", params, [0.1, -0.1, 0.1])
    with pytest.raises(ValueError, match="foreach=True"):
        make_batched_optimizer("Adam", params, 0.1, foreach=True)
    with pytest.raises(TypeError, match="unknown option 'nesterovv'"):
        make_batched_optimizer("SGD", params, 0.1, nesterovv=True)
    with pytest.raises(ValueError, match="Nesterov"):
        make_batched_optimizer("SGD", params, 0.1, nesterov=True)

    optimizer = make_batched_optimizer("SGD", params, 0.1, foreach=None, fused=False)
    assert optimizer.lr.tolist() == pytest.approx([0.1, 0.1, 0.1])


def test_optimizer_state_dict_resumes(regression):
    features, target = regression
    lrs = torch.tensor([0.003, 0.01, 0.03], dtype=DTYPE)
    straight = BatchedLinearStack.from_models(build_models(depth=2))
    straight_optimizer = BatchedAdam(straight.parameters(), lrs, amsgrad=True)
    train_batched(straight, features, target, 4, straight_optimizer, 20)

    resumed = BatchedLinearStack.from_models(build_models(depth=2))
    first_optimizer = BatchedAdam(resumed.parameters(), lrs, amsgrad=True)
    train_batched(resumed, features, target, 4, first_optimizer, 10)
    second_optimizer = BatchedAdam(resumed.parameters(), lrs, amsgrad=True)
    second_optimizer.load_state_dict(first_optimizer.state_dict())
    train_batched(resumed, features, target, 4, second_optimizer, 10)

    for weight, reference in zip(resumed.weights, straight.weights):
        assert torch.equal(weight, reference)


def test_train_rejects_dtype_mismatch(regression):
    features, target = regression
    batched = BatchedLinearStack.from_models([LinearStack(INPUT_SIZE)])
    optimizer = BatchedSGD(batched.parameters(), [0.1])
    with pytest.raises(ValueError, match="move the model"):
        train_batched(batched, features, target, 2, optimizer, 3)

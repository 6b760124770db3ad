"""Tests of the end-to-end update rule against its closed forms and against real deep linear networks."""

from pathlib import Path

import pytest
import torch

from overparam.models.linear_stack import LinearStack
from overparam.models.losses import LpLoss
from overparam.optim import EndToEndSGD, emulation_start, end_to_end_direction, set_end_to_end

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def single_thread():
    """Run on one thread, because the matrices are tiny.

    Thread synchronization made these steps over ten times slower while other processes held the cores.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def float64_default():
    """Build every module in float64 so balanced layers are balanced to float64 rounding."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def explicit_direction(weight: torch.Tensor, grad: torch.Tensor, depth: int) -> torch.Tensor:
    """Sum the N terms with matrix powers built from an SVD of ``weight`` and an explicit identity for power 0."""
    rows, columns = weight.shape
    u, s, vh = torch.linalg.svd(weight, full_matrices=True)
    s = torch.where(s > 1e-12 * s.max(), s, torch.zeros_like(s))

    def left_power(power: float) -> torch.Tensor:
        if power == 0:
            return torch.eye(rows)
        values = torch.zeros(rows)
        values[: s.numel()] = s ** (2 * power)
        return u @ torch.diag(values) @ u.T

    def right_power(power: float) -> torch.Tensor:
        if power == 0:
            return torch.eye(columns)
        values = torch.zeros(columns)
        values[: s.numel()] = s ** (2 * power)
        return vh.T @ torch.diag(values) @ vh

    terms = [left_power((j - 1) / depth) @ grad @ right_power((depth - j) / depth) for j in range(1, depth + 1)]
    return torch.stack(terms).sum(dim=0)


def one_step(weight: torch.Tensor, grad: torch.Tensor, **optimizer_args) -> torch.Tensor:
    """Return the matrix after one EndToEndSGD step from ``weight`` with gradient ``grad``."""
    parameter = torch.nn.Parameter(weight.clone())
    parameter.grad = grad.clone()
    EndToEndSGD([parameter], **optimizer_args).step()
    return parameter.detach()


def regression_problem(outputs: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a 200 x 10 linear regression problem with ``outputs`` targets and small noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 10, generator=generator)
    teacher = torch.randn(outputs, 10, generator=generator) / 10**0.5
    y = x @ teacher.T + 0.1 * torch.randn(200, outputs, generator=generator)
    return x, y


def train_side_by_side(
    network: LinearStack,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: torch.nn.Module,
    lr: float,
    steps: int,
    emulated_depth: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train the network with SGD and a depth-1 copy with the rule, and return both end-to-end matrices."""
    shallow = LinearStack(network.widths[0], network.widths[-1], depth=1)
    set_end_to_end(shallow, emulation_start(network))
    network_optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    rule_optimizer = EndToEndSGD(shallow.parameters(), lr=lr, depth=emulated_depth)

    for _ in range(steps):
        for model, optimizer in ((network, network_optimizer), (shallow, rule_optimizer)):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    return network.end_to_end().detach(), shallow.end_to_end().detach()


def relative_distance(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((reference - other).norm() / reference.norm()).item()


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (1, 128), (7, 1), (128, 1)])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 7])
def test_row_and_matrix_forms_agree(shape, depth):
    generator = torch.Generator().manual_seed(depth * 1000 + shape[0] + shape[1])
    weight = torch.randn(*shape, generator=generator)
    grad = torch.randn(*shape, generator=generator)

    row = one_step(weight, grad, lr=0.1, depth=depth, mode="row")
    matrix = one_step(weight, grad, lr=0.1, depth=depth, mode="matrix")
    auto = one_step(weight, grad, lr=0.1, depth=depth, mode="auto")

    torch.testing.assert_close(matrix, row, rtol=1e-12, atol=1e-13)
    assert torch.equal(auto, row)


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_row_form_closed_formula(depth):
    generator = torch.Generator().manual_seed(depth)
    w = torch.randn(1, 9, generator=generator)
    g = torch.randn(1, 9, generator=generator)
    norm = w.norm()

    expected = norm ** (2 - 2 / depth) * (g + (depth - 1) * (g * w).sum() * w / norm**2)

    torch.testing.assert_close(end_to_end_direction(w, g, depth, mode="row"), expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(end_to_end_direction(w.T, g.T, depth, mode="row"), expected.T, rtol=1e-13, atol=0)


@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (5, 5), (2, 6)])
@pytest.mark.parametrize("depth", [2, 3, 4, 6])
def test_matrix_form_matches_explicit_sum(shape, depth):
    generator = torch.Generator().manual_seed(10 * depth + shape[0])
    weight = torch.randn(*shape, generator=generator)
    grad = torch.randn(*shape, generator=generator)

    torch.testing.assert_close(
        end_to_end_direction(weight, grad, depth, mode="matrix"),
        explicit_direction(weight, grad, depth),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_matrix_form_rank_deficient(depth):
    # A rank-2 matrix of shape 4 x 5: both Gram matrices are singular, so a power 0 must stay the identity
    # while a positive power of a zero eigenvalue must stay exactly 0.
    generator = torch.Generator().manual_seed(depth)
    weight = torch.randn(4, 2, generator=generator) @ torch.randn(2, 5, generator=generator)
    grad = torch.randn(4, 5, generator=generator)

    direction = end_to_end_direction(weight, grad, depth, mode="matrix")

    torch.testing.assert_close(direction, explicit_direction(weight, grad, depth), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(direction).all()


def test_matrix_form_float32_round_trip():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=generator)
    grad = torch.randn(3, 4, generator=generator)

    direction = end_to_end_direction(weight.float(), grad.float(), 3, mode="matrix")

    assert direction.dtype == torch.float32
    torch.testing.assert_close(direction.double(), explicit_direction(weight, grad, 3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("shape", [(1, 6), (3, 4)])
def test_depth_one_matches_sgd(dtype, weight_decay, shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, shape[1], generator=generator, dtype=dtype) / shape[1] ** 0.5
    y = torch.randn(50, shape[0], generator=generator, dtype=dtype)
    start = 0.1 * torch.randn(*shape, generator=generator, dtype=dtype)
    rule_weight = torch.nn.Parameter(start.clone())
    sgd_weight = torch.nn.Parameter(start.clone())
    rule = EndToEndSGD([rule_weight], lr=0.05, depth=1, weight_decay=weight_decay)
    sgd = torch.optim.SGD([sgd_weight], lr=0.05, weight_decay=weight_decay)

    for _ in range(20):
        for weight, optimizer in ((rule_weight, rule), (sgd_weight, sgd)):
            optimizer.zero_grad()
            LpLoss(4)(x @ weight.T, y).backward()
            optimizer.step()

    assert torch.isfinite(rule_weight).all()
    assert not torch.equal(rule_weight, start)
    assert torch.equal(rule_weight, sgd_weight)


@pytest.mark.parametrize(
    ("shape", "mode"),
    [((1, 5), "row"), ((5, 1), "row"), ((1, 5), "matrix"), ((5, 1), "matrix"), ((3, 4), "matrix"), ((3, 4), "auto")],
)
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_update_zero_at_origin(shape, mode, depth):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(depth))

    after = one_step(torch.zeros(*shape), grad, lr=0.5, depth=depth, weight_decay=0.1, mode=mode)

    assert torch.equal(after, torch.zeros(*shape))


def test_weight_decay_scales_by_depth():
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))

    after = one_step(weight, torch.zeros(3, 4), lr=0.1, depth=3, weight_decay=0.2)

    torch.testing.assert_close(after, (1 - 0.1 * 0.2 * 3) * weight, rtol=1e-14, atol=0)


def test_step_with_closure():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=generator)
    y = torch.randn(30, 2, generator=generator)
    start = torch.randn(2, 4, generator=generator)
    with_closure = torch.nn.Parameter(start.clone())
    without_closure = torch.nn.Parameter(start.clone())
    closure_optimizer = EndToEndSGD([with_closure], lr=0.1, depth=3)
    plain_optimizer = EndToEndSGD([without_closure], lr=0.1, depth=3)

    def closure():
        closure_optimizer.zero_grad()
        loss = LpLoss(2)(x @ with_closure.T, y)
        loss.backward()
        return loss

    returned = closure_optimizer.step(closure)
    plain_optimizer.zero_grad()
    expected_loss = LpLoss(2)(x @ without_closure.T, y)
    expected_loss.backward()
    no_closure_result = plain_optimizer.step()

    assert no_closure_result is None
    assert returned.item() == expected_loss.item()
    assert torch.equal(with_closure, without_closure)
    assert not torch.equal(with_closure, start)


def test_param_groups_use_own_depth():
    generator = torch.Generator().manual_seed(0)
    first = torch.nn.Parameter(torch.randn(1, 5, generator=generator))
    second = torch.nn.Parameter(torch.randn(2, 3, generator=generator))
    first_start, second_start = first.detach().clone(), second.detach().clone()
    first.grad = torch.randn(1, 5, generator=generator)
    second.grad = torch.randn(2, 3, generator=generator)

    EndToEndSGD([{"params": [first]}, {"params": [second], "depth": 4, "lr": 0.01}], lr=0.1, depth=2).step()

    torch.testing.assert_close(first.detach(), first_start - 0.1 * end_to_end_direction(first_start, first.grad, 2))
    torch.testing.assert_close(
        second.detach(), second_start - 0.01 * end_to_end_direction(second_start, second.grad, 4)
    )


def test_invalid_arguments_raise():
    matrix = torch.nn.Parameter(torch.ones(2, 3))

    with pytest.raises(ValueError, match="2-D end-to-end matrices"):
        EndToEndSGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, depth=2)
    with pytest.raises(ValueError, match="2-D end-to-end matrices"):
        EndToEndSGD([torch.nn.Parameter(torch.ones(2, 3, 4))], lr=0.1, depth=2)
    with pytest.raises(ValueError, match="one row or one column"):
        EndToEndSGD([matrix], lr=0.1, depth=2, mode="row")
    with pytest.raises(ValueError, match="mode must be one of"):
        EndToEndSGD([matrix], lr=0.1, depth=2, mode="svd")
    with pytest.raises(ValueError, match="depth must be an integer"):
        EndToEndSGD([matrix], lr=0.1, depth=0)
    with pytest.raises(ValueError, match="depth must be an integer"):
        EndToEndSGD([matrix], lr=0.1, depth=2.5)
    with pytest.raises(ValueError, match="lr must be"):
        EndToEndSGD([matrix], lr=-0.1, depth=2)
    with pytest.raises(ValueError, match="weight_decay must be"):
        EndToEndSGD([matrix], lr=0.1, depth=2, weight_decay=-1.0)

    optimizer = EndToEndSGD([matrix], lr=0.1, depth=2)
    with pytest.raises(ValueError, match="one row or one column"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, 3))], "mode": "row"})
    with pytest.raises(ValueError, match="grad has shape"):
        end_to_end_direction(torch.ones(2, 3), torch.ones(3, 2), depth=2)


def test_emulation_helpers():
    torch.manual_seed(0)
    network = LinearStack(4, 3, depth=3, hidden_widths=5, init="balanced", init_std=0.5)
    shallow = LinearStack(4, 3, depth=1)

    start = emulation_start(network)
    set_end_to_end(shallow, start)

    assert torch.equal(shallow.end_to_end(), network.end_to_end())
    assert not start.requires_grad
    with pytest.raises(ValueError, match="depth-1 LinearStack"):
        set_end_to_end(network, start)
    with pytest.raises(ValueError, match="input_size=4 and output_size=3"):
        set_end_to_end(LinearStack(3, 4, depth=1), start)
    with pytest.raises(ValueError, match="bias=False"):
        emulation_start(LinearStack(4, 3, depth=2, bias=True))


@pytest.mark.parametrize(
    ("inputs", "outputs", "hidden_widths", "p", "weight_decay"),
    [
        (4, 3, [5, 5], 2, 0.0),
        (4, 3, [5, 5], 4, 0.0),
        (4, 3, [5, 5], 2, 0.3),
        (6, 1, [1], 2, 0.0),
        (6, 2, [2, 3, 2], 4, 0.0),
    ],
)
def test_rule_is_first_order_step(inputs, outputs, hidden_widths, p, weight_decay):
    torch.manual_seed(0)
    network = LinearStack(inputs, outputs, len(hidden_widths) + 1, hidden_widths, init="balanced", init_std=0.7)
    x = torch.randn(40, inputs)
    y = torch.randn(40, outputs)
    loss_fn = LpLoss(p)
    depth = network.depth
    start = network.end_to_end().detach().clone()

    end_to_end = start.clone().requires_grad_()
    loss_fn(x @ end_to_end.T, y).backward()
    # The rule's velocity: W_e changes by -eta * velocity + O(eta^2).
    velocity = weight_decay * depth * start + end_to_end_direction(start, end_to_end.grad, depth, mode="matrix")

    # The step sizes move W_e by about 1%, 0.1% and 0.01%, because the l4 gradients here are
    # 20 to 100 times the l2 ones.
    errors = []
    for relative_step in (1e-2, 1e-3, 1e-4):
        eta = relative_step * (start.norm() / velocity.norm()).item()
        layers = LinearStack(inputs, outputs, depth, hidden_widths)
        layers.load_state_dict(network.state_dict())
        optimizer = torch.optim.SGD(layers.parameters(), lr=eta, weight_decay=weight_decay)
        optimizer.zero_grad()
        loss_fn(layers(x), y).backward()
        optimizer.step()
        change = layers.end_to_end().detach() - start
        errors.append(relative_distance(-eta * velocity, change))

    assert network.balancedness().item() < 1e-12
    assert errors[2] < 1e-3
    assert errors[1] < errors[0] / 5
    assert errors[2] < errors[1] / 5


TRAJECTORY_CASES = [
    pytest.param(outputs, width, depth, p, id=f"out{outputs}-width{width}-depth{depth}-l{p}")
    for outputs, width in ((1, 1), (1, 4), (3, 5))
    for depth in (2, 3)
    for p in (2, 4)
]


@pytest.mark.parametrize(("outputs", "width", "depth", "p"), TRAJECTORY_CASES)
def test_rule_tracks_network_trajectory(outputs, width, depth, p):
    # The l4 loss is steep far from the data, so its runs start closer to zero.
    lr = 0.01
    init_std = 0.3 if p == 2 else 0.1
    total_time = 2.0
    x, y = regression_problem(outputs)
    distances = []
    for step_size in (lr, lr / 4):
        torch.manual_seed(0)
        network = LinearStack(10, outputs, depth, width, init="balanced", init_std=init_std)
        start = network.end_to_end().detach().clone()
        steps = round(total_time / step_size)
        network_end, rule_end = train_side_by_side(network, x, y, LpLoss(p), step_size, steps, depth)
        distances.append(relative_distance(network_end, rule_end))
        assert relative_distance(network_end, start) > 0.5

    assert distances[0] < 0.05
    assert distances[1] < 0.015
    # The rule is the first-order expansion, so the gap at a fixed time shrinks about in proportion to the step.
    assert distances[1] < distances[0] / 3


def test_plain_gradient_descent_is_far_from_network():
    x, y = regression_problem(1)
    torch.manual_seed(0)
    network = LinearStack(10, 1, 3, 4, init="balanced", init_std=0.3)
    twin = LinearStack(10, 1, 3, 4)
    twin.load_state_dict(network.state_dict())

    network_end, rule_end = train_side_by_side(network, x, y, LpLoss(2), 0.01, 200, emulated_depth=3)
    twin_end, plain_end = train_side_by_side(twin, x, y, LpLoss(2), 0.01, 200, emulated_depth=1)

    assert torch.equal(network_end, twin_end)
    assert relative_distance(network_end, plain_end) > 10 * relative_distance(network_end, rule_end)


def load_gas_ethanol() -> tuple[torch.Tensor, torch.Tensor]:
    """Read the ethanol rows of the exact UCI gas-sensor-drift batch files, z-scored."""
    folder = DATA_DIR / "gas-sensor-drift"
    features, targets = [], []
    for path in sorted(folder.glob("batch[0-9].dat")):
        for line in path.read_text().splitlines():
            label, *pairs = line.split()
            gas, concentration = label.split(";")
            if gas != "1":
                continue
            features.append([float(pair.split(":")[1]) for pair in pairs])
            targets.append(float(concentration))
    x = torch.tensor(features)
    y = torch.tensor(targets)[:, None]
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "gas-sensor-drift").is_dir(), reason=f"{DATA_DIR / 'gas-sensor-drift'} is absent")
def test_rule_tracks_network_on_gas_data():
    x, y = load_gas_ethanol()
    distances = []
    for step_size in (2e-3, 5e-4):
        torch.manual_seed(0)
        network = LinearStack(128, 1, 3, 8, init="balanced", init_std=0.05)
        start = network.end_to_end().detach().clone()
        steps = round(3.0 / step_size)
        network_end, rule_end = train_side_by_side(network, x, y, LpLoss(2), step_size, steps, 3)
        distances.append(relative_distance(network_end, rule_end))
        assert relative_distance(network_end, start) > 0.5

    assert x.shape == (1316, 128)
    assert distances[0] < 0.01
    assert distances[1] < distances[0] / 3

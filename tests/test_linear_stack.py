import pytest
import torch

from overparam.models.linear_stack import LinearStack, balanced_factors


def test_end_to_end_equals_product():
    torch.manual_seed(0)
    net = LinearStack(6, 2, depth=3, hidden_widths=[4, 5], init="default").double()
    w1, w2, w3 = net.weights

    torch.testing.assert_close(net.end_to_end(), w3 @ w2 @ w1)


def test_depth_one_end_to_end_is_weight():
    net = LinearStack(5, 1, depth=1)

    assert net.end_to_end() is net.layers[0].weight


@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("widths", [1, 3])
def test_balanced_init_is_balanced(depth, widths):
    torch.manual_seed(depth)
    net = LinearStack(7, 1, depth=depth, hidden_widths=widths, init="balanced", init_std=0.5)

    assert net.balancedness().item() < 1e-6


def test_balanced_factors_reproduce_product():
    torch.manual_seed(0)
    end_to_end = torch.randn(3, 4, dtype=torch.float64)
    factors = balanced_factors(end_to_end, [4, 5, 3, 3])

    torch.testing.assert_close(factors[2] @ factors[1] @ factors[0], end_to_end)
    for lower, upper in zip(factors[:-1], factors[1:]):
        torch.testing.assert_close(upper.T @ upper, lower @ lower.T)


def test_balanced_factors_truncate_to_narrowest_width():
    torch.manual_seed(0)
    end_to_end = torch.randn(3, 4, dtype=torch.float64)
    factors = balanced_factors(end_to_end, [4, 1, 3])

    assert torch.linalg.matrix_rank(factors[1] @ factors[0]).item() == 1


def test_identity_init_square_and_rectangular():
    square = LinearStack(4, 4, depth=3, hidden_widths=4, init="identity")
    rectangular = LinearStack(5, 1, depth=2, hidden_widths=3, init="identity")

    torch.testing.assert_close(square.end_to_end(), torch.eye(4))
    w1, w2 = rectangular.weights
    torch.testing.assert_close(w1, torch.eye(3, 5))
    torch.testing.assert_close(w2, torch.eye(1, 3))
    torch.testing.assert_close(rectangular.end_to_end(), torch.eye(1, 5))


def test_near_zero_init_std():
    torch.manual_seed(0)
    net = LinearStack(1000, 1, depth=2, hidden_widths=50, init="near_zero", init_std=0.01)

    assert net.weights[0].std().item() == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("widths", [1, 4])
def test_product_first_matches_layers(depth, widths):
    torch.manual_seed(depth)
    features = torch.randn(300, 16, dtype=torch.float64)
    target = torch.randn(300, 1, dtype=torch.float64)
    product = LinearStack(16, 1, depth, widths, init="orthogonal", evaluation="product").double()
    layers = LinearStack(16, 1, depth, widths, init="orthogonal", evaluation="layers").double()
    layers.load_state_dict(product.state_dict())

    losses = []
    for net in (product, layers):
        loss = (net(features) - target).pow(4).mean()
        loss.backward()
        losses.append(loss)

    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    for a, b in zip(product.weights, layers.weights):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


def test_auto_evaluation_takes_product_on_ethanol_shape():
    net = LinearStack(128, 1, depth=3, hidden_widths=1)

    assert net._product_first(2565)


def test_bias_uses_layers():
    torch.manual_seed(0)
    net = LinearStack(3, 1, depth=2, hidden_widths=2, bias=True, init="default")
    features = torch.randn(5, 3)

    expected = net.layers[1](net.layers[0](features))
    torch.testing.assert_close(net(features), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth": 0}, "depth must be at least 1"),
        ({"depth": 3, "hidden_widths": [2]}, "needs 2"),
        ({"init": "xavier"}, "init must be one of"),
        ({"depth": 2, "hidden_widths": 0}, "positive"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearStack(4, 1, **kwargs)

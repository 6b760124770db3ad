import pytest
import torch

from overparam.models.optimum import lp_optimum


def _problem(seed: int = 0, rows: int = 400, features: int = 12):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(features, 1, generator=generator, dtype=torch.float64)
    y = y + 0.5 * torch.randn(rows, 1, generator=generator, dtype=torch.float64).pow(3)
    return x, y


def test_l2_optimum_is_least_squares():
    x, y = _problem()
    optimum = lp_optimum(x, y, 2)

    solution = torch.linalg.lstsq(x, y).solution
    expected = (x @ solution - y).pow(2).mean().item()
    assert optimum.loss == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(optimum.weight, solution.T)


@pytest.mark.parametrize("p", [3.0, 4.0, 6.0])
def test_lp_optimum_gradient_vanishes(p):
    x, y = _problem(seed=int(p))
    optimum = lp_optimum(x, y, p)

    weight = optimum.weight.clone().requires_grad_(True)
    loss = (x @ weight.T - y).abs().pow(p).mean()
    (gradient,) = torch.autograd.grad(loss, weight)
    assert gradient.norm().item() < 1e-8
    assert optimum.gradient_norm < 1e-8


def test_lp_optimum_beats_perturbations():
    x, y = _problem(seed=3)
    optimum = lp_optimum(x, y, 4)

    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        perturbed = optimum.weight + 1e-3 * torch.randn(optimum.weight.shape, generator=generator, dtype=torch.float64)
        assert (x @ perturbed.T - y).pow(4).mean().item() > optimum.loss


def test_l4_optimum_below_l4_loss_of_least_squares():
    x, y = _problem(seed=4)
    least_squares = lp_optimum(x, y, 2).weight

    assert lp_optimum(x, y, 4).loss < (x @ least_squares.T - y).pow(4).mean().item()


def test_lp_optimum_separates_output_columns():
    x, y = _problem(seed=5)
    two_columns = torch.cat([y, -2 * y], dim=1)
    joint = lp_optimum(x, two_columns, 4)

    first = lp_optimum(x, y, 4)
    second = lp_optimum(x, -2 * y, 4)
    torch.testing.assert_close(joint.weight[0], first.weight[0])
    torch.testing.assert_close(joint.weight[1], second.weight[0])
    assert joint.loss == pytest.approx((first.loss + second.loss) / 2, rel=1e-10)


def test_lp_optimum_is_cached():
    x, y = _problem(seed=6)

    assert lp_optimum(x, y, 4) is lp_optimum(x.clone(), y.clone(), 4)


def test_lp_optimum_rejects_small_p():
    x, y = _problem()

    with pytest.raises(ValueError, match="p >= 2"):
        lp_optimum(x, y, 1.5)


def test_lp_optimum_ignores_rounding_level_directions():
    generator = torch.Generator().manual_seed(7)
    groups = torch.randint(0, 3, (600,), generator=generator)
    one_hot = torch.nn.functional.one_hot(groups, 3).to(torch.float64)
    measurements = torch.randn(600, 4, generator=generator, dtype=torch.float64)
    y = (measurements.sum(1, keepdim=True) + groups[:, None] + torch.randn(600, 1, generator=generator, dtype=torch.float64))
    x = torch.cat([one_hot, measurements], dim=1)
    x = ((x - x.mean(0)) / x.std(0)).to(torch.float32)

    # The z-scored one-hot columns are collinear up to float32 rounding; dropping one loses nothing.
    full = lp_optimum(x, y.float(), 4)
    without_redundant = lp_optimum(x[:, 1:].contiguous(), y.float(), 4)

    assert full.loss == pytest.approx(without_redundant.loss, rel=1e-6)
    assert full.weight.norm().item() < 100

"""M independent deep linear networks evaluated in one pass over the data.

``BatchedLinearStack`` keeps the weights of M ``LinearStack`` members stacked along a leading member
dimension, so a full-batch step of all M models costs one batched chain product and one matrix
product with the data. Members share no parameters, so the gradient of the summed per-member
losses with respect to member m's weights is exactly the gradient of member m's own loss.
"""

from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor, nn

from overparam.models.linear_stack import LinearStack

# A chain plan is either the index of one matrix in the product or a pair of sub-plans to multiply.
ChainPlan = int | tuple["ChainPlan", "ChainPlan"]


class BatchedLinearStack(nn.Module):
    """Bias-free deep linear networks ``W_N ... W_1`` for M members, weights of shape ``(M, d_j, d_{j-1})``.

    Build it with ``from_models`` or ``from_seeds`` so that each member starts exactly where a single
    ``LinearStack`` would. ``forward`` always forms the end-to-end matrices first, which is the
    cheaper order whenever the data has more rows than the hidden layers are wide.

    Args:
        weights: ``[W_1, ..., W_N]``, input side first, each of shape ``(M, d_j, d_{j-1})``.
        member_configs: Per-member ``LinearStack`` keyword arguments (``init``, ``init_std``,
            ``evaluation``) that ``member`` passes on; ``None`` uses ``LinearStack``'s defaults.
    """

    def __init__(self, weights: Sequence[Tensor], member_configs: Sequence[dict] | None = None) -> None:
        super().__init__()
        if len(weights) == 0:
            raise ValueError("weights is empty; give at least one tensor of shape (M, d_1, d_0).")
        for index, weight in enumerate(weights):
            if weight.dim() != 3:
                raise ValueError(
                    f"weights[{index}] has shape {tuple(weight.shape)}; every weight needs shape (M, d_out, d_in)."
                )
        num_members = weights[0].shape[0]
        widths = [weights[0].shape[2]]
        for index, weight in enumerate(weights):
            if weight.shape[0] != num_members:
                raise ValueError(
                    f"weights[{index}] has {weight.shape[0]} members but weights[0] has {num_members}."
                )
            if weight.shape[2] != widths[-1]:
                raise ValueError(
                    f"weights[{index}] has input width {weight.shape[2]} but the previous layer outputs "
                    f"{widths[-1]}; the shapes must chain as (M, d_j, d_(j-1))."
                )
            widths.append(weight.shape[1])
        if member_configs is not None and len(member_configs) != num_members:
            raise ValueError(f"member_configs has {len(member_configs)} entries for {num_members} members.")

        self.num_members = num_members
        self.widths = widths
        self.depth = len(weights)
        self.weights = nn.ParameterList(nn.Parameter(weight.detach().clone()) for weight in weights)
        self.member_configs = [dict(config) for config in member_configs] if member_configs else None
        self._chain_plan = _cheapest_chain_plan(tuple(widths[::-1]))

    @classmethod
    def from_models(cls, models: Sequence[LinearStack]) -> "BatchedLinearStack":
        """Stack copies of the weights of bias-free ``LinearStack`` models with identical widths."""
        if len(models) == 0:
            raise ValueError("models is empty; give at least one LinearStack.")
        first = models[0]
        for index, model in enumerate(models):
            if model.has_bias:
                raise ValueError(
                    f"models[{index}] has biases; BatchedLinearStack supports bias-free stacks only "
                    "(build the LinearStack with bias=False)."
                )
            if model.widths != first.widths:
                raise ValueError(
                    f"models[{index}] has widths {model.widths} but models[0] has {first.widths}; "
                    "batch only models of one architecture."
                )
            if model.weights[0].dtype != first.weights[0].dtype or model.weights[0].device != first.weights[0].device:
                raise ValueError(
                    f"models[{index}] is {model.weights[0].dtype} on {model.weights[0].device} but models[0] is "
                    f"{first.weights[0].dtype} on {first.weights[0].device}; move them to one dtype and device."
                )

        weights = [torch.stack([model.weights[j].detach() for model in models]) for j in range(first.depth)]
        configs = [
            {"init": model.init, "init_std": model.init_std, "evaluation": model.evaluation} for model in models
        ]
        return cls(weights, configs)

    @classmethod
    def from_seeds(
        cls,
        seeds: Sequence[int],
        input_size: int,
        init_std: float | Sequence[float] = 1e-3,
        dtype: torch.dtype | None = None,
        **stack_kwargs,
    ) -> "BatchedLinearStack":
        """Build member m as ``LinearStack(input_size, init_std=init_std[m], **stack_kwargs)`` under ``torch.manual_seed(seeds[m])``.

        The global CPU random state is restored afterwards. ``dtype`` converts the weights after they
        are drawn, as ``LinearStack(...).to(dtype)`` does.
        """
        init_stds = [init_std] * len(seeds) if isinstance(init_std, (int, float)) else list(init_std)
        if len(init_stds) != len(seeds):
            raise ValueError(f"init_std has {len(init_stds)} entries for {len(seeds)} seeds.")

        models = []
        with torch.random.fork_rng(devices=[]):
            for seed, std in zip(seeds, init_stds):
                torch.manual_seed(seed)
                models.append(LinearStack(input_size, init_std=std, **stack_kwargs).to(dtype=dtype))
        return cls.from_models(models)

    def member(self, index: int) -> LinearStack:
        """Return a ``LinearStack`` with a copy of member ``index``'s current weights."""
        if not -self.num_members <= index < self.num_members:
            raise IndexError(f"member index {index} is out of range for {self.num_members} members.")
        config = self.member_configs[index] if self.member_configs else {}
        reference = self.weights[0]

        # LinearStack draws an initialization that is overwritten below. fork_rng keeps that draw
        # from advancing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            model = LinearStack(
                self.widths[0], self.widths[-1], self.depth, hidden_widths=self.widths[1:-1], **config
            )
        model = model.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for target, source in zip(model.weights, self.weights):
                target.copy_(source[index])
        return model

    def end_to_end(self) -> Tensor:
        """Return the end-to-end matrices ``W_N ... W_1`` of shape ``(M, output_size, input_size)``."""
        factors = list(self.weights)[::-1]
        return _multiply_chain(factors, self._chain_plan)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` of shape ``(n, input_size)`` to predictions of shape ``(n, M, output_size)``."""
        end_to_end = self.end_to_end()
        num_members, output_size, input_size = end_to_end.shape

        # One product with the data for all members: (n, d) @ (d, M * output_size). Column block m
        # depends on member m's weights only, so a NaN in one member's weights stays in its own columns.
        stacked = end_to_end.reshape(num_members * output_size, input_size)
        return (x @ stacked.T).view(x.shape[0], num_members, output_size)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, widths={self.widths}"


class BatchedLpLoss(nn.Module):
    """Per-member ``LpLoss``: the mean of ``|y_hat - y|^p`` over rows and outputs, shape ``(M,)``.

    Args:
        p: Exponent of the loss, at least 1.
        inverse_p_factor: Multiply by ``1/p`` as ``LpLoss`` does.
    """

    def __init__(self, p: float = 2.0, inverse_p_factor: bool = False) -> None:
        super().__init__()
        if p < 1:
            raise ValueError(f"p must be at least 1 for a convex l_p loss, got {p}.")
        self.p = float(p)
        self.inverse_p_factor = inverse_p_factor
        self.scale = 1.0 / self.p if inverse_p_factor else 1.0

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Compare ``prediction`` of shape ``(n, M, out)`` with ``target`` of shape ``(n, out)``, or ``(n,)`` when ``out`` is 1."""
        if prediction.dim() != 3:
            raise ValueError(f"prediction has shape {tuple(prediction.shape)}; expected (n, M, output_size).")
        if target.dim() == 1:
            target = target.unsqueeze(1)
        if target.shape != (prediction.shape[0], prediction.shape[2]):
            raise ValueError(
                f"target has shape {tuple(target.shape)} but predictions of shape {tuple(prediction.shape)} "
                f"need ({prediction.shape[0]}, {prediction.shape[2]})."
            )

        residual = prediction - target.unsqueeze(1)
        if self.p in (2.0, 4.0):
            value = _EvenPowerMean.apply(residual, int(self.p))
        else:
            value = residual.abs().pow(self.p).mean(dim=(0, 2))
        return value * self.scale if self.scale != 1.0 else value

    def extra_repr(self) -> str:
        return f"p={self.p:g}, inverse_p_factor={self.inverse_p_factor}"


class _EvenPowerMean(torch.autograd.Function):
    """Mean of ``residual ** p`` over dims 0 and 2 for p = 2 or 4, with a hand-written backward.

    The forward uses LpLoss's operations (``square`` twice for p = 4). The backward forms
    ``p / count * residual ** (p - 1)`` in one or two passes where autograd's ``PowBackward`` chain
    takes about five, which is most of a training step's elementwise work.
    NOTE: this backward is not itself differentiable, so second derivatives of the loss are unsupported.
    """

    @staticmethod
    def forward(ctx, residual: Tensor, p: int) -> Tensor:
        square = residual.square()
        power = square if p == 2 else square.square()
        ctx.p = p
        ctx.save_for_backward(residual, square if p == 4 else None)
        return power.mean(dim=(0, 2))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        residual, square = ctx.saved_tensors
        count = residual.shape[0] * residual.shape[2]
        scale = (grad * (ctx.p / count)).view(1, -1, 1)
        if ctx.p == 2:
            return residual * scale, None
        return torch.mul(residual, square).mul_(scale), None


@cache
def _cheapest_chain_plan(dims: tuple[int, ...]) -> ChainPlan:
    """Return the multiplication order of the chain ``A_0 ... A_(k-1)`` (``A_i`` of shape ``dims[i] x dims[i+1]``) with the fewest multiply-adds.

    This is the textbook dynamic program for the matrix-chain problem, cubic in the number of factors.
    """
    count = len(dims) - 1
    cost = [[0] * count for _ in range(count)]
    split = [[0] * count for _ in range(count)]
    for length in range(2, count + 1):
        for first in range(count - length + 1):
            last = first + length - 1
            best = None
            for middle in range(first, last):
                candidate = cost[first][middle] + cost[middle + 1][last] + dims[first] * dims[middle + 1] * dims[last + 1]
                if best is None or candidate < best:
                    best = candidate
                    split[first][last] = middle
            cost[first][last] = best

    def plan(first: int, last: int) -> ChainPlan:
        if first == last:
            return first
        middle = split[first][last]
        return (plan(first, middle), plan(middle + 1, last))

    return plan(0, count - 1)


def _multiply_chain(factors: list[Tensor], plan: ChainPlan) -> Tensor:
    if isinstance(plan, int):
        return factors[plan]
    left, right = plan
    return torch.matmul(_multiply_chain(factors, left), _multiply_chain(factors, right))

"""A deep linear network that exposes its end-to-end matrix.

``LinearStack`` computes ``x -> x W_1^T W_2^T ... W_N^T`` with weights ``W_j`` of shape
``(d_j, d_{j-1})``, so its end-to-end matrix is ``W_e = W_N ... W_1`` of shape ``(output, input)``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

INITS = ("near_zero", "identity", "balanced", "orthogonal", "default")
EVALUATIONS = ("auto", "product", "layers")


class LinearStack(nn.Module):
    """Deep linear network ``W_N ... W_1`` with optional biases.

    Args:
        input_size: Number of input features ``d_0``.
        output_size: Number of outputs ``d_N``.
        depth: Number of layers ``N``; depth 1 is plain linear regression.
        hidden_widths: Width of every hidden layer (an int) or of each one (a list of ``depth - 1`` ints).
        bias: Give every layer a bias; the networks of Arora, Cohen & Hazan (2018) have none.
        init: ``near_zero``, ``identity``, ``balanced``, ``orthogonal`` or ``default`` (PyTorch's ``nn.Linear``).
        init_std: Standard deviation of the Gaussian entries of each layer (``near_zero``) or of the
            end-to-end matrix (``balanced``).
        evaluation: ``product`` forms ``W_e`` first, ``layers`` applies the layers one by one, and
            ``auto`` picks the order with fewer multiply-adds for the batch at hand.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int = 1,
        depth: int = 1,
        hidden_widths: int | Sequence[int] = 1,
        bias: bool = False,
        init: str = "near_zero",
        init_std: float = 1e-3,
        evaluation: str = "auto",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}.")
        if evaluation not in EVALUATIONS:
            raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}.")
        if isinstance(hidden_widths, int):
            hidden_widths = [hidden_widths] * (depth - 1)
        hidden_widths = list(hidden_widths)
        if len(hidden_widths) != depth - 1:
            raise ValueError(
                f"hidden_widths has {len(hidden_widths)} entries but depth {depth} needs {depth - 1}; "
                "give one int for all hidden layers or one per hidden layer."
            )
        if any(width < 1 for width in hidden_widths):
            raise ValueError(f"hidden widths must be positive, got {hidden_widths}.")

        self.widths = [input_size, *hidden_widths, output_size]
        self.depth = depth
        self.init = init
        self.init_std = init_std
        self.evaluation = evaluation
        self.layers = nn.ModuleList(
            nn.Linear(d_in, d_out, bias=bias) for d_in, d_out in zip(self.widths[:-1], self.widths[1:])
        )
        self.reset_parameters()

    @property
    def weights(self) -> list[Tensor]:
        """The weight matrices ``[W_1, ..., W_N]``, input side first."""
        return [layer.weight for layer in self.layers]

    @property
    def has_bias(self) -> bool:
        return self.layers[0].bias is not None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the weights from the configured initialization; biases start at zero (except ``default``)."""
        for layer in self.layers:
            layer.reset_parameters()
            if self.init != "default" and layer.bias is not None:
                layer.bias.zero_()

        if self.init == "near_zero":
            for weight in self.weights:
                weight.normal_(0.0, self.init_std)
        elif self.init == "identity":
            # A non-square layer gets the rectangular identity: ones on the main diagonal, so
            # W[i, i] = 1 for i < min(d_out, d_in) and every other entry 0.
            for weight in self.weights:
                nn.init.eye_(weight)
        elif self.init == "orthogonal":
            for weight in self.weights:
                nn.init.orthogonal_(weight)
        elif self.init == "balanced":
            end_to_end = torch.randn(self.widths[-1], self.widths[0], dtype=torch.float64) * self.init_std
            for weight, factor in zip(self.weights, balanced_factors(end_to_end, self.widths)):
                weight.copy_(factor)

    def end_to_end(self) -> Tensor:
        """Return the end-to-end matrix ``W_N ... W_1`` of shape ``(output_size, input_size)``."""
        if self.depth == 1:
            return self.layers[0].weight
        # multi_dot chooses the cheapest association order for the chain.
        return torch.linalg.multi_dot(self.weights[::-1])

    def balancedness(self) -> Tensor:
        """Return ``max_j ||W_{j+1}^T W_{j+1} - W_j W_j^T||_F``; zero for depth 1 and balanced layers."""
        weights = self.weights
        if len(weights) == 1:
            return weights[0].new_zeros(())
        gaps = [
            torch.linalg.matrix_norm(upper.T @ upper - lower @ lower.T)
            for lower, upper in zip(weights[:-1], weights[1:])
        ]
        return torch.stack(gaps).max()

    def forward(self, x: Tensor) -> Tensor:
        if self.has_bias or not self._product_first(x.shape[0]):
            for layer in self.layers:
                x = layer(x)
            return x
        return x @ self.end_to_end().T

    def _product_first(self, batch_size: int) -> bool:
        """Return whether forming ``W_e`` first costs fewer multiply-adds than applying each layer."""
        if self.evaluation != "auto":
            return self.evaluation == "product"
        layer_cost = batch_size * sum(a * b for a, b in zip(self.widths[:-1], self.widths[1:]))
        product_cost = batch_size * self.widths[0] * self.widths[-1] + _chain_cost(self.widths)
        return product_cost <= layer_cost


def _chain_cost(widths: list[int]) -> int:
    """Multiply-adds to form ``W_N ... W_1`` from the output side, an upper bound on ``multi_dot``'s cost."""
    cost = 0
    rows = widths[-1]
    for d_in, d_out in zip(widths[-3::-1], widths[-2:0:-1]):
        cost += rows * d_out * d_in
    return cost


def balanced_factors(end_to_end: Tensor, widths: Sequence[int]) -> list[Tensor]:
    """Split a matrix into ``len(widths) - 1`` balanced factors whose product is its best rank-r approximation.

    With ``W_e = U S V^T`` truncated to rank ``r = min(widths)``, the factors are ``W_1 = S^(1/N) V^T``,
    ``W_j = S^(1/N)`` for hidden layers and ``W_N = U S^(1/N)``, each zero-padded to its shape, so
    ``W_{j+1}^T W_{j+1} = W_j W_j^T`` is exact. The product equals ``end_to_end`` whenever every
    width is at least its rank.
    """
    depth = len(widths) - 1
    if end_to_end.shape != (widths[-1], widths[0]):
        raise ValueError(f"end_to_end has shape {tuple(end_to_end.shape)}, expected {(widths[-1], widths[0])}.")
    u, s, vh = torch.linalg.svd(end_to_end.to(torch.float64), full_matrices=False)
    rank = min(min(widths), s.numel())
    root = s[:rank] ** (1.0 / depth)

    factors = []
    for j, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        factor = torch.zeros(d_out, d_in, dtype=torch.float64)
        if depth == 1:
            factor = end_to_end.to(torch.float64).clone()
        elif j == 0:
            factor[:rank] = root[:, None] * vh[:rank]
        elif j == depth - 1:
            factor[:, :rank] = u[:, :rank] * root[None, :]
        else:
            factor[:rank, :rank] = torch.diag(root)
        factors.append(factor)
    return factors


"""The l_p regression losses of deep-linear-network experiments."""

from torch import Tensor, nn


class LpLoss(nn.Module):
    """Mean of ``|y_hat - y|^p`` over all entries, optionally times ``1/p``.

    Args:
        p: Exponent of the loss, at least 1; ``p = 2`` is the mean squared error.
        inverse_p_factor: Multiply by ``1/p``, the form whose gradient has no factor ``p``.
    """

    def __init__(self, p: float = 2.0, inverse_p_factor: bool = False) -> None:
        super().__init__()
        if p < 1:
            raise ValueError(f"p must be at least 1 for a convex l_p loss, got {p}.")
        self.p = float(p)
        self.inverse_p_factor = inverse_p_factor
        self.scale = 1.0 / self.p if inverse_p_factor else 1.0

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        residual = prediction - target
        if self.p == 2.0:
            value = residual.square().mean()
        elif self.p == 4.0:
            value = residual.square().square().mean()
        else:
            value = residual.abs().pow(self.p).mean()
        return value * self.scale if self.scale != 1.0 else value

    def extra_repr(self) -> str:
        return f"p={self.p:g}, inverse_p_factor={self.inverse_p_factor}"



"""The end-to-end update rule of deep linear networks, as an optimizer over the end-to-end matrix.

For a depth-N linear network trained by gradient descent from a balanced start
(``W_{j+1}^T W_{j+1} = W_j W_j^T``), the end-to-end matrix ``W_e = W_N ... W_1`` moves, to first
order in the step size ``eta``, as::

    W_e <- (1 - eta * lambda * N) W_e - eta * sum_{j=1..N} [W_e W_e^T]^((j-1)/N) grad L(W_e) [W_e^T W_e]^((N-j)/N)

where ``lambda`` is the weight decay of every layer and a power 0 is the identity. Source: Arora, Cohen &
Hazan, "On the Optimization of Deep Networks: Implicit Acceleration by Overparameterization", ICML 2018,
arXiv:1802.06509. ``EndToEndSGD`` applies this rule to a depth-1 model, so it emulates a deep network
without its layers.
"""

from collections.abc import Callable, Iterable
from numbers import Integral
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from overparam.models.linear_stack import LinearStack

MODES = ("auto", "row", "matrix")


class EndToEndSGD(Optimizer):
    """Gradient descent on end-to-end matrices with the update rule of a depth-N linear network.

    Each parameter is an end-to-end matrix ``W_e`` of shape ``(outputs, inputs)``, and a step sets::

        W_e <- (1 - lr * weight_decay * depth) W_e - lr * sum_{j=1..N} [W_e W_e^T]^((j-1)/N) G [W_e^T W_e]^((N-j)/N)

    with ``G = W_e.grad``, ``N = depth`` and a power 0 meaning the identity. For a single row
    ``w`` (one output) the sum has the closed form ``||w||^(2-2/N) (g + (N-1) <g, w> w / ||w||^2)``,
    and the same formula holds for a single column. The update is zero at ``W_e = 0`` for
    ``depth > 1``, so emulating a network starts from the product of its initial weights
    (``emulation_start``). ``depth=1`` performs exactly the arithmetic of ``torch.optim.SGD``
    without momentum.

    Reference: Arora, Cohen & Hazan, "On the Optimization of Deep Networks: Implicit Acceleration by
    Overparameterization", ICML 2018, arXiv:1802.06509.

    NOTE: The rule describes gradient flow from a balanced start. It matches gradient descent on
    the layers only to first order in ``lr`` (exact as ``lr -> 0``), and only when the layers start
    balanced. An unbalanced start, such as independent near-zero Gaussian layers, drifts away from it.
    A hidden width below ``min(outputs, inputs)`` caps the rank of the network's ``W_e``. Each step
    of the rule can raise that rank at order ``lr^2``, and the rule then grows the new directions,
    so it tracks such networks only for small ``lr`` and short times.

    Args:
        params: 2-D end-to-end matrices, or parameter groups of them. Every group may override
            ``lr``, ``depth``, ``weight_decay`` and ``mode``.
        lr: Step size ``eta``.
        depth: Depth ``N`` of the emulated network.
        weight_decay: L2 penalty ``lambda`` on every layer of the emulated network, so the
            end-to-end matrix shrinks by ``lr * weight_decay * depth`` per step.
        mode: ``row`` uses the closed form and accepts only matrices with one row or one column.
            ``matrix`` uses symmetric eigendecompositions in float64 for any shape. ``auto``
            picks ``row`` for one row or one column and ``matrix`` otherwise.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        depth: int,
        weight_decay: float = 0.0,
        mode: str = "auto",
    ) -> None:
        defaults = {"lr": lr, "depth": depth, "weight_decay": weight_decay, "mode": mode}
        _validate_settings(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its settings and that every parameter fits its mode."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_settings(group)
        for param in group["params"]:
            _validate_end_to_end(param, group["mode"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one update of every parameter that has a gradient.

        Args:
            closure: Optional function that clears the gradients, recomputes the loss, calls
                ``backward`` and returns the loss, as for ``torch.optim.SGD``.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr = group["lr"]
            depth = group["depth"]
            weight_decay = group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("EndToEndSGD does not support sparse gradients. Use dense parameters.")

                if depth == 1:
                    # The same operations as torch.optim.SGD, so depth 1 matches it bit for bit.
                    grad = param.grad
                    if weight_decay != 0:
                        grad = grad.add(param, alpha=weight_decay)
                    param.add_(grad, alpha=-lr)
                    continue

                direction = end_to_end_direction(param, param.grad, depth, group["mode"])
                if weight_decay != 0:
                    param.mul_(1.0 - lr * weight_decay * depth)
                param.add_(direction, alpha=-lr)
        return loss


def end_to_end_direction(end_to_end: Tensor, grad: Tensor, depth: int, mode: str = "auto") -> Tensor:
    """Compute ``sum_{j=1..N} [W W^T]^((j-1)/N) G [W^T W]^((N-j)/N)``, the rule's replacement for the gradient.

    Both forms compute in float64 and return the result in the dtype of ``grad``. A power 0 is the
    identity, also where ``W`` is singular.

    Args:
        end_to_end: The end-to-end matrix ``W``, 2-D.
        grad: The gradient ``G`` of the loss with respect to ``W``, of the same shape.
        depth: Depth ``N`` of the emulated network, at least 1.
        mode: ``auto``, ``row`` or ``matrix``, as for ``EndToEndSGD``.
    """
    _validate_end_to_end(end_to_end, mode)
    if grad.shape != end_to_end.shape:
        raise ValueError(
            f"grad has shape {tuple(grad.shape)} but the end-to-end matrix has shape {tuple(end_to_end.shape)}. "
            "Pass the gradient of the loss with respect to that matrix."
        )
    if depth == 1:
        return grad.clone()

    weight = end_to_end.detach().to(torch.float64)
    gradient = grad.detach().to(torch.float64)
    if mode == "row" or (mode == "auto" and min(weight.shape) == 1):
        direction = _vector_direction(weight, gradient, depth)
    else:
        direction = _matrix_direction(weight, gradient, depth)
    return direction.to(grad.dtype)


def _vector_direction(weight: Tensor, grad: Tensor, depth: int) -> Tensor:
    """Apply the closed form ``||w||^(2-2/N) (g + (N-1) <g, w> w / ||w||^2)`` to a single row or column.

    For a column ``w`` the roles of the two Gram matrices swap: ``W^T W = ||w||^2`` is a scalar and
    ``W W^T = w w^T``, whose positive powers are ``||w||^(2p) w w^T / ||w||^2``, so the sum is the
    same formula as for a row.
    """
    squared_norm = weight.square().sum()
    scale = squared_norm ** (1.0 - 1.0 / depth)

    # At w = 0 the scale is 0 and the projection is 0/0. A denominator of 1 there keeps the update
    # exactly zero without a data-dependent branch.
    denominator = torch.where(squared_norm > 0, squared_norm, torch.ones_like(squared_norm))
    projection = (grad * weight).sum() / denominator * weight
    return scale * (grad + (depth - 1) * projection)


def _matrix_direction(weight: Tensor, grad: Tensor, depth: int) -> Tensor:
    """Apply the sum of the rule to a float64 matrix of any shape through two eigendecompositions.

    With ``W W^T = U diag(a) U^T`` and ``W^T W = V diag(b) V^T``, the terms ``j = 1`` and ``j = N``
    have one power 0, so they are ``G B^((N-1)/N)`` and ``A^((N-1)/N) G`` with no approximate
    identity ``U U^T``. Every other term has two positive powers, and their sum is
    ``U (C * (U^T G V)) V^T`` with ``C[i, k] = sum_{j=2..N-1} a_i^((j-1)/N) b_k^((N-j)/N)``.
    """
    left_values, left_vectors = torch.linalg.eigh(weight @ weight.T)
    right_values, right_vectors = torch.linalg.eigh(weight.T @ weight)
    left_values = _clean_eigenvalues(left_values, max(weight.shape))
    right_values = _clean_eigenvalues(right_values, max(weight.shape))

    outer_power = (depth - 1) / depth
    direction = grad @ _matrix_power(right_values, right_vectors, outer_power)
    direction = direction + _matrix_power(left_values, left_vectors, outer_power) @ grad

    if depth > 2:
        inner = torch.arange(2, depth, dtype=torch.float64, device=weight.device)
        left_powers = left_values[:, None] ** ((inner - 1) / depth)[None, :]
        right_powers = right_values[:, None] ** ((depth - inner) / depth)[None, :]
        coefficients = left_powers @ right_powers.T
        rotated = left_vectors.T @ grad @ right_vectors
        direction = direction + left_vectors @ (coefficients * rotated) @ right_vectors.T
    return direction


def _clean_eigenvalues(values: Tensor, size: int) -> Tensor:
    """Set eigenvalues of a Gram matrix that are zero up to rounding to exactly 0.

    ``eigh`` resolves the eigenvalues of ``W W^T`` only to about ``eps * max eigenvalue``, and a
    fractional power magnifies that rounding (``(1e-16)^(1/3)`` is about ``5e-6``). Eigenvalues at
    or below ``size * eps * max eigenvalue``, the tolerance ``torch.linalg.matrix_rank`` uses for
    singular values, are therefore treated as zero, and negative ones always are.
    """
    tolerance = size * torch.finfo(values.dtype).eps * values.max().clamp(min=0)
    return torch.where(values > tolerance, values, torch.zeros_like(values))


def _matrix_power(values: Tensor, vectors: Tensor, power: float) -> Tensor:
    """Form ``V diag(values^power) V^T`` for a positive power, so zero eigenvalues contribute nothing."""
    return (vectors * values**power) @ vectors.T


def _validate_settings(settings: dict[str, Any]) -> None:
    lr = settings["lr"]
    depth = settings["depth"]
    weight_decay = settings["weight_decay"]
    mode = settings["mode"]
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"lr must be a non-negative number, got {lr!r}.")
    if isinstance(depth, bool) or not isinstance(depth, Integral) or depth < 1:
        raise ValueError(f"depth must be an integer of at least 1, got {depth!r}.")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def _validate_end_to_end(end_to_end: Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if end_to_end.dim() != 2:
        raise ValueError(
            f"EndToEndSGD takes 2-D end-to-end matrices, got a tensor of shape {tuple(end_to_end.shape)}. "
            "Pass only weight matrices: biases are outside the rule, so build the model with bias=False."
        )
    if not end_to_end.is_floating_point():
        raise ValueError(f"the end-to-end matrix must have a real floating-point dtype, got {end_to_end.dtype}.")
    if mode == "row" and min(end_to_end.shape) != 1:
        raise ValueError(
            f"mode 'row' needs a matrix with one row or one column, got shape {tuple(end_to_end.shape)}. "
            "Use mode 'matrix' or 'auto'."
        )


@torch.no_grad()
def emulation_start(network: LinearStack) -> Tensor:
    """Return a detached copy of the network's end-to-end matrix, the start of its depth-1 emulation.

    NOTE: The emulation follows the network only if the network is balanced (``network.balancedness()``
    near 0, as with ``init="balanced"``). The rule is zero at ``W_e = 0``, so a zero start never moves.
    """
    if network.has_bias:
        raise ValueError(
            "the network has biases, which the end-to-end rule does not model. Build it with bias=False."
        )
    return network.end_to_end().detach().clone()


@torch.no_grad()
def set_end_to_end(model: LinearStack, end_to_end: Tensor) -> None:
    """Copy an end-to-end matrix into the weight of a depth-1 ``LinearStack``, converting to its dtype.

    Typical use, with ``deep`` a balanced depth-N ``LinearStack``::

        shallow = LinearStack(deep.widths[0], deep.widths[-1], depth=1).to(deep.weights[0].dtype)
        set_end_to_end(shallow, emulation_start(deep))
        optimizer = EndToEndSGD(shallow.parameters(), lr=eta, depth=deep.depth)
    """
    if model.depth != 1:
        raise ValueError(
            f"set_end_to_end needs a depth-1 LinearStack, got depth {model.depth}. "
            "Build the model with depth=1 to hold an end-to-end matrix."
        )
    weight = model.layers[0].weight
    if end_to_end.dim() != 2:
        raise ValueError(f"end_to_end must be a 2-D matrix, got a tensor of shape {tuple(end_to_end.shape)}.")
    if end_to_end.shape != weight.shape:
        raise ValueError(
            f"end_to_end has shape {tuple(end_to_end.shape)} but the model's weight has shape "
            f"{tuple(weight.shape)}. Build the model with input_size={end_to_end.shape[-1]} "
            f"and output_size={end_to_end.shape[0]}."
        )
    weight.copy_(end_to_end)

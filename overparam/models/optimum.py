"""The optimum of the convex bias-free l_p regression problem that every linear network shares.

A linear network of any depth computes a linear map, so its training loss is bounded below by
``L* = min_W mean(|X W^T - Y|^p)``. Arora, Cohen & Hazan (ICML 2018) plot the training loss minus ``L*`` on a log axis.
"""

import hashlib
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_CACHE: dict[tuple[str, float], "LpOptimum"] = {}


@dataclass(frozen=True)
class LpOptimum:
    """Minimizer of ``mean(|X W^T - Y|^p)`` in float64."""

    loss: float
    weight: Tensor
    iterations: int
    gradient_norm: float


def data_fingerprint(features: Tensor, target: Tensor) -> str:
    """Return a SHA-256 digest of the data's values, shapes and dtypes, to key caches."""
    digest = hashlib.sha256()
    for tensor in (features, target):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def lp_optimum(features: Tensor, target: Tensor, p: float, max_iterations: int = 200) -> LpOptimum:
    """Compute the minimizer of ``mean(|X W^T - Y|^p)`` over ``W``, cached per data and ``p``.

    ``p = 2`` is solved by least squares. ``p > 2`` is solved by damped Newton's method started at
    the least-squares solution, one output column at a time since the loss separates over columns.

    Args:
        features: ``X`` of shape ``(n, d)``.
        target: ``Y`` of shape ``(n, k)`` or ``(n,)``.
        p: Exponent, 2 or more.
        max_iterations: Newton iterations per column before giving up.
    """
    if p < 2:
        raise ValueError(f"lp_optimum needs p >= 2 (Newton's method needs a smooth loss), got {p}.")
    key = (data_fingerprint(features, target), float(p))
    if key in _CACHE:
        return _CACHE[key]

    x = features.detach().cpu().to(torch.float64)
    y = target.detach().cpu().to(torch.float64)
    if y.ndim == 1:
        y = y[:, None]

    # Solve in the span of the singular directions that the data's own precision resolves. A
    # direction below that, such as one-hot columns that z-scoring made collinear up to float32
    # rounding, would let the solver exploit rounding noise with huge weights.
    _, singular_values, vh = torch.linalg.svd(x, full_matrices=False)
    tolerance = 10 * torch.finfo(features.dtype).eps * singular_values[0]
    basis = vh[singular_values > tolerance].T
    reduced = x @ basis
    if basis.shape[1] < x.shape[1]:
        log.info("l%g optimum: %d of %d directions of the data are below its precision and left out", p, x.shape[1] - basis.shape[1], x.shape[1])

    coefficients = torch.linalg.lstsq(reduced, y, driver="gelsd").solution.T.contiguous()
    iterations = 0
    if p != 2:
        columns = []
        for column in range(y.shape[1]):
            solution, steps = _newton_lp(reduced, y[:, column], coefficients[column], float(p), max_iterations)
            columns.append(solution)
            iterations = max(iterations, steps)
        coefficients = torch.stack(columns)
    weight = coefficients @ basis.T

    residual = x @ weight.T - y
    loss = residual.abs().pow(p).mean().item()
    gradient = p * (residual.abs().pow(p - 1) * residual.sign()).T @ x / residual.numel()
    optimum = LpOptimum(loss, weight, iterations, torch.linalg.norm(gradient).item())
    log.info("l%g optimum %.10g (gradient norm %.2e, %d Newton iterations)", p, loss, optimum.gradient_norm, iterations)
    _CACHE[key] = optimum
    return optimum


def _newton_lp(x: Tensor, y: Tensor, w: Tensor, p: float, max_iterations: int) -> tuple[Tensor, int]:
    """Minimize ``mean(|x w - y|^p)`` for one column by Newton's method with backtracking."""
    n = x.shape[0]

    def objective(v: Tensor) -> Tensor:
        return (x @ v - y).abs().pow(p).mean()

    value = objective(w)
    for iteration in range(1, max_iterations + 1):
        residual = x @ w - y
        gradient = p * x.T @ (residual.abs().pow(p - 1) * residual.sign()) / n
        curvature = p * (p - 1) * residual.abs().pow(p - 2) / n
        hessian = (x * curvature[:, None]).T @ x
        # A tiny ridge keeps the solve defined where the curvature weights vanish.
        ridge = 1e-14 * torch.trace(hessian) / hessian.shape[0]
        direction = torch.linalg.solve(hessian + ridge * torch.eye(hessian.shape[0], dtype=x.dtype), gradient)
        decrement = gradient @ direction
        if not torch.isfinite(decrement):
            break

        step = 1.0
        while step > 1e-12:
            candidate = w - step * direction
            candidate_value = objective(candidate)
            if candidate_value <= value - 0.25 * step * decrement:
                break
            step *= 0.5
        else:
            # No step decreases the loss beyond rounding error: w is optimal to working precision.
            return w, iteration
        w, value = candidate, candidate_value
        if torch.linalg.vector_norm(step * direction) <= 1e-12 * (1.0 + torch.linalg.vector_norm(w)):
            return w, iteration

    log.warning("Newton's method for the l%g optimum stopped after %d iterations", p, max_iterations)
    return w, max_iterations

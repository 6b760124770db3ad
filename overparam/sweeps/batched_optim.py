"""Per-member optimizers for parameters with a leading member dimension M.

Each class applies the update rule of its ``torch.optim`` counterpart (torch 2.13, single-tensor
path, ``maximize`` supported) to every member at once, with a learning rate of shape ``(M,)`` and all
other hyperparameters shared. Updates are computed out of place and committed only for active
members, so a frozen member's parameters and state stop changing while the others carry on.
"""

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Options of torch.optim classes that pick an implementation, not an update rule. They are accepted
# so that keyword arguments written for torch.optim carry over, but only with their default value.
_IMPLEMENTATION_OPTIONS = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")


class BatchedOptimizer:
    """Base class of the batched optimizers: shared bookkeeping, masking and the divergence check.

    A subclass implements ``_update``, which returns the new parameter and state tensors of all
    members without writing to them. ``step`` commits them for the members that are active and whose
    new parameters are finite, and freezes the others.

    Args:
        params: Tensors of shape ``(M, ...)`` sharing M, device and dtype, usually ``model.parameters()``.
        lr: Learning rate per member, shape ``(M,)``, or one number for all members.
    """

    def __init__(self, params: Iterable[Tensor], lr: Tensor | float | Sequence[float], **options) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("params is empty; pass the parameters of a BatchedLinearStack.")
        for index, param in enumerate(self.params):
            if not isinstance(param, Tensor):
                raise TypeError(
                    f"params[{index}] is a {type(param).__name__}; parameter groups are not supported, "
                    "pass a flat list of tensors of shape (M, ...)."
                )
        first = self.params[0]
        if first.dim() == 0:
            raise ValueError("params[0] is a scalar; every parameter needs a leading member dimension M.")
        self.num_members = first.shape[0]
        for index, param in enumerate(self.params):
            if param.dim() == 0 or param.shape[0] != self.num_members:
                raise ValueError(
                    f"params[{index}] has shape {tuple(param.shape)} but params[0] has {self.num_members} members."
                )
            if param.device != first.device or param.dtype != first.dtype:
                raise ValueError(
                    f"params[{index}] is {param.dtype} on {param.device} but params[0] is {first.dtype} on "
                    f"{first.device}; keep all parameters on one device and dtype."
                )

        for name, value in options.items():
            if name not in _IMPLEMENTATION_OPTIONS:
                raise TypeError(f"{type(self).__name__} got an unknown option {name!r}.")
            if value:
                raise ValueError(
                    f"{type(self).__name__} does not support {name}={value!r}; "
                    f"leave it at its default (None or False)."
                )

        self.lr = _member_learning_rates(lr, self.num_members, first)
        self.active = torch.ones(self.num_members, dtype=torch.bool, device=first.device)
        self.step_count = 0
        self.state: list[dict[str, Tensor]] = [self._initial_state(param) for param in self.params]
        self._member_shapes = [(self.num_members,) + (1,) * (param.dim() - 1) for param in self.params]

    def _initial_state(self, param: Tensor) -> dict[str, Tensor]:
        return {}

    def _update(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], lr: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the new parameter and state of every member; ``lr`` has shape ``(M, 1, ...)``."""
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()

    def freeze_unless(self, keep: Tensor) -> None:
        """Freeze every member where the boolean ``(M,)`` tensor ``keep`` is False."""
        self.active.logical_and_(keep)

    @torch.no_grad()
    def step(self) -> None:
        """Update the active members from ``param.grad``.

        A member whose new parameters would contain a NaN or infinity keeps its current values and is
        frozen, so parameters that start finite stay finite. Parameters without a gradient are skipped,
        as in ``torch.optim``.
        """
        self.step_count += 1

        updates = []
        finite_sum = None
        for index, param in enumerate(self.params):
            if param.grad is None:
                continue
            lr = self.lr.view(self._member_shapes[index])
            new_param, new_state = self._update(param, param.grad, self.state[index], lr)
            updates.append((index, new_param, new_state))

            # A member's sum is NaN or infinite when any of its entries is, and one reduction per parameter
            # is cheaper than an isfinite pass plus a reduction. A sum of finite entries near the dtype's
            # maximum can overflow too, which also freezes that member.
            member_sum = new_param.reshape(self.num_members, -1).sum(dim=1)
            finite_sum = member_sum if finite_sum is None else finite_sum.add_(member_sum)

        if finite_sum is None:
            return
        keep = self.active.logical_and_(torch.isfinite(finite_sum))

        for index, new_param, new_state in updates:
            mask = keep.view(self._member_shapes[index])
            param = self.params[index]
            torch.where(mask, new_param, param, out=param)
            state = self.state[index]
            for name, value in new_state.items():
                torch.where(mask, value, state[name], out=state[name])

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "lr": self.lr.clone(),
            "active": self.active.clone(),
            "state": [{name: value.clone() for name, value in state.items()} for state in self.state],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict["state"]) != len(self.state):
            raise ValueError(
                f"state_dict has state for {len(state_dict['state'])} parameters but this optimizer has "
                f"{len(self.state)}."
            )
        self.step_count = int(state_dict["step_count"])
        self.lr.copy_(state_dict["lr"])
        self.active.copy_(state_dict["active"])
        for state, loaded in zip(self.state, state_dict["state"]):
            for name, value in state.items():
                value.copy_(loaded[name])


class BatchedSGD(BatchedOptimizer):
    """``torch.optim.SGD`` per member: momentum, dampening, Nesterov momentum and L2 weight decay."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: Tensor | float | Sequence[float],
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        **options,
    ) -> None:
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}; it must be non-negative.")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; it must be non-negative.")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening.")
        self.momentum = momentum
        self.dampening = dampening
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.maximize = maximize
        super().__init__(params, lr, **options)

    def _initial_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros_like(param)} if self.momentum != 0 else {}

    def _update(self, param, grad, state, lr):
        grad = -grad if self.maximize else grad
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)

        new_state = {}
        if self.momentum != 0:
            # torch.optim.SGD starts the buffer as a copy of the first gradient, without dampening.
            if self.step_count == 1:
                buffer = grad.clone()
            else:
                buffer = state["momentum_buffer"].mul(self.momentum).add_(grad, alpha=1 - self.dampening)
            new_state["momentum_buffer"] = buffer
            grad = grad.add(buffer, alpha=self.momentum) if self.nesterov else buffer

        return torch.addcmul(param, grad, lr, value=-1), new_state


class BatchedAdam(BatchedOptimizer):
    """``torch.optim.Adam`` per member, with bias correction, L2 weight decay and optional AMSGrad."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: Tensor | float | Sequence[float],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        **options,
    ) -> None:
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}; it must be non-negative.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas {betas}; each must be in [0, 1).")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; it must be non-negative.")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self.weight_decay = weight_decay
        self.amsgrad = amsgrad
        self.maximize = maximize
        super().__init__(params, lr, **options)

    def _initial_state(self, param: Tensor) -> dict[str, Tensor]:
        state = {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
        if self.amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(param)
        return state

    def _update(self, param, grad, state, lr):
        beta1, beta2 = self.betas
        grad = -grad if self.maximize else grad
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)

        exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        new_state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2_sqrt = (1 - beta2**self.step_count) ** 0.5
        step_size = lr / bias_correction1

        if self.amsgrad:
            max_exp_avg_sq = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
            new_state["max_exp_avg_sq"] = max_exp_avg_sq
            denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)

        return torch.addcmul(param, exp_avg / denom, step_size, value=-1), new_state


class BatchedAdagrad(BatchedOptimizer):
    """``torch.optim.Adagrad`` per member, with ``lr_decay``, ``initial_accumulator_value`` and L2 weight decay."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: Tensor | float | Sequence[float],
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        maximize: bool = False,
        **options,
    ) -> None:
        if lr_decay < 0.0:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}; it must be non-negative.")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; it must be non-negative.")
        if initial_accumulator_value < 0.0:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {initial_accumulator_value}; it must be non-negative."
            )
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}; it must be non-negative.")
        self.lr_decay = lr_decay
        self.weight_decay = weight_decay
        self.initial_accumulator_value = initial_accumulator_value
        self.eps = eps
        self.maximize = maximize
        super().__init__(params, lr, **options)

    def _initial_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"sum": torch.full_like(param, self.initial_accumulator_value)}

    def _update(self, param, grad, state, lr):
        grad = -grad if self.maximize else grad
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)

        state_sum = state["sum"].addcmul(grad, grad, value=1)
        std = state_sum.sqrt().add_(self.eps)
        decayed_lr = lr / (1 + (self.step_count - 1) * self.lr_decay)
        return torch.addcmul(param, grad / std, decayed_lr, value=-1), {"sum": state_sum}


class BatchedAdadelta(BatchedOptimizer):
    """``torch.optim.Adadelta`` per member; ``lr`` scales the update and is 1.0 in torch's default."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: Tensor | float | Sequence[float] = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        maximize: bool = False,
        **options,
    ) -> None:
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}; it must be in [0, 1].")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}; it must be non-negative.")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; it must be non-negative.")
        self.rho = rho
        self.eps = eps
        self.weight_decay = weight_decay
        self.maximize = maximize
        super().__init__(params, lr, **options)

    def _initial_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"square_avg": torch.zeros_like(param), "acc_delta": torch.zeros_like(param)}

    def _update(self, param, grad, state, lr):
        grad = -grad if self.maximize else grad
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)

        square_avg = state["square_avg"].mul(self.rho).addcmul_(grad, grad, value=1 - self.rho)
        std = square_avg.add(self.eps).sqrt_()
        delta = state["acc_delta"].add(self.eps).sqrt_().div_(std).mul_(grad)
        acc_delta = state["acc_delta"].mul(self.rho).addcmul_(delta, delta, value=1 - self.rho)
        new_state = {"square_avg": square_avg, "acc_delta": acc_delta}
        return torch.addcmul(param, delta, lr, value=-1), new_state


class BatchedRMSprop(BatchedOptimizer):
    """``torch.optim.RMSprop`` per member, with ``alpha``, ``centered``, momentum and L2 weight decay."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: Tensor | float | Sequence[float],
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        maximize: bool = False,
        **options,
    ) -> None:
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}; it must be non-negative.")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}; it must be non-negative.")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; it must be non-negative.")
        if alpha < 0.0:
            raise ValueError(f"Invalid alpha value: {alpha}; it must be non-negative.")
        self.alpha = alpha
        self.eps = eps
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.centered = centered
        self.maximize = maximize
        super().__init__(params, lr, **options)

    def _initial_state(self, param: Tensor) -> dict[str, Tensor]:
        state = {"square_avg": torch.zeros_like(param)}
        if self.momentum > 0:
            state["momentum_buffer"] = torch.zeros_like(param)
        if self.centered:
            state["grad_avg"] = torch.zeros_like(param)
        return state

    def _update(self, param, grad, state, lr):
        grad = -grad if self.maximize else grad
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)

        square_avg = state["square_avg"].mul(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
        new_state = {"square_avg": square_avg}
        if self.centered:
            grad_avg = state["grad_avg"].lerp(grad, 1 - self.alpha)
            new_state["grad_avg"] = grad_avg
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(self.eps)

        if self.momentum > 0:
            buffer = state["momentum_buffer"].mul(self.momentum).addcdiv_(grad, avg)
            new_state["momentum_buffer"] = buffer
            return torch.addcmul(param, buffer, lr, value=-1), new_state
        return torch.addcmul(param, grad / avg, lr, value=-1), new_state


BATCHED_OPTIMIZERS: dict[str, type[BatchedOptimizer]] = {
    "SGD": BatchedSGD,
    "Adam": BatchedAdam,
    "Adagrad": BatchedAdagrad,
    "Adadelta": BatchedAdadelta,
    "RMSprop": BatchedRMSprop,
}


def resolve_batched_optimizer(name_or_class: str | type) -> type[BatchedOptimizer]:
    """Map ``"torch.optim.SGD"``, ``"SGD"``, ``"sgd"``, ``torch.optim.SGD`` or ``BatchedSGD`` to ``BatchedSGD``, and so on."""
    if isinstance(name_or_class, type):
        if issubclass(name_or_class, BatchedOptimizer):
            return name_or_class
        for name, batched in BATCHED_OPTIMIZERS.items():
            if name_or_class is getattr(torch.optim, name):
                return batched
        raise ValueError(
            f"{name_or_class.__module__}.{name_or_class.__qualname__} has no batched version; "
            f"supported: {', '.join('torch.optim.' + name for name in BATCHED_OPTIMIZERS)}."
        )

    if not isinstance(name_or_class, str):
        raise TypeError(f"name_or_class must be a name or a class, got {type(name_or_class).__name__}.")
    name = name_or_class.removeprefix("torch.optim.")
    for supported, batched in BATCHED_OPTIMIZERS.items():
        if name.lower() in (supported.lower(), batched.__name__.lower()):
            return batched
    raise ValueError(
        f"Unknown optimizer {name_or_class!r}; supported: "
        f"{', '.join('torch.optim.' + name for name in BATCHED_OPTIMIZERS)}."
    )


def make_batched_optimizer(
    name_or_class: str | type, params: Iterable[Tensor], lr: Tensor | float | Sequence[float], **kwargs
) -> BatchedOptimizer:
    """Build the batched counterpart of a ``torch.optim`` class with per-member learning rates ``lr``."""
    return resolve_batched_optimizer(name_or_class)(params, lr, **kwargs)


def _member_learning_rates(lr: Tensor | float | Sequence[float], num_members: int, like: Tensor) -> Tensor:
    rates = torch.as_tensor(lr, dtype=like.dtype).to(like.device)
    if rates.dim() == 0:
        rates = rates.expand(num_members)
    if rates.shape != (num_members,):
        raise ValueError(
            f"lr has shape {tuple(rates.shape)}; give one learning rate per member, shape ({num_members},)."
        )
    # This check reads the rates back from the device once, at construction, and never in a step.
    if not bool(torch.isfinite(rates).all()) or bool((rates < 0).any()):
        raise ValueError(f"Invalid learning rates {rates.tolist()}; each must be finite and non-negative.")
    return rates.clone()

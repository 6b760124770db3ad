"""Callbacks shared by every training run."""

import logging
import math

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


class DivergenceCallback(Callback):
    """Stop training cleanly when the training loss is NaN, infinite or above a bound.

    The loss is read from each training step's output. A module that detects divergence inside its
    own step, as ``LinearStackRegressor`` does between logged iterations, sets ``diverged_at`` and
    ``divergence_reason``, and this callback reports the module's more precise iteration.

    Args:
        max_loss: Treat a finite training loss above this value as divergence; None checks only for
            NaN and infinity.
    """

    def __init__(self, max_loss: float | None = None) -> None:
        self.max_loss = max_loss
        self.diverged_at: int | None = None
        self.reason: str | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.diverged:
            return

        module_iteration = getattr(pl_module, "diverged_at", None)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss) if loss is not None else math.nan
        if module_iteration is not None:
            self.diverged_at = module_iteration
            self.reason = pl_module.divergence_reason
        elif not math.isfinite(value):
            self.diverged_at = trainer.global_step
            self.reason = f"train/loss is {value}"
        elif self.max_loss is not None and value > self.max_loss:
            self.diverged_at = trainer.global_step
            self.reason = f"train/loss {value:.6g} exceeded max_loss {self.max_loss:g}"
        else:
            return

        trainer.should_stop = True
        log.error("Training diverged at iteration %d: %s", self.diverged_at, self.reason)

    def message(self) -> str:
        """Return a one-line description of the divergence and the usual fix."""
        return (
            f"Training diverged at iteration {self.diverged_at}: {self.reason}. "
            "Lower the learning rate (model.optimizer.init_args.lr) or the initialization scale."
        )

    def state_dict(self) -> dict:
        return {"diverged_at": self.diverged_at, "reason": self.reason}

    def load_state_dict(self, state_dict: dict) -> None:
        self.diverged_at = state_dict["diverged_at"]
        self.reason = state_dict["reason"]

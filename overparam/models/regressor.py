"""LightningModule that trains a ``LinearStack`` by full-batch iterations of an optimizer.

Each Lightning training step runs ``iterations_per_step`` full-batch iterations (forward, backward,
optimizer step) in a plain loop. ``trainer.global_step`` and ``trainer.max_steps`` therefore count
iterations, and metrics are logged per iteration at ``trainer.log_every_n_steps``, while Lightning's
per-step overhead is paid once per ``iterations_per_step`` iterations.
"""

import logging
import math
from collections.abc import Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from overparam.models.linear_stack import LinearStack
from overparam.models.losses import LpLoss
from overparam.models.optimum import lp_optimum

log = logging.getLogger(__name__)


class LinearStackRegressor(LightningModule):
    """Deep linear regression trained on the l_p loss ``mean(|y_hat - y|^p)``.

    Args:
        input_size: Number of input features; LightningCLI links it to ``data.num_features``.
        output_size: Number of regression targets.
        depth: Number of layers ``N``.
        hidden_widths: Width of every hidden layer (an int) or of each one (a list).
        bias: Give every layer a bias; the networks of Arora, Cohen & Hazan (2018) have none.
        init: ``near_zero``, ``identity``, ``balanced``, ``orthogonal`` or ``default``.
        init_std: Gaussian standard deviation of each layer (``near_zero``) or of the end-to-end matrix (``balanced``).
        p: Exponent of the l_p loss (2 is the mean squared error, the paper also uses 4).
        inverse_p_factor: Multiply the loss by ``1/p``.
        optimizer: Any ``torch.optim`` optimizer class with its arguments, e.g. ``torch.optim.SGD`` with ``lr``.
        iterations_per_step: Full-batch iterations per Lightning training step; results do not depend on it.
        loss_optimum: Minimum of the training loss over linear maps; None computes it for bias-free networks.
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
        p: float = 2.0,
        inverse_p_factor: bool = False,
        optimizer: OptimizerCallable = torch.optim.SGD,
        iterations_per_step: int = 100,
        loss_optimum: float | None = None,
    ) -> None:
        super().__init__()
        if iterations_per_step < 1:
            raise ValueError(f"iterations_per_step must be at least 1, got {iterations_per_step}.")
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False

        self.net = LinearStack(input_size, output_size, depth, hidden_widths, bias, init, init_std)
        self.loss_fn = LpLoss(p, inverse_p_factor)
        self.optimizer_factory = optimizer
        self.loss_optimum = loss_optimum

        self.last_loss: float = math.nan
        # (iteration, train/loss) at every logged iteration of the last fit, for objectives and plots.
        self.curve: list[tuple[int, float]] = []
        self.diverged_at: int | None = None
        self.divergence_reason: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_tensors"):
            return

        features, target = datamodule.train_tensors()
        if self.loss_optimum is None and not self.hparams.bias:
            optimum = lp_optimum(features, target, self.hparams.p)
            self.loss_optimum = optimum.loss * self.loss_fn.scale
            # NOTE: with several outputs and a hidden layer narrower than min(input, output), the
            # network cannot reach this optimum, so the logged gap stays positive.

    def on_fit_start(self) -> None:
        self.curve = []

        # The precision plugin has converted the weights by now, so this reads their final dtype.
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_tensors"):
            data_dtype = datamodule.train_tensors()[0].dtype
            weight_dtype = self.net.weights[0].dtype
            if data_dtype != weight_dtype:
                raise ValueError(
                    f"The data are {data_dtype} but the model is {weight_dtype}; set trainer.precision to "
                    "'64-true' for float64 data, or data.dtype to 'float32'."
                )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        optimizer = self.optimizers().optimizer
        log_every = max(self.trainer.log_every_n_steps, 1)
        start = self.trainer.global_step
        num_iterations = self.hparams.iterations_per_step
        if self.trainer.max_steps > 0:
            num_iterations = min(num_iterations, self.trainer.max_steps - start)

        loss = None
        for iteration in range(start, start + num_iterations):
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.net(x), y)
            loss.backward()

            if iteration % log_every == 0 and self._check_and_log(loss.detach(), iteration):
                num_iterations = iteration - start
                break
            optimizer.step()

        _advance_global_step(self.trainer, num_iterations)
        self.last_loss = loss.item()
        if self.diverged_at is None and not math.isfinite(self.last_loss):
            self._mark_diverged(self.trainer.global_step, self.last_loss)
        # Lightning's logger skips these: the loop above already wrote them at their own iterations.
        self.log("train/loss", self.last_loss, prog_bar=True, logger=False)
        if self.loss_optimum is not None:
            self.log("train/loss_gap", self.last_loss - self.loss_optimum, logger=False)
        return loss.detach()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._log_evaluation("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._log_evaluation("test", batch)

    def _log_evaluation(self, split: str, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self.log(f"{split}/loss", loss, prog_bar=True)

    def _check_and_log(self, loss: Tensor, iteration: int) -> bool:
        """Log the metrics of ``iteration`` and return whether training has diverged."""
        value = loss.item()
        self.curve.append((iteration, value))
        with torch.no_grad():
            metrics = {
                "train/loss": value,
                "train/e2e_norm": torch.linalg.matrix_norm(self.net.end_to_end()).item(),
                "train/balancedness": self.net.balancedness().item(),
            }
        if self.loss_optimum is not None:
            metrics["train/loss_gap"] = value - self.loss_optimum
        for logger in self.loggers:
            logger.log_metrics(metrics, step=iteration)

        if math.isfinite(value):
            return False
        self._mark_diverged(iteration, value)
        return True

    def _mark_diverged(self, iteration: int, value: float) -> None:
        """Record the first non-finite loss; ``DivergenceCallback`` stops the run and reports it."""
        self.diverged_at = iteration
        self.divergence_reason = f"train/loss is {value}"

    @torch.no_grad()
    def final_loss(self) -> float:
        """Return the training loss at the current weights, after the last update."""
        features, target = self.trainer.datamodule.train_tensors()
        features, target = features.to(self.device), target.to(self.device)
        return self.loss_fn(self.net(features), target).item()

    def on_train_end(self) -> None:
        if self.diverged_at is None and hasattr(self.trainer.datamodule, "train_tensors"):
            self.last_loss = self.final_loss()
            self.curve.append((self.trainer.global_step, self.last_loss))
            metrics = {"train/loss": self.last_loss}
            if self.loss_optimum is not None:
                metrics["train/loss_gap"] = self.last_loss - self.loss_optimum
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.trainer.global_step)

        # Write the hyperparameters once with real metric values, so TensorBoard's hparams tab
        # shows the outcome instead of a placeholder.
        metrics = {"hp/final_loss": self.last_loss}
        if self.loss_optimum is not None:
            metrics["hp/final_loss_gap"] = self.last_loss - self.loss_optimum
        metrics["hp/diverged"] = float(self.diverged_at is not None)
        for logger in self.loggers:
            logger.log_hyperparams(self.hparams_for_logging(), metrics)
            logger.save()

    def teardown(self, stage: str) -> None:
        # Lightning leaves the process group of a DDP run alive. A ddp_spawn rank that exits with
        # it still alive can abort (SIGABRT) when gloo's threads release their tensors during
        # interpreter shutdown, and the launcher then reports the whole run as failed.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def hparams_for_logging(self) -> dict:
        """Return the hyperparameters with the optimizer's class and scalar settings, flat for TensorBoard."""
        params = dict(self.hparams)
        params["optimizer"] = getattr(self.optimizer_factory, "__name__", repr(self.optimizer_factory))
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is not None:
            params["optimizer"] = type(optimizer).__name__
            for name, value in optimizer.defaults.items():
                if isinstance(value, (int, float, bool, str)):
                    params[f"optimizer_{name}"] = value
        return params


def _advance_global_step(trainer, num_iterations: int) -> None:
    """Count ``num_iterations`` optimizer steps, so ``trainer.global_step`` counts iterations.

    The inner loop calls the raw optimizer because Lightning's optimizer wrapper costs more per call
    than a small full-batch iteration. With manual optimization, Lightning 2.x reads the global step
    from this progress tracker.
    """
    # NOTE: relies on Lightning's private loop attributes (checked with lightning 2.6).
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    for tracker in (progress.total, progress.current):
        tracker.ready += num_iterations
        tracker.completed += num_iterations

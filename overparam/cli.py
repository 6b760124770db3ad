"""Command-line entry point: ``overparam fit | validate | test`` through LightningCLI."""

import importlib
import logging
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from overparam.callbacks import DivergenceCallback
from overparam.data.base import FullBatchRegressionDataModule
from overparam.models.regressor import LinearStackRegressor

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # default_hp_metric=False: the module writes the hparams with real metrics at the end.
        "init_args": {"save_dir": "runs", "default_hp_metric": False},
    },
}


class OverparamCLI(LightningCLI):
    """LightningCLI that links the data's shape to the model and adds the divergence check."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(DivergenceCallback, "divergence")
        parser.link_arguments("data.num_features", "model.input_size", apply_on="instantiate")
        parser.link_arguments("data.num_targets", "model.output_size", apply_on="instantiate")


def build_cli(args: list[str] | None, run: bool = True) -> OverparamCLI:
    """Parse ``args`` (None: the command line) and build model, data and trainer; run the subcommand when ``run``."""
    return OverparamCLI(
        LinearStackRegressor,
        FullBatchRegressionDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def divergence_of(cli: LightningCLI) -> DivergenceCallback | None:
    """Return the run's divergence callback if training diverged, else None."""
    for callback in cli.trainer.callbacks:
        if isinstance(callback, DivergenceCallback) and callback.diverged:
            return callback
    return None


# Subcommands beyond LightningCLI's fit, validate and test, as "module:function" taking the remaining arguments.
EXTRA_SUBCOMMANDS = {
    "tune": "overparam.tuning.command:main",
    "reproduce": "overparam.reproduce.command:main",
}


def main(args: list[str] | None = None) -> None:
    """Run ``overparam`` with ``args`` (default: ``sys.argv[1:]``)."""
    command_line = sys.argv[1:] if args is None else list(args)
    if command_line and command_line[0] in EXTRA_SUBCOMMANDS:
        module_name, function_name = EXTRA_SUBCOMMANDS[command_line[0]].split(":")
        return getattr(importlib.import_module(module_name), function_name)(command_line[1:])
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Full-batch runs without a validation split return no validation batches on purpose.
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")

    cli = build_cli(None if args is None else list(args))
    diverged = divergence_of(cli)
    if diverged is not None:
        raise SystemExit(f"overparam: {diverged.message()}")


if __name__ == "__main__":
    main()

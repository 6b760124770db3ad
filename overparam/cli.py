"""Command-line entry point: ``overparam fit | validate | test`` through LightningCLI."""

import contextlib
import importlib
import io
import logging
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from overparam.callbacks import DivergenceCallback
from overparam.data.base import FullBatchRegressionDataModule
from overparam.models.regressor import LinearStackRegressor

log = logging.getLogger(__name__)

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # default_hp_metric=False: the module writes the hparams with real metrics at the end.
        "init_args": {"save_dir": "runs", "default_hp_metric": False},
    },
}


class OverparamCLI(LightningCLI):
    """LightningCLI that links the data's shape to the model and adds the divergence check."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict is left out: the data modules serve no prediction set.
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(DivergenceCallback, "divergence")
        parser.link_arguments("data.num_features", "model.input_size", apply_on="instantiate")
        parser.link_arguments("data.num_targets", "model.output_size", apply_on="instantiate")


def parser_error(stderr: str, max_chars: int = 500) -> str:
    """Return the parser's message from its first ``error:`` to the end, on one line and cut to ``max_chars``."""
    text = stderr.split("error:", 1)[1] if "error:" in stderr else stderr
    return " ".join(text.split())[:max_chars].rstrip(".")


def print_config(args: list[str]) -> str:
    """Return the config that ``overparam fit`` with ``args`` would run, as ``--print_config`` prints it.

    Raises:
        ValueError: LightningCLI rejected ``args``; the message is the parser's error.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            build_cli([*args, "--print_config"], run=False)
    except SystemExit as exit_info:
        if exit_info.code in (None, 0):
            return stdout.getvalue()
        raise ValueError(parser_error(stderr.getvalue())) from None
    raise RuntimeError("LightningCLI did not exit after --print_config, so the arguments could not be checked.")


def build_cli(args: list[str] | None, run: bool = True) -> OverparamCLI:
    """Parse ``args`` (None: the command line) and build model, data and trainer; run the subcommand when ``run``."""
    return OverparamCLI(
        LinearStackRegressor,
        FullBatchRegressionDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        # A misspelled option such as --model.dept must fail, not match --model.depth by prefix.
        parser_kwargs={"allow_abbrev": False},
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

    if not command_line or command_line[0] in ("-h", "--help"):
        print("Subcommands beyond fit, validate and test: overparam tune --help, overparam reproduce --help", file=sys.stderr)

    try:
        cli = build_cli(None if args is None else list(args))
    except (OSError, ValueError) as error:
        # Missing or invalid data and settings: the message names the file or value and the fix.
        log.debug("overparam failed", exc_info=True)
        raise SystemExit(f"overparam: {error}") from error
    diverged = divergence_of(cli)
    if diverged is not None:
        raise SystemExit(f"overparam: {diverged.message()}")


if __name__ == "__main__":
    main()

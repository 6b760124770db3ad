"""``overparam reproduce NAME``: run one experiment spec and write its curves, tables, plot and report."""

import argparse
import logging
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import optuna
import torch

from overparam.reproduce.analysis import evaluate_claim
from overparam.reproduce.plot import plot_experiment
from overparam.reproduce.report import ReportTiming, write_report, write_tables
from overparam.reproduce.runs import ExperimentRunner, RunSettings
from overparam.reproduce.spec import SpecError, builtin_spec_dir, builtin_spec_names, load_spec, resolve_spec_path
from overparam.reproduce.studies import write_studies

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overparam reproduce",
        allow_abbrev=False,
        description=(
            "Run one linear-network experiment of Arora, Cohen & Hazan (ICML 2018) from a spec file, tune "
            "learning rates, test the paper's claims and write curves.csv, summary.csv, NAME.png and report.md."
        ),
    )
    parser.add_argument("experiment", nargs="?", help="an experiment name (see --list) or the path to a spec file")
    parser.add_argument("--list", action="store_true", help="list the built-in experiments and exit")

    parser.add_argument(
        "--scale", type=float, default=1.0,
        help="multiply every horizon and log interval by this factor (default 1, the paper's horizons); "
        "0.01 gives a quick look whose verdicts are provisional",
    )
    parser.add_argument("--output", type=Path, help="output folder (default: results/NAME)")
    parser.add_argument(
        "--data-dir",
        help="folder with local copies of the spec's data files (batch*.dat for Ethanol, abalone.data for "
        "Abalone); default: the download cache, as overparam fit",
    )

    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of every model (default: the spec's)")
    parser.add_argument("--points-per-decade", type=int, help="learning rates per decade of the tuning grids")
    parser.add_argument(
        "--max-widen", type=int,
        help="how often a grid may grow by one rate on a side where the chosen rate sits on its edge",
    )

    parser.add_argument("--device", help="torch device for training, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    parser.add_argument(
        "--cache-dir", type=Path,
        help="folder of finished runs shared between experiments (default: the output folder's parent /.run-cache)",
    )
    parser.add_argument("--no-cache", action="store_true", help="train every run, reading and writing no run cache")
    parser.add_argument(
        "--tensorboard", action="store_true", help="also write TensorBoard logs of the trained runs under OUTPUT/tensorboard"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run ``overparam reproduce`` with ``argv`` (default: ``sys.argv[2:]``)."""
    argv = sys.argv[2:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging()

    if args.list:
        _print_list()
        return
    _check_options(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    try:
        spec = load_spec(resolve_spec_path(args.experiment))
    except SpecError as error:
        raise SystemExit(f"overparam reproduce: {error}") from None
    output = args.output if args.output is not None else Path("results") / spec.name
    cache_dir = None if args.no_cache else (args.cache_dir or output.resolve().parent / ".run-cache")
    tensorboard_dir = None
    if args.tensorboard:
        tensorboard_dir = output / "tensorboard"
        # run_sweep raises FileExistsError for a member folder that contains files, so old logs go first.
        shutil.rmtree(tensorboard_dir, ignore_errors=True)
    settings = RunSettings(
        scale=args.scale,
        data_dir=args.data_dir,
        seeds=tuple(args.seeds) if args.seeds else None,
        points_per_decade=args.points_per_decade,
        max_widen=args.max_widen,
        device=args.device,
        cache_dir=cache_dir,
        tensorboard_dir=tensorboard_dir,
    )
    if len(settings.seeds or spec.seeds) < 3:
        log.warning("Fewer than 3 seeds: the bands in the figure say little about the spread.")

    start = time.perf_counter()
    log.info("Experiment %s (%s) at scale %g into %s.", spec.name, spec.path, args.scale, output)
    try:
        # The runner loads the data first, so a wrong data folder leaves no empty output folder.
        runner = ExperimentRunner(spec, settings)
        output.mkdir(parents=True, exist_ok=True)
        runs = runner.run(progress=log.info)
    except (OSError, ValueError) as error:
        # Missing or invalid data and settings: the message names the file or value and the fix.
        log.debug("overparam reproduce failed", exc_info=True)
        raise SystemExit(f"overparam reproduce: {error}") from error
    curves = {key: result.curves for key, result in runs.models.items() if result.curves is not None}
    claims = [evaluate_claim(claim, curves, args.scale) for claim in spec.claims]

    write_tables(runs, output)
    write_studies(runs, output / "tuning.db")
    figure = plot_experiment(runs, output / f"{spec.name}.png")
    command = "overparam reproduce " + " ".join(shlex.quote(part) for part in argv)
    timing = ReportTiming(total=time.perf_counter() - start)
    report = write_report(runs, claims, timing, command, output, figure)

    for result in claims:
        print(f"{result.verdict:>18}: {result.claim.text}")
    print(f"Wrote {report} ({timing.total:.0f} s).")


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject option values that argparse's types let through; ``parser.error`` exits with status 2."""
    if args.experiment is None:
        parser.error("give an experiment name or a spec file (--list shows the names)")
    if not args.scale > 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    if args.points_per_decade is not None and args.points_per_decade < 1:
        parser.error(f"--points-per-decade must be at least 1, got {args.points_per_decade}")
    if args.max_widen is not None and args.max_widen < 0:
        parser.error(f"--max-widen must be 0 or more, got {args.max_widen}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} requested, but this torch build sees no CUDA device; use --device cpu")


def _print_list() -> None:
    names = builtin_spec_names()
    if not names:
        print(f"No built-in experiments found in {builtin_spec_dir()}.")
        return
    for name in names:
        try:
            title = load_spec(builtin_spec_dir() / f"{name}.yaml").title
        except SpecError as error:
            title = f"(invalid spec: {error})"
        print(f"{name:<12} {title}")


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Each run_sweep call builds a LightningCLI, whose start-up messages would repeat every round.
    for name in ("lightning.pytorch", "lightning.fabric", "overparam.sweeps", "overparam.models.optimum", "overparam.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Keep the sweeps' progress lines, because one round at the paper's horizon can train for an hour.
    logging.getLogger("overparam.sweeps.trainer.progress").setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")

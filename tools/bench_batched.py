"""Benchmark batched sweeps against sequential ``overparam fit`` runs and plain PyTorch loops.

Everything runs in one process on the real Ethanol l4 problem (``configs/ethanol/l4_depth{1,2,3}.yaml``,
2565 x 128, float32, SGD, hidden width 1) for the same number of iterations. For each depth and
each member count M it measures, in model-steps per second (members times iterations per second):

* ``run_sweep``: the whole call for M members, from parsing the config to writing members.csv,
  curves.csv and one TensorBoard run per member, logging every ``--log-every`` iterations;
* the engine: ``train_batched`` alone on a ``BatchedLinearStack`` of M members, the faster of two runs;
* sequential ``overparam fit``: ``--fit-runs`` measured runs of ``build_cli(["fit", ...])`` (config
  parsing, data loading and ``trainer.fit`` with TensorBoard logging every ``--log-every``
  iterations, checkpointing off), so M runs take M times their mean time;
* sequential plain loops: ``--plain-runs`` measured loops of ``LinearStack`` + ``torch.optim.SGD`` +
  ``LpLoss``, so M loops take M times their mean time.

The floating-point rate counts the engine's two products with the data per iteration, the forward
pass and the gradient of the end-to-end matrices (``4 * n * d * M`` operations), and compares it
with a bare ``torch.mm`` of shape ``(n, d) @ (d, M)``.

    python tools/bench_batched.py --data-dir ../shared/data/gas-sensor-drift --threads 1
"""

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench_steps import replace_section, command_line
from overparam.cli import build_cli
from overparam.models.linear_stack import LinearStack
from overparam.models.losses import LpLoss
from overparam.sweeps import BatchedLinearStack, BatchedSGD, run_sweep, train_batched

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs" / "ethanol"
SECTION_TITLE = "## Batched sweeps: `run_sweep` against sequential `overparam fit` runs and plain loops"
# Learning rates of the members, spread geometrically. Members near the top can diverge at depth 1
# within 2000 iterations, and the table counts them.
LOWEST_LR, HIGHEST_LR = 3e-5, 1e-4
GOAL_MEMBERS, FIT_GOAL, PLAIN_GOAL = 32, 10.0, 3.0
PEAK_MEMBERS, PEAK_GOAL = 64, 0.5


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def learning_rates(members: int) -> list[float]:
    if members == 1:
        return [LOWEST_LR]
    ratio = (HIGHEST_LR / LOWEST_LR) ** (1 / (members - 1))
    return [LOWEST_LR * ratio**index for index in range(members)]


def config_args(depth: int, data_dir: str | None, iterations: int, log_every: int) -> list[str]:
    args = [
        "--config", str(CONFIG_DIR / f"l4_depth{depth}.yaml"),
        "--trainer.max_steps", str(iterations),
        "--trainer.log_every_n_steps", str(log_every),
    ]
    return args + (["--data.init_args.data_dir", data_dir] if data_dir else [])


def fit_seconds(depth: int, args, runs: int, accelerator: str) -> float:
    """Return the mean wall time of one ``overparam fit`` run, start-up included."""
    elapsed = []
    for seed in range(runs):
        with tempfile.TemporaryDirectory() as save_dir:
            start = time.perf_counter()
            cli = build_cli([
                "fit", *config_args(depth, args.data_dir, args.iterations, args.log_every),
                "--seed_everything", str(seed),
                "--model.optimizer.init_args.lr", str(HIGHEST_LR),
                "--trainer.accelerator", accelerator,
                "--trainer.logger.init_args.save_dir", save_dir,
                "--trainer.enable_checkpointing", "false",
                "--trainer.enable_model_summary", "false",
            ])
            elapsed.append(time.perf_counter() - start)
        if cli.trainer.global_step != args.iterations or cli.model.diverged_at is not None:
            raise RuntimeError(
                f"overparam fit at depth {depth} stopped after {cli.trainer.global_step} of {args.iterations} iterations."
            )
    return sum(elapsed) / len(elapsed)


def plain_seconds(depth: int, features, target, iterations: int, runs: int, lr: float) -> float:
    """Return the mean wall time of one plain LinearStack + torch.optim.SGD loop, as fit's inner loop runs it."""
    elapsed = []
    loss_fn = LpLoss(4)
    for seed in range(runs):
        torch.manual_seed(seed)
        model = LinearStack(features.shape[1], target.shape[1], depth=depth, init_std=0.05).to(features.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        synchronize(features.device)
        start = time.perf_counter()
        for _ in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(features), target)
            loss.backward()
            optimizer.step()
        loss.item()
        elapsed.append(time.perf_counter() - start)
    return sum(elapsed) / len(elapsed)


def sweep_seconds(depth: int, members: int, args, device: torch.device, log_root: Path) -> tuple[float, int]:
    """Return the wall time of one ``run_sweep`` call with logging, and how many members diverged."""
    member_settings = [
        {"seed_everything": seed, "model.optimizer.init_args.lr": lr}
        for seed, lr in enumerate(learning_rates(members))
    ]
    synchronize(device)
    start = time.perf_counter()
    result = run_sweep(
        config_args(depth, args.data_dir, args.iterations, args.log_every),
        member_settings,
        log_dir=log_root / f"depth{depth}_m{members}",
        device=device,
    )
    synchronize(device)
    return time.perf_counter() - start, sum(result.diverged)


def engine_seconds(
    depth: int, members: int, features, target, iterations: int, log_every: int, repeats: int = 2
) -> float:
    """Return the shortest wall time of ``repeats`` ``train_batched`` runs of ``iterations`` iterations, after a warm-up run."""

    def build():
        model = BatchedLinearStack.from_seeds(
            range(members), features.shape[1], init_std=0.05, depth=depth, output_size=target.shape[1]
        ).to(features.device)
        lrs = torch.tensor(learning_rates(members), dtype=features.dtype)
        return model, BatchedSGD(model.parameters(), lrs)

    model, optimizer = build()
    train_batched(model, features, target, 4, optimizer, min(iterations, 50), log_every=log_every)
    best = float("inf")
    for _ in range(repeats):
        model, optimizer = build()
        synchronize(features.device)
        start = time.perf_counter()
        train_batched(model, features, target, 4, optimizer, iterations, log_every=log_every)
        synchronize(features.device)
        best = min(best, time.perf_counter() - start)
    return best


def mm_flop_rate(features, columns: int, seconds: float = 0.3, repeats: int = 3) -> float:
    """Return the best floating-point rate of ``features @ W.T`` with ``W`` of shape ``(columns, d)``.

    The transposed operand matches the layout of the engine's forward pass.
    """
    weights = torch.randn(columns, features.shape[1], device=features.device, dtype=features.dtype)
    rows, width = features.shape

    def run(count: int) -> float:
        synchronize(features.device)
        start = time.perf_counter()
        for _ in range(count):
            torch.mm(features, weights.T)
        synchronize(features.device)
        return time.perf_counter() - start

    count = 10
    while run(count) < seconds / 4:
        count *= 4
    count = max(10, int(count * seconds / max(run(count), 1e-9)))
    best = min(run(count) for _ in range(repeats))
    return 2 * rows * width * columns * count / best


def square_mm_flop_rate(device: torch.device, size: int = 1024) -> float:
    """Return the floating-point rate of a float32 ``size x size`` matrix product, for context."""
    left = torch.randn(size, size, device=device)
    right = torch.randn(size, size, device=device)
    torch.mm(left, right)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        torch.mm(left, right)
    synchronize(device)
    return 5 * 2 * size**3 / (time.perf_counter() - start)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder of the gas sensor batch*.dat files (default: the download cache)")
    parser.add_argument("--iterations", type=int, default=2000, help="full-batch iterations of every run")
    parser.add_argument("--members", default="8,32,64", help="comma-separated member counts M")
    parser.add_argument("--depths", default="1,2,3", help="comma-separated depths")
    parser.add_argument("--fit-runs", type=int, default=2, help="overparam fit runs measured per depth")
    parser.add_argument("--plain-runs", type=int, default=3, help="plain PyTorch loops measured per depth")
    parser.add_argument("--log-every", type=int, default=100, help="logging interval of overparam fit and run_sweep, in iterations")
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads of torch")
    parser.add_argument("--device", default="cpu", help="device of run_sweep, the engine and the plain loops, e.g. cpu or cuda")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md", help="Markdown file to update")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric", "overparam"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # build_cli gets its arguments from this script, and full-batch runs have no validation batches.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    member_counts = [int(value) for value in args.members.split(",")]
    depths = [int(value) for value in args.depths.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()

    base = build_cli(config_args(1, args.data_dir, args.iterations, args.log_every), run=False)
    features, target = (tensor.to(device) for tensor in base.datamodule.train_tensors())
    square_rate = square_mm_flop_rate(device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, data {tuple(features.shape)} "
          f"{features.dtype}, {args.iterations} iterations; 1024^2 mm {square_rate / 1e9:.1f} GFLOP/s")

    rows = []
    with tempfile.TemporaryDirectory() as log_root:
        for depth in depths:
            fit_time = fit_seconds(depth, args, args.fit_runs, accelerator)
            plain_time = plain_seconds(depth, features, target, args.iterations, args.plain_runs, HIGHEST_LR)
            for members in member_counts:
                sweep_time, diverged = sweep_seconds(depth, members, args, device, Path(log_root))
                engine_time = engine_seconds(depth, members, features, target, args.iterations, args.log_every)
                # Measured right after the engine, so that both see about the same load on a shared machine.
                mm_rate = mm_flop_rate(features, members)
                row = {
                    "depth": depth,
                    "members": members,
                    "sweep": members * args.iterations / sweep_time,
                    "engine": members * args.iterations / engine_time,
                    "fit": args.iterations / fit_time,
                    "plain": args.iterations / plain_time,
                    "flops": 4 * features.shape[0] * features.shape[1] * target.shape[1] * members * args.iterations / engine_time,
                    "mm": mm_rate,
                    "diverged": diverged,
                }
                rows.append(row)
                print(format_row(row))
    elapsed = time.perf_counter() - started
    load = (load, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    print(f"total {elapsed:.0f} s, load average {load[0]:.1f} at the start and {load[1]:.1f} at the end")

    write_section(args, rows, features, square_rate, load, elapsed)


def format_row(row: dict) -> str:
    return (
        f"depth {row['depth']} M={row['members']:>3}: run_sweep {row['sweep']:>8,.0f}, engine {row['engine']:>8,.0f}, "
        f"fit {row['fit']:>6,.0f}, plain {row['plain']:>6,.0f} model-steps/s; sweep/fit {row['sweep'] / row['fit']:5.1f}x, "
        f"sweep/plain {row['sweep'] / row['plain']:4.1f}x, engine/plain {row['engine'] / row['plain']:4.1f}x; "
        f"{row['flops'] / 1e9:.1f} of {row['mm'] / 1e9:.1f} GFLOP/s ({row['flops'] / row['mm']:.0%})"
    )


def goal_lines(rows: list[dict]) -> list[str]:
    """Return one Markdown line per goal with the measured values and whether each depth met it."""

    def verdict(values: list[float], goal: float) -> str:
        return "met" if all(value >= goal for value in values) else "not met"

    at_goal = [row for row in rows if row["members"] == GOAL_MEMBERS]
    at_peak = [row for row in rows if row["members"] == PEAK_MEMBERS]
    lines = []
    if at_goal:
        fit_ratios = [row["sweep"] / row["fit"] for row in at_goal]
        sweep_plain = [row["sweep"] / row["plain"] for row in at_goal]
        engine_plain = [row["engine"] / row["plain"] for row in at_goal]
        lines.append(
            f"- M = {GOAL_MEMBERS}, `run_sweep` at least {FIT_GOAL:g}x sequential `overparam fit`: "
            f"{', '.join(f'{value:.1f}x' for value in fit_ratios)} (depths {', '.join(str(row['depth']) for row in at_goal)}), "
            f"**{verdict(fit_ratios, FIT_GOAL)}**."
        )
        lines.append(
            f"- M = {GOAL_MEMBERS}, batched at least {PLAIN_GOAL:g}x sequential plain loops: `run_sweep` "
            f"{', '.join(f'{value:.1f}x' for value in sweep_plain)} (**{verdict(sweep_plain, PLAIN_GOAL)}**), engine "
            f"{', '.join(f'{value:.1f}x' for value in engine_plain)} (**{verdict(engine_plain, PLAIN_GOAL)}**)."
        )
    if at_peak:
        shares = [row["flops"] / row["mm"] for row in at_peak]
        lines.append(
            f"- M = {PEAK_MEMBERS}, engine at least {PEAK_GOAL:.0%} of the measured `torch.mm` rate: "
            f"{', '.join(f'{value:.0%}' for value in shares)}, **{verdict(shares, PEAK_GOAL)}**."
        )
    return lines


def write_section(
    args, rows: list[dict], features, square_rate: float, load: tuple[float, float], elapsed: float
) -> None:
    """Replace this benchmark's section of the Markdown record with the new figures."""
    table = [
        "| depth | M | run_sweep | engine | sequential fit | sequential plain | sweep / fit | sweep / plain | engine / plain | engine GFLOP/s | mm GFLOP/s | of mm | diverged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        table.append(
            f"| {row['depth']} | {row['members']} | {row['sweep']:,.0f} | {row['engine']:,.0f} | {row['fit']:,.0f} | "
            f"{row['plain']:,.0f} | {row['sweep'] / row['fit']:.1f}x | {row['sweep'] / row['plain']:.1f}x | "
            f"{row['engine'] / row['plain']:.1f}x | {row['flops'] / 1e9:.1f} | {row['mm'] / 1e9:.1f} | "
            f"{row['flops'] / row['mm']:.0%} | {row['diverged']} |"
        )
    lines = [
        SECTION_TITLE,
        "",
        f"Ethanol ({features.shape[0]} x {features.shape[1]}, {str(features.dtype).removeprefix('torch.')}), l4 loss, SGD, "
        f"hidden width 1, {args.iterations:,} iterations per run.",
        f"Member m has seed m, and the M learning rates are spaced geometrically from {LOWEST_LR:g} to {HIGHEST_LR:g}.",
        "Rates are model-steps per second (members times iterations per second).",
        "",
        "- `run_sweep` counts the whole call, in one run: config parsing, data loading, training, and writing",
        f"  the CSV files and one TensorBoard run per member, logging every {args.log_every} iterations.",
        "- The engine counts `train_batched` alone, the faster of two runs.",
        f"- Sequential fit is the mean of {args.fit_runs} measured `build_cli([\"fit\", ...])` runs per depth at learning rate",
        f"  {HIGHEST_LR:g}, times M. Each run covers parsing, data loading and `trainer.fit` with TensorBoard logging",
        f"  every {args.log_every} iterations and checkpointing off, in one process, so without the interpreter start-up",
        "  of a separate `overparam fit`.",
        f"- Sequential plain is the mean of {args.plain_runs} measured `LinearStack` + `torch.optim.SGD` loops per depth, times M.",
        "- Engine GFLOP/s counts the two products with the data per iteration (`4 n d M`). mm GFLOP/s is the best",
        "  rate of `torch.mm` of shape `(n, d) @ (d, M)`, measured right after the engine.",
        "- Diverged members stay in the batch, frozen, so they cost as much as the others.",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores shared with other work (load average {load[0]:.1f} at the",
        f"start and {load[1]:.1f} at the end), torch threads: {torch.get_num_threads()}, device {args.device},",
        f"Python {platform.python_version()}, torch {torch.__version__}. A 1024 x 1024 float32 `torch.mm` ran at",
        f"{square_rate / 1e9:.1f} GFLOP/s. The run took {elapsed:.0f} s.",
        f"Command: `python tools/bench_batched.py {command_line()}`",
        "",
        *table,
        "",
        "Goals:",
        "",
        *goal_lines(rows),
        "",
    ]
    replace_section(args.output, SECTION_TITLE, "\n".join(lines))


if __name__ == "__main__":
    main()

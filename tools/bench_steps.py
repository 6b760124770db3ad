"""Benchmark full-batch iterations per second of ``overparam fit`` against a plain PyTorch loop.

Both train the same bias-free linear network (Ethanol data, l4 loss, SGD, near-zero init) for the
same number of iterations in one process. ``overparam fit`` logs every 100 iterations to TensorBoard.
The ratio of the two rates goes to BENCHMARKS.md.

    python tools/bench_steps.py --data-dir ../shared/data/gas-sensor-drift
"""

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from overparam.cli import build_cli
from overparam.models.linear_stack import LinearStack
from overparam.models.losses import LpLoss

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDE = 100  # hidden width of the evaluation-order comparison


def plain_loop_rate(features, target, depth: int, iterations: int, evaluation: str = "auto", width: int = 1) -> float:
    """Return iterations per second of a hand-written training loop."""
    torch.manual_seed(0)
    net = LinearStack(features.shape[1], 1, depth=depth, hidden_widths=width, init_std=0.05, evaluation=evaluation)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    loss_fn = LpLoss(4)

    start = time.perf_counter()
    for _ in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(features), target)
        loss.backward()
        optimizer.step()
    loss.item()
    return iterations / (time.perf_counter() - start)


def fit_rate(config: Path, data_dir: str | None, depth: int, iterations: int, log_every: int) -> float:
    """Return iterations per second of ``trainer.fit`` built from ``config`` as ``overparam fit`` builds it."""
    with tempfile.TemporaryDirectory() as save_dir:
        args = [
            "--config", str(config),
            "--model.depth", str(depth),
            "--trainer.max_steps", str(iterations),
            "--trainer.log_every_n_steps", str(log_every),
            "--trainer.enable_checkpointing", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", save_dir,
        ]
        if data_dir:
            args += ["--data.init_args.data_dir", data_dir]
        cli = build_cli(args, run=False)

        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        elapsed = time.perf_counter() - start
        assert cli.trainer.global_step == iterations
    return iterations / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder of the gas sensor batch*.dat files (default: the download cache)")
    parser.add_argument("--iterations", type=int, default=20000, help="full-batch iterations per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting; the median is reported")
    parser.add_argument("--log-every", type=int, default=100, help="TensorBoard logging interval of overparam fit")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md", help="Markdown file to update")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    config = REPO_ROOT / "configs" / "ethanol" / "l4_depth1.yaml"
    cli = build_cli(["--config", str(config)] + (["--data.init_args.data_dir", args.data_dir] if args.data_dir else []), run=False)
    features, target = cli.datamodule.train_tensors()

    rows = []
    for depth in (1, 2, 3):
        plain, layers, fit = [], [], []
        for _ in range(args.repeats):
            plain.append(plain_loop_rate(features, target, depth, args.iterations))
            layers.append(plain_loop_rate(features, target, depth, args.iterations // 4, evaluation="layers"))
            fit.append(fit_rate(config, args.data_dir, depth, args.iterations, args.log_every))
        plain_rate, layer_rate, fit_rate_ = statistics.median(plain), statistics.median(layers), statistics.median(fit)
        rows.append((depth, plain_rate, layer_rate, fit_rate_, fit_rate_ / plain_rate))
        print(
            f"depth {depth}: plain loop {plain_rate:,.0f} it/s (layer by layer {layer_rate:,.0f}), "
            f"overparam fit {fit_rate_:,.0f} it/s, ratio {fit_rate_ / plain_rate:.2f}"
        )

    wide_rows = []
    for depth in (2, 3):
        product = statistics.median(
            plain_loop_rate(features, target, depth, args.iterations // 4, "product", WIDE) for _ in range(args.repeats)
        )
        layers = statistics.median(
            plain_loop_rate(features, target, depth, args.iterations // 20, "layers", WIDE) for _ in range(args.repeats)
        )
        wide_rows.append((depth, product, layers))
        print(f"depth {depth}, width {WIDE}: product first {product:,.0f} it/s, layer by layer {layers:,.0f} it/s")

    write_section(args, rows, wide_rows)


def write_section(args, rows, wide_rows) -> None:
    """Replace this benchmark's section of the Markdown record with the new figures."""
    title = "## Full-batch iterations: `overparam fit` against a plain PyTorch loop"
    lines = [
        title,
        "",
        f"Ethanol ({2565} x 128, float32), l4 loss, SGD, hidden width 1, {args.iterations:,} iterations per",
        f"measurement, median of {args.repeats}; `overparam fit` logs to TensorBoard every {args.log_every} iterations",
        "and its time includes `trainer.fit` start-up. Goal: a ratio of at least 0.8. Both loops evaluate the",
        "network product-first; the plain loop that applies the layers one by one is shown for comparison.",
        "",
        f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()},",
        f"torch {torch.__version__}. Command: `python tools/bench_steps.py {command_line()}`",
        "",
        "| depth | plain loop (it/s) | plain loop, layer by layer (it/s) | overparam fit (it/s) | fit / plain loop |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {depth} | {plain:,.0f} | {layers:,.0f} | {fit:,.0f} | {ratio:.2f} |"
            for depth, plain, layers, fit, ratio in rows
        ],
        "",
        f"Evaluation order of the plain loop at hidden width {WIDE}, where the two orders differ in cost:",
        "",
        "| depth | product first (it/s) | layer by layer (it/s) | speed-up |",
        "| --- | --- | --- | --- |",
        *[f"| {depth} | {product:,.0f} | {layers:,.0f} | {product / layers:.1f}x |" for depth, product, layers in wide_rows],
        "",
    ]
    replace_section(args.output, title, "\n".join(lines))


def command_line() -> str:
    """Return this run's arguments with the local data folder written as DATA_DIR."""
    arguments = sys.argv[1:]
    for index, argument in enumerate(arguments[:-1]):
        if argument == "--data-dir":
            arguments[index + 1] = "DATA_DIR"
    return " ".join(arguments)


def cpu_model() -> str:
    """Return the processor's model name from /proc/cpuinfo, or the architecture elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.machine()


def replace_section(path: Path, title: str, section: str) -> None:
    """Write ``section`` in place of the one headed ``title`` in ``path``, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nFigures are ratios measured in one run on the machine named.\n\n"
    section = section.rstrip("\n") + "\n"
    if title in text:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + ("\n" + text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()

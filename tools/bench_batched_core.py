"""Measure the training throughput of BatchedLinearStack against one-model-at-a-time loops.

The data is random with the Ethanol shape (2565 rows, 128 features), float32, trained with the l4
loss and SGD. For each depth (hidden width 1) the script times:

* a plain loop: ``LinearStack`` (product-first evaluation) + ``torch.optim.SGD`` + ``LpLoss``,
  one model at a time, in model-steps per second;
* ``train_batched`` on M members at once, in model-steps per second (M times iterations per second);
* the matrix-product rate of the batched run: each iteration does two products with the data
  (the forward pass and the gradient of the end-to-end matrices), ``4 * n * d * M`` floating-point
  operations, compared with a bare ``torch.mm`` of shape ``(n, d) @ (d, M)``.

Intra-op threads that lose their core to other processes stall every matrix product, so on a
machine with busy cores ``--threads 1`` gives steadier numbers.

Usage: python tools/bench_batched_core.py [--device cpu] [--threads N] [--seconds 0.5]
"""

import argparse
import logging
import time

import torch

from overparam.models.linear_stack import LinearStack
from overparam.models.losses import LpLoss
from overparam.sweeps import BatchedLinearStack, BatchedSGD, train_batched

ROWS, FEATURES = 2565, 128
DEPTHS = (1, 2, 3)
MEMBER_COUNTS = (8, 32, 64)
P = 4
LEARNING_RATE = 1e-5


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_best(run, iterations: int, device: torch.device, repeats: int) -> float:
    """Return the shortest wall time of ``repeats`` calls of ``run(iterations)``, after one warm-up call."""
    run(max(1, iterations // 10))
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(iterations)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def calibrate(run, device: torch.device, seconds: float) -> int:
    """Return an iteration count that makes ``run`` take about ``seconds``."""
    iterations = 10
    while True:
        synchronize(device)
        start = time.perf_counter()
        run(iterations)
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4 or iterations >= 1_000_000:
            return max(10, int(iterations * seconds / max(elapsed, 1e-9)))
        iterations *= 4


def plain_rate(depth: int, features, target, seconds: float, repeats: int) -> float:
    """Measure the model-steps per second of a one-model LinearStack + torch.optim.SGD loop."""
    torch.manual_seed(0)
    model = LinearStack(FEATURES, depth=depth, evaluation="product").to(features.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loss_fn = LpLoss(P)

    def run(iterations: int) -> None:
        for _ in range(iterations):
            loss = loss_fn(model(features), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    iterations = calibrate(run, features.device, seconds)
    return iterations / time_best(run, iterations, features.device, repeats)


def batched_rate(depth: int, members: int, features, target, seconds: float, repeats: int) -> float:
    """Measure the model-steps per second of train_batched with ``members`` members."""
    model = BatchedLinearStack.from_seeds(range(members), FEATURES, depth=depth).to(features.device)
    optimizer = BatchedSGD(model.parameters(), torch.full((members,), LEARNING_RATE))
    diverged = []

    def run(iterations: int) -> None:
        result = train_batched(model, features, target, P, optimizer, iterations, log_every=max(1, iterations))
        diverged.append(bool(result.diverged.any()))

    iterations = calibrate(run, features.device, seconds)
    elapsed = time_best(run, iterations, features.device, repeats)
    if any(diverged):
        logging.warning("A member diverged at depth %d, M=%d; the timing still covers every member.", depth, members)
    return members * iterations / elapsed


def mm_flop_rate(members: int, features, seconds: float, repeats: int) -> float:
    """Measure the floating-point operations per second of ``features @ W.T`` with ``W`` of shape ``(M, d)``.

    The transposed operand matches the layout of the forward pass, which MKL runs faster at small M.
    """
    weights = torch.randn(members, FEATURES, device=features.device, dtype=features.dtype)

    def run(iterations: int) -> None:
        for _ in range(iterations):
            torch.mm(features, weights.T)

    iterations = calibrate(run, features.device, seconds)
    return 2 * ROWS * FEATURES * members * iterations / time_best(run, iterations, features.device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="Torch device to run on, e.g. cpu or cuda.")
    parser.add_argument("--threads", type=int, default=None, help="Intra-op CPU threads; default: torch's choice.")
    parser.add_argument("--seconds", type=float, default=0.5, help="Target wall time of one timed repeat, in seconds.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per measurement; the fastest counts.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(ROWS, FEATURES, generator=generator).to(device)
    target = (features @ torch.randn(FEATURES, 1, generator=generator).to(device)) / FEATURES**0.5

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, "
          f"data {ROWS}x{FEATURES} float32, l{P} loss, SGD")
    mm_rates = {members: mm_flop_rate(members, features, args.seconds, args.repeats) for members in MEMBER_COUNTS}

    header = f"{'depth':>5} {'M':>4} {'plain steps/s':>14} {'batched steps/s':>16} {'speedup':>8} {'GFLOP/s':>8} {'mm GFLOP/s':>11} {'of mm':>6}"
    print(header)
    print("-" * len(header))
    for depth in DEPTHS:
        plain = plain_rate(depth, features, target, args.seconds, args.repeats)
        for members in MEMBER_COUNTS:
            batched = batched_rate(depth, members, features, target, args.seconds, args.repeats)
            flop_rate = 4 * ROWS * FEATURES * batched
            print(
                f"{depth:>5} {members:>4} {plain:>14.0f} {batched:>16.0f} {batched / plain:>7.1f}x "
                f"{flop_rate / 1e9:>8.2f} {mm_rates[members] / 1e9:>11.2f} {flop_rate / mm_rates[members]:>6.0%}"
            )


if __name__ == "__main__":
    main()

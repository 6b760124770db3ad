"""Training the models of an experiment spec: tuned and fixed-rate grids through ``run_sweep``, emulations through ``EndToEndSGD``.

Tuning: every rate of a model's grid runs for every seed over the model's full horizon (deep
networks can diverge late, so a shortened horizon would pick rates that later blow up). The choice
rule is ``analysis.choose_lr``. When the choice is the smallest or largest rate of the grid, the
grid grows by one point on that side and the new rate runs, up to ``max_widen`` times per side.
"""

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from overparam.cli import build_cli
from overparam.models.linear_stack import LinearStack
from overparam.models.losses import LpLoss
from overparam.models.optimum import data_fingerprint, lp_optimum
from overparam.optim.end_to_end import EndToEndSGD, set_end_to_end
from overparam.reproduce.analysis import (
    LrCandidate,
    LrChoice,
    ModelCurves,
    choose_lr,
    curve_score,
    gap_floor,
    lr_grid,
    widen_grid,
)
from overparam.reproduce.spec import ExperimentSpec, ModelSpec
from overparam.sweeps.runner import INIT_STD_KEY, LR_KEY, SEED_KEY, SweepMember, run_sweep

log = logging.getLogger(__name__)

# Bump when a change alters the numbers a cached run would produce.
CACHE_VERSION = 1


@dataclass
class RunSettings:
    """Options of one ``overparam reproduce`` call that change what is trained."""

    scale: float = 1.0
    data_dir: str | None = None
    seeds: tuple[int, ...] | None = None
    points_per_decade: int | None = None
    max_widen: int | None = None
    device: str | None = None
    cache_dir: Path | None = None
    tensorboard_dir: Path | None = None

    def iterations(self, iterations_at_scale_1: int) -> int:
        return max(1, int(round(iterations_at_scale_1 * self.scale)))


@dataclass
class MemberRun:
    """One trained run: a model at one rate and seed. ``losses`` is NaN after a divergence."""

    iterations: np.ndarray
    losses: np.ndarray
    loss_optimum: float
    diverged_at: int | None
    seconds: float
    cached: bool
    end_to_end_norm: float

    @property
    def gaps(self) -> np.ndarray:
        return self.losses - self.loss_optimum


@dataclass
class NetworkStart:
    """Initial state of a deep network: its end-to-end matrix and balancedness ``max_j ||W_{j+1}^T W_{j+1} - W_j W_j^T||_F``."""

    end_to_end: torch.Tensor
    balancedness: float


@dataclass
class ModelResult:
    """Every run of one model, the tuning record and the curves at the chosen rate."""

    model: ModelSpec
    iterations: int
    log_every: int
    runs: dict[tuple[float, int], MemberRun] = field(default_factory=dict)
    candidates: list[LrCandidate] = field(default_factory=list)
    choice: LrChoice | None = None
    initial_grid: list[float] = field(default_factory=list)
    widened: list[float] = field(default_factory=list)
    curves: ModelCurves | None = None
    starts: dict[int, NetworkStart] = field(default_factory=dict)
    start_mismatch: float | None = None

    @property
    def seconds(self) -> float:
        return sum(run.seconds for run in self.runs.values())

    @property
    def cached_runs(self) -> int:
        return sum(run.cached for run in self.runs.values())


@dataclass
class ExperimentRuns:
    spec: ExperimentSpec
    settings: RunSettings
    seeds: tuple[int, ...]
    models: dict[str, ModelResult]
    loss_optimum: dict[float, float]
    data_name: str
    data_shape: tuple[int, int]
    wall_seconds: float = 0.0
    # How the config prepares the data, for the report: z-scored or not, and the tensors' dtype.
    standardized: bool = True
    dtype: str = "float32"


class RunCache:
    """Finished runs stored as JSON files named by a hash of everything that determines them.

    Experiments share runs through it (``optimizers`` reuses the depth-3 runs of ``depth``), and a
    rerun after a crash or a change of the analysis trains nothing twice.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(payload: dict[str, Any]) -> str:
        text = json.dumps({"cache_version": CACHE_VERSION, **payload}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def load(self, key: str) -> MemberRun | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            log.warning("Ignoring the unreadable cache file %s: %s", path, error)
            return None
        return MemberRun(
            iterations=np.asarray(record["iterations"], dtype=np.int64),
            losses=np.asarray(record["losses"], dtype=float),
            loss_optimum=float(record["loss_optimum"]),
            diverged_at=record["diverged_at"],
            seconds=float(record["seconds"]),
            cached=True,
            end_to_end_norm=float(record["end_to_end_norm"]),
        )

    def store(self, key: str, run: MemberRun) -> None:
        if self.folder is None:
            return
        record = {
            "iterations": run.iterations.tolist(),
            "losses": [None if math.isnan(value) else value for value in run.losses.tolist()],
            "loss_optimum": run.loss_optimum,
            "diverged_at": run.diverged_at,
            "seconds": run.seconds,
            "end_to_end_norm": run.end_to_end_norm,
        }
        path = self.folder / f"{key}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record))
        temporary.replace(path)


def _parameter_count(model: ModelSpec, input_size: int) -> int:
    widths = [input_size] + [model.hidden_width] * (model.depth - 1) + [1]
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def logged_iterations(iterations: int, log_every: int) -> np.ndarray:
    """Return ``0, log_every, ...`` below ``iterations``, then ``iterations`` itself (the final loss)."""
    return np.append(np.arange(0, iterations, log_every), iterations)


def curve_on_grid(curve: list[tuple[int, float]], iterations: int, log_every: int) -> np.ndarray:
    """Place a runner curve of ``(iteration, loss)`` pairs on ``logged_iterations``. Missing and non-finite points are NaN."""
    grid = logged_iterations(iterations, log_every)
    losses = np.full(grid.shape, np.nan)
    index = {int(iteration): position for position, iteration in enumerate(grid)}
    for iteration, loss in curve:
        if int(iteration) in index and math.isfinite(loss):
            losses[index[int(iteration)]] = loss
    return losses


class ExperimentRunner:
    """Train the models of ``spec`` under ``settings``; ``run`` returns the finished ``ExperimentRuns``."""

    def __init__(self, spec: ExperimentSpec, settings: RunSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.seeds = settings.seeds if settings.seeds else spec.seeds
        self.points_per_decade = settings.points_per_decade or spec.tuning.points_per_decade
        self.max_widen = spec.tuning.max_widen if settings.max_widen is None else settings.max_widen
        self.log_every = max(1, int(round(spec.log_every * settings.scale)))
        self._rounds = 0

        self.config_args = ["--config", str(spec.config), "--trainer.logger", "false"]
        self.config_args += ["--trainer.enable_progress_bar", "false", "--divergence.max_loss", repr(spec.max_loss)]
        if settings.data_dir is not None:
            self.config_args += ["--data.init_args.data_dir", str(settings.data_dir)]

        cli = build_cli(self.config_args, run=False)
        self.features, self.target = cli.datamodule.train_tensors()
        self.cache = RunCache(settings.cache_dir)
        self.data_name = type(cli.datamodule).__name__
        self.standardized = bool(getattr(cli.datamodule, "standardize", True))
        self.dtype = self.features.dtype
        self.device = torch.device(settings.device) if settings.device else torch.device("cpu")
        self.cache_identity = {
            "data": data_fingerprint(self.features, self.target),
            "config": hashlib.sha256(spec.config.read_bytes()).hexdigest(),
            "max_loss": spec.max_loss,
            "torch": torch.__version__.split("+")[0],
        }
        self.loss_optimum = {}
        for panel in spec.panels:
            if panel.p not in self.loss_optimum:
                self.loss_optimum[panel.p] = lp_optimum(self.features, self.target, panel.p).loss

    def run(self, progress: Callable[[str], None] | None = None) -> ExperimentRuns:
        start = time.perf_counter()
        networks = [model for model in self.spec.models.values() if not model.is_end_to_end]
        results = self._run_networks(networks, progress)
        for key, model in self.spec.models.items():
            if model.is_end_to_end:
                results[key] = self._run_emulation(model, results[model.emulates], progress)
        results = {key: results[key] for key in self.spec.models}
        return ExperimentRuns(
            spec=self.spec,
            settings=self.settings,
            seeds=self.seeds,
            models=results,
            loss_optimum=self.loss_optimum,
            data_name=self.data_name,
            data_shape=tuple(self.features.shape),
            wall_seconds=time.perf_counter() - start,
            standardized=self.standardized,
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def _run_networks(self, models: list[ModelSpec], progress) -> dict[str, ModelResult]:
        """Train every network at its fixed rate, or tune it: run the grids, then widen those whose choice is on an edge.

        Each round trains the pending rates of all models in one ``run_sweep`` call, which batches
        what it can and loads the data once.
        """
        results = {}
        pending: dict[str, list[float]] = {}
        widen_count: dict[str, dict[str, int]] = {}
        for model in models:
            result = ModelResult(model, self.settings.iterations(model.iterations), self.log_every)
            if model.depth > 1:
                for seed in self.seeds:
                    result.starts[seed] = self.network_start(model, seed)
            rates = lr_grid(*model.lr_grid, self.points_per_decade) if model.tuned else [model.lr]
            result.initial_grid = list(rates)
            results[model.key] = result
            pending[model.key] = rates
            widen_count[model.key] = {"low": 0, "high": 0}

        while pending:
            self._train_round(results, pending, progress)
            trained = list(pending)
            pending = {}
            for key in trained:
                result = results[key]
                result.candidates = self._candidates(result)
                result.choice = choose_lr(result.candidates)
                if not result.model.tuned or result.choice.edge is None:
                    continue
                sides = ("low", "high") if result.choice.edge == "both" else (result.choice.edge,)
                for side in sides:
                    if widen_count[key][side] >= self.max_widen:
                        continue
                    widen_count[key][side] += 1
                    rate = widen_grid(result.choice.grid, side, self.points_per_decade)
                    pending.setdefault(key, []).append(rate)
                    result.widened.append(rate)
                    log.info("%s: the chosen lr is on the %s edge of its grid; adding lr %g.", key, side, rate)

        for result in results.values():
            if not result.model.tuned:
                # A fixed rate is kept even where a seed diverged, so the report can show where.
                result.choice = LrChoice(result.model.lr, None, [result.model.lr])
            if result.choice.lr is not None:
                result.curves = self._model_curves(result, result.choice.lr)
        return results

    def _train_round(self, results: dict[str, ModelResult], pending: dict[str, list[float]], progress) -> None:
        """Train the pending rates of every model for every seed, reading finished runs from the cache."""
        members: list[tuple[ModelResult, float, int, str, dict]] = []
        for key, rates in pending.items():
            result = results[key]
            missing = 0
            for lr in rates:
                for seed in self.seeds:
                    overrides = self.member_overrides(result.model, lr, seed, result.iterations)
                    cache_key = self.cache.key(
                        {**self.cache_identity, "kind": "network", "overrides": overrides, "log_every": self.log_every}
                    )
                    cached = self.cache.load(cache_key)
                    if cached is not None:
                        result.runs[(lr, seed)] = cached
                    else:
                        members.append((result, lr, seed, cache_key, overrides))
                        missing += 1
            if progress is not None:
                progress(
                    f"{key}: {len(rates)} lr x {len(self.seeds)} seeds, {result.iterations:,} iterations, "
                    f"{missing} to train, {len(rates) * len(self.seeds) - missing} from the cache"
                )
        if not members:
            return

        sweep_members = [
            SweepMember(overrides, f"{result.model.key.replace('/', '-')}_lr={lr:g}_seed={seed}")
            for result, lr, seed, _, overrides in members
        ]
        log_dir = None
        if self.settings.tensorboard_dir is not None:
            log_dir = self.settings.tensorboard_dir / f"round{self._rounds}"
        self._rounds += 1
        start = time.perf_counter()
        sweep = run_sweep(self.config_args, sweep_members, log_dir=log_dir, log_every=self.log_every, device=self.device)
        elapsed = time.perf_counter() - start

        # NOTE: run_sweep reports no per-member time, so the call's time is shared in proportion to
        # iterations times parameters, an estimate of each member's share of the work.
        work = [result.iterations * _parameter_count(result.model, self.features.shape[1]) for result, *_ in members]
        for (result, lr, seed, cache_key, _), outcome, share in zip(members, sweep.outcomes, work):
            run = MemberRun(
                iterations=logged_iterations(result.iterations, self.log_every),
                losses=curve_on_grid(outcome.curve, result.iterations, self.log_every),
                loss_optimum=float(outcome.loss_optimum),
                diverged_at=outcome.diverged_at,
                seconds=elapsed * share / sum(work),
                cached=False,
                end_to_end_norm=float(torch.linalg.matrix_norm(outcome.end_to_end.double())),
            )
            self.cache.store(cache_key, run)
            result.runs[(lr, seed)] = run

    def member_overrides(self, model: ModelSpec, lr: float, seed: int, iterations: int) -> dict[str, Any]:
        """Return the ``overparam fit`` config overrides of one run of ``model``."""
        return {
            "model.depth": model.depth,
            "model.hidden_widths": model.hidden_width,
            "model.init": model.init,
            "model.p": model.p,
            "model.optimizer": {"class_path": f"torch.optim.{model.optimizer}", "init_args": dict(model.optimizer_args)},
            "trainer.max_steps": iterations,
            LR_KEY: lr,
            SEED_KEY: seed,
            INIT_STD_KEY: model.init_std,
        }

    def network_start(self, model: ModelSpec, seed: int) -> NetworkStart:
        """Rebuild the initial network of ``model`` for ``seed`` as ``run_sweep`` and ``overparam fit`` draw it."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = LinearStack(
                self.features.shape[1],
                self.target.shape[1],
                depth=model.depth,
                hidden_widths=model.hidden_width,
                init=model.init,
                init_std=model.init_std,
            ).to(self.dtype)
        with torch.no_grad():
            return NetworkStart(network.end_to_end().detach().clone(), float(network.balancedness()))

    def _candidates(self, result: ModelResult) -> list[LrCandidate]:
        floor = gap_floor(self.loss_optimum[result.model.p])
        candidates = []
        for lr in sorted({lr for lr, _ in result.runs}):
            runs = [result.runs[(lr, seed)] for seed in self.seeds]
            candidates.append(
                LrCandidate(
                    lr=lr,
                    scores=[curve_score(run.gaps, floor) for run in runs],
                    final_gaps=[float(run.gaps[-1]) for run in runs],
                    diverged_at=[run.diverged_at for run in runs],
                )
            )
        return candidates

    def _model_curves(self, result: ModelResult, lr: float) -> ModelCurves:
        runs = [result.runs[(lr, seed)] for seed in self.seeds]
        return ModelCurves(
            key=result.model.key,
            label=result.model.label,
            iterations=runs[0].iterations,
            gaps=np.stack([run.gaps for run in runs], axis=1),
            seeds=list(self.seeds),
            diverged_at=[run.diverged_at for run in runs],
            floor=gap_floor(self.loss_optimum[result.model.p]),
        )

    def _run_emulation(self, model: ModelSpec, network: ModelResult, progress) -> ModelResult:
        """Run ``EndToEndSGD`` from the initial end-to-end matrix of each seed of the emulated network."""
        result = ModelResult(model, self.settings.iterations(model.iterations), self.log_every)
        result.initial_grid = [model.lr]
        if progress is not None:
            progress(f"{model.key}: end-to-end rule of depth {model.depth}, {len(self.seeds)} seeds, "
                     f"{result.iterations:,} iterations")
        mismatch = 0.0
        for seed in self.seeds:
            start = network.starts[seed]
            payload = {
                **self.cache_identity,
                "kind": "end_to_end",
                "depth": model.depth,
                "p": model.p,
                "lr": model.lr,
                "iterations": result.iterations,
                "log_every": self.log_every,
                "start": hashlib.sha256(start.end_to_end.double().numpy().tobytes()).hexdigest(),
            }
            key = self.cache.key(payload)
            run = self.cache.load(key)
            if run is None:
                run = self.train_end_to_end(start.end_to_end, model.depth, model.p, model.lr, result.iterations)
                self.cache.store(key, run)
            result.runs[(model.lr, seed)] = run

            # The rule starts where the network starts, so their first losses must agree.
            network_run = next((run for (_, run_seed), run in network.runs.items() if run_seed == seed), None)
            if network_run is not None and math.isfinite(network_run.losses[0]):
                mismatch = max(mismatch, abs(run.losses[0] - network_run.losses[0]) / abs(network_run.losses[0]))
        result.start_mismatch = mismatch
        if mismatch > 1e-4:
            log.warning("%s starts at a loss %.2g (relative) away from %s.", model.key, mismatch, network.model.key)
        result.candidates = self._candidates(result)
        result.choice = LrChoice(model.lr, None, [model.lr])
        result.curves = self._model_curves(result, model.lr)
        return result

    def train_end_to_end(self, start: torch.Tensor, depth: int, p: float, lr: float, iterations: int) -> MemberRun:
        """Run ``EndToEndSGD`` of depth ``depth`` on a depth-1 model from ``start`` for ``iterations`` full-batch steps."""
        features = self.features.to(self.device)
        target = self.target.to(self.device)
        with torch.random.fork_rng(devices=[]):
            shallow = LinearStack(features.shape[1], target.shape[1], depth=1).to(device=self.device, dtype=self.dtype)
        set_end_to_end(shallow, start.to(self.device))
        optimizer = EndToEndSGD(shallow.parameters(), lr=lr, depth=depth)
        loss_fn = LpLoss(p)
        grid = logged_iterations(iterations, self.log_every)
        losses = np.full(grid.shape, np.nan)
        diverged_at = None

        begin = time.perf_counter()
        for iteration in range(iterations):
            loss = loss_fn(shallow(features), target)
            value = loss.item()
            if iteration % self.log_every == 0 and math.isfinite(value):
                losses[iteration // self.log_every] = value
            if not math.isfinite(value) or value > self.spec.max_loss:
                diverged_at = iteration
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if diverged_at is None:
            with torch.no_grad():
                final = loss_fn(shallow(features), target).item()
            if math.isfinite(final) and final <= self.spec.max_loss:
                losses[-1] = final
            else:
                diverged_at = iterations
        seconds = time.perf_counter() - begin
        return MemberRun(
            iterations=grid,
            losses=losses,
            loss_optimum=self.loss_optimum[p],
            diverged_at=diverged_at,
            seconds=seconds,
            cached=False,
            end_to_end_norm=float(torch.linalg.matrix_norm(shallow.layers[0].weight.detach().double())),
        )

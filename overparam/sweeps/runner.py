"""Run a sweep of ``overparam fit`` settings as batched training and log every member.

``run_sweep`` reads one config the way ``overparam fit`` does and trains every member in a
``BatchedLinearStack``. Members of one batch may differ in learning rate, seed and initialization
scale. Members that differ in anything else the batched engine cannot mix (depth, widths, loss,
optimizer class or its other arguments, iteration count) go to separate batches. A batch contains
as many members as fit in the device's free memory, so a long member list is split into chunks.
"""

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jsonargparse import ArgumentError, Namespace
from torch import Tensor

from overparam.cli import build_cli
from overparam.models.optimum import lp_optimum
from overparam.sweeps.batched_optim import make_batched_optimizer
from overparam.sweeps.batched_stack import BatchedLinearStack
from overparam.sweeps.trainer import BatchedTrainingResult, train_batched

log = logging.getLogger(__name__)

LR_KEY = "model.optimizer.init_args.lr"
SEED_KEY = "seed_everything"
INIT_STD_KEY = "model.init_std"
# Settings that may differ between members of one batch.
BATCHED_KEYS = (LR_KEY, SEED_KEY, INIT_STD_KEY)
# Settings outside ``model.`` that a member may change; a different value puts it in another batch.
GROUPED_KEYS = ("trainer.max_steps", "trainer.log_every_n_steps", "divergence.max_loss")
# LightningCLI links these to the data's shape, so a member cannot set them.
LINKED_KEYS = ("model.input_size", "model.output_size")
SHORT_NAMES = {SEED_KEY: "seed", "model.optimizer": "optimizer", "model.optimizer.class_path": "optimizer"}
PRECISION_DTYPES = {"32-true": torch.float32, "32": torch.float32, "64-true": torch.float64, "64": torch.float64}

# Per-member memory estimate of one train_batched iteration, in elements of the data's dtype.
# ROW_TENSORS counts tensors of shape (n, output_size): prediction, residual, its square and power,
# the tensors autograd saves and the gradients of residual and prediction. The generic l_p path needs
# the most. PARAMETER_COPIES counts copies of the weights: weights, gradients, up to three optimizer
# state tensors and the out-of-place update's new values and temporaries. END_TO_END_COPIES counts
# copies of the end-to-end matrix: product, gradient and chain intermediates.
ROW_TENSORS = 10
PARAMETER_COPIES = 12
END_TO_END_COPIES = 4


@dataclass
class SweepMember:
    """One point of a sweep, given as overrides of the base config.

    Attributes:
        overrides: Values by dotted config path, e.g. ``{"model.optimizer.init_args.lr": 1e-3,
            "seed_everything": 2}``; paths not given keep the base config's value.
        name: Run name and TensorBoard folder of the member; built from ``overrides`` when empty
            (``lr=1e-03_seed=2``).
    """

    overrides: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        self.overrides = dict(self.overrides)
        if not self.name:
            self.name = member_name(self.overrides)


@dataclass
class MemberOutcome:
    """Result of one member.

    Attributes:
        settings: Effective value of every swept config path for this member.
        final_loss: Training loss after the last iteration; NaN for a diverged member.
        final_gap: ``final_loss`` minus the loss optimum; NaN for a diverged member or without an optimum.
        diverged: Whether the member was frozen for a non-finite loss or update, or a loss above ``divergence.max_loss``.
        diverged_at: Iteration whose loss or update triggered the freeze; None if the member did not diverge.
            ``overparam fit`` checks the loss only at logged iterations and at the end of each
            Lightning step, so it can report a later iteration.
        iterations: Iterations the member's batch ran.
        curve: ``(iteration, loss)`` at the logged iterations, then ``(iterations, final_loss)``
            unless the member diverged.
        loss_optimum: Minimum of the training loss over linear maps, or None.
        end_to_end: End-to-end matrix ``W_N ... W_1`` after training, on the CPU.
        batch: Index of the batch that trained the member, in training order.
    """

    settings: dict[str, Any]
    final_loss: float
    final_gap: float
    diverged: bool
    diverged_at: int | None
    iterations: int
    curve: list[tuple[int, float]]
    loss_optimum: float | None
    end_to_end: Tensor
    batch: int
    hparams: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class SweepResult:
    """Members of a sweep and their outcomes, in the order the members were given."""

    members: list[SweepMember]
    outcomes: list[MemberOutcome]
    log_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.members)

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    @property
    def final_loss(self) -> list[float]:
        return [outcome.final_loss for outcome in self.outcomes]

    @property
    def final_gap(self) -> list[float]:
        return [outcome.final_gap for outcome in self.outcomes]

    @property
    def diverged(self) -> list[bool]:
        return [outcome.diverged for outcome in self.outcomes]

    @property
    def diverged_at(self) -> list[int | None]:
        return [outcome.diverged_at for outcome in self.outcomes]

    @property
    def curves(self) -> list[list[tuple[int, float]]]:
        return [outcome.curve for outcome in self.outcomes]

    @property
    def num_batches(self) -> int:
        return 1 + max((outcome.batch for outcome in self.outcomes), default=-1)

    def to_frame(self) -> pd.DataFrame:
        """Return one row per member: index, name, batch, settings and outcome."""
        rows = []
        for index, (member, outcome) in enumerate(zip(self.members, self.outcomes)):
            row = {"member": index, "name": member.name, "batch": outcome.batch}
            row.update({key: _cell(value) for key, value in outcome.settings.items()})
            row.update(
                final_loss=outcome.final_loss,
                final_gap=outcome.final_gap,
                diverged=outcome.diverged,
                diverged_at=outcome.diverged_at,
                iterations=outcome.iterations,
            )
            rows.append(row)
        frame = pd.DataFrame(rows)
        if len(frame):
            frame["diverged_at"] = frame["diverged_at"].astype("Int64")
        return frame

    def curves_frame(self) -> pd.DataFrame:
        """Return the curves in long format: member, name, iteration, loss, loss_gap."""
        rows = []
        for index, (member, outcome) in enumerate(zip(self.members, self.outcomes)):
            optimum = math.nan if outcome.loss_optimum is None else outcome.loss_optimum
            for iteration, loss in outcome.curve:
                rows.append((index, member.name, iteration, loss, loss - optimum))
        return pd.DataFrame(rows, columns=["member", "name", "iteration", "loss", "loss_gap"])


@dataclass(frozen=True)
class BatchSpec:
    """Settings that every member of one batch shares; members with equal specs can train together."""

    input_size: int
    output_size: int
    depth: int
    hidden_widths: tuple[int, ...]
    init: str
    p: float
    inverse_p_factor: bool
    loss_optimum: float | None
    optimizer: str
    optimizer_kwargs: tuple[tuple[str, Any], ...]
    max_steps: int
    log_every: int
    max_loss: float | None


@dataclass
class _MemberPlan:
    index: int
    member: SweepMember
    spec: BatchSpec
    seed: int
    lr: float
    init_std: float
    settings: dict[str, Any]
    hparams: dict[str, Any]


def member_name(overrides: Mapping[str, Any]) -> str:
    """Build a run name such as ``lr=1e-03_seed=2`` from config-path overrides.

    Each path is shortened to its last part (``seed_everything`` to ``seed``, an optimizer class to
    ``optimizer``), unless two paths of the member would then share a name.
    """
    if not overrides:
        return "base"
    short = {key: SHORT_NAMES.get(key, key.rsplit(".", 1)[-1]) for key in overrides}
    counts = {name: list(short.values()).count(name) for name in short.values()}
    parts = []
    for key, value in overrides.items():
        label = short[key] if counts[short[key]] == 1 else key
        parts.append(f"{label}={_format_value(value)}")
    return _safe_path_part("_".join(parts))


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, str):
        # A class path names the class: torch.optim.Adam -> Adam.
        return value.rsplit(".", 1)[-1] if re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Z]\w*", value) else value
    if isinstance(value, Mapping):
        parts = []
        if "class_path" in value:
            parts.append(_format_value(value["class_path"]))
        for key, item in dict(value.get("init_args", {}) if "class_path" in value else value).items():
            parts.append(f"{key}={_format_value(item)}")
        return "-".join(parts)
    if isinstance(value, (list, tuple)):
        return "x".join(_format_value(item) for item in value)
    return str(value)


def _format_float(value: float) -> str:
    """Return the shortest ``1e-03`` style form that reads back as ``value``; whole numbers print as integers."""
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    for digits in range(17):
        text = f"{value:.{digits}e}"
        if float(text) == value:
            return text
    return repr(value)


def _safe_path_part(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", name)
    return name if name not in ("", ".", "..") else "member"


def _unique_names(members: list[SweepMember]) -> list[SweepMember]:
    """Return copies of ``members`` whose names are safe folder names, numbering repeated names."""
    seen: dict[str, int] = {}
    unique = []
    for member in members:
        name = _safe_path_part(member.name)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        unique.append(SweepMember(dict(member.overrides), name))
    return unique


def available_memory(device: torch.device) -> int:
    """Return the bytes a new allocation can use on ``device``.

    CUDA: free device memory plus what PyTorch's caching allocator keeps cached but unused. CPU: available
    RAM from psutil if installed, else ``MemAvailable`` of /proc/meminfo, else free physical pages.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        raise ValueError(f"Cannot measure free memory on device {device}; use a cpu or cuda device.")

    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def estimate_member_bytes(spec: BatchSpec, num_rows: int, dtype: torch.dtype) -> int:
    """Estimate the device memory one member adds to a ``train_batched`` run, in bytes.

    The count covers the per-member tensors of one iteration (see ``ROW_TENSORS``,
    ``PARAMETER_COPIES`` and ``END_TO_END_COPIES``) and the member's column of the loss curve.
    NOTE: an estimate from the shapes, not a measured peak; the data tensors, which all members
    share, are not included.
    """
    widths = [spec.input_size, *spec.hidden_widths, spec.output_size]
    num_parameters = sum(d_in * d_out for d_in, d_out in zip(widths[:-1], widths[1:]))
    num_logged = math.ceil(spec.max_steps / spec.log_every)
    elements = (
        ROW_TENSORS * num_rows * spec.output_size
        + PARAMETER_COPIES * num_parameters
        + END_TO_END_COPIES * spec.input_size * spec.output_size
        + num_logged
    )
    return elements * torch.empty((), dtype=dtype).element_size()


def members_per_batch(
    member_bytes: int, free_bytes: int, memory_fraction: float, max_members: int | None = None
) -> int:
    """Return how many members fit in ``memory_fraction`` of ``free_bytes``, at least 1 and at most ``max_members``."""
    count = max(1, int(free_bytes * memory_fraction) // max(member_bytes, 1))
    if max_members is not None:
        count = min(count, max_members)
    return count


def run_sweep(
    config_args: list[str],
    members: Sequence[Mapping[str, Any] | SweepMember],
    *,
    log_dir: str | os.PathLike | None = None,
    log_every: int | None = None,
    device: str | torch.device | None = None,
    max_members: int | None = None,
    memory_fraction: float = 0.5,
) -> SweepResult:
    """Train every member of a sweep of ``overparam fit`` settings in batches, and log each one.

    One ``build_cli(config_args, run=False)`` provides the data, the base model settings, the
    optimizer, ``trainer.max_steps`` (iterations) and ``trainer.log_every_n_steps``. Member m then
    starts from the weights that ``overparam fit`` with its seed draws, and runs the same update
    rule for the same number of iterations. Like ``overparam fit``, this seeds the global random
    generators with the config's ``seed_everything``.

    Args:
        config_args: Command-line arguments of ``overparam fit`` without the subcommand, e.g.
            ``["--config", "configs/ethanol/l4_depth2.yaml", "--trainer.max_steps", "1000"]``.
        members: One dict of config-path overrides (or a ``SweepMember``) per member.
        log_dir: Folder for ``curves.csv``, ``members.csv`` and one TensorBoard run folder per
            member named by its settings; None writes nothing.
        log_every: Iterations between logged losses; None uses ``trainer.log_every_n_steps``.
        device: Device to train on; None picks CUDA when available, else the CPU.
        max_members: Upper limit on the members of one batch.
        memory_fraction: Fraction of the device's free memory that one batch may use.

    Raises:
        ValueError: A member overrides a setting that members must share (data, trainer settings
            other than ``max_steps`` and ``log_every_n_steps``), gives an invalid value, or the
            config requests something the batched engine does not run (biases, a learning-rate
            scheduler, an optimizer without a batched version, mixed precision).
        FileExistsError: A member's TensorBoard folder under ``log_dir`` already contains files.
    """
    if max_members is not None and max_members < 1:
        raise ValueError(f"max_members must be at least 1, got {max_members}.")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}.")
    if log_every is not None and log_every < 1:
        raise ValueError(f"log_every must be at least 1, got {log_every}.")
    config_args = _without_fit_subcommand(config_args)
    sweep_members = _unique_names([m if isinstance(m, SweepMember) else SweepMember(dict(m)) for m in members])
    if not sweep_members:
        raise ValueError("members is empty; give at least one dict of config overrides.")
    for member in sweep_members:
        for key in member.overrides:
            _check_key(key, member.name)
    device = torch.device(device) if device is not None else _default_device()
    log_dir = Path(log_dir) if log_dir is not None else None
    if log_dir is not None:
        _check_log_dir(log_dir, sweep_members)

    cli = build_cli(config_args, run=False)
    _check_unsupported_config(cli)
    features, target = cli.datamodule.train_tensors()
    _check_precision(cli, features.dtype)
    plans = _plan_members(cli, config_args, sweep_members, log_every)
    features = features.to(device)
    target = target.to(device)

    optimum_cache: dict[tuple[float, float], float] = {}
    outcomes: list[MemberOutcome | None] = [None] * len(plans)
    batch_index = 0
    for spec, group in _group_by_spec(plans).items():
        loss_optimum = _loss_optimum(spec, features, target, optimum_cache)
        member_bytes = estimate_member_bytes(spec, features.shape[0], features.dtype)
        chunk = members_per_batch(member_bytes, available_memory(device), memory_fraction, max_members)
        log.info(
            "Batch settings %s: %d members, up to %d per batch (about %.1f MiB each).",
            _describe_spec(spec), len(group), chunk, member_bytes / 2**20,
        )
        for start in range(0, len(group), chunk):
            part = group[start : start + chunk]
            model, result = _train_batch(spec, part, features, target)
            # One copy to the CPU per batch, instead of one device read per member and value.
            result = BatchedTrainingResult(
                **{name: value.cpu() if isinstance(value, Tensor) else value for name, value in vars(result).items()}
            )
            end_to_end = model.end_to_end().detach().cpu()
            for column, plan in enumerate(part):
                outcomes[plan.index] = _outcome(plan, column, end_to_end, result, loss_optimum, batch_index)
            batch_index += 1

    sweep = SweepResult(sweep_members, outcomes, log_dir)
    if log_dir is not None:
        write_logs(sweep, log_dir)
    return sweep


def _without_fit_subcommand(config_args: Sequence[str]) -> list[str]:
    args = list(config_args)
    if args and args[0] == "fit":
        return args[1:]
    if args and args[0] in ("validate", "test", "predict", "tune", "reproduce"):
        raise ValueError(f"config_args starts with the subcommand {args[0]!r}; give the arguments of 'fit' only.")
    return args


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_log_dir(log_dir: Path, members: list[SweepMember]) -> None:
    for member in members:
        folder = log_dir / member.name
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} already contains files from an earlier run; choose another log_dir or delete the folder."
            )


def _check_unsupported_config(cli) -> None:
    for key in ("optimizer", "lr_scheduler"):
        if cli.config.get(key) is not None:
            raise ValueError(
                f"The config sets the top-level {key!r}, which run_sweep does not support; "
                "set the optimizer as model.optimizer and remove the scheduler."
            )


def _check_precision(cli, data_dtype: torch.dtype) -> None:
    """Reject what ``overparam fit`` rejects: weights of another dtype than the data, and precisions the engine lacks."""
    precision = str(cli.trainer.precision)
    if precision not in PRECISION_DTYPES:
        raise ValueError(
            f"trainer.precision {precision!r} is not supported by run_sweep; use '32-true' or '64-true'."
        )
    if PRECISION_DTYPES[precision] != data_dtype:
        raise ValueError(
            f"The data are {data_dtype} but trainer.precision is {precision!r}; set trainer.precision to "
            "'64-true' for float64 data, or data.dtype to 'float32'."
        )


def _plan_members(cli, config_args: list[str], members: list[SweepMember], log_every: int | None) -> list[_MemberPlan]:
    """Resolve each member's settings: parse its structural overrides, then apply the batched ones."""
    features, target = cli.datamodule.train_tensors()
    swept_keys = _swept_keys(members)
    parsed: dict[str, Namespace] = {}
    plans = []
    checked_optimizers: set[tuple] = set()
    for index, member in enumerate(members):
        structural = {key: value for key, value in member.overrides.items() if key not in BATCHED_KEYS}
        signature = json.dumps({key: _jsonable(value) for key, value in structural.items()}, sort_keys=True)
        if signature not in parsed:
            parsed[signature] = _parse_with_overrides(cli, config_args, structural, member.name)
        config = parsed[signature]

        model = config["model"]
        optimizer_path, optimizer_kwargs = _optimizer_of(model["optimizer"], member.name)
        seed = _seed(member.overrides.get(SEED_KEY, config["seed_everything"]), cli, member.name)
        config_lr = optimizer_kwargs.pop("lr", None)
        lr = _float_value(member.overrides.get(LR_KEY, config_lr), LR_KEY, member.name)
        init_std = _float_value(member.overrides.get(INIT_STD_KEY, model["init_std"]), INIT_STD_KEY, member.name)
        if model["bias"]:
            raise ValueError(
                f"Member {member.name!r} sets model.bias true; the batched engine trains bias-free networks only."
            )

        depth = int(model["depth"])
        hidden_widths = model["hidden_widths"]
        if isinstance(hidden_widths, int):
            hidden_widths = [hidden_widths] * (depth - 1)
        interval = log_every if log_every is not None else max(int(config["trainer"]["log_every_n_steps"]), 1)
        max_steps = int(config["trainer"]["max_steps"])
        if max_steps < 1:
            raise ValueError(
                f"trainer.max_steps is {max_steps} for member {member.name!r}; run_sweep needs a positive "
                "number of iterations."
            )
        _check_epoch_limit(cli, model, max_steps)

        spec = BatchSpec(
            input_size=features.shape[1],
            output_size=target.shape[1],
            depth=depth,
            hidden_widths=tuple(int(width) for width in hidden_widths),
            init=model["init"],
            p=float(model["p"]),
            inverse_p_factor=bool(model["inverse_p_factor"]),
            loss_optimum=model["loss_optimum"],
            optimizer=optimizer_path,
            optimizer_kwargs=tuple(sorted((key, _hashable(value)) for key, value in optimizer_kwargs.items())),
            max_steps=max_steps,
            log_every=interval,
            max_loss=(config.get("divergence") or {}).get("max_loss"),
        )
        if (spec.optimizer, spec.optimizer_kwargs) not in checked_optimizers:
            _check_optimizer(spec, member.name)
            checked_optimizers.add((spec.optimizer, spec.optimizer_kwargs))
        settings = {SEED_KEY: seed, LR_KEY: lr, INIT_STD_KEY: init_std}
        for key in swept_keys:
            if key not in settings:
                settings[key] = _plain(config.get(key))
        hparams = _hparams(member.name, spec, seed, lr, init_std, optimizer_kwargs)
        plans.append(_MemberPlan(index, member, spec, seed, lr, init_std, settings, hparams))
    return plans


def _swept_keys(members: list[SweepMember]) -> list[str]:
    keys: list[str] = []
    for member in members:
        keys.extend(key for key in member.overrides if key not in keys)
    return keys


def _check_key(key: str, name: str) -> None:
    if key in LINKED_KEYS:
        raise ValueError(f"Member {name!r} sets {key}, which the data's shape fixes; remove it from the member.")
    if key in BATCHED_KEYS or key in GROUPED_KEYS or key.startswith("model."):
        return
    raise ValueError(
        f"Member {name!r} sets {key!r}, which members of a sweep must share; supported member settings are "
        f"model.*, {', '.join(k for k in BATCHED_KEYS + GROUPED_KEYS if not k.startswith('model.'))}. "
        "Put shared settings in config_args, or run a separate sweep."
    )


def _parse_with_overrides(cli, config_args: list[str], overrides: dict[str, Any], name: str) -> Namespace:
    """Parse ``config_args`` plus ``overrides`` with the CLI's own parser, so values are type-checked as ``overparam fit`` does."""
    if not overrides:
        return cli.config
    args = list(config_args)
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(_jsonable(value))]

    parser = cli.parser
    exit_on_error = parser.exit_on_error
    parser.exit_on_error = False
    try:
        return parser.parse_args(args)
    except ArgumentError as error:
        raise ValueError(f"Member {name!r} has invalid overrides {overrides}: {error}") from error
    finally:
        parser.exit_on_error = exit_on_error


def _check_optimizer(spec: BatchSpec, name: str) -> None:
    """Build the batched optimizer on a placeholder parameter, so an unsupported class or option fails before any training."""
    placeholder = torch.zeros(1, 1, 1, requires_grad=True)
    try:
        make_batched_optimizer(spec.optimizer, [placeholder], 0.0, **dict(spec.optimizer_kwargs))
    except (TypeError, ValueError) as error:
        raise ValueError(f"Member {name!r} uses optimizer {spec.optimizer}: {error}") from error


def _optimizer_of(optimizer: Any, name: str) -> tuple[str, dict[str, Any]]:
    """Return the class path and keyword arguments of the config's ``model.optimizer``."""
    if isinstance(optimizer, Namespace):
        optimizer = optimizer.as_dict()
    if isinstance(optimizer, Mapping) and "class_path" in optimizer:
        return optimizer["class_path"], dict(optimizer.get("init_args") or {})
    if isinstance(optimizer, str):
        return optimizer, {}
    if isinstance(optimizer, type):
        return f"{optimizer.__module__}.{optimizer.__qualname__}", {}
    raise ValueError(
        f"Member {name!r} has model.optimizer {optimizer!r}; give a torch.optim class path with init_args."
    )


def _seed(value: Any, cli, name: str) -> int:
    if value is True:
        # LightningCLI drew a seed for the base config and stored it there.
        value = cli.config["seed_everything"]
    if isinstance(value, bool) or value is None:
        raise ValueError(
            f"Member {name!r} has seed_everything {value!r}; give an integer seed so that its initial "
            "weights can be reproduced."
        )
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"Member {name!r} has seed_everything {value!r}; give an integer.") from None


def _float_value(value: Any, key: str, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Member {name!r} has {key} {value!r}; give a number.") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"Member {name!r} has {key} {value!r}; it must be finite and non-negative.")
    return number


def _check_epoch_limit(cli, model: Mapping, max_steps: int) -> None:
    """Reject a ``trainer.max_epochs`` that would stop ``overparam fit`` before ``max_steps`` iterations."""
    max_epochs = cli.trainer.max_epochs
    batches_per_epoch = getattr(cli.datamodule, "batches_per_epoch", None)
    if max_epochs in (None, -1) or batches_per_epoch is None:
        return
    epoch_limit = max_epochs * batches_per_epoch * int(model["iterations_per_step"])
    if epoch_limit < max_steps:
        raise ValueError(
            f"trainer.max_epochs {max_epochs} stops overparam fit after {epoch_limit} iterations, before "
            f"trainer.max_steps {max_steps}; remove max_epochs or lower max_steps."
        )


def _group_by_spec(plans: list[_MemberPlan]) -> dict[BatchSpec, list[_MemberPlan]]:
    groups: dict[BatchSpec, list[_MemberPlan]] = {}
    for plan in plans:
        groups.setdefault(plan.spec, []).append(plan)
    return groups


def _loss_optimum(spec: BatchSpec, features: Tensor, target: Tensor, cache: dict) -> float | None:
    """Return the loss optimum as ``LinearStackRegressor.setup`` computes it."""
    if spec.loss_optimum is not None:
        return float(spec.loss_optimum)
    key = (spec.p, spec.inverse_p_factor)
    if key not in cache:
        scale = 1.0 / spec.p if spec.inverse_p_factor else 1.0
        cache[key] = lp_optimum(features, target, spec.p).loss * scale
    return cache[key]


def _train_batch(
    spec: BatchSpec, part: list[_MemberPlan], features: Tensor, target: Tensor
) -> tuple[BatchedLinearStack, BatchedTrainingResult]:
    """Build the members of ``part`` as ``overparam fit`` seeds them, and train them together."""
    # LightningCLI calls seed_everything(seed) and builds the LinearStack right away (the data
    # module draws no torch random numbers), which from_seeds repeats under torch.manual_seed(seed).
    model = BatchedLinearStack.from_seeds(
        [plan.seed for plan in part],
        spec.input_size,
        init_std=[plan.init_std for plan in part],
        dtype=features.dtype,
        output_size=spec.output_size,
        depth=spec.depth,
        hidden_widths=list(spec.hidden_widths),
        init=spec.init,
    ).to(features.device)
    learning_rates = torch.tensor([plan.lr for plan in part], dtype=features.dtype)
    optimizer = make_batched_optimizer(spec.optimizer, model.parameters(), learning_rates, **dict(spec.optimizer_kwargs))

    start = time.perf_counter()
    # NOTE: overparam fit compares divergence.max_loss with the loss at the end of each Lightning
    # step. Here every iteration's loss is compared, so a member can stop earlier than its fit run.
    result = train_batched(
        model,
        features,
        target,
        spec.p,
        optimizer,
        spec.max_steps,
        log_every=spec.log_every,
        inverse_p_factor=spec.inverse_p_factor,
        divergence_bound=spec.max_loss,
    )
    log.info(
        "Trained %d members for %d iterations in %.2f s.", len(part), result.iterations_run, time.perf_counter() - start
    )
    return model, result


def _outcome(
    plan: _MemberPlan,
    column: int,
    end_to_end: Tensor,
    result: BatchedTrainingResult,
    loss_optimum: float | None,
    batch: int,
) -> MemberOutcome:
    diverged = bool(result.diverged[column])
    diverged_at = int(result.diverged_at[column]) if diverged else None
    final_loss = float(result.final_losses[column])
    last_logged = diverged_at if diverged else result.iterations_run - 1

    losses = result.losses[:, column].tolist()
    curve = [
        (iteration, loss)
        for iteration, loss in zip(result.iterations.tolist(), losses)
        if iteration <= last_logged
    ]
    if not diverged:
        curve.append((result.iterations_run, final_loss))

    optimum = math.nan if loss_optimum is None else loss_optimum
    return MemberOutcome(
        settings=plan.settings,
        final_loss=final_loss,
        final_gap=final_loss - optimum,
        diverged=diverged,
        diverged_at=diverged_at,
        iterations=result.iterations_run,
        curve=curve,
        loss_optimum=loss_optimum,
        end_to_end=end_to_end[column].clone(),
        batch=batch,
        hparams=plan.hparams,
    )


def _hparams(name: str, spec: BatchSpec, seed: int, lr: float, init_std: float, optimizer_kwargs: dict) -> dict:
    """Return the hyperparameters that ``overparam fit`` writes to TensorBoard, plus the member's name and seed."""
    params: dict[str, Any] = {
        "name": name,
        "seed": seed,
        "input_size": spec.input_size,
        "output_size": spec.output_size,
        "depth": spec.depth,
        "hidden_widths": str(list(spec.hidden_widths)),
        "bias": False,
        "init": spec.init,
        "init_std": init_std,
        "p": spec.p,
        "inverse_p_factor": spec.inverse_p_factor,
        "loss_optimum": "None" if spec.loss_optimum is None else spec.loss_optimum,
        "max_steps": spec.max_steps,
        "optimizer": spec.optimizer.rsplit(".", 1)[-1],
        "optimizer_lr": lr,
    }
    for key, value in optimizer_kwargs.items():
        if isinstance(value, (int, float, bool, str)):
            params[f"optimizer_{key}"] = value
    return params


def write_logs(sweep: SweepResult, log_dir: str | os.PathLike) -> None:
    """Write ``members.csv``, ``curves.csv`` and one TensorBoard run folder per member under ``log_dir``."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    sweep.to_frame().to_csv(log_dir / "members.csv", index=False)
    sweep.curves_frame().to_csv(log_dir / "curves.csv", index=False)

    for member, outcome in zip(sweep.members, sweep.outcomes):
        with SummaryWriter(log_dir=str(log_dir / member.name)) as writer:
            for iteration, loss in outcome.curve:
                writer.add_scalar("train/loss", loss, iteration)
                if outcome.loss_optimum is not None:
                    writer.add_scalar("train/loss_gap", loss - outcome.loss_optimum, iteration)

            metrics = {"hp/final_loss": outcome.final_loss, "hp/diverged": float(outcome.diverged)}
            if outcome.loss_optimum is not None:
                metrics["hp/final_loss_gap"] = outcome.final_gap
            # Written into the run's own folder, as Lightning's TensorBoardLogger does;
            # SummaryWriter.add_hparams would open a new subfolder instead.
            for summary in hparams(outcome.hparams, metrics):
                writer.file_writer.add_summary(summary)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, outcome.iterations)
    log.info("Wrote the logs of %d members to %s.", len(sweep.members), log_dir)


def _describe_spec(spec: BatchSpec) -> str:
    widths = [spec.input_size, *spec.hidden_widths, spec.output_size]
    return f"widths {widths}, l{spec.p:g} loss, {spec.optimizer.rsplit('.', 1)[-1]}, {spec.max_steps} iterations"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, Mapping):
        return tuple(sorted((key, _hashable(item)) for key, item in value.items()))
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return value.as_dict()
    return value


def _cell(value: Any) -> Any:
    """Return ``value`` as one CSV cell: numbers and strings as they are, containers as JSON."""
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(_jsonable(value), sort_keys=True)
    return value

"""Search files: which config values ``overparam tune`` searches, and how.

A search file is YAML with these top-level keys (only ``params`` is required)::

    study_name: ethanol_l4_depth2_lr_grid   # default study name; --study-name overrides it
    direction: minimize                      # minimize or maximize
    n_trials: 7                              # total trial budget; a grid defaults to its size
    objective:                               # or just the name: "objective: final_gap"
      name: iterations_to_gap                # final_gap | iterations_to_gap | auc_log_gap
      gap_threshold: 1.0e-2                  # required by iterations_to_gap
      gap_floor: 1.0e-12                     # auc_log_gap clamps gaps below this before log10
    sampler: {name: grid}                    # grid | tpe | random | cmaes, plus the class's arguments
    pruner: {name: median, n_startup_trials: 3}   # median (default) | none | percentile | ...
    divergence: {max_loss: 1.0e+3}           # passed to every trial as --divergence.max_loss
    seeds:
      sampler: 0                             # seed of the sampler
      training: 0                            # --seed_everything of every trial
      per_trial: false                       # true: training seed + trial number
    params:                                  # LightningCLI config paths
      model.optimizer.init_args.lr: [1.0e-4, 1.0e-3]        # list of choices (a grid)
      model.init_std: {low: 1.0e-4, high: 1.0e-2, log: true} # float range
      model.depth: {low: 1, high: 3}                         # int range (both bounds ints)
      model.init: {choices: [near_zero, balanced]}           # categorical

NOTE: PyYAML reads ``1e-5`` (no dot) as a string. This module converts such strings to floats in
numeric fields and in choices, so ``[1e-5, 1e-4]`` is a list of floats.
"""

import importlib.util
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

log = logging.getLogger(__name__)

OBJECTIVES = ("final_gap", "iterations_to_gap", "auc_log_gap")
DEFAULT_GAP_FLOOR = 1e-12
TOP_LEVEL_KEYS = ("study_name", "direction", "n_trials", "objective", "sampler", "pruner", "divergence", "seeds", "params")
PARAM_KEYS = ("type", "low", "high", "log", "step", "choices")
PARAM_TYPES = ("float", "int", "categorical")
SEED_KEYS = ("sampler", "training", "per_trial")

SAMPLERS = {
    "grid": "GridSampler",
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
}
PRUNERS = {
    "median": "MedianPruner",
    "none": "NopPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "threshold": "ThresholdPruner",
    "patient": "PatientPruner",
}

# A number as YAML 1.2 writes it, including forms that PyYAML leaves as strings (1e-5, 1E3).
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class SearchFileError(ValueError):
    """Invalid search file; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched config value.

    ``choices`` contains grid or categorical values, and ``low``/``high`` bound a float or int range.
    """

    path: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial: optuna.trial.BaseTrial, grid: bool = False) -> Any:
        """Draw this parameter's value for ``trial``.

        In a grid search (``grid``), numeric choices are declared as a float or int range covering
        the grid, log-scaled when every value is positive and they span more than a decade, so
        dashboards plot them on a numeric axis.
        ``GridSampler`` still returns exactly the grid values.
        """
        if self.kind == "categorical":
            if grid and _all_numeric(self.choices):
                low, high = min(self.choices), max(self.choices)
                use_log = low > 0 and high > 10 * low
                if all(isinstance(value, int) for value in self.choices):
                    return trial.suggest_int(self.path, low, high, log=use_log)
                return trial.suggest_float(self.path, float(low), float(high), log=use_log)
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class ObjectiveSpec:
    """Name and settings of the value each trial returns; see ``overparam.tuning.objectives``."""

    name: str = "final_gap"
    gap_threshold: float | None = None
    gap_floor: float = DEFAULT_GAP_FLOOR


@dataclass(frozen=True)
class SearchSpec:
    """Parsed and checked search file."""

    path: Path
    params: dict[str, ParamSpec]
    study_name: str | None = None
    direction: str = "minimize"
    n_trials: int | None = None
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    sampler_name: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    pruner_name: str = "median"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    max_loss: float | None = None
    sampler_seed: int | None = 0
    training_seed: int = 0
    per_trial_seed: bool = False

    @property
    def is_grid(self) -> bool:
        return self.sampler_name == "grid"

    @property
    def grid_size(self) -> int:
        """Number of grid points (the product of the choice counts); 0 unless the sampler is grid."""
        if not self.is_grid:
            return 0
        return math.prod(len(param.choices) for param in self.params.values())

    def grid(self) -> dict[str, list]:
        return {path: list(param.choices) for path, param in self.params.items()}

    def training_seed_for(self, trial_number: int) -> int:
        return self.training_seed + trial_number if self.per_trial_seed else self.training_seed

    def fingerprint(self) -> dict[str, Any]:
        """Return the settings that must not change when a study resumes: params, objective, direction."""
        return {
            "direction": self.direction,
            "objective": {
                "name": self.objective.name,
                "gap_threshold": self.objective.gap_threshold,
                "gap_floor": self.objective.gap_floor,
            },
            "params": {
                path: {
                    "kind": param.kind,
                    "low": param.low,
                    "high": param.high,
                    "log": param.log,
                    "step": param.step,
                    "choices": list(param.choices),
                }
                for path, param in sorted(self.params.items())
            },
        }


def load_search_file(path: str | Path) -> SearchSpec:
    """Read and check a search file; raise ``SearchFileError`` naming the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise SearchFileError(f"Search file {path} not found; pass an existing YAML file to --search.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SearchFileError(f"Search file {path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise SearchFileError(f"Search file {path} must contain a mapping with at least a 'params' key.")
    return parse_search(raw, path)


def parse_search(raw: dict[str, Any], path: Path) -> SearchSpec:
    """Build a ``SearchSpec`` from the mapping of a search file at ``path`` (for messages)."""
    _reject_unknown(raw, TOP_LEVEL_KEYS, path, "top level")
    if not raw.get("params"):
        raise SearchFileError(
            f"Search file {path}: 'params' is missing or empty; add a mapping of config paths to "
            "ranges or choices, e.g. 'model.optimizer.init_args.lr: {low: 1.0e-5, high: 1.0e-2, log: true}'."
        )
    if not isinstance(raw["params"], dict):
        raise SearchFileError(f"Search file {path}: 'params' must be a mapping of config paths to ranges or choices.")
    params = {str(name): _parse_param(str(name), value, path) for name, value in raw["params"].items()}

    sampler_name, sampler_options = _parse_named(raw.get("sampler", "tpe"), "sampler", SAMPLERS, path)
    pruner_name, pruner_options = _parse_named(raw.get("pruner", "median"), "pruner", PRUNERS, path)
    if "seed" in sampler_options:
        raise SearchFileError(f"Search file {path}: set the sampler's seed under 'seeds: {{sampler: N}}', not in 'sampler'.")
    if sampler_name == "grid":
        _check_grid(params, path)

    direction = raw.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise SearchFileError(f"Search file {path}: 'direction' must be 'minimize' or 'maximize', got {direction!r}.")
    if direction == "maximize":
        log.warning("Search file %s maximizes; every built-in objective is lower-is-better.", path)

    n_trials = raw.get("n_trials")
    if n_trials is not None and (not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1):
        raise SearchFileError(f"Search file {path}: 'n_trials' must be a positive integer, got {n_trials!r}.")

    study_name = raw.get("study_name")
    if study_name is not None and not isinstance(study_name, str):
        raise SearchFileError(f"Search file {path}: 'study_name' must be a string, got {study_name!r}.")

    seeds = _parse_seeds(raw.get("seeds") or {}, path)
    return SearchSpec(
        path=path,
        params=params,
        study_name=study_name,
        direction=direction,
        n_trials=n_trials,
        objective=_parse_objective(raw.get("objective", "final_gap"), path),
        sampler_name=sampler_name,
        sampler_options=sampler_options,
        pruner_name=pruner_name,
        pruner_options=pruner_options,
        max_loss=_parse_divergence(raw.get("divergence"), path),
        **seeds,
    )


def make_sampler(spec: SearchSpec, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    """Build the search file's sampler.

    Grid search gives every worker the same seed, because ``GridSampler`` maps trial numbers to grid
    points through a seeded shuffle and all workers must share that mapping. Other samplers add the
    worker index to the seed, so parallel workers do not draw identical first points.
    """
    cls = getattr(optuna.samplers, SAMPLERS[spec.sampler_name])
    if spec.sampler_name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        # CmaEsSampler imports the package only when it first samples, inside a trial.
        raise SearchFileError(
            f"Search file {spec.path}: sampler 'cmaes' needs the cmaes package, which is not installed; "
            "run 'pip install cmaes' or choose sampler tpe or random."
        )

    seed = spec.sampler_seed
    if not spec.is_grid and seed is not None:
        seed += worker_index
    try:
        if spec.is_grid:
            return cls(spec.grid(), seed=seed, **spec.sampler_options)
        return cls(seed=seed, **spec.sampler_options)
    except TypeError as error:
        raise SearchFileError(f"Search file {spec.path}: invalid 'sampler' arguments for {cls.__name__}: {error}") from error


def make_pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    """Build the search file's pruner; ``none`` returns ``NopPruner``."""
    cls = getattr(optuna.pruners, PRUNERS[spec.pruner_name])
    options = dict(spec.pruner_options)
    if spec.pruner_name == "patient":
        # PatientPruner wraps another pruner; default to the median pruner.
        options.setdefault("wrapped_pruner", optuna.pruners.MedianPruner())
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise SearchFileError(f"Search file {spec.path}: invalid 'pruner' arguments for {cls.__name__}: {error}") from error


def _parse_param(name: str, value: Any, path: Path) -> ParamSpec:
    if not name or name.startswith("-") or " " in name:
        raise SearchFileError(
            f"Search file {path}: parameter {name!r} must be a config path such as 'model.optimizer.init_args.lr', "
            "without leading dashes."
        )
    if isinstance(value, list):
        value = {"choices": value}
    if not isinstance(value, dict):
        raise SearchFileError(
            f"Search file {path}: parameter {name!r} must be a list of choices or a mapping with low/high or choices, "
            f"got {value!r}."
        )
    _reject_unknown(value, PARAM_KEYS, path, f"parameter {name!r}")

    kind = value.get("type")
    if kind is not None and kind not in PARAM_TYPES:
        raise SearchFileError(f"Search file {path}: parameter {name!r} has type {kind!r}; use one of {', '.join(PARAM_TYPES)}.")

    if "choices" in value:
        if kind not in (None, "categorical") or "low" in value or "high" in value:
            raise SearchFileError(f"Search file {path}: parameter {name!r} mixes 'choices' with a range; keep one of them.")
        choices = value["choices"]
        if not isinstance(choices, list) or not choices:
            raise SearchFileError(f"Search file {path}: 'choices' of parameter {name!r} must be a non-empty list.")
        choices = tuple(_coerce_choice(choice) for choice in choices)
        for choice in choices:
            if not (choice is None or isinstance(choice, (str, int, float, bool))):
                raise SearchFileError(
                    f"Search file {path}: choice {choice!r} of parameter {name!r} is not a string, number, boolean or null."
                )
        if len(set(choices)) != len(choices):
            raise SearchFileError(f"Search file {path}: 'choices' of parameter {name!r} contain duplicates: {list(choices)}.")
        return ParamSpec(name, "categorical", choices=choices)

    if "low" not in value or "high" not in value:
        raise SearchFileError(
            f"Search file {path}: parameter {name!r} needs 'low' and 'high' (a range) or 'choices' (a list)."
        )
    low = _number(value["low"], name, "low", path)
    high = _number(value["high"], name, "high", path)
    step = None if value.get("step") is None else _number(value["step"], name, "step", path)
    use_log = value.get("log", False)
    if not isinstance(use_log, bool):
        raise SearchFileError(f"Search file {path}: 'log' of parameter {name!r} must be true or false, got {use_log!r}.")
    if kind is None:
        kind = "int" if isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)) else "float"
    if kind == "categorical":
        raise SearchFileError(f"Search file {path}: categorical parameter {name!r} needs 'choices', not low/high.")
    if kind == "int":
        if not all(isinstance(number, int) for number in (low, high) + (() if step is None else (step,))):
            raise SearchFileError(f"Search file {path}: int parameter {name!r} needs integer low, high and step.")
    else:
        low, high = float(low), float(high)
    if low > high:
        raise SearchFileError(f"Search file {path}: parameter {name!r} has low {low} above high {high}; swap them.")
    if use_log and low <= 0:
        raise SearchFileError(f"Search file {path}: log-scaled parameter {name!r} needs low > 0, got {low}.")
    if use_log and step is not None:
        raise SearchFileError(f"Search file {path}: parameter {name!r} sets both 'log' and 'step'; Optuna allows only one.")
    return ParamSpec(name, kind, low=low, high=high, log=use_log, step=step)


def _parse_named(value: Any, key: str, known: dict[str, str], path: Path) -> tuple[str, dict[str, Any]]:
    if isinstance(value, str):
        value = {"name": value}
    if value is None:
        value = {"name": "none"}
    if not isinstance(value, dict) or "name" not in value:
        raise SearchFileError(f"Search file {path}: '{key}' must be a name or a mapping with 'name', got {value!r}.")
    options = dict(value)
    name = str(options.pop("name")).lower()
    if name not in known:
        raise SearchFileError(f"Search file {path}: unknown {key} {name!r}; use one of {', '.join(known)}.")
    return name, {option: _coerce_choice(setting) for option, setting in options.items()}


def _parse_objective(value: Any, path: Path) -> ObjectiveSpec:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise SearchFileError(f"Search file {path}: 'objective' must be a name or a mapping with 'name', got {value!r}.")
    _reject_unknown(value, ("name", "gap_threshold", "gap_floor"), path, "objective")
    name = value["name"]
    if name not in OBJECTIVES:
        raise SearchFileError(f"Search file {path}: unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}.")

    threshold = value.get("gap_threshold")
    if threshold is not None:
        threshold = float(_number(threshold, "objective", "gap_threshold", path))
    if name == "iterations_to_gap" and threshold is None:
        raise SearchFileError(
            f"Search file {path}: objective iterations_to_gap needs 'gap_threshold', the training loss gap to reach "
            "(e.g. 'objective: {name: iterations_to_gap, gap_threshold: 1.0e-2}')."
        )
    floor = float(_number(value.get("gap_floor", DEFAULT_GAP_FLOOR), "objective", "gap_floor", path))
    if floor <= 0:
        raise SearchFileError(f"Search file {path}: 'gap_floor' must be positive, got {floor}.")
    return ObjectiveSpec(name, threshold, floor)


def _parse_divergence(value: Any, path: Path) -> float | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SearchFileError(f"Search file {path}: 'divergence' must be a mapping such as '{{max_loss: 1.0e+3}}'.")
    _reject_unknown(value, ("max_loss",), path, "divergence")
    if value.get("max_loss") is None:
        return None
    max_loss = float(_number(value["max_loss"], "divergence", "max_loss", path))
    if max_loss <= 0:
        raise SearchFileError(f"Search file {path}: 'divergence.max_loss' must be positive, got {max_loss}.")
    return max_loss


def _parse_seeds(value: Any, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SearchFileError(f"Search file {path}: 'seeds' must be a mapping with keys {', '.join(SEED_KEYS)}.")
    _reject_unknown(value, SEED_KEYS, path, "seeds")
    sampler_seed = value.get("sampler", 0)
    training_seed = value.get("training", 0)
    per_trial = value.get("per_trial", False)
    if sampler_seed is not None and (not isinstance(sampler_seed, int) or isinstance(sampler_seed, bool)):
        raise SearchFileError(f"Search file {path}: 'seeds.sampler' must be an integer or null, got {sampler_seed!r}.")
    if not isinstance(training_seed, int) or isinstance(training_seed, bool):
        raise SearchFileError(f"Search file {path}: 'seeds.training' must be an integer, got {training_seed!r}.")
    if not isinstance(per_trial, bool):
        raise SearchFileError(f"Search file {path}: 'seeds.per_trial' must be true or false, got {per_trial!r}.")
    return {"sampler_seed": sampler_seed, "training_seed": training_seed, "per_trial_seed": per_trial}


def _check_grid(params: dict[str, ParamSpec], path: Path) -> None:
    ranges = [name for name, param in params.items() if param.kind != "categorical"]
    if ranges:
        raise SearchFileError(
            f"Search file {path}: the grid sampler needs a list of values for every parameter, but "
            f"{', '.join(ranges)} {'is a range' if len(ranges) == 1 else 'are ranges'}; write e.g. "
            "'model.optimizer.init_args.lr: [1.0e-4, 3.16e-4, 1.0e-3]' or choose sampler tpe."
        )


def _reject_unknown(mapping: dict, allowed: tuple[str, ...], path: Path, where: str) -> None:
    unknown = sorted(str(key) for key in mapping if key not in allowed)
    if unknown:
        raise SearchFileError(
            f"Search file {path}: unknown key(s) {', '.join(unknown)} at {where}; allowed keys are {', '.join(allowed)}."
        )


def _coerce_choice(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER.match(value):
        number = float(value)
        return int(number) if number.is_integer() and not any(c in value for c in ".eE") else number
    return value


def _number(value: Any, name: str, key: str, path: Path) -> int | float:
    value = _coerce_choice(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SearchFileError(f"Search file {path}: '{key}' of {name!r} must be a finite number, got {value!r}.")
    return value


def _all_numeric(values: tuple) -> bool:
    return all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)

"""Experiment spec files of ``overparam reproduce``: loading, defaults and validation.

A spec is a YAML mapping with these keys (``configs/paper/*.yaml`` are commented examples):

- ``name``, ``title``, ``description``: identification and the text of the report's introduction.
- ``config``: the ``overparam fit`` config that supplies data and shared settings, relative to the spec file.
- ``iterations``, ``log_every``: horizon and log interval in full-batch iterations at ``--scale 1``.
- ``seeds``: seeds of every model (``seed_everything``); ``max_loss``: divergence bound on the loss.
- ``tuning``: ``points_per_decade`` of the learning-rate grids and ``max_widen``, the number of
  times a grid may grow by one point on a side where the chosen rate sits on its edge.
- ``defaults``: model settings that every model starts from.
- ``panels``: one plot panel each, with ``name``, ``title``, the loss exponent ``p``, optional
  ``defaults`` and a list of ``models``.
- ``claims``: claims of Arora, Cohen & Hazan (ICML 2018) under test, each with ``id``, ``text``, a ``kind`` from ``CLAIM_KINDS`` and
  its parameters.
- ``notes``: free text copied into the report.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("SGD", "Adam", "Adagrad", "Adadelta", "RMSprop")
END_TO_END = "end_to_end"
INITS = ("near_zero", "identity", "balanced", "orthogonal", "default")
MODEL_KEYS = (
    "name", "label", "depth", "hidden_width", "init", "init_std", "optimizer", "optimizer_args",
    "lr", "lr_grid", "iterations", "emulates",
)
DEFAULT_KEYS = ("depth", "hidden_width", "init", "init_std", "optimizer", "optimizer_args", "iterations")
TOP_KEYS = (
    "name", "title", "description", "config", "iterations", "log_every", "seeds", "max_loss",
    "tuning", "defaults", "panels", "claims", "notes",
)
PANEL_KEYS = ("name", "title", "p", "defaults", "models")
TUNING_KEYS = ("points_per_decade", "max_widen")
# Claim kinds with their parameters and defaults; ``model`` and ``baseline`` are model keys.
CLAIM_KINDS: dict[str, dict[str, Any]] = {
    "ends_below": {"factor": 1.0, "at": None},
    "overtakes": {"factor": 1.0},
    "not_faster": {"tolerance": 1.5},
    "tracks": {"tolerance": 0.1},
    "stalls": {"min_ratio": 0.9},
}
CLAIMS_WITH_BASELINE = ("ends_below", "overtakes", "not_faster", "tracks")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class SpecError(ValueError):
    """An invalid spec file; the message names the file and the key."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of an experiment: architecture, initialization, optimizer and learning rates.

    ``lr`` is set for a fixed learning rate and ``lr_grid`` (low, high) for a tuned one. An
    ``end_to_end`` model runs ``EndToEndSGD`` with the depth of the model named by ``emulates``,
    starting from that model's initial end-to-end matrix.
    """

    key: str
    panel: str
    name: str
    label: str
    p: float
    depth: int
    hidden_width: int
    init: str
    init_std: float
    optimizer: str
    optimizer_args: dict[str, Any]
    lr: float | None
    lr_grid: tuple[float, float] | None
    iterations: int
    emulates: str | None = None

    @property
    def tuned(self) -> bool:
        return self.lr_grid is not None

    @property
    def is_end_to_end(self) -> bool:
        return self.optimizer == END_TO_END


@dataclass(frozen=True)
class PanelSpec:
    name: str
    title: str
    p: float
    models: tuple[str, ...]


@dataclass(frozen=True)
class ClaimSpec:
    """A claim under test and the rule that tests it (see ``analysis.evaluate_claim``)."""

    id: str
    text: str
    kind: str
    model: str
    baseline: str | None
    params: dict[str, Any]


@dataclass(frozen=True)
class TuningSpec:
    points_per_decade: int = 2
    max_widen: int = 2


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated spec file; ``config`` is an absolute path."""

    name: str
    title: str
    description: str
    path: Path
    config: Path
    iterations: int
    log_every: int
    seeds: tuple[int, ...]
    max_loss: float
    tuning: TuningSpec
    panels: tuple[PanelSpec, ...]
    models: dict[str, ModelSpec]
    claims: tuple[ClaimSpec, ...]
    notes: str = ""
    source_text: str = field(default="", repr=False)

    def panel_models(self, panel: PanelSpec) -> list[ModelSpec]:
        return [self.models[key] for key in panel.models]


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a spec file.

    Raises:
        SpecError: The file is missing, is not YAML, or has a missing, unknown or invalid key;
            the message names the file and the key.
    """
    path = Path(path).resolve()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: invalid YAML: {error}") from None
    return parse_spec(data, path, text)


def parse_spec(data: Any, path: Path, text: str = "") -> ExperimentSpec:
    """Validate the parsed YAML ``data`` of the spec file ``path``."""
    check = _Checker(path)
    check.mapping(data, "the file", TOP_KEYS)
    for key in ("name", "title", "config", "iterations", "panels"):
        check.require(data, key, "the file")

    name = check.string(data["name"], "name")
    if not NAME_PATTERN.fullmatch(name):
        check.fail("name", f"{name!r} is not a valid experiment name; use letters, digits, '_', '-' and '.'")
    config = (path.parent / check.string(data["config"], "config")).resolve()
    if not config.is_file():
        check.fail("config", f"the overparam fit config {config} was not found; give a path relative to the spec file")

    iterations = check.positive_int(data["iterations"], "iterations")
    log_every = check.positive_int(data.get("log_every", max(1, iterations // 1000)), "log_every")
    seeds = tuple(check.int_list(data.get("seeds", [0, 1, 2]), "seeds"))
    if len(set(seeds)) != len(seeds):
        check.fail("seeds", f"{list(seeds)} repeats a seed")
    max_loss = check.positive_float(data.get("max_loss", 1.0e6), "max_loss")

    tuning_data = data.get("tuning") or {}
    check.mapping(tuning_data, "tuning", TUNING_KEYS)
    tuning = TuningSpec(
        points_per_decade=check.positive_int(tuning_data.get("points_per_decade", 2), "tuning.points_per_decade"),
        max_widen=check.non_negative_int(tuning_data.get("max_widen", 2), "tuning.max_widen"),
    )

    defaults = data.get("defaults") or {}
    check.mapping(defaults, "defaults", DEFAULT_KEYS)
    panels_data = data["panels"]
    if not isinstance(panels_data, list) or not panels_data:
        check.fail("panels", "expected a non-empty list of panels")

    panels = []
    models: dict[str, ModelSpec] = {}
    for panel_index, panel_data in enumerate(panels_data):
        where = f"panels[{panel_index}]"
        check.mapping(panel_data, where, PANEL_KEYS)
        for key in ("name", "p", "models"):
            check.require(panel_data, key, where)
        panel_name = check.string(panel_data["name"], f"{where}.name")
        if not NAME_PATTERN.fullmatch(panel_name):
            check.fail(f"{where}.name", f"{panel_name!r} is not a valid panel name")
        if any(panel.name == panel_name for panel in panels):
            check.fail(f"{where}.name", f"panel {panel_name!r} appears twice")
        p = check.positive_float(panel_data["p"], f"{where}.p")
        if p < 2:
            check.fail(f"{where}.p", f"p = {p:g}; the loss optimum L* is computed for p >= 2 only")
        panel_defaults = panel_data.get("defaults") or {}
        check.mapping(panel_defaults, f"{where}.defaults", DEFAULT_KEYS)

        models_data = panel_data["models"]
        if not isinstance(models_data, list) or not models_data:
            check.fail(f"{where}.models", "expected a non-empty list of models")
        keys = []
        for model_index, model_data in enumerate(models_data):
            model_where = f"{where}.models[{model_index}]"
            check.mapping(model_data, model_where, MODEL_KEYS)
            merged = {**defaults, **panel_defaults, **model_data}
            model = _parse_model(check, merged, model_where, panel_name, p, iterations)
            if model.key in models:
                check.fail(f"{model_where}.name", f"model {model.key!r} appears twice")
            models[model.key] = model
            keys.append(model.key)
        title = check.string(panel_data.get("title", f"l{p:g} loss"), f"{where}.title")
        panels.append(PanelSpec(panel_name, title, p, tuple(keys)))

    for key, model in list(models.items()):
        if model.is_end_to_end:
            models[key] = _resolve_emulation(check, model, models)

    claims = []
    for claim_index, claim_data in enumerate(data.get("claims") or []):
        claims.append(_parse_claim(check, claim_data, f"claims[{claim_index}]", models, panels))
    if len({claim.id for claim in claims}) != len(claims):
        check.fail("claims", "two claims share an id")

    return ExperimentSpec(
        name=name,
        title=check.string(data["title"], "title"),
        description=check.string(data.get("description", ""), "description"),
        path=path,
        config=config,
        iterations=iterations,
        log_every=log_every,
        seeds=seeds,
        max_loss=max_loss,
        tuning=tuning,
        panels=tuple(panels),
        models=models,
        claims=tuple(claims),
        notes=check.string(data.get("notes", ""), "notes"),
        source_text=text,
    )


def _parse_model(check: "_Checker", data: dict, where: str, panel: str, p: float, iterations: int) -> ModelSpec:
    check.require(data, "name", where)
    name = check.string(data["name"], f"{where}.name")
    if not NAME_PATTERN.fullmatch(name):
        check.fail(f"{where}.name", f"{name!r} is not a valid model name; use letters, digits, '_', '-' and '.'")

    optimizer = check.string(data.get("optimizer", "SGD"), f"{where}.optimizer")
    if optimizer not in OPTIMIZERS + (END_TO_END,):
        check.fail(f"{where}.optimizer", f"{optimizer!r} is not supported; use one of {OPTIMIZERS + (END_TO_END,)}")
    optimizer_args = data.get("optimizer_args") or {}
    if not isinstance(optimizer_args, Mapping) or "lr" in optimizer_args:
        check.fail(f"{where}.optimizer_args", "expected a mapping of optimizer arguments other than lr (set lr or lr_grid)")

    init = check.string(data.get("init", "near_zero"), f"{where}.init")
    if init not in INITS:
        check.fail(f"{where}.init", f"{init!r} is not an initialization of LinearStack; use one of {INITS}")

    has_lr = data.get("lr") is not None
    has_grid = data.get("lr_grid") is not None
    if has_lr == has_grid:
        check.fail(where, "give exactly one of lr (a fixed learning rate) and lr_grid ([low, high], tuned)")
    lr = check.positive_float(data["lr"], f"{where}.lr") if has_lr else None
    lr_grid = None
    if has_grid:
        grid = data["lr_grid"]
        if not isinstance(grid, list) or len(grid) != 2:
            check.fail(f"{where}.lr_grid", f"expected [low, high], got {grid!r}")
        low = check.positive_float(grid[0], f"{where}.lr_grid[0]")
        high = check.positive_float(grid[1], f"{where}.lr_grid[1]")
        if low > high:
            check.fail(f"{where}.lr_grid", f"low {low:g} is above high {high:g}")
        lr_grid = (low, high)
    if optimizer == END_TO_END:
        if has_grid:
            check.fail(f"{where}.lr_grid", "an end_to_end model runs one fixed lr; give lr")
        if data.get("emulates") is None:
            check.fail(f"{where}.emulates", "an end_to_end model needs the name of the network it emulates")
    elif data.get("emulates") is not None:
        check.fail(f"{where}.emulates", "only a model with optimizer end_to_end emulates another model")

    return ModelSpec(
        key=f"{panel}/{name}",
        panel=panel,
        name=name,
        label=check.string(data.get("label", name), f"{where}.label"),
        p=p,
        depth=check.positive_int(data.get("depth", 1), f"{where}.depth"),
        hidden_width=check.positive_int(data.get("hidden_width", 1), f"{where}.hidden_width"),
        init=init,
        init_std=check.positive_float(data.get("init_std", 0.05), f"{where}.init_std"),
        optimizer=optimizer,
        optimizer_args=dict(optimizer_args),
        lr=lr,
        lr_grid=lr_grid,
        iterations=check.positive_int(data.get("iterations", iterations), f"{where}.iterations"),
        emulates=None if data.get("emulates") is None else check.string(data["emulates"], f"{where}.emulates"),
    )


def _resolve_emulation(check: "_Checker", model: ModelSpec, models: dict[str, ModelSpec]) -> ModelSpec:
    """Point an end_to_end model at the network it emulates and take that network's depth and start."""
    target_key = model.emulates if "/" in model.emulates else f"{model.panel}/{model.emulates}"
    where = f"model {model.key!r}, key emulates"
    target = models.get(target_key)
    if target is None:
        check.fail(where, f"no model {target_key!r}; name a model of the spec")
    if target.optimizer != "SGD" or target.depth < 2:
        check.fail(where, f"{target_key!r} must be a network of depth 2 or more trained by SGD")
    if target.p != model.p or target.iterations != model.iterations:
        check.fail(where, f"{target_key!r} has another loss or horizon than {model.key!r}")
    return replace(
        model,
        emulates=target_key,
        depth=target.depth,
        hidden_width=target.hidden_width,
        init=target.init,
        init_std=target.init_std,
    )


def _parse_claim(check: "_Checker", data: Any, where: str, models: dict[str, ModelSpec], panels: list) -> ClaimSpec:
    if not isinstance(data, Mapping):
        check.fail(where, "expected a mapping with id, text, kind and model")
    for key in ("id", "text", "kind", "model"):
        check.require(data, key, where)
    kind = check.string(data["kind"], f"{where}.kind")
    if kind not in CLAIM_KINDS:
        check.fail(f"{where}.kind", f"{kind!r} is not a claim kind; use one of {tuple(CLAIM_KINDS)}")
    allowed = ("id", "text", "kind", "model", "baseline", *CLAIM_KINDS[kind])
    check.mapping(data, where, allowed)

    def model_key(value: Any, key: str) -> str:
        text = check.string(value, f"{where}.{key}")
        if text not in models:
            check.fail(f"{where}.{key}", f"no model {text!r}; use a key 'panel/model' from {sorted(models)}")
        return text

    baseline = None
    if kind in CLAIMS_WITH_BASELINE:
        check.require(data, "baseline", where)
        baseline = model_key(data["baseline"], "baseline")
    elif "baseline" in data:
        check.fail(f"{where}.baseline", f"a {kind} claim compares no baseline")

    params = dict(CLAIM_KINDS[kind])
    for key in CLAIM_KINDS[kind]:
        if data.get(key) is not None:
            params[key] = check.positive_float(data[key], f"{where}.{key}")
    if kind in ("ends_below", "overtakes", "not_faster") and params.get("factor", params.get("tolerance", 1.0)) < 1:
        check.fail(where, "factor and tolerance are ratios of at least 1")
    return ClaimSpec(
        id=check.string(data["id"], f"{where}.id"),
        text=check.string(data["text"], f"{where}.text"),
        kind=kind,
        model=model_key(data["model"], "model"),
        baseline=baseline,
        params=params,
    )


class _Checker:
    """Type checks that raise ``SpecError`` naming the spec file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str):
        raise SpecError(f"{self.path}: {where}: {problem}.")

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(value, Mapping):
            self.fail(where, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                self.fail(where, f"unknown key {key!r}; expected one of {', '.join(allowed)}")

    def require(self, value: Mapping, key: str, where: str) -> None:
        if key not in value or value[key] is None:
            self.fail(where, f"missing key {key!r}")

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            self.fail(where, f"expected text, got {value!r}")
        return value.strip()

    def positive_int(self, value: Any, where: str) -> int:
        number = self._int(value, where)
        if number < 1:
            self.fail(where, f"expected a positive integer, got {value!r}")
        return number

    def non_negative_int(self, value: Any, where: str) -> int:
        number = self._int(value, where)
        if number < 0:
            self.fail(where, f"expected a non-negative integer, got {value!r}")
        return number

    def int_list(self, value: Any, where: str) -> list[int]:
        if not isinstance(value, list) or not value:
            self.fail(where, f"expected a non-empty list of integers, got {value!r}")
        return [self._int(item, where) for item in value]

    def positive_float(self, value: Any, where: str) -> float:
        # PyYAML reads "1e-3" (no dot) as a string, so numeric strings are accepted too.
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number <= 0:
            self.fail(where, f"expected a positive number, got {value!r}")
        return number

    def _int(self, value: Any, where: str) -> int:
        if isinstance(value, bool):
            self.fail(where, f"expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            self.fail(where, f"expected an integer, got {value!r}")
        return value


def builtin_spec_dir() -> Path:
    """Return the folder of the specs shipped with the repository, ``configs/paper``.

    NOTE: the specs are not package data, so only a source checkout or an editable install finds
    them. Elsewhere, pass the path of a spec file.
    """
    return Path(__file__).resolve().parents[2] / "configs" / "paper"


def builtin_spec_names() -> list[str]:
    folder = builtin_spec_dir()
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_spec_path(name_or_path: str) -> Path:
    """Map an experiment name (``depth``) or a path to a spec file to the file's path.

    Raises:
        SpecError: Neither a file of that path nor a built-in spec of that name exists.
    """
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise SpecError(f"{candidate}: spec file not found.")
        return candidate
    builtin = builtin_spec_dir() / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    names = ", ".join(builtin_spec_names()) or "none found"
    raise SpecError(
        f"No experiment named {name_or_path!r}; built-in experiments: {names}. "
        "Give one of them or the path to a spec file."
    )

from pathlib import Path

import pytest
import yaml

from overparam.reproduce.spec import (
    SpecError,
    builtin_spec_dir,
    builtin_spec_names,
    load_spec,
    resolve_spec_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "configs" / "ethanol" / "l4_depth1.yaml"
EXPERIMENTS = ("abalone", "depth", "emulation", "init", "optimizers", "teaser")


def minimal_spec() -> dict:
    return {
        "name": "mini",
        "title": "A small experiment",
        "config": str(BASE_CONFIG),
        "iterations": 1000,
        "log_every": 10,
        "seeds": [0, 1, 2],
        "panels": [
            {
                "name": "l4",
                "p": 4,
                "models": [
                    {"name": "depth1", "depth": 1, "lr_grid": [1e-5, 1e-4]},
                    {"name": "depth2", "depth": 2, "hidden_width": 3, "lr": 1e-4},
                    {"name": "rule2", "optimizer": "end_to_end", "emulates": "depth2", "lr": 1e-4},
                ],
            }
        ],
        "claims": [
            {"id": "c1", "text": "depth 2 ends below depth 1", "kind": "ends_below", "model": "l4/depth2",
             "baseline": "l4/depth1"},
        ],
    }


def write(tmp_path: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_builtin_specs_all_load():
    assert builtin_spec_names() == list(EXPERIMENTS)
    for name in EXPERIMENTS:
        spec = load_spec(builtin_spec_dir() / f"{name}.yaml")
        assert spec.name == name
        assert spec.claims, f"{name} has no claims"
        assert len(spec.seeds) >= 3


def test_variant_specs_all_load():
    paths = sorted((builtin_spec_dir() / "variants").glob("*.yaml"))
    assert paths
    for path in paths:
        spec = load_spec(path)
        assert spec.name == path.stem
        assert spec.config == BASE_CONFIG
        assert spec.claims, f"{path.name} has no claims"


def test_minimal_spec_defaults_and_emulation(tmp_path):
    spec = load_spec(write(tmp_path, minimal_spec()))
    depth1 = spec.models["l4/depth1"]
    assert depth1.tuned
    assert depth1.init == "near_zero"
    assert depth1.init_std == 0.05
    assert depth1.iterations == 1000

    rule = spec.models["l4/rule2"]
    assert rule.is_end_to_end
    assert rule.emulates == "l4/depth2"
    assert rule.depth == 2
    assert rule.hidden_width == 3
    assert spec.claims[0].params == {"factor": 1.0, "at": None}


def test_panel_defaults_override_spec_defaults(tmp_path):
    data = minimal_spec()
    data["defaults"] = {"init_std": 0.1, "optimizer": "SGD"}
    data["panels"][0]["defaults"] = {"optimizer": "Adam", "iterations": 500}
    data["panels"][0]["models"] = [{"name": "a", "lr": 1e-3}, {"name": "b", "optimizer": "Adagrad", "lr": 1e-3}]
    data["claims"] = []
    spec = load_spec(write(tmp_path, data))
    assert spec.models["l4/a"].optimizer == "Adam"
    assert spec.models["l4/a"].iterations == 500
    assert spec.models["l4/a"].init_std == 0.1
    assert spec.models["l4/b"].optimizer == "Adagrad"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("iterations"), "the file: missing key 'iterations'"),
        (lambda d: d.update(colour="red"), "unknown key 'colour'"),
        (lambda d: d["panels"][0]["models"][0].update(lr_gird=[1, 2]), "panels[0].models[0]: unknown key 'lr_gird'"),
        (lambda d: d["panels"][0]["models"][0].update(lr=1e-3), "panels[0].models[0]: give exactly one of lr"),
        (lambda d: d["panels"][0]["models"][0].update(lr_grid=[1e-2, 1e-4]), "low 0.01 is above high 0.0001"),
        (lambda d: d["panels"][0]["models"][0].update(init="zeros"), "panels[0].models[0].init: 'zeros'"),
        (lambda d: d["panels"][0]["models"][0].update(optimizer="LBFGS"), "panels[0].models[0].optimizer"),
        (lambda d: d["panels"][0]["models"][2].update(emulates="depth9"), "no model 'l4/depth9'"),
        (lambda d: d["panels"][0]["models"][2].update(emulates="depth1"), "must be a network of depth 2 or more"),
        (lambda d: d["panels"][0].update(p=1), "panels[0].p: p = 1"),
        (lambda d: d.update(seeds=[0, 0, 1]), "seeds: [0, 0, 1] repeats a seed"),
        (lambda d: d.update(iterations=-5), "iterations: expected a positive integer"),
        (lambda d: d.update(config="missing.yaml"), "config: the overparam fit config"),
        (lambda d: d["claims"][0].update(model="l4/depth7"), "claims[0].model: no model 'l4/depth7'"),
        (lambda d: d["claims"][0].update(kind="faster"), "claims[0].kind: 'faster' is not a claim kind"),
        (lambda d: d["claims"][0].pop("baseline"), "claims[0]: missing key 'baseline'"),
        (lambda d: d["claims"][0].update(tolerance=2), "claims[0]: unknown key 'tolerance'"),
    ],
)
def test_invalid_spec_names_file_and_key(tmp_path, change, expected):
    data = minimal_spec()
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as error:
        load_spec(path)
    message = str(error.value)
    assert str(path) in message
    assert expected in message


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="broken.yaml: invalid YAML"):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nothing.yaml")


def test_resolve_spec_path_by_name_and_path(tmp_path):
    assert resolve_spec_path("depth") == builtin_spec_dir() / "depth.yaml"
    path = write(tmp_path, minimal_spec(), "variant.yaml")
    assert resolve_spec_path(str(path)) == path
    with pytest.raises(SpecError) as error:
        resolve_spec_path("deepth")
    assert "No experiment named 'deepth'" in str(error.value)
    assert "depth, emulation" in str(error.value)
    with pytest.raises(SpecError, match="spec file not found"):
        resolve_spec_path(str(tmp_path / "absent.yaml"))

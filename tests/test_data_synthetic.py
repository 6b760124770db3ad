"""SyntheticRegressionDataModule: determinism, conditioning, teacher, splits and selection by class path."""

import numpy as np
import pytest
import torch

from overparam.data import FullBatchLoader, SyntheticRegressionDataModule
from overparam.data.synthetic import random_correlation_matrix


def _condition_number(features: torch.Tensor) -> float:
    eigenvalues = torch.linalg.eigvalsh(features.double().T @ features.double() / features.shape[0])
    return (eigenvalues.max() / eigenvalues.min()).item()


def test_same_seed_gives_same_data():
    first = SyntheticRegressionDataModule(num_samples=200, input_size=8, seed=3)
    second = SyntheticRegressionDataModule(num_samples=200, input_size=8, seed=3)

    assert torch.equal(first.train_tensors()[0], second.train_tensors()[0])
    assert torch.equal(first.train_tensors()[1], second.train_tensors()[1])


def test_other_seed_gives_other_data():
    first = SyntheticRegressionDataModule(num_samples=200, input_size=8, seed=3)
    second = SyntheticRegressionDataModule(num_samples=200, input_size=8, seed=4)

    assert not torch.allclose(first.train_tensors()[0], second.train_tensors()[0])


@pytest.mark.parametrize(("input_size", "condition_number"), [(20, 100.0), (5, 1e4), (50, 1.0), (1, 1.0)])
def test_features_have_requested_condition_number(input_size, condition_number):
    module = SyntheticRegressionDataModule(
        num_samples=400, input_size=input_size, condition_number=condition_number, dtype="float64"
    )
    features, _ = module.train_tensors()

    assert features.shape == (400, input_size)
    assert _condition_number(features) == pytest.approx(condition_number, rel=1e-6)


def test_float32_condition_number_close():
    module = SyntheticRegressionDataModule(condition_number=100.0)

    assert _condition_number(module.train_tensors()[0]) == pytest.approx(100.0, rel=1e-3)


def test_z_scoring_leaves_features_unchanged():
    standardized = SyntheticRegressionDataModule(num_samples=300, input_size=10, dtype="float64")
    raw = SyntheticRegressionDataModule(num_samples=300, input_size=10, dtype="float64", standardize=False)

    torch.testing.assert_close(standardized.train_tensors()[0], raw.train_tensors()[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(standardized.feature_std, np.ones(10), atol=1e-12)


def test_target_follows_teacher():
    module = SyntheticRegressionDataModule(num_samples=300, input_size=10, noise_std=0.0, standardize=False)
    features, target = module.load_arrays()

    assert np.linalg.norm(module.teacher) == pytest.approx(1.0)
    np.testing.assert_allclose(target, features @ module.teacher, atol=1e-12)


def test_noise_has_requested_std():
    module = SyntheticRegressionDataModule(num_samples=5000, input_size=10, noise_std=0.3, standardize=False)
    features, target = module.load_arrays()

    residual = target - features @ module.teacher
    assert residual.std() == pytest.approx(0.3, rel=0.05)


def test_shape_properties():
    module = SyntheticRegressionDataModule(num_samples=100, input_size=7)

    assert module.num_features == 7
    assert module.num_targets == 1
    assert module.input_size == 7


def test_validation_split_reproducible_and_disjoint():
    kwargs = {"num_samples": 200, "input_size": 4, "standardize": False, "dtype": "float64"}
    first = SyntheticRegressionDataModule(val_fraction=0.25, split_seed=7, **kwargs)
    second = SyntheticRegressionDataModule(val_fraction=0.25, split_seed=7, **kwargs)
    other_seed = SyntheticRegressionDataModule(val_fraction=0.25, split_seed=8, **kwargs)
    whole = SyntheticRegressionDataModule(**kwargs)
    for module in (first, second, other_seed, whole):
        module.setup("fit")

    train_rows = {tuple(row) for row in first.x_train.tolist()}
    val_rows = {tuple(row) for row in first.x_val.tolist()}
    all_rows = {tuple(row) for row in whole.x_train.tolist()}
    assert first.x_val.shape == (50, 4)
    assert torch.equal(first.x_val, second.x_val)
    assert torch.equal(first.y_val, second.y_val)
    assert not torch.equal(first.x_val, other_seed.x_val)
    assert train_rows.isdisjoint(val_rows)
    assert train_rows | val_rows == all_rows


def test_dataloaders_serve_full_batches():
    module = SyntheticRegressionDataModule(num_samples=100, input_size=3, batches_per_epoch=4)

    loader = module.train_dataloader()
    batches = list(loader)

    assert isinstance(loader, FullBatchLoader)
    assert len(loader) == 4
    assert len(batches) == 4
    assert all(batch[0] is module.x_train for batch in batches)
    assert module.val_dataloader() == []


INVALID_ARGS = {
    "input_size 0": ({"input_size": 0}, "input_size must be at least 1"),
    "too few samples": ({"num_samples": 20, "input_size": 20}, "num_samples must exceed input_size"),
    "condition below 1": ({"condition_number": 0.5}, "condition_number must be at least 1"),
    "one feature conditioned": ({"input_size": 1, "condition_number": 10.0}, "exactly 1 for a single feature"),
    "negative noise": ({"noise_std": -0.1}, "noise_std must be non-negative"),
}


@pytest.mark.parametrize("case", INVALID_ARGS, ids=list(INVALID_ARGS))
def test_invalid_args_rejected(case):
    kwargs, message = INVALID_ARGS[case]

    with pytest.raises(ValueError, match=message):
        SyntheticRegressionDataModule(**kwargs)


def test_random_correlation_matrix_keeps_spectrum():
    eigenvalues = np.geomspace(50.0, 1.0, 12)
    eigenvalues *= 12 / eigenvalues.sum()

    matrix = random_correlation_matrix(eigenvalues, np.random.default_rng(0))

    np.testing.assert_allclose(np.diag(matrix), np.ones(12), atol=1e-12)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-14)
    np.testing.assert_allclose(np.linalg.eigvalsh(matrix), np.sort(eigenvalues), atol=1e-12)


def test_random_correlation_matrix_rejects_bad_trace():
    with pytest.raises(ValueError, match="must average 1"):
        random_correlation_matrix(np.array([3.0, 1.0]), np.random.default_rng(0))


def test_config_selects_module_by_class_path(tmp_path):
    from overparam.cli import build_cli

    config = tmp_path / "synthetic.yaml"
    config.write_text(
        "data:\n"
        "  class_path: overparam.data.SyntheticRegressionDataModule\n"
        "  init_args:\n"
        "    num_samples: 60\n"
        "    input_size: 6\n"
        "    condition_number: 10.0\n"
    )

    cli = build_cli([
        "fit", "--config", str(config),
        "--trainer.fast_dev_run", "true", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ])

    assert isinstance(cli.datamodule, SyntheticRegressionDataModule)
    assert cli.datamodule.x_train.shape == (60, 6)
    assert cli.trainer.global_step == 1

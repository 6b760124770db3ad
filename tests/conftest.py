import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real UCI data: shared/data next to the repository, or the folder that OVERPARAM_TEST_DATA names.
SHARED_DATA = Path(os.environ.get("OVERPARAM_TEST_DATA") or REPO_ROOT.parent / "shared" / "data")


def _shared_folder(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real UCI data not found at {folder}; set OVERPARAM_TEST_DATA to the folder that contains {name}/")
    return folder


@pytest.fixture
def gas_dir() -> Path:
    """Folder of the real UCI gas sensor drift files (batch*.dat)."""
    return _shared_folder("gas-sensor-drift")


@pytest.fixture
def abalone_dir() -> Path:
    """Folder of the real UCI Abalone files (abalone.data, data.csv)."""
    return _shared_folder("abalone")

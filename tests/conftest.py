"""Shared test fixtures."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The real one-machine SLURM cluster for tests marked `slurm` (tests/slurm_fixtures.py).
pytest_plugins = ["slurm_fixtures"]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def configs_dir() -> Path:
    return REPO / "configs"

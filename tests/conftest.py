"""Shared test fixtures."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The real one-machine SLURM cluster for tests marked `slurm` (tests/slurm_fixtures.py).
pytest_plugins = ["slurm_fixtures"]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def configs_dir() -> Path:
    return REPO / "configs"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny and overhead-bound: extra intra-op threads only contend with the
    multi-process tests and each other on a small CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

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


def pytest_collection_modifyitems(items):
    """Tests marked ``slurm`` first: they spend most of their time waiting on the cluster, so that
    under pytest-xdist (the README's test command) they overlap with the CPU-bound rest of the
    suite instead of forming its tail."""
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)

"""SLURM fixtures: one real one-machine cluster per test session, for tests marked ``slurm``.

Tests marked ``slurm`` get the cluster started for them (the first one pays ~2 s), with
SLURM_CONF exported so sbatch/srun/squeue and submitit's executor talk to it. Without the
SLURM packages they are skipped, unless GTL_REQUIRE_SLURM=1 (set by .ci/run), where a missing
SLURM, a cluster that does not come up, or any other skip of a `slurm` test fails it with
the reason. At the end of the
session exactly the daemons the fixture started are stopped.

Without accounting submitit cannot learn a job's state (sacct fails) and ``results()`` hangs
forever when a task dies before writing its result pickle, so tests wait through
``wait_for_results``, which has a deadline and reports SLURM's view of the job when it fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

# The one-machine cluster is a tool beside launchers/slurm_cluster.py, outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launchers"))
from slurm_local import (INSTALL_HINT, ClusterError, ClusterSpec, LocalSlurmCluster,  # noqa: E402
                         find_free_controller_port, missing_programs)
from gtl_dist.slurm_query import TERMINAL_STATES, job_states  # noqa: E402

REQUIRE_ENV = "GTL_REQUIRE_SLURM"
# A task's result pickle is written before its process exits; allow the file system a moment.
_PICKLE_GRACE_S = 3.0


def slurm_required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def _unavailable(reason: str) -> None:
    if slurm_required():
        pytest.fail(f"{reason}\n({REQUIRE_ENV}=1: the SLURM tests must run on this machine)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running three-node cluster (n1..n3) in a fresh /tmp dir on free ports; SLURM_CONF is set.

    Three nodes, so that one cluster serves the two-node tests and the odd three-node topology.
    """
    missing = missing_programs()
    if missing:
        _unavailable(f"SLURM not installed (missing {', '.join(missing)}); {INSTALL_HINT}")
    # /tmp, not pytest's tmp_path: munged needs every parent of its socket world-searchable,
    # and pytest's base dir is 0700.
    state_dir = Path(tempfile.mkdtemp(prefix="gtl-slurm-test-", dir="/tmp"))
    spec = ClusterSpec(nodes=3, controller_port=find_free_controller_port(3))
    cluster = LocalSlurmCluster(state_dir, spec)
    failure = None
    try:
        cluster.start(timeout_s=60)
    except ClusterError as exc:  # start() has stopped its daemons; the logs stay in state_dir
        failure = f"the test SLURM cluster did not start: {exc}"
    if failure:
        _unavailable(failure)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf_path)
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under GTL_REQUIRE_SLURM=1 a skipped `slurm` test is a failure, whatever skipped it."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and slurm_required()
            and item.get_closest_marker("slurm") is not None):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped although {REQUIRE_ENV}=1 (CI must run every SLURM test): {reason}"


@pytest.fixture(autouse=True)
def _slurm_cluster_for_marked_tests(request):
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")


def wait_for_results(jobs, timeout_s: float) -> list[list]:
    """``[job.results() for job in jobs]``, waiting at most ``timeout_s`` for the result pickles.

    Fails early when SLURM reports a job finished but a task left no pickle (the case in which
    submitit's own ``results()`` would wait forever), with the job's state and its stderr.
    """
    deadline = time.monotonic() + timeout_s
    finished_without_pickle: dict[str, float] = {}
    while True:
        waiting = [job for job in jobs
                   if not all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks))]
        if not waiting:
            return [job.results() for job in jobs]
        states = job_states([job.job_id for job in waiting])
        now = time.monotonic()
        for job in waiting:
            if states[job.job_id] in TERMINAL_STATES:
                first_seen = finished_without_pickle.setdefault(job.job_id, now)
                if now - first_seen > _PICKLE_GRACE_S:
                    pytest.fail(f"SLURM job {job.job_id} is {states[job.job_id]} but left no result "
                                f"pickle; stderr:\n{_stderr(job)}", pytrace=False)
        if now > deadline:
            pytest.fail(f"no results within {timeout_s:.0f} s; SLURM states: "
                        f"{ {job.job_id: states[job.job_id] for job in waiting} }; stderr of "
                        f"{waiting[0].job_id}:\n{_stderr(waiting[0])}", pytrace=False)
        time.sleep(0.5)


def _stderr(job) -> str:
    parts = []
    for i in range(job.num_tasks):
        path = job.task(i).paths.stderr
        parts.append(f"[task {i}] {path.read_text()[-2000:] if path.exists() else '(no stderr file)'}")
    return "\n".join(parts)

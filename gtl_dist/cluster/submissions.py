"""Which job last ran each task (``jobs/submissions.json``), and the state of every task.

A task's state comes from its completion marker first (gtl_dist/cluster/tasks.py), then from the
job recorded for it: submitit's result file, SLURM's view of the job (``squeue``, which works
without accounting) or, for a local job, whether its process still lives.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gtl_dist.cluster.dag import Pipeline
from gtl_dist.cluster.tasks import marker_valid
from gtl_dist.io import atomic_write_json, read_json
from gtl_dist.locks import flocked
from gtl_dist.processes import pid_alive
from gtl_dist.paths import RunPaths
from gtl_dist.slurm_query import job_states
from gtl_dist.stages import Task

# SLURM states in which a job may still produce its output (requeue included).
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED",
                           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT",
                           "SIGNALING", "RESV_DEL_HOLD", "STOPPED"})


@dataclass
class Submission:
    job_id: str
    group: str
    input_hash: str
    cluster: str
    folder: str
    submitted: float = field(default_factory=time.time)
    cancelled: Optional[str] = None
    """Why a launcher stopped this job before it finished (local and debug jobs)."""

    def pid(self) -> Optional[str]:
        """The process that runs the job on this host: a local job's submitit controller (its job
        id), a debug task's launcher (``debug-<pid>-<n>``); None on SLURM."""
        if self.cluster == "local":
            return self.job_id
        return self.job_id.split("-")[1] if self.cluster == "debug" else None

    def log_paths(self) -> tuple[Path, Path]:
        from submitit.core.utils import JobPaths
        jp = JobPaths(self.folder, job_id=self.job_id, task_id=0)
        return jp.stdout, jp.stderr

    def result(self) -> Optional[tuple[str, Any]]:
        """submitit's result pickle of task 0: ("success", value) or ("error", traceback)."""
        import pickle

        from submitit.core.utils import JobPaths
        path = JobPaths(self.folder, job_id=self.job_id, task_id=0).result_pickle
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh)
        except Exception:  # a pickle being written right now
            return None


class SubmissionLog:
    """``jobs/submissions.json``: the job that last ran each task (task key -> Submission).

    ``save`` re-reads the file under an exclusive flock on ``submissions.json.lock`` and writes it
    back with this log's new records added, so concurrent writers never drop each other's entries.
    """

    def __init__(self, paths: RunPaths):
        self.path = paths.jobs / "submissions.json"
        self.records = self._read()
        self._new: dict[str, Submission] = {}  # recorded here since the last save

    def _read(self) -> dict[str, Submission]:
        raw = read_json(self.path) if self.path.is_file() else {}
        return {k: Submission(**v) for k, v in raw.items()}

    def get(self, task: Task) -> Optional[Submission]:
        return self.records.get(task.key)

    def record(self, task: Task, sub: Submission) -> None:
        self.records[task.key] = self._new[task.key] = sub

    def save(self) -> None:
        with flocked(self.path.with_name(self.path.name + ".lock")):
            self.records = {**self._read(), **self._new}
            atomic_write_json(self.path, {k: vars(v) for k, v in sorted(self.records.items())})
        self._new.clear()


@dataclass
class Plan:
    """Per task: done (skip), in flight (depend on it), or to run."""
    done: list[Task] = field(default_factory=list)
    in_flight: dict[Task, Submission] = field(default_factory=dict)
    to_run: list[Task] = field(default_factory=list)
    # Tasks whose inputs changed while a job made with the old ones still runs: Launcher.check_prerequisites
    # refuses them, since a new job would share that job's directory.
    superseded: dict[Task, Submission] = field(default_factory=dict)


def slurm_job_states(subs: list[Submission]) -> dict[str, str]:
    ids = sorted({s.job_id for s in subs if s.cluster == "slurm"})
    return job_states(ids) if ids else {}


# Every state task_state gives; failed and cancelled tasks need attention (see launchers/status.py).
TASK_STATES = ("done", "running", "pending", "failed", "cancelled", "stale", "not submitted")


def task_state(pipeline: Pipeline, paths: RunPaths, task: Task, sub: Optional[Submission],
               slurm_states: dict[str, str]) -> str:
    """One of TASK_STATES."""
    # Whether the job lives is read before its marker: a job that ends between the two reads is
    # then seen done, not failed (``slurm_states`` is a snapshot taken before either).
    active = sub is not None and job_active(sub, slurm_states)
    if marker_valid(pipeline, paths, task):
        return "done"
    if sub is None:
        return "not submitted"
    if sub.input_hash != pipeline.input_hash(task):
        return "stale"  # ran with other inputs; will be resubmitted
    if sub.cancelled:
        return "cancelled"
    result = sub.result()
    if result is not None and result[0] == "error":
        return "failed"
    if active:
        pending = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING")
        return "pending" if slurm_states.get(sub.job_id) in pending else "running"
    if sub.cluster == "slurm":
        state = slurm_states.get(sub.job_id, "UNKNOWN")
        if state == "CANCELLED":
            return "cancelled"
        if state in ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
            return "failed"
        return "failed" if result is None and state == "COMPLETED" else "not submitted"
    # A local job or debug task whose process is gone and left no completion marker: it failed,
    # or was killed (its log says which).
    return "failed"


def log_tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a job's log, or none where it was never written."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 200 * lines))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return text.splitlines()[-lines:]


def job_active(sub: Submission, slurm_states: dict[str, str]) -> bool:
    """Whether a recorded job may still write its task's files: queued, running or requeued on
    SLURM (as far as ``slurm_states`` knows), or a local job (or debug task) whose process lives."""
    if sub.cluster == "slurm":
        return slurm_states.get(sub.job_id) in ACTIVE_STATES
    return pid_alive(sub.pid(), started=sub.submitted)

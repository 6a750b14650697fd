"""Progress of training tasks from their ``train_log.jsonl`` (for ``launchers/status.py``, the
preflight's measured step time and a launcher following a run), and the plain progress lines a
following launcher prints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from gtl_dist.cluster.dag import Pipeline
from gtl_dist.io import read_json_lines
from gtl_dist.paths import RunPaths
from gtl_dist.stages import STAGES, Task


def train_log_records(paths: RunPaths, task: Task) -> list[dict]:
    """The records of a task's train_log.jsonl, without a last line being written right now (or cut
    short by a kill); none when the task has not logged yet."""
    return read_json_lines(train_log_path(paths, task))


def train_log_path(paths: RunPaths, task: Task) -> Path:
    return paths.stage(task.kind, task.target, task.fraction, task.seed) / "train_log.jsonl"


def last_train_record(paths: RunPaths, task: Task) -> Optional[dict]:
    """The task's last "train" record (step, loss, samples_per_s, ...); None before its first."""
    return next((r for r in reversed(train_log_records(paths, task)) if r.get("kind") == "train"), None)


def format_progress(step: int, total: int, rate: Optional[float] = None) -> str:
    """``step 1200/2500 (48%), 2.1 step/s, eta 10 min``; without a rate, just the steps."""
    text = f"step {step}/{total} ({100 * step // max(total, 1)}%)"
    if rate:
        text += f", {rate:.2g} step/s" if rate < 10 else f", {rate:.0f} step/s"
        if step < total:
            text += f", eta {format_duration((total - step) / rate)}"
    return text


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 2 * 3600 else f"{seconds / 3600:.1f} h"


class TrainProgress:
    """One plain line ``running <task>: <format_progress>`` per running training task, for a
    launcher that follows a run: per task at most one every ``every_s`` seconds, and only when its
    logged step moved. A log that has not grown costs a ``stat``, not a read.

    The rate is the one observed while following (train_log.jsonl's modification times, so
    validation and checkpoints count), and until a second sighting the log's own ``samples_per_s``
    over the global batch. Sampling tasks log no progress to a file (their ``sampling n/total``
    lines go to the job's stderr only), so they get no line."""

    def __init__(self, pipeline: Pipeline, paths: RunPaths, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.pipeline, self.paths, self.every_s, self.clock = pipeline, paths, every_s, clock
        self._shown: dict[str, tuple[float, int]] = {}  # key -> (clock, step) of the last line
        self._origin: dict[str, tuple[float, int]] = {}  # key -> (mtime, step) the rate starts from
        self._sizes: dict[str, int] = {}  # key -> size of train_log.jsonl when last read

    def lines(self, tasks: Iterable[Task]) -> list[str]:
        now = self.clock()
        return [line for t in tasks if t.kind in STAGES and (line := self._line(t, now))]

    def _line(self, task: Task, now: float) -> Optional[str]:
        shown = self._shown.get(task.key)
        if shown is not None and now - shown[0] < self.every_s:
            return None
        seen = self._grown_log(task)
        step = seen[0].get("step") if seen else None
        if step is None or (shown is not None and step == shown[1]):
            return None
        self._shown[task.key] = (now, step)
        tc = getattr(self.pipeline.cfg.train, task.kind)
        rate = self._rate(task.key, step, seen[1]) or (seen[0].get("samples_per_s") or 0) / tc.global_batch
        return f"running {task.key}: {format_progress(step, tc.steps, rate)}"

    def _grown_log(self, task: Task) -> Optional[tuple[dict, float]]:
        """The last train record and the log's mtime, when the log changed since the last read."""
        try:
            st = train_log_path(self.paths, task).stat()
        except FileNotFoundError:
            return None
        if self._sizes.get(task.key) == st.st_size:
            return None
        self._sizes[task.key] = st.st_size
        record = last_train_record(self.paths, task)
        return (record, st.st_mtime) if record is not None else None

    def _rate(self, key: str, step: int, mtime: float) -> Optional[float]:
        """Steps per second since this task was first seen (again, after it resumed from an
        earlier checkpoint); None until it moved."""
        t0, s0 = self._origin.setdefault(key, (mtime, step))
        if step < s0:
            self._origin[key] = (mtime, step)
        return (step - s0) / (mtime - t0) if step > s0 and mtime > t0 else None

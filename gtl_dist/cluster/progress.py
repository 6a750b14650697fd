"""Progress of training tasks from their ``train_log.jsonl`` (for ``launchers/status.py``, the
preflight's measured step time and a launcher following a run), and the plain progress lines a
following launcher prints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from gtl_dist.cluster.dag import Pipeline
from gtl_dist.config import RunConfig
from gtl_dist.io import read_json_lines
from gtl_dist.paths import RunPaths
from gtl_dist.stages import STAGES, Task, run_variants


def train_log_path(paths: RunPaths, task: Task) -> Path:
    """The stage task's own train_log.jsonl (a task with a grid writes one per run instead:
    train_logs)."""
    return paths.stage(task.kind, task.target, task.fraction, task.seed) / "train_log.jsonl"


def train_logs(cfg: RunConfig, paths: RunPaths, task: Task) -> list[Path]:
    """The train_log.jsonl files a training task writes, in the order it writes them: its own, or
    one per run (stages.run_variants: a grid's points, and k-fold selection's folds and refit)."""
    return paths.train_logs(task.kind, task.target, task.fraction, task.seed,
                            run_variants(cfg, task.kind, task.fraction))


def train_log_records(cfg: RunConfig, paths: RunPaths, task: Task) -> list[dict]:
    """The records of all the task's train logs, run after run, without a last line being written
    right now (or cut short by a kill); none when the task has not logged yet."""
    return [r for log in train_logs(cfg, paths, task) for r in read_json_lines(log)]


def task_steps(cfg: RunConfig, task: Task) -> int:
    """A training task's optimiser steps over all its runs (at most)."""
    return getattr(cfg.train, task.kind).steps * max(1, len(run_variants(cfg, task.kind, task.fraction)))


def current_train_log(cfg: RunConfig, paths: RunPaths, task: Task) -> Optional[tuple[int, Path]]:
    """The log the task writes now, or wrote last (the last of train_logs that exists), with the
    index of its run in the grid; None before the task logs."""
    found = [(i, log) for i, log in enumerate(train_logs(cfg, paths, task)) if log.is_file()]
    return found[-1] if found else None


def last_train_record(cfg: RunConfig, paths: RunPaths, task: Task,
                      current: Optional[tuple[int, Path]] = None) -> Optional[dict]:
    """The task's last "train" record (step, loss, samples_per_s, ...), its step counted over the
    whole grid (run i's step s is i * steps + s, out of task_steps); None before its first.
    ``current``: current_train_log's answer, when the caller has it already."""
    current = current or current_train_log(cfg, paths, task)
    if current is None:
        return None
    run, log = current
    record = next((r for r in reversed(read_json_lines(log)) if r.get("kind") == "train"), None)
    if record is None or "step" not in record:
        return record
    return {**record, "step": run * getattr(cfg.train, task.kind).steps + record["step"]}


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
    logged step moved. A log that has not grown costs a ``stat``, not a read. A task with a grid
    (TrainConfig.grid) counts its steps over all its runs, so its eta covers the runs still to come.

    The rate is the one observed while following (train_log.jsonl's modification times, so
    validation and checkpoints count), and until a second sighting the log's own ``samples_per_s``
    over the global batch. Sampling tasks log no progress to a file (their ``sampling n/total``
    lines go to the job's stderr only), so they get no line."""

    def __init__(self, pipeline: Pipeline, paths: RunPaths, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.pipeline, self.paths, self.every_s, self.clock = pipeline, paths, every_s, clock
        self._shown: dict[str, tuple[float, int]] = {}  # key -> (clock, step) of the last line
        self._origin: dict[str, tuple[float, int]] = {}  # key -> (mtime, step) the rate starts from
        self._sizes: dict[str, tuple[int, int]] = {}  # key -> (grid run, size of its log) when last read

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
        cfg = self.pipeline.cfg
        rate = self._rate(task.key, step, seen[1]) or \
            (seen[0].get("samples_per_s") or 0) / getattr(cfg.train, task.kind).global_batch
        return f"running {task.key}: {format_progress(step, task_steps(cfg, task), rate)}"

    def _grown_log(self, task: Task) -> Optional[tuple[dict, float]]:
        """The last train record and the log's mtime, when the log changed since the last read."""
        current = current_train_log(self.pipeline.cfg, self.paths, task)
        try:
            st = current[1].stat() if current else None
        except FileNotFoundError:
            return None
        if st is None or self._sizes.get(task.key) == (current[0], st.st_size):
            return None
        self._sizes[task.key] = (current[0], st.st_size)
        record = last_train_record(self.pipeline.cfg, self.paths, task, current)
        return (record, st.st_mtime) if record is not None else None

    def _rate(self, key: str, step: int, mtime: float) -> Optional[float]:
        """Steps per second since this task was first seen (again, after it resumed from an
        earlier checkpoint); None until it moved."""
        t0, s0 = self._origin.setdefault(key, (mtime, step))
        if step < s0:
            self._origin[key] = (mtime, step)
        return (step - s0) / (mtime - t0) if step > s0 and mtime > t0 else None

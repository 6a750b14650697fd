"""How long a submission's tasks will take: per stage and in all, from measured rates.

Rates are read from a run directory: each training task's ``train_log.jsonl`` (seconds per
optimiser step, from its logged throughput), each sample task's completion marker (seconds per
generated sequence) and, for the time around them (start-up, a validation pass, the export), its
submission record and completion marker. They come from

- the run directory itself, once its tasks have logged (a resubmission, a run in progress), or
- ``launchers/submit.py --plan --estimate``: every training stage of the config trained for
  MEASURED_STEPS steps at its full size, and one batch of samples per method, in a scratch run
  directory over the run's own shards, in this process, at the threads a local task would get.

What it leaves out, and says so: the data build and the evaluation; validation passes are counted
as a third of a training step per batch (a forward pass); a multi-rank job is measured at one
rank. A measurement on this machine predicts runs on this machine: run it where the jobs will
run (on a cluster, inside a job on a compute node).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from gtl_dist.cluster.dag import Pipeline, build_pipeline
from gtl_dist.cluster.options import LaunchError, LaunchOptions, world_size
from gtl_dist.cluster.progress import current_train_log, format_duration, train_log_records
from gtl_dist.cluster.submissions import Plan, SubmissionLog
from gtl_dist.config import RunConfig, config_from_dict
from gtl_dist.io import read_json
from gtl_dist.paths import RunPaths
from gtl_dist.stages import STAGES, Task

MEASURED_STEPS = 3
# A validation batch is a forward pass: about a third of a training step's forward and backward.
VALIDATION_SHARE = 1 / 3


@dataclass
class Rates:
    """What one task of a group takes, per unit of its work, and besides it."""
    step_s: dict[str, float] = field(default_factory=dict)    # stage -> seconds per optimiser step
    sample_s: dict[str, float] = field(default_factory=dict)  # method -> seconds per sequence
    other_s: dict[str, float] = field(default_factory=dict)   # group -> seconds besides steps/samples


def step_seconds(cfg: RunConfig, paths: RunPaths, tasks: list[Task]) -> Optional[tuple[float, Path]]:
    """The slowest of the tasks' median step times in their train logs (seconds per step of the
    stage's global batch; all the runs of a grid), with a log that holds them; None when no task
    logged one."""
    found = []
    for task in tasks:
        rates = sorted(r["samples_per_s"] for r in train_log_records(cfg, paths, task)
                       if r.get("kind") == "train" and (r.get("samples_per_s") or 0) > 0)
        if rates:
            global_batch = getattr(cfg.train, task.kind).global_batch
            found.append((global_batch / rates[len(rates) // 2], current_train_log(cfg, paths, task)[1]))
    return max(found, default=None)


def _wall_seconds(paths: RunPaths, subs: SubmissionLog, task: Task) -> Optional[float]:
    """From the task's submission to its completion marker (written last); None on SLURM, where
    it includes the wait in the queue."""
    sub, marker = subs.get(task), task.marker(paths)
    if sub is None or sub.cluster == "slurm" or not marker.is_file():
        return None
    return marker.stat().st_mtime - sub.submitted


def work_steps(cfg: RunConfig, stage: str) -> float:
    """A task's optimiser steps, with its validation passes counted as VALIDATION_SHARE of a step
    per batch, over every run of its grid (TrainConfig.grid)."""
    tc = getattr(cfg.train, stage)
    runs = len(tc.grid()) or 1
    return runs * (tc.steps + (tc.steps // tc.val_every) * tc.val_batches * VALIDATION_SHARE)


def read_rates(pipeline: Pipeline, paths: RunPaths) -> Rates:
    """The rates the run directory's finished or logging tasks show."""
    rates, subs = Rates(), SubmissionLog(paths)
    for group in pipeline.all_groups:
        if group.name in STAGES:
            measured = step_seconds(pipeline.cfg, paths, group.tasks)
            if measured is None:
                continue
            rates.step_s[group.name] = measured[0]
            walls = [w - work_steps(pipeline.cfg, group.name) * measured[0] for t in group.tasks
                     if (w := _wall_seconds(paths, subs, t)) is not None]
            rates.other_s[group.name] = max(0.0, min(walls, default=0.0))
        elif group.name == "sample":
            for task in group.tasks:
                wall = _wall_seconds(paths, subs, task)
                if task.method in rates.sample_s or wall is None:
                    continue
                done = read_json(task.marker(paths))
                rates.sample_s[task.method] = done["seconds"] / max(done["samples"], 1)
                rates.other_s[f"sample/{task.method}"] = max(0.0, wall - done["seconds"])
    return rates


# -- the measurement ---------------------------------------------------------------------------------

def measure(cfg: RunConfig, run_dir: Path, opts: LaunchOptions, groups: list[str],
            on_event: Callable[[str], None] = print) -> Rates:
    """Train each stage of ``groups`` for MEASURED_STEPS steps at full size and draw one batch of
    samples per method, in a scratch run directory over the run's shards (deleted afterwards), and
    read the rates that gives. Needs the run's data built."""
    from gtl_dist.cluster.launch import Launcher
    from gtl_dist.cluster.run_dir import prepare_run_dir
    from gtl_dist.data import data_dir
    shards = data_dir(cfg, run_dir).resolve()
    if not (shards / "manifest.json").is_file():
        raise LaunchError(f"--estimate measures on the run's own shards, and {shards} holds none yet: build "
                          f"them first (python shards/build.py with the same --config, --set and --run-dir "
                          f"{run_dir}), then run --plan --estimate again")
    from gtl_dist.train.dist import prebuild_ops
    prebuild_ops()  # the real run builds DeepSpeed's op before its jobs start: not a task's time
    start_up = process_start_seconds()
    scratch = Path(tempfile.mkdtemp(prefix="gtl-estimate-"))
    try:
        mini = _measuring_config(cfg, shards)
        pipeline = build_pipeline(mini, only=groups)
        launcher = Launcher(mini, scratch, replace(opts, cluster="debug", nodes=1), pipeline)
        threads = local_threads(opts)
        launcher.runner = replace(launcher.runner, threads=threads)
        prepare_run_dir(mini, scratch)
        plan = launcher.plan()
        plan.to_run = [t for t in plan.to_run if t in _representatives(pipeline)]
        on_event(f"estimate: measuring {len(plan.to_run)} task(s) at full size, {MEASURED_STEPS} steps each, "
                 f"{threads} thread{'s' * (threads > 1)} per task, in {scratch}")
        start = time.monotonic()
        failed = launcher.run_here(plan, on_event=on_event)
        if failed:
            raise LaunchError(f"--estimate: measuring {', '.join(t.key for t in failed)} failed; its log: "
                              f"{launcher.subs.get(failed[0]).log_paths()[1]}")
        on_event(f"estimate: measured in {time.monotonic() - start:.0f} s")
        rates = read_rates(pipeline, RunPaths(scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the shards are elsewhere (shards.dir)
    # The tasks ran in this process; a job starts its own, importing torch and DeepSpeed first.
    rates.other_s = {k: v + start_up for k, v in rates.other_s.items()}
    return rates


def process_start_seconds() -> float:
    """How long a fresh interpreter takes to import what every job imports (torch, DeepSpeed,
    the task code): the start-up each local or SLURM job pays before its task begins."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import deepspeed, gtl_dist.cluster.tasks, gtl_dist.train"],
                   check=True, capture_output=True)
    return time.monotonic() - start


def local_threads(opts: LaunchOptions) -> int:
    """The torch threads of a one-rank local task: its share of this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, opts.local_parallelism))


def _measuring_config(cfg: RunConfig, shards: Path) -> RunConfig:
    """``cfg`` with every stage trained MEASURED_STEPS steps (logging each, validating and saving
    at the last), one seed, one batch of samples per shard, over ``shards``: what it builds and how
    large are unchanged."""
    d = cfg.to_dict()
    d["shards"]["dir"] = str(shards)
    for tc in d["train"].values():
        tc.update(steps=MEASURED_STEPS, log_every=1, val_every=MEASURED_STEPS, save_every=MEASURED_STEPS,
                  keep_last=1, lr_grid=None, weight_decay_grid=None)
    d["sample"]["num_samples"] = d["sample"]["batch_size"] * d["sample"]["shards"]
    d["pipeline"].update(seeds=[0], replicates_at={})
    return config_from_dict(d, "the estimate's scratch config")


def _representatives(pipeline: Pipeline) -> set[Task]:
    """The first task of every selected group but the evaluation, one sample task per method, and
    what they read."""
    firsts = [g.tasks[0] for g in pipeline.groups if g.name not in ("sample", "eval")]
    if "sample" in pipeline.group_names:
        firsts += list({t.method: t for t in reversed(pipeline.group("sample").tasks)}.values())
    keep: set[Task] = set()
    while firsts:
        task = firsts.pop()
        if task not in keep:
            keep.add(task)
            firsts.extend(pipeline.task_deps(task))
    return keep


# -- the estimate --------------------------------------------------------------------------------------

def task_seconds(task: Task, cfg: RunConfig, rates: Rates) -> Optional[float]:
    """One task's wall time at ``rates``; None when they do not cover it."""
    if task.kind in STAGES and task.kind in rates.step_s:
        return rates.other_s.get(task.kind, 0.0) + work_steps(cfg, task.kind) * rates.step_s[task.kind]
    if task.kind == "sample" and task.method in rates.sample_s:
        per_shard = cfg.sample.num_samples / cfg.sample.shards
        return rates.other_s.get(f"sample/{task.method}", 0.0) + per_shard * rates.sample_s[task.method]
    return None


def local_wall_seconds(pipeline: Pipeline, plan: Plan, seconds: dict[Task, float], opts: LaunchOptions) -> float:
    """The wall time of the plan's tasks on this machine, scheduled as gtl_dist/cluster/local.py
    does: a task starts when what it reads has finished, at most --local-parallelism ranks at once."""
    slots = max(1, opts.local_parallelism)
    ranks = {t: world_size(pipeline.group_of(t), pipeline.cfg, opts) for t in plan.to_run}
    pending, running, finished, now = list(plan.to_run), {}, set(plan.done) | set(plan.in_flight), 0.0
    while pending or running:
        for task in list(pending):
            if all(d in finished for d in pipeline.task_deps(task)) and (
                    ranks[task] + sum(ranks[t] for t in running) <= max(slots, ranks[task])):
                pending.remove(task)
                running[task] = now + seconds.get(task, 0.0)
        if not running:  # what is left reads a task outside the plan: nothing more can start
            break
        now = min(running.values())
        for task in [t for t, end in running.items() if end <= now]:
            del running[task]
            finished.add(task)
    return now


def estimate_lines(pipeline: Pipeline, plan: Plan, rates: Rates, opts: LaunchOptions, origin: str) -> list[str]:
    """The estimate as printed under the plan: per group with tasks to run, and the wall time."""
    cfg = pipeline.cfg
    seconds = {t: s for t in plan.to_run if (s := task_seconds(t, cfg, rates)) is not None}
    lines = [f"estimate ({origin}; validation counted as {VALIDATION_SHARE:.2g} of a step per batch; the data "
             f"build and the evaluation are not included):"]
    missing = []
    for group in pipeline.groups:
        todo = [t for t in group.tasks if t in plan.to_run]
        if not todo or group.name in ("data", "eval"):
            continue
        known = [seconds[t] for t in todo if t in seconds]
        if not known:
            missing.append(group.name)
            continue
        what = (f"{getattr(cfg.train, group.name).steps} steps x {rates.step_s[group.name]:.3g} s"
                if group.name in STAGES else f"{cfg.sample.num_samples // cfg.sample.shards} samples per shard")
        lines.append(f"  {group.name:<14} {len(todo):>4} task(s), {what}: {format_duration(max(known))} per "
                     f"task, {format_duration(sum(known))} in all")
    if missing:
        lines.append(f"  not estimated (no rate measured): {', '.join(missing)}")
    if opts.cluster == "local":
        lines.append(f"  wall time with --cluster local --local-parallelism {opts.local_parallelism}: about "
                     f"{format_duration(local_wall_seconds(pipeline, plan, seconds, opts))}")
    return lines

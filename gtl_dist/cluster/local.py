"""Running the pipeline on this machine: submitit's local executor (``--cluster local``), or every
task in the launcher's own process (``--cluster debug``, for a debugger).

There is no scheduler to hold dependencies, so the runner starts a task as soon as every task it
reads has finished, at most ``--local-parallelism`` ranks at a time. Local jobs of an earlier
launch that still run are waited for, so the launcher holds the run directory until they end.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Callable, Optional

from gtl_dist.cluster.dag import Pipeline
from gtl_dist.cluster.options import LaunchOptions, world_size
from gtl_dist.cluster.progress import TrainProgress
from gtl_dist.cluster.submissions import Plan, Submission, SubmissionLog
from gtl_dist.cluster.tasks import TaskRunner, marker_valid
from gtl_dist.config import RunConfig
from gtl_dist.locks import pid_alive
from gtl_dist.log import get_logger
from gtl_dist.paths import RunPaths
from gtl_dist.stages import BIG, Task

log = get_logger("cluster.local")

Events = Callable[[str], None]


class LocalRunner:
    def __init__(self, cfg: RunConfig, opts: LaunchOptions, pipeline: Pipeline, paths: RunPaths,
                 subs: SubmissionLog, runner: TaskRunner):
        self.cfg, self.opts, self.pipeline, self.paths = cfg, opts, pipeline, paths
        self.subs, self.runner = subs, runner

    def run(self, plan: Plan, on_event: Events = print) -> list[Task]:
        """Run the plan's remaining tasks here. A task starts as soon as every task it reads has
        finished (not group by group), up to ``local_parallelism`` at a time (a multi-rank task
        takes one slot per rank); ``debug`` runs them one by one in this process. Returns the
        failed tasks; their dependants are cancelled (not run) and reported. Running training
        tasks report their step now and then (``progress.TrainProgress``)."""
        progress = TrainProgress(self.pipeline, self.paths)
        failed: list[Task] = []
        cancelled: set[Task] = set()
        pending = [t for t in self.pipeline.tasks if t in plan.to_run]
        unfinished = set(pending) | set(plan.in_flight)  # anything else a task reads is done
        running: dict[Task, Any] = {}
        slots = max(1, self.opts.local_parallelism)
        debug = self.opts.cluster == "debug"
        while pending or running:
            for task in list(pending):
                deps = self.pipeline.task_deps(task)
                for dep in deps:
                    if dep in plan.in_flight:  # a local job of an earlier, interrupted launch
                        if self._await_earlier(dep, plan.in_flight.pop(dep), failed, on_event, progress):
                            unfinished.discard(dep)
                bad = [d for d in deps if d in failed or d in cancelled]
                if bad:
                    pending.remove(task)
                    cancelled.add(task)
                    on_event(f"  cancelled {task.key} (its input {bad[0].key} did not finish)")
                elif not any(d in unfinished for d in deps) and self._ranks(task) + sum(
                        self._ranks(t) for t in running) <= max(slots, self._ranks(task)) and (
                        not running or not debug):
                    pending.remove(task)
                    running[task] = self._start(task, slots, on_event)
            for task, job in list(running.items()):
                error = self._outcome(job)
                if error is False:
                    continue
                del running[task]
                if error is None:
                    unfinished.discard(task)
                    on_event(f"  finished {task.key}")
                else:
                    failed.append(task)
                    on_event(f"  FAILED {task.key}: {error}")
            for line in progress.lines(running):
                on_event(f"  {line}")
            if running and not debug:
                time.sleep(0.5)
        for task in self.pipeline.tasks:  # an earlier launch's jobs that no task here waited for
            if task in plan.in_flight and plan.in_flight[task].cluster == "local":
                self._await_earlier(task, plan.in_flight.pop(task), failed, on_event, progress)
        return failed

    def _ranks(self, task: Task) -> int:
        return world_size(self.pipeline.group_of(task), self.cfg, self.opts)

    def _start(self, task: Task, slots: int, on_event: Events) -> Any:
        """Submit one task to submitit's local executor (or, for debug, run it right here)."""
        if self.opts.cluster == "debug":
            try:
                self.runner(task)
                return None
            except Exception as exc:  # report and go on with independent work
                log.exception("%s failed", task.key)
                return f"{type(exc).__name__}: {exc}"
        import submitit
        group = self.pipeline.group_of(task)
        big = group.size == BIG
        folder = self.paths.jobs / group.name / "%j"
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=self.cfg.cluster.max_requeue)
        executor.update_parameters(
            timeout_min=(self.opts.time_min or self.cfg.cluster.timeout_min) if big
            else self.cfg.cluster.small_timeout_min,
            tasks_per_node=self._ranks(task),  # one machine: --nodes ranks on it
            gpus_per_node=min(self.opts.gpus(self.cfg), 1) if not big else self.opts.gpus(self.cfg),
            signal_delay_s=min(self.cfg.cluster.signal_delay_s, 60))
        # The job inherits this: each rank uses its share of the machine's cores (tasks.py).
        os.environ["GTL_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(slots, self._ranks(task))))
        job = executor.submit(self.runner, task)
        self.subs.record(task, Submission(str(job.job_id), group.name, self.pipeline.input_hash(task),
                                          "local", str(folder)))
        self.subs.save()
        on_event(f"  started {task.key} (local job {job.job_id}, log {job.paths.stderr})")
        return job

    @staticmethod
    def _outcome(job: Any) -> Optional[str] | bool:
        """False while ``job`` runs; then None (success) or the error in one line. A debug task
        ran in _start, which left its outcome (None or the error) in place of a job."""
        if job is None or isinstance(job, str):
            return job
        if not job.done():
            return False
        try:
            job.results()
            return None
        except Exception as exc:
            return f"{first_error_line(exc)} (log: {job.paths.stderr})"

    def _await_earlier(self, task: Task, sub: Submission, failed: list[Task], on_event: Events,
                       progress: TrainProgress) -> bool:
        on_event(f"  waiting for {task.key} (local job {sub.job_id} of an earlier launch)")
        while pid_alive(sub.job_id, started=sub.submitted):
            for line in progress.lines([task]):
                on_event(f"  {line}")
            time.sleep(2)
        if marker_valid(self.pipeline, self.paths, task):
            return True
        failed.append(task)
        on_event(f"  FAILED {task.key}: its earlier job ended without finishing "
                 f"(log: {sub.log_paths()[1]})")
        return False


_ERROR_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt|Exit)\w*: ")


def first_error_line(exc: BaseException) -> str:
    """The line that says what went wrong: submitit's FailedJobError embeds the remote traceback
    (and log paths after it), so take its last ``SomethingError: message`` line."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return line.strip()
    return lines[0].strip() if lines else type(exc).__name__

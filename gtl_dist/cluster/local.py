"""Running the pipeline on this machine: submitit's local executor (``--cluster local``), or every
task in the launcher's own process (``--cluster debug``, for a debugger).

There is no scheduler to hold dependencies, so the runner starts a task as soon as every task it
reads has finished, at most ``--local-parallelism`` ranks at a time. Local jobs of an earlier
launch that still run are adopted: waited for, so the launcher holds the run directory until they
end. A launcher that is stopped (Ctrl-C, SIGTERM) stops its jobs with it, adopted ones included,
and records them as cancelled; one that is killed outright leaves them to the next launcher, which
adopts them. Either way no task runs twice at once (the task itself also refuses to, see
``gtl_dist.cluster.tasks.task_lock``).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator, Optional

from gtl_dist.cluster.dag import Pipeline
from gtl_dist.cluster.options import Interrupted, LaunchOptions, time_limit_min, world_size
from gtl_dist.cluster.progress import TrainProgress
from gtl_dist.cluster.submissions import Plan, Submission, SubmissionLog
from gtl_dist.cluster.tasks import TaskRunner, marker_valid
from gtl_dist.config import RunConfig
from gtl_dist.io import atomic_write_bytes
from gtl_dist.log import get_logger
from gtl_dist.paths import RunPaths
from gtl_dist.processes import pid_alive, stop_tree
from gtl_dist.stages import BIG, Task

log = get_logger("cluster.local")

Events = Callable[[str], None]


class LocalRunner:
    def __init__(self, cfg: RunConfig, opts: LaunchOptions, pipeline: Pipeline, paths: RunPaths,
                 subs: SubmissionLog, runner: TaskRunner):
        self.cfg, self.opts, self.pipeline, self.paths = cfg, opts, pipeline, paths
        self.subs, self.runner = subs, runner
        self._debug_jobs = 0

    def run(self, plan: Plan, on_event: Events = print) -> list[Task]:
        """Run the plan's remaining tasks here and return the failed ones; their dependants are
        cancelled (not run) and reported. Raises Interrupted, after stopping every job this
        launcher runs or adopted, when Ctrl-C or SIGTERM stops it."""
        running: dict[Task, Any] = {}
        try:
            return self._run(plan, running, on_event)
        except BaseException as exc:  # the launcher stops: its jobs stop with it
            why = (exc.signal_name if isinstance(exc, Interrupted)
                   else (str(exc) or "Ctrl-C") if isinstance(exc, KeyboardInterrupt) else type(exc).__name__)
            with _signals_ignored(signal.SIGINT, signal.SIGTERM):  # a second one must not leave half the jobs
                stopped = self._stop(running, plan, reason=why)
            if isinstance(exc, Interrupted):  # --cluster debug: the task this process was running
                raise Interrupted(why, exc.stopped + stopped) from None
            if isinstance(exc, KeyboardInterrupt):
                raise Interrupted(why, stopped) from None
            raise

    def _run(self, plan: Plan, running: dict[Task, Any], on_event: Events) -> list[Task]:
        """A task starts as soon as every task it reads has finished (not group by group), up to
        ``local_parallelism`` at a time (a multi-rank task takes one slot per rank); ``debug``
        runs them one by one in this process. Running training tasks report their step now and
        then (``progress.TrainProgress``)."""
        progress = TrainProgress(self.pipeline, self.paths)
        failed: list[Task] = []
        cancelled: set[Task] = set()
        pending = [t for t in self.pipeline.tasks if t in plan.to_run]
        unfinished = set(pending) | set(plan.in_flight)  # anything else a task reads is done
        slots = max(1, self.opts.local_parallelism)
        debug = self.opts.cluster == "debug"
        while pending or running:
            for task in list(pending):
                deps = self.pipeline.task_deps(task)
                for dep in deps:
                    if dep in plan.in_flight:  # a local job of an earlier, interrupted launch
                        if self._await_earlier(dep, plan.in_flight[dep], failed, on_event, progress):
                            unfinished.discard(dep)
                        del plan.in_flight[dep]
                bad = [d for d in deps if d in failed or d in cancelled]
                if bad:
                    pending.remove(task)
                    cancelled.add(task)
                    on_event(f"  cancelled {task.key} (its input {bad[0].key} did not finish)")
                elif not any(d in unfinished for d in deps) and self._ranks(task) + sum(
                        self._ranks(t) for t in running) <= max(slots, self._ranks(task)) and (
                        not running or not debug):
                    pending.remove(task)
                    running[task] = self._start(task, self._sharing(task, pending, running, plan, slots),
                                                on_event)
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
                self._await_earlier(task, plan.in_flight[task], failed, on_event, progress)
                del plan.in_flight[task]
        return failed

    def _ranks(self, task: Task) -> int:
        return world_size(self.pipeline.group_of(task), self.cfg, self.opts)

    def _record(self, task: Task, job_id: str, cluster: str, folder: str) -> Submission:
        sub = Submission(job_id, self.pipeline.group_of(task).name, self.pipeline.input_hash(task),
                         cluster, folder)
        self.subs.record(task, sub)
        self.subs.save()
        return sub

    def _sharing(self, task: Task, pending: list[Task], running: dict[Task, Any], plan: Plan,
                 slots: int) -> int:
        """How many tasks ``task`` shares the cores with: ``slots``, or 1 when nothing else runs
        and every task left reads it (directly or through others), so that nothing can start
        beside it until it ends, such as the data build and the evaluation."""
        if running or plan.in_flight:
            return slots
        downstream = {task}
        for later in pending:  # in pipeline order: a task's inputs come before it
            if not any(d in downstream for d in self.pipeline.task_deps(later)):
                return slots
            downstream.add(later)
        return 1

    def _start(self, task: Task, slots: int, on_event: Events) -> Any:
        """Submit one task to submitit's local executor (or, for debug, run it right here)."""
        if self.opts.cluster == "debug":
            return self._run_in_process(task)
        import submitit
        group = self.pipeline.group_of(task)
        big = group.size == BIG
        folder = self.paths.jobs / group.name / "%j"
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=self.cfg.cluster.max_requeue)
        executor.update_parameters(
            timeout_min=time_limit_min(group, self.cfg, self.opts),
            tasks_per_node=self._ranks(task),  # one machine: --nodes ranks on it
            gpus_per_node=min(self.opts.gpus(self.cfg), 1) if not big else self.opts.gpus(self.cfg),
            signal_delay_s=min(self.cfg.cluster.signal_delay_s, 60))
        # Each rank uses its share of the machine's cores.
        threads = max(1, (os.cpu_count() or 1) // max(slots, self._ranks(task)))
        with _signals_ignored(signal.SIGINT):  # inherited: Ctrl-C reaches the launcher, which stops the job
            job = executor.submit(replace(self.runner, threads=threads), task)
        self._record(task, str(job.job_id), "local", str(folder))
        on_event(f"  started {task.key} (local job {job.job_id}, log {job.paths.stderr})")
        return job

    def _run_in_process(self, task: Task) -> Optional[str]:
        """--cluster debug: run ``task`` here. Its log lines also go to a log file, and a failure
        leaves submitit's result file, so that status.py shows it like a failed job. Returns None
        or the error in one line."""
        from submitit.core.utils import JobPaths
        self._debug_jobs += 1
        job_id = f"debug-{os.getpid()}-{self._debug_jobs}"
        sub = self._record(task, job_id, "debug", str(self.paths.jobs / self.pipeline.group_of(task).name / "%j"))
        job_paths = JobPaths(sub.folder, job_id=job_id, task_id=0)
        job_paths.stderr.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(job_paths.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        logging.getLogger("gtl_dist").addHandler(handler)
        try:
            self.runner(task)
            return None
        except KeyboardInterrupt as exc:
            why = str(exc) or "Ctrl-C"
            self.subs.record(task, replace(sub, cancelled=f"stopped with its launcher ({why})"))
            self.subs.save()
            raise Interrupted(why, [task]) from None  # so the stop line names it
        except Exception as exc:  # report and go on with independent work
            log.exception("%s failed", task.key)
            atomic_write_bytes(job_paths.result_pickle, pickle.dumps(("error", traceback.format_exc())))
            return f"{type(exc).__name__}: {exc} (log: {job_paths.stderr})"
        finally:
            logging.getLogger("gtl_dist").removeHandler(handler)
            handler.close()

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

    def _stop(self, running: dict[Task, Any], plan: Plan, reason: str) -> list[Task]:
        """Stop the jobs this launcher started and the earlier launch's jobs it adopted (each
        with its ranks and their workers), and record them as cancelled; the tasks stopped."""
        jobs = {task: self.subs.get(task) for task in running}
        jobs.update({task: sub for task, sub in plan.in_flight.items() if sub.cluster == "local"})
        stopped = []
        for task, sub in jobs.items():
            if sub is None or sub.cluster == "local" and not pid_alive(sub.job_id, sub.submitted):
                continue
            if sub.cluster == "local":  # its ranks (and their workers), then submitit's controller
                stop_tree(sub.job_id, sub.submitted)
            self.subs.record(task, replace(sub, cancelled=f"stopped with its launcher ({reason})"))
            stopped.append(task)
        if stopped:
            self.subs.save()
        return stopped


@contextmanager
def _signals_ignored(*signals: signal.Signals) -> Iterator[None]:
    """Ignore ``signals`` in the block; a process started in it ignores them too (an ignored
    signal stays ignored across exec, and Python then installs no KeyboardInterrupt handler)."""
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


_ERROR_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt|Exit)\w*: ")


def first_error_line(exc: BaseException) -> str:
    """The line that says what went wrong: submitit's FailedJobError embeds the remote traceback
    (and log paths after it), so take its last ``SomethingError: message`` line."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return line.strip()
    return lines[0].strip() if lines else type(exc).__name__

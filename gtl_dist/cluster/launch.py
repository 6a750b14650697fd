"""Turn the pipeline DAG into jobs: SLURM through submitit, submitit's local executor, or in-process.

SLURM (``--cluster slurm``): every group is submitted at once, single jobs with ``submit`` and
per-(target, fraction) groups as job arrays with ``map_array``, chained with ``afterok``
dependencies on the upstream groups' job ids; ``--kill-on-invalid-dep=yes`` makes SLURM cancel
the dependants of a failed job instead of leaving them pending forever. The launcher returns
after submitting (``--wait`` follows the run).

Local (``--cluster local``) runs the same DAG with submitit's local executor on this machine;
there is no scheduler to hold dependencies, so the launcher drives it group by group, at most
``--local-parallelism`` tasks at a time. Debug (``--cluster debug``) calls the tasks in this
process, one after another, for stepping through with a debugger.

Re-running the launcher on the same run directory is safe: tasks with a valid completion marker
are skipped, tasks whose recorded job is still queued or running are not submitted again (their
job ids become dependencies), and everything else is (re)submitted; training stages resume from
their last committed checkpoint.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from gtl_dist.cluster.dag import Group, Pipeline
from gtl_dist.cluster.progress import TrainProgress, train_log_path
from gtl_dist.cluster.tasks import TaskRunner, marker_valid
from gtl_dist.config import RunConfig
from gtl_dist.io import atomic_write_json, read_json
from gtl_dist.locks import flocked, pid_alive
from gtl_dist.log import get_logger
from gtl_dist.paths import RunPaths
from gtl_dist.slurm_query import job_states
from gtl_dist.stages import BIG, DATA, STAGES, Task

log = get_logger("cluster.launch")

# SLURM states in which a job may still produce its output (requeue included).
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED",
                           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT",
                           "SIGNALING", "RESV_DEL_HOLD", "STOPPED"})


class LaunchError(RuntimeError):
    """Something about the submission is wrong; the message says what and how to fix it."""


@dataclass
class LaunchOptions:
    cluster: str = "slurm"  # slurm | local | debug
    nodes: int = 1
    gpus_per_node: Optional[int] = None  # None: cfg.cluster.gpus_per_node
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    time_min: Optional[int] = None
    local_parallelism: int = 1
    command: str = ""

    def gpus(self, cfg: RunConfig) -> int:
        return cfg.cluster.gpus_per_node if self.gpus_per_node is None else self.gpus_per_node

    def cpus(self, cfg: RunConfig) -> int:
        return cfg.cluster.cpus_per_task if self.cpus_per_task is None else self.cpus_per_task


# -- executor parameters ------------------------------------------------------------------------------

def slurm_parameters(group: Group, cfg: RunConfig, opts: LaunchOptions, run_name: str,
                     dependency: Optional[str] = None) -> dict[str, Any]:
    """sbatch parameters (submitit ``SlurmExecutor`` names) for one group's job or array."""
    c = cfg.cluster
    gpus, cpus = opts.gpus(cfg), opts.cpus(cfg)
    big = group.size == BIG
    params: dict[str, Any] = {
        "job_name": f"gtl-{run_name}-{group.name}",
        "nodes": opts.nodes if big else 1,
        # One rank per GPU on GPU nodes, one per node on CPU nodes.
        "ntasks_per_node": max(1, gpus) if big else 1,
        "cpus_per_task": max(cpus, cfg.shards.build_workers) if group.size == DATA else cpus,
        "time": (opts.time_min or c.timeout_min) if big else c.small_timeout_min,
        "signal_delay_s": c.signal_delay_s,
        "array_parallelism": c.array_parallelism,
        # --requeue lets submitit requeue after preemption; --kill-on-invalid-dep cancels the
        # dependants of a failed job rather than leaving them pending (DependencyNeverSatisfied).
        "additional_parameters": {"requeue": True, "kill-on-invalid-dep": "yes"},
        "setup": _job_setup(cfg),
    }
    if gpus and group.size != DATA:
        params["gpus_per_node"] = gpus if big else 1
    partition = opts.partition or c.partition
    if partition:
        params["partition"] = partition
    if c.mem_gb:
        params["mem"] = f"{c.mem_gb}GB"
    if dependency:
        params["dependency"] = dependency
    return params


def world_size(group: Group, cfg: RunConfig, opts: LaunchOptions) -> int:
    """Ranks of one task of ``group``: its SLURM job's nodes × tasks per node; with the local
    executor --nodes ranks for the big group and one otherwise; one in the launcher's process
    (debug)."""
    if opts.cluster == "slurm":
        params = slurm_parameters(group, cfg, opts, run_name="")
        return params["nodes"] * params["ntasks_per_node"]
    return opts.nodes if group.size == BIG and opts.cluster == "local" else 1


def _job_setup(cfg: RunConfig) -> list[str]:
    from gtl_dist.train.dist import extensions_dir
    # Jobs must find the DeepSpeed op the launcher prebuilt (never build inside a preemptible job).
    lines = [f"export GTL_TORCH_EXTENSIONS_DIR={extensions_dir()}"]
    return lines + list(cfg.cluster.setup)


def render_sbatch(group: Group, cfg: RunConfig, opts: LaunchOptions, run_dir: str | Path,
                  dependency: Optional[str] = None) -> str:
    """The sbatch script submitit would submit for ``group``, without submitting it.

    submitit has no public API for this; its private ``_make_sbatch_string`` is used, which is why
    pyproject.toml pins submitit exactly (tests/test_preflight.py renders scripts with it)."""
    from submitit.slurm.slurm import _make_sbatch_string
    params = slurm_parameters(group, cfg, opts, RunPaths(run_dir).root.name, dependency)
    if group.is_array:
        params["map_count"] = len(group.tasks)
    folder = RunPaths(run_dir).jobs / group.name / "%j"
    return _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {folder}",
                               folder=folder, **params)


# -- submission records -------------------------------------------------------------------------------

@dataclass
class Submission:
    job_id: str
    group: str
    input_hash: str
    cluster: str
    folder: str
    submitted: float = field(default_factory=time.time)

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


# -- task states --------------------------------------------------------------------------------------

def slurm_job_states(subs: list[Submission]) -> dict[str, str]:
    ids = sorted({s.job_id for s in subs if s.cluster == "slurm"})
    return job_states(ids) if ids else {}


# Every state task_state gives; failed and cancelled tasks need attention (see launchers/status.py).
TASK_STATES = ("done", "running", "pending", "failed", "cancelled", "stale", "not submitted")


def task_state(pipeline: Pipeline, paths: RunPaths, task: Task, sub: Optional[Submission],
               slurm_states: dict[str, str]) -> str:
    """One of TASK_STATES."""
    if marker_valid(pipeline, paths, task):
        return "done"
    if sub is None:
        return "not submitted"
    if sub.input_hash != pipeline.input_hash(task):
        return "stale"  # ran with other inputs; will be resubmitted
    result = sub.result()
    if result is not None and result[0] == "error":
        return "failed"
    if job_active(sub, slurm_states):
        pending = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING")
        return "pending" if slurm_states.get(sub.job_id) in pending else "running"
    if sub.cluster == "slurm":
        state = slurm_states.get(sub.job_id, "UNKNOWN")
        if state == "CANCELLED":
            return "cancelled"
        if state in ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
            return "failed"
        return "failed" if result is None and state == "COMPLETED" else "not submitted"
    return "failed" if result is not None else "not submitted"


def job_active(sub: Submission, slurm_states: dict[str, str]) -> bool:
    """Whether a recorded job may still write its task's files: queued, running or requeued on
    SLURM (as far as ``slurm_states`` knows), or a local job whose process lives."""
    if sub.cluster == "slurm":
        return slurm_states.get(sub.job_id) in ACTIVE_STATES
    return sub.cluster == "local" and pid_alive(sub.job_id, started=sub.submitted)


# -- the launcher ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Per task: done (skip), in flight (depend on it), or to run."""
    done: list[Task] = field(default_factory=list)
    in_flight: dict[Task, Submission] = field(default_factory=dict)
    to_run: list[Task] = field(default_factory=list)
    # Tasks whose inputs changed while a job made with the old ones still runs: check_prerequisites
    # refuses them, since a new job would share that job's directory.
    superseded: dict[Task, Submission] = field(default_factory=dict)


class Launcher:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, opts: LaunchOptions,
                 pipeline: Pipeline):
        self.cfg = cfg
        self.paths = RunPaths(Path(run_dir).resolve())
        self.opts = opts
        self.pipeline = pipeline
        self.subs = SubmissionLog(self.paths)
        self.runner = TaskRunner(cfg.to_dict(), str(self.paths.root))

    # planning ----------------------------------------------------------------------------
    def plan(self, query_slurm: bool = True) -> Plan:
        """States of every task in the DAG; only the selected groups' tasks are scheduled (the
        others count as inputs when they are done or queued). ``query_slurm=False`` (no
        controller to ask) counts recorded SLURM jobs as not queued."""
        plan = Plan()
        selected = set(self.pipeline.tasks)
        tasks = [t for g in self.pipeline.all_groups for t in g.tasks]
        subs = [s for t in tasks if (s := self.subs.get(t)) is not None]
        states = slurm_job_states(subs) if self.opts.cluster == "slurm" and query_slurm else {}
        for task in tasks:
            state = task_state(self.pipeline, self.paths, task, self.subs.get(task), states)
            if state == "done":
                plan.done.append(task)
            elif state in ("running", "pending") and self.opts.cluster != "debug":
                plan.in_flight[task] = self.subs.get(task)
            elif task in selected:
                plan.to_run.append(task)
                if state == "stale" and job_active(self.subs.get(task), states):
                    plan.superseded[task] = self.subs.get(task)
        return plan

    def check_prerequisites(self, plan: Plan) -> None:
        """Every task to run must have its inputs done, in flight, or about to run, and no job
        made with its old inputs may still run."""
        if plan.superseded:
            raise LaunchError(superseded_message(plan.superseded, self.paths.root))
        available = set(plan.done) | set(plan.in_flight) | set(plan.to_run)
        for task in plan.to_run:
            for dep in self.pipeline.task_deps(task):
                if dep not in available:
                    path = dep.marker(self.paths)
                    raise LaunchError(
                        f"{task.key} needs {dep.key}, which has not finished ({path} missing or "
                        f"made with other inputs) and is not queued: run it first (add "
                        f"'{self.pipeline.group_of(dep).name}' to --stages, or drop --stages)")

    def retire_stale_checkpoints(self, plan: Plan, on_event: Callable[[str], None] = print) -> None:
        """Training tasks about to run whose checkpoints were written with other inputs (after
        --update-config) start afresh; their old checkpoint folders are kept, renamed, with the
        old run's train_log.jsonl inside (a fresh start would truncate it, and until then its
        steps would show as the new run's progress)."""
        from gtl_dist.train.checkpoint import retire_stale
        for task in plan.to_run:
            if task.kind not in STAGES:
                continue
            # The pipeline's input hash is the one the stage's checkpoints carry (stage_input_hash).
            moved = retire_stale(self.paths.checkpoints(task.kind, task.target, task.fraction,
                                                        task.seed), self.pipeline.input_hash(task))
            if moved is not None:
                old_log = train_log_path(self.paths, task)
                if old_log.exists():
                    old_log.rename(moved / old_log.name)
                on_event(f"  {task.key}: its checkpoints were made with other inputs; kept as "
                         f"{moved} with their train log, the stage starts afresh")

    # submission ------------------------------------------------------------------------------
    def submit(self, plan: Plan) -> dict[str, list[str]]:
        """SLURM: submit every group's remaining tasks with afterok dependencies."""
        import submitit
        submitted: dict[Task, str] = {}
        out: dict[str, list[str]] = {}
        for group in self.pipeline.groups:
            todo = [t for t in group.tasks if t in plan.to_run]
            if not todo:
                continue
            dep_ids = sorted({self._job_of(d, plan, submitted) for t in todo
                              for d in self.pipeline.task_deps(t)} - {None})
            # Array elements are named "<array>_<index>": afterok waits for exactly those tasks.
            dependency = "afterok:" + ":".join(dep_ids) if dep_ids else None
            folder = self.paths.jobs / group.name / "%j"
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=self.cfg.cluster.max_requeue)
            executor.update_parameters(**slurm_parameters(group, self.cfg, self.opts,
                                                          self.paths.root.name, dependency))
            try:
                if group.is_array:
                    jobs = executor.map_array(self.runner, todo)
                else:
                    jobs = [executor.submit(self.runner, todo[0])]
            except Exception as exc:  # sbatch's own error, in one line
                raise LaunchError(f"submitting {group.name} failed: {_sbatch_error(exc)}") from None
            for task, job in zip(todo, jobs):
                submitted[task] = job.job_id
                self.subs.record(task, Submission(job.job_id, group.name, self.pipeline.input_hash(task),
                                                  "slurm", str(folder)))
            self.subs.save()
            out[group.name] = [j.job_id for j in jobs]
        return out

    def _job_of(self, dep: Task, plan: Plan, submitted: dict[Task, str]) -> Optional[str]:
        if dep in submitted:
            return submitted[dep]
        if dep in plan.in_flight:
            return plan.in_flight[dep].job_id
        return None

    # local / debug ---------------------------------------------------------------------------------
    def run_here(self, plan: Plan, on_event: Callable[[str], None] = print) -> list[Task]:
        """Run the remaining tasks on this machine. A task starts as soon as every task it reads
        has finished (not group by group), up to ``local_parallelism`` at a time (a multi-rank
        task takes one slot per rank); ``debug`` runs them one by one in this process. Local jobs
        of an earlier launch that still run are waited for, so the launcher holds the run
        directory until they end. Returns the failed tasks; their dependants are cancelled (not
        run) and reported. Running training tasks report their step now and then
        (``progress.TrainProgress``)."""
        progress = TrainProgress(self.pipeline, self.paths)
        failed: list[Task] = []
        cancelled: set[Task] = set()
        pending = [t for t in self.pipeline.tasks if t in plan.to_run]
        unfinished = set(pending) | set(plan.in_flight)  # anything else a task reads is done
        running: dict[Task, Any] = {}
        slots = max(1, self.opts.local_parallelism)
        while pending or running:
            for task in list(pending):
                deps = self.pipeline.task_deps(task)
                for dep in deps:
                    if dep in plan.in_flight:  # a local job of an earlier, interrupted launch
                        if self._await_local(dep, plan.in_flight.pop(dep), failed, on_event, progress):
                            unfinished.discard(dep)
                bad = [d for d in deps if d in failed or d in cancelled]
                if bad:
                    pending.remove(task)
                    cancelled.add(task)
                    on_event(f"  cancelled {task.key} (its input {bad[0].key} did not finish)")
                elif not any(d in unfinished for d in deps) and self._ranks(task) + sum(
                        self._ranks(t) for t in running) <= max(slots, self._ranks(task)) and (
                        not running or self.opts.cluster != "debug"):
                    pending.remove(task)
                    running[task] = self._start(task, slots, on_event)
            for task, job in list(running.items()):
                error = self._outcome(task, job)
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
            if running and self.opts.cluster != "debug":
                time.sleep(0.5)
        for task in self.pipeline.tasks:  # an earlier launch's jobs that no task here waited for
            if task in plan.in_flight and plan.in_flight[task].cluster == "local":
                self._await_local(task, plan.in_flight.pop(task), failed, on_event, progress)
        return failed

    def _ranks(self, task: Task) -> int:
        return world_size(self.pipeline.group_of(task), self.cfg, self.opts)

    def _start(self, task: Task, slots: int, on_event: Callable[[str], None]) -> Any:
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
    def _outcome(task: Task, job: Any) -> Optional[str] | bool:
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
            return f"{_first_line(exc)} (log: {job.paths.stderr})"

    def _await_local(self, task: Task, sub: Submission, failed: list[Task],
                     on_event: Callable[[str], None], progress: TrainProgress) -> bool:
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


def superseded_message(jobs: dict[Task, Submission], run_dir: Path) -> str:
    listed = [f"{task.key} ({'SLURM job' if sub.cluster == 'slurm' else 'local job, PID'} {sub.job_id})"
              for task, sub in jobs.items()]
    cancel = " / ".join(sorted({"scancel <job>" if sub.cluster == "slurm" else "kill <PID>"
                                for sub in jobs.values()}))
    return (f"{run_dir / 'jobs' / 'submissions.json'}: the inputs of {len(jobs)} task(s) changed "
            f"while their jobs, made with the old ones, still run: {'; '.join(listed[:5])}"
            f"{'; ...' if len(listed) > 5 else ''}. A new job would write into the same task "
            f"directories. Wait for them to end (python launchers/status.py --run-dir {run_dir}) "
            f"or cancel them ({cancel}), then launch again; nothing was submitted")


_ERROR_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt|Exit)\w*: ")


def _first_line(exc: BaseException) -> str:
    """The line that says what went wrong: submitit's FailedJobError embeds the remote traceback
    (and log paths after it), so take its last ``SomethingError: message`` line."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return line.strip()
    return lines[0].strip() if lines else type(exc).__name__


def _sbatch_error(exc: BaseException) -> str:
    text = str(exc)
    output = getattr(exc, "output", None) or getattr(exc, "stderr", None)
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    for source in (output or "", text):
        for line in source.splitlines():
            if "error" in line.lower():
                return line.strip()
    return _first_line(exc)

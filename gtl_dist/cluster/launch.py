"""Turn the pipeline DAG into jobs: plan what to run, check it, and submit it to SLURM.

SLURM (``--cluster slurm``): every group is submitted at once, single jobs with ``submit`` and
per-(target, fraction) groups as job arrays with ``map_array``, chained with ``afterok``
dependencies on the upstream groups' job ids; ``--kill-on-invalid-dep=yes`` makes SLURM cancel
the dependants of a failed job instead of leaving them pending forever. The launcher returns
after submitting (``--wait`` follows the run). ``--cluster local`` and ``--cluster debug`` run the
same plan on this machine (gtl_dist/cluster/local.py).

Re-running the launcher on the same run directory is safe: tasks with a valid completion marker
are skipped, tasks whose recorded job is still queued or running are not submitted again (their
job ids become dependencies), and everything else is (re)submitted; training stages resume from
their last committed checkpoint.

A submission's other parts: its flags and each job's ranks (options.py), the sbatch parameters
(sbatch.py), the submission records and task states (submissions.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from gtl_dist.cluster.dag import Pipeline
from gtl_dist.cluster.local import LocalRunner, first_error_line
from gtl_dist.cluster.options import LaunchError, LaunchOptions
from gtl_dist.cluster.progress import train_log_path
from gtl_dist.cluster.sbatch import slurm_parameters
from gtl_dist.cluster.submissions import Plan, Submission, SubmissionLog, job_active, slurm_job_states, task_state
from gtl_dist.cluster.tasks import TaskRunner
from gtl_dist.config import RunConfig
from gtl_dist.paths import RunPaths
from gtl_dist.stages import STAGES, Task


class Launcher:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, opts: LaunchOptions,
                 pipeline: Pipeline):
        self.cfg = cfg
        self.paths = RunPaths(Path(run_dir).resolve())
        self.opts = opts
        self.pipeline = pipeline
        self.subs = SubmissionLog(self.paths)
        self.runner = TaskRunner(cfg.to_dict(), str(self.paths.root), command=opts.command or None)

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
        """Run the remaining tasks on this machine (gtl_dist/cluster/local.py); the failed ones."""
        return LocalRunner(self.cfg, self.opts, self.pipeline, self.paths, self.subs,
                           self.runner).run(plan, on_event)


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


def _sbatch_error(exc: BaseException) -> str:
    text = str(exc)
    output = getattr(exc, "output", None) or getattr(exc, "stderr", None)
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    for source in (output or "", text):
        for line in source.splitlines():
            if "error" in line.lower():
                return line.strip()
    return first_error_line(exc)

"""Submit the whole GTL pipeline for one config: data, the source denoiser, per-(target, fraction)
classifiers / ratio nets / baselines, sampling and evaluation.

    python launchers/submit.py --config configs/arxiv.yaml --nodes 8 --gpus-per-node 8 \\
        --set data.path=/data/arxiv-metadata-oai-snapshot.json
    tensorboard --logdir runs/arxiv/tb
    python launchers/submit.py --config configs/arxiv.yaml --nodes 8 ...   # again after a
        # preemption or a crash: finished tasks are skipped, queued ones are not submitted twice,
        # the rest resume from their last committed checkpoint
    python launchers/submit.py --config configs/markov.yaml --cluster local --wait   # no SLURM

On SLURM the command submits every job (arrays with afterok dependencies), prints the job ids,
the run directory and the TensorBoard command, and returns; --wait follows the run to the end.
--cluster local and --cluster debug always run to the end on this machine.

Preflight: before anything is queued, the launcher checks what it can know from the config, the
plan and the cluster, and refuses with one line per problem (exit 2): global batches that do not
split over each stage's own world size, validation sets with fewer samples than ranks and target
fractions without data (once the data stage has run), the partition's nodes and GPUs (sinfo),
time limits shorter than one checkpoint interval (at a step time measured by an earlier run),
and free disk for the checkpoints. --plan prints the plan and the preflight's result without
submitting (--dry-run also the sbatch scripts); both work away from the cluster, skipping the
live SLURM queries with a note. Precondition: on SLURM the run directory (and shards.dir) must be
on a filesystem that every node shares; paths under /tmp, /dev/shm or /var/tmp get a warning.
See docs/operations.md, "Preflight".

One launcher per run directory: the launcher holds RUN_DIR/launcher.flock for its whole life
(with --wait or --cluster local, until the run ends) and records itself in RUN_DIR/launcher.lock.
A second launcher on the same run directory submits nothing and exits 3, naming the holder's PID
and host: wait for it, follow it with `python launchers/status.py --run-dir RUN_DIR`, or stop it
and launch again. A lock left by a launcher that died on this host is taken over with a warning.
--plan and --dry-run take no lock. See docs/operations.md, "One launcher per run directory".
Stopping: Ctrl-C or SIGTERM stops a launcher that runs the pipeline on this machine
(--cluster local or debug) together with its running jobs, which status.py then shows as
cancelled; the same command resumes (finished tasks are kept, training restarts from its last
checkpoint). A launcher killed outright leaves its jobs running; the next one waits for them.
Jobs submitted to SLURM keep running when a launcher that follows them stops.

Exit codes: 0 success (or submitted), 1 a task failed, 2 bad configuration or arguments,
3 another launcher holds the run directory, 130 stopped by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.cluster.estimate import MEASURED_STEPS, estimate_lines, local_threads, measure, read_rates
from gtl_dist.cluster.launch import Launcher
from gtl_dist.cluster.options import CLUSTERS, Interrupted, LaunchError, LaunchOptions, world_size
from gtl_dist.cluster.sbatch import render_sbatch
from gtl_dist.cluster.submissions import Plan, log_tail, task_state
from gtl_dist.cluster.preflight import Report, gather_facts, preflight
from gtl_dist.cluster.run_dir import check_writable, prepare_run_dir
from gtl_dist.cluster.run_lock import RunDirBusy, hold_run_dir
from gtl_dist.config import ConfigError, load_config
from gtl_dist.log import get_logger, quiet_closed_stdout, say, setup_logging
from gtl_dist.stages import TASK_KINDS

log = get_logger("submit")

# How the launcher is called from a clone of the repository; the gtl-submit entry point is the same.
PROG = "python launchers/submit.py"
EXIT_STOPPED = 130  # as a shell reports a command ended by SIGINT
FAILED_LOG_LINES = 15  # of each failed task's error log, printed when the launcher ends
# Numeric flags: (flag, argparse dest, least value, what it counts).
FLAG_MINIMUMS = (("--nodes", "nodes", 1, "nodes of the source stage's job"),
                 ("--gpus-per-node", "gpus_per_node", 0, "GPUs per node (0: CPU-only nodes)"),
                 ("--cpus-per-task", "cpus_per_task", 1, "CPUs of each task"),
                 ("--time", "time", 1, "minutes of the source stage's time limit"),
                 ("--local-parallelism", "local_parallelism", 1, "tasks --cluster local runs at once"))


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, metavar="YAML",
                   help="experiment config (configs/*.yaml); repeat to layer overlays, later wins")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any config key, e.g. --set train.denoiser.steps=1000 (repeatable)")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes for the source denoiser (and AR/AR2Diff) job; the small "
                        "per-target jobs use one task each (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node; the denoiser runs one rank per GPU (default: cluster.gpus_per_node)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per task (default: cluster.cpus_per_task)")
    p.add_argument("--partition", default=None, help="SLURM partition (default: cluster.partition "
                                                     "or the cluster's default partition)")
    p.add_argument("--time", type=int, default=None, metavar="MIN",
                   help="time limit of the denoiser job in minutes (default: cluster.timeout_min)")
    p.add_argument("--cluster", choices=CLUSTERS, default=None,
                   help="slurm: submit with sbatch; local: submitit's local executor on this "
                        "machine; debug: in this process (default: slurm if sbatch is on PATH, "
                        "else local)")
    p.add_argument("--run-dir", default=None,
                   help="run directory (default: runs/<config name>); it holds data, checkpoints, "
                        "samples, TensorBoard events and the report. On SLURM it must be on a "
                        "filesystem that every node shares")
    p.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help=f"run only these stages ({' '.join(TASK_KINDS)})")
    p.add_argument("--wait", action="store_true",
                   help="SLURM: follow the run until every task finished or one failed")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="MIN",
                   help="give up following after this many minutes (jobs keep running)")
    p.add_argument("--local-parallelism", type=int, default=os.cpu_count() or 1,
                   help="--cluster local: tasks run at once, each with its share of the cores "
                        "(default: the number of cores, %(default)s here)")
    p.add_argument("--update-config", action="store_true",
                   help="let an existing run directory adopt a changed config (default: refuse, "
                        "naming the changed keys); only tasks whose inputs changed run again, "
                        "e.g. only GTL sampling and the report after --set sample.gamma=3")
    p.add_argument("--plan", action="store_true",
                   help="print the plan and the preflight's result, submit nothing; exit 2 when the "
                        "preflight refuses (works away from the cluster: live SLURM queries are "
                        "skipped with a note)")
    p.add_argument("--dry-run", action="store_true",
                   help="--plan, and print the sbatch scripts (rendered offline)")
    p.add_argument("--estimate", action="store_true",
                   help="--plan, and estimate each stage's wall time by training it a few steps at full "
                        "size (and sampling one batch per method) on this machine, over the run's built "
                        "shards; without it, the plan estimates from this run directory's own logs when "
                        "it has any")
    p.add_argument("--publish", default=None, metavar="DIR",
                   help="when the run ends with its report (--wait, --cluster local or debug), copy "
                        "report.md, results.csv and plots/ into DIR (e.g. results/markov/main), replacing "
                        "a report DIR held; a DIR with other files is refused before anything runs")
    return p.parse_args(argv)


def flag_problems(args: argparse.Namespace) -> list[str]:
    """One line per flag that cannot work (a number outside its range, a --publish folder that
    publishing would destroy), naming the flag and the fix."""
    problems = []
    for flag, dest, least, what in FLAG_MINIMUMS:
        value = getattr(args, dest)
        if value is not None and value < least:
            problems.append(f"{flag} {value}: the {what} must be at least {least}; use {flag} {max(least, 1)} "
                            f"or more" + (" (0 for CPU-only nodes)" if least == 0 else ""))
    if args.publish is not None:
        from gtl_dist.eval.report import publish_problem
        problems += filter(None, [publish_problem(Path(args.publish))])
    if args.wait_timeout is not None and not args.wait_timeout > 0:
        problems.append(f"--wait-timeout {args.wait_timeout}: give the minutes to follow the run, a number "
                        f"above 0, or leave the flag out to follow it to its end")
    return problems


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The launcher; its exit codes are the module docstring's."""
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join([prog, *(shlex.quote(a) for a in argv)])  # the report cites it
    with quiet_closed_stdout(), _sigterm_stops(), ExitStack() as held:  # held: the run directory's lock
        try:
            return _launch(argv, prog, command, held)
        except Interrupted as exc:
            shown = ", ".join(t.key for t in exc.stopped[:4]) + (", ..." if len(exc.stopped) > 4 else "")
            stopped = (f"its {len(exc.stopped)} running job(s) ({shown}) stopped with it" if exc.stopped
                       else "no job was running")
            print(f"stopped by {exc.signal_name}: {stopped}; finished tasks are kept and training resumes "
                  f"from its last checkpoint. Resume with: {command}", file=sys.stderr)
            return EXIT_STOPPED
        except KeyboardInterrupt as exc:  # before or after running jobs here: nothing left running
            print(f"stopped by {str(exc) or 'Ctrl-C'}: what finished or was submitted is kept. "
                  f"Resume with: {command}", file=sys.stderr)
            return EXIT_STOPPED
    return 1  # its reader closed the output before the launcher finished (quiet_closed_stdout)


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM (``kill <pid>``, a scheduler ending the launcher) stops it as Ctrl-C does."""
    def stop(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cli() -> None:
    """The ``gtl-submit`` command (pyproject.toml)."""
    setup_logging()
    sys.exit(main(prog="gtl-submit"))


def _launch(argv: list[str], prog: str, command: str, held: ExitStack) -> int:
    args = parse_args(argv, prog)
    problems = flag_problems(args)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    cluster = args.cluster or ("slurm" if shutil.which("sbatch") else "local")
    preview = args.plan or args.dry_run or args.estimate
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir or Path("runs") / cfg.name).resolve()
        pipeline = build_pipeline(cfg, only=args.stages)
        opts = LaunchOptions(cluster=cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                             cpus_per_task=args.cpus_per_task, partition=args.partition,
                             time_min=args.time, local_parallelism=args.local_parallelism,
                             command=command, cluster_chosen=args.cluster is not None)
        check_writable(run_dir)
        if not preview:
            held.enter_context(hold_run_dir(run_dir, command))
        facts = gather_facts(opts, run_dir)
        launcher = Launcher(cfg, run_dir, opts, pipeline)
        plan = launcher.plan(query_slurm=facts.slurm_error is None)
        launcher.check_prerequisites(plan)
        source = " + ".join(args.config + ["--set"] * bool(args.overrides))
        report = preflight(cfg, opts, pipeline, plan, run_dir, facts, source, live=not preview)
        _print_plan(run_dir, launcher, plan)
        if _print_report(report):
            return 2
        _print_estimate(cfg, run_dir, launcher, plan, measure_now=args.estimate)
        # Only now: a refused submission leaves no config behind to refuse its corrected retry.
        prepare_run_dir(cfg, run_dir, update=args.update_config, write=not preview)
    except RunDirBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, LaunchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if not plan.to_run:
        busy = [t for t in pipeline.tasks if t in plan.in_flight]
        print("nothing to submit" + (" (jobs still queued/running)" if busy else
                                     ": every task is done"))
        if preview:
            return 0
        if busy and cluster == "local":  # an earlier launch's local jobs: hold the run until they end
            return _report_end(run_dir, launcher.run_here(plan, on_event=say), launcher, args.publish)
        return _finish(run_dir, launcher, args, cluster, follow=bool(busy) and args.wait)

    if preview:
        if args.dry_run and cluster == "slurm":
            for group in pipeline.groups:
                if any(t in plan.to_run for t in group.tasks):
                    print(f"\n# ---- {group.name} ----")
                    upstream = "afterok:<job ids of " + ", ".join(group.deps) + ">" if group.deps else None
                    print(render_sbatch(group, cfg, opts, run_dir, dependency=upstream))
        return 0

    launcher.retire_stale_checkpoints(plan)
    if cluster != "debug":
        from gtl_dist.train.dist import prebuild_ops
        prebuild_ops()  # jobs must never JIT-build it inside a preemptible step

    if cluster == "slurm":
        try:
            submitted = launcher.submit(plan)
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for name, ids in submitted.items():
            shown = ", ".join(ids[:4]) + (f", ... ({len(ids)} tasks)" if len(ids) > 4 else "")
            print(f"  submitted {name:<14} {shown}")
        return _finish(run_dir, launcher, args, cluster, follow=args.wait)

    print(f"tensorboard --logdir {run_dir / 'tb'}")
    failed = launcher.run_here(plan, on_event=say)
    return _report_end(run_dir, failed, launcher, args.publish)


def _print_plan(run_dir: Path, launcher: Launcher, plan: Plan) -> None:
    print(f"run directory: {run_dir}")
    for group in launcher.pipeline.groups:
        n_done = sum(t in plan.done for t in group.tasks)
        n_flight = sum(t in plan.in_flight for t in group.tasks)
        n_run = sum(t in plan.to_run for t in group.tasks)
        ranks = world_size(group, launcher.cfg, launcher.opts)
        print(f"  {group.name:<14} {len(group.tasks):>3} task(s): {n_done} done, {n_flight} queued/running, "
              f"{n_run} to run" + (f" ({ranks} ranks each)" if ranks > 1 else ""))


def _print_estimate(cfg, run_dir: Path, launcher: Launcher, plan: Plan, measure_now: bool) -> None:
    """The wall time of what is to run: measured now (--estimate), or from the run directory's own
    logs when it has some (gtl_dist/cluster/estimate.py)."""
    if not plan.to_run:
        return
    if measure_now:
        rates = measure(cfg, run_dir, launcher.opts, launcher.pipeline.group_names, on_event=say)
        threads = local_threads(launcher.opts)
        origin = (f"measured just now on this machine: each stage {MEASURED_STEPS} steps at full size, "
                  f"{threads} thread{'s' * (threads > 1)} per task, one rank")
    else:
        rates = read_rates(launcher.pipeline, launcher.paths)
        origin = "from the rates this run directory's tasks logged"
        if not (rates.step_s or rates.sample_s):
            return
    for line in estimate_lines(launcher.pipeline, plan, rates, launcher.opts, origin):
        say(line)


def _print_report(report: Report) -> bool:
    """Print the preflight's notes and problems; True when it refuses."""
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    if report.refused:
        print(f"preflight: {len(report.problems)} problem(s); nothing was submitted", file=sys.stderr)
    else:
        print("preflight: passed")
    return report.refused


def _finish(run_dir: Path, launcher: Launcher, args, cluster: str, follow: bool) -> int:
    print(f"tensorboard --logdir {run_dir / 'tb'}")
    print(f"status:     python launchers/status.py --run-dir {run_dir}")
    if not follow or cluster != "slurm":
        return _report_end(run_dir, [], publish=args.publish) if args.publish else 0
    return _follow(run_dir, launcher, args.wait_timeout, args.publish)


def _follow(run_dir: Path, launcher: Launcher, timeout_min: float | None, publish: str | None) -> int:
    """Poll task states until everything is done or nothing is left running; running training
    tasks report their step now and then. Ctrl-C stops following, not the jobs."""
    try:
        return _poll(run_dir, launcher, timeout_min, publish)
    except KeyboardInterrupt as exc:
        print(f"stopped following ({str(exc) or 'Ctrl-C'}); the submitted jobs keep running: "
              f"python launchers/status.py --run-dir {run_dir}", file=sys.stderr)
        return EXIT_STOPPED


def _poll(run_dir: Path, launcher: Launcher, timeout_min: float | None, publish: str | None) -> int:
    from gtl_dist.cluster.progress import TrainProgress
    from gtl_dist.cluster.submissions import slurm_job_states
    deadline = None if timeout_min is None else time.monotonic() + 60 * timeout_min
    last: dict[str, str] = {}
    tasks = launcher.pipeline.tasks
    progress = TrainProgress(launcher.pipeline, launcher.paths)
    while True:
        states = slurm_job_states([s for t in tasks if (s := launcher.subs.get(t)) is not None])
        now = {t.key: task_state(launcher.pipeline, launcher.paths, t, launcher.subs.get(t), states)
               for t in tasks}
        for key, state in now.items():
            if last.get(key) != state:
                say(f"  {time.strftime('%H:%M:%S')} {key:<32} {state}")
        for line in progress.lines(t for t in tasks if now[t.key] == "running"):
            say(f"  {time.strftime('%H:%M:%S')} {line}")
        last = now
        failed = [t for t in tasks if now[t.key] in ("failed", "cancelled")]
        active = [t for t in tasks if now[t.key] in ("running", "pending")]
        if not active:
            return _report_end(run_dir, failed, launcher, publish)
        if deadline is not None and time.monotonic() > deadline:
            print(f"stopped following after {timeout_min} min; jobs keep running "
                  f"(python launchers/status.py --run-dir {run_dir})")
            return 0
        time.sleep(10)


def _report_end(run_dir: Path, failed: list, launcher: Launcher | None = None,
                publish: str | None = None) -> int:
    if failed:
        print(f"{len(failed)} task(s) failed:", file=sys.stderr)
        for task in failed:
            sub = launcher.subs.get(task) if launcher else None
            where = f" (log: {sub.log_paths()[1]})" if sub else ""
            print(f"  {task.key}{where}", file=sys.stderr)
            if sub:
                for line in log_tail(sub.log_paths()[1], FAILED_LOG_LINES):
                    print(f"    | {line}", file=sys.stderr)
        print(f"see: python launchers/status.py --run-dir {run_dir}", file=sys.stderr)
        return 1
    report = run_dir / "eval" / "report.md"
    print(f"done. report: {report}" if report.is_file() else "done.")
    if publish and report.is_file():
        from gtl_dist.eval.report import publish_report
        print(f"published: {publish_report(run_dir / 'eval', Path(publish))}")
    return 0

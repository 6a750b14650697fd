"""Show a run's state: one row per task (stage × target × fraction, and sample shards) with its
state (done, running, pending, failed, cancelled, stale, not submitted), training step/total, the
last training loss, the job id, and for failures the log to read.

    python launchers/status.py --run-dir runs/arxiv
    python launchers/status.py --run-dir runs/arxiv --only failed

Exit status: 0, or 1 when any task of the run failed or was cancelled (whatever --only shows),
2 for bad arguments or a folder that is not a run directory.

State comes from the completion markers, the launcher's submission log and SLURM (``squeue``,
which works without accounting); progress from each training stage's ``train_log.jsonl``
(gtl_dist/cluster/progress.py, which also prints a following launcher's progress lines).
Installed, the same command is ``gtl-status``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from gtl_dist.cluster.dag import Pipeline, build_pipeline
from gtl_dist.cluster.submissions import TASK_STATES, SubmissionLog, slurm_job_states, task_state
from gtl_dist.cluster.progress import last_train_record, task_steps
from gtl_dist.config import RunConfig, config_from_dict
from gtl_dist.log import quiet_closed_stdout, setup_logging
from gtl_dist.paths import RunPaths, fraction_name
from gtl_dist.stages import STAGES, Task


@dataclass
class StatusRow:
    stage: str
    target: str
    fraction: str
    detail: str  # method/shard for sample tasks
    state: str
    step: Optional[int]
    total: Optional[int]
    loss: Optional[float]
    job: str
    log: str


def _progress(cfg: RunConfig, paths: RunPaths, task: Task) -> tuple[Optional[int], Optional[float]]:
    """Last logged training step (over all the runs of the task's grid) and loss."""
    rec = last_train_record(cfg, paths, task) or {}
    return rec.get("step"), rec.get("loss")


def load_run(run_dir: str | Path) -> tuple[Pipeline, RunPaths]:
    paths = RunPaths(run_dir)
    if not paths.config_yaml.is_file():
        raise FileNotFoundError(f"{paths.config_yaml}: not found; is {paths.root} a run directory made "
                                f"by launchers/submit.py?")
    cfg = config_from_dict(yaml.safe_load(paths.config_yaml.read_text()), str(paths.config_yaml), strict=False)
    return build_pipeline(cfg), paths


def status_rows(run_dir: str | Path) -> list[StatusRow]:
    pipeline, paths = load_run(run_dir)
    subs = SubmissionLog(paths)
    records = [s for t in pipeline.tasks if (s := subs.get(t)) is not None]
    try:
        states = slurm_job_states(records)
    except Exception as exc:  # no controller reachable: show what the files say
        states = {}
        print(f"(SLURM not reachable: {exc})")
    rows = []
    for task in pipeline.tasks:
        sub = subs.get(task)
        state = task_state(pipeline, paths, task, sub, states)
        step = loss = total = None
        if task.kind in STAGES:
            total = task_steps(pipeline.cfg, task)
            step, loss = _progress(pipeline.cfg, paths, task)
            if state == "done":
                step = total
        detail = " ".join(x for x in ("" if task.kind != "sample" else f"{task.method}#{task.shard}",
                                      f"seed{task.seed}" if task.seed else "") if x)
        log = str(sub.log_paths()[1]) if sub is not None and state in ("failed", "cancelled") else ""
        rows.append(StatusRow(task.kind, task.target or "-",
                              fraction_name(task.fraction) if task.fraction is not None else "-",
                              detail, state, step, total, loss, sub.job_id if sub else "", log))
    return rows


def format_table(rows: list[StatusRow]) -> str:
    head = ["stage", "target", "fraction", "detail", "state", "step", "last loss", "job", "log"]
    body = [[r.stage, r.target, r.fraction, r.detail, r.state,
             "" if r.total is None else f"{r.step if r.step is not None else 0}/{r.total}",
             "" if r.loss is None else f"{r.loss:.4f}", r.job, r.log] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return "\n".join(lines + ["", f"{len(rows)} tasks: {summary}"])


FAILED_STATES = ("failed", "cancelled")
PROG = "python launchers/status.py"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\nState comes")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the run directory launchers/submit.py made")
    p.add_argument("--only", default=None, metavar="STATE", choices=TASK_STATES,
                   help=f"show only tasks in this state, one of: {', '.join(TASK_STATES)}")
    args = p.parse_args(argv)
    try:
        rows = status_rows(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = sum(r.state in FAILED_STATES for r in rows)
    with quiet_closed_stdout():  # `status.py | head`
        print(format_table([r for r in rows if args.only in (None, r.state)]))
    if failed:
        config = RunPaths(args.run_dir).config_yaml
        print(f"{failed} task(s) failed or cancelled: read the logs listed above, then resubmit: "
              f"python launchers/submit.py --config {config} --run-dir {args.run_dir}", file=sys.stderr)
    return 1 if failed else 0


def cli() -> None:
    """The ``gtl-status`` command (pyproject.toml)."""
    setup_logging()
    sys.exit(main(prog="gtl-status"))

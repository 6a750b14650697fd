#!/usr/bin/env python
"""Show a run's state: one row per task (stage × target × fraction, and sample shards) with its
state (done, running, pending, failed, cancelled, stale, not submitted), training step/total, the
last training loss, the job id, and for failures the log to read.

    python launchers/status.py --run-dir runs/arxiv
    python launchers/status.py --run-dir runs/arxiv --only failed

Exit status: 0, or 1 when any task of the run failed or was cancelled (whatever --only shows),
2 for bad arguments or a folder that is not a run directory.
"""

from __future__ import annotations

import argparse
import sys

from gtl_dist.cluster.launch import TASK_STATES
from gtl_dist.cluster.status import format_table, status_rows
from gtl_dist.log import setup_logging
from gtl_dist.paths import RunPaths

FAILED_STATES = ("failed", "cancelled")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launchers/status.py", description=__doc__,
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
    print(format_table([r for r in rows if args.only in (None, r.state)]))
    if failed:
        config = RunPaths(args.run_dir).config_yaml
        print(f"{failed} task(s) failed or cancelled: read the logs listed above, then resubmit: "
              f"python launchers/submit.py --config {config} --run-dir {args.run_dir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())

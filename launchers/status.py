#!/usr/bin/env python
"""Show a run's state: one row per task (stage × target × fraction, and sample shards) with its
state (done, running, pending, failed, cancelled, stale, not submitted), training step/total, the
last training loss, the job id, and for failures the log to read.

    python launchers/status.py --run-dir runs/arxiv
"""

from __future__ import annotations

import argparse
import sys

from gtl_dist.cluster.status import format_table, status_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launchers/status.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the run directory launchers/submit.py made")
    p.add_argument("--only", default=None, metavar="STATE",
                   help="show only tasks in this state (e.g. failed)")
    args = p.parse_args(argv)
    try:
        rows = status_rows(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.only:
        rows = [r for r in rows if r.state == args.only]
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Show a run's state, one row per task (gtl_dist/cluster/status.py; `--help` says how).
Installed, the same command is `gtl-status`."""

import sys

from gtl_dist.cluster.status import main
from gtl_dist.log import setup_logging

if __name__ == "__main__":
    setup_logging()
    sys.exit(main())

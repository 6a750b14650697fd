#!/usr/bin/env python
"""Submit the whole GTL pipeline for one config (gtl_dist/cluster/submit.py; `--help` says how).
Installed, the same command is `gtl-submit`."""

import sys

from gtl_dist.cluster.submit import main
from gtl_dist.log import setup_logging

if __name__ == "__main__":
    setup_logging()
    sys.exit(main())

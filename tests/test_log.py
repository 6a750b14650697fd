"""Logs a cluster user can read: every line names its rank and task, importing the package
configures nothing, and a task has one name in the launcher, the trainer and the logs."""

from __future__ import annotations

import re
import subprocess
import sys

from gtl_dist.paths import task_name
from gtl_dist.stages import Task


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_the_package_configures_no_handler():
    out = _run("import logging, gtl_dist.cluster.launch, gtl_dist.train.loop, gtl_dist.eval.evaluate\n"
               "print(logging.getLogger('gtl_dist').handlers, logging.getLogger().handlers)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"


def test_every_line_names_the_rank_and_the_task_once_known():
    out = _run("from gtl_dist.log import get_logger, set_log_context, setup_logging\n"
               "setup_logging(); log = get_logger('x')\n"
               "log.info('before')\n"
               "set_log_context(task='ratio/physics/0.05'); log.info('task known')\n"
               "set_log_context(rank=3); log.info('rank known')\n"
               "setup_logging(); log.info('configured once')\n")
    assert out.returncode == 0, out.stderr
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d", "[T", line) for line in out.stderr.splitlines()]
    assert lines == ["[T] before", "[T ratio/physics/0.05] task known", "[T r3 ratio/physics/0.05] rank known",
                     "[T r3 ratio/physics/0.05] configured once"]


def test_a_task_has_one_name_everywhere():
    assert Task("ratio", "physics", 1.0).key == task_name("ratio", target="physics", fraction=1.0) == "ratio/physics/1"
    assert Task("sample", "physics", 0.05, method="gtl", shard=0, seed=2).key == "sample/gtl/physics/0.05/seed2/shard0"
    assert task_name("denoiser") == "denoiser"

"""Processes of this host, through psutil: whether a recorded process is still the one recorded,
and stopping a process together with everything it started.

A PID alone names a process only while it lives: the kernel hands the number to a later process
once it ends. So a process is recorded with a time, and a process with that PID that started
later is another one.
"""

from __future__ import annotations

import os
from typing import Optional

import psutil

# How much later than its recorded start a process may have started and still be the one recorded:
# the start times compared come from different clocks (psutil's is accurate to about a second).
START_SLACK_S = 5.0


def pid_alive(pid: int | str, started: float | None = None) -> bool:
    """Whether process ``pid`` runs on this host (one of another user counts as running).

    ``started`` is when the process was recorded as running (a ``time.time()`` taken after it
    started). A process with that PID that started later than this (plus START_SLACK_S) is another
    one, which got the PID after the recorded process ended, and counts as not running: a
    launcher would otherwise wait on it forever."""
    try:
        process = psutil.Process(int(pid))
        return started is None or process.create_time() <= started + START_SLACK_S
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return True


def start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (psutil's ``create_time``, the same number every time it is
    asked), or None when no such process runs. A zombie counts as ended, and is reaped when it is
    a child of this process."""
    try:
        process = psutil.Process(pid)
        if process.status() != psutil.STATUS_ZOMBIE:
            return process.create_time()
    except psutil.NoSuchProcess:
        return None
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return None


def is_running(pid: int, started: float) -> bool:
    """Whether the process recorded as (``pid``, ``started`` = its start_time) still runs."""
    return start_time(pid) == started


def stop_tree(pid: int | str, started: float | None = None, grace_s: float = 10.0) -> list[int]:
    """Stop process ``pid`` (if it is still the one recorded at ``started``, as for pid_alive) with
    everything it started: SIGKILL to all its descendants, then ``grace_s`` for it to notice and end
    on its own (a job controller that sees its tasks gone), SIGKILL if it does not. Returns the PIDs
    that were running."""
    if not pid_alive(pid, started):
        return []
    try:
        root = psutil.Process(int(pid))
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    _kill(descendants)
    _, alive = psutil.wait_procs([root], timeout=grace_s)
    _kill(alive)
    return [p.pid for p in (root, *descendants)]


def _kill(processes: list[psutil.Process]) -> None:
    """SIGKILL each of ``processes`` still running, and wait (up to 5 s) for them to end."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=5)

"""One launcher per run directory.

``launchers/submit.py`` holds an exclusive flock on ``<run>/launcher.flock`` (gtl_dist/locks.py)
for its whole life: planning, submission and, with ``--wait`` or ``--cluster local``, following the
run to its end. ``<run>/launcher.lock`` records the holder (PID, host, start time, command; written
atomically, deleted when the launcher ends), so that a second launcher can refuse naming it.

The flock decides; the record covers what the flock cannot see:

- flock held: another launcher runs; refuse, naming it.
- flock free, no record: the run directory is free.
- flock free, a record of this host: its launcher died without cleaning up (the kernel released
  its flock); take over, with a warning.
- flock free, a record of another host: its PID cannot be checked from here, and on a filesystem
  whose flocks are not shared between hosts (see gtl_dist/locks.py) that launcher may still run;
  refuse, saying to delete the record if no launcher runs there any more.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from gtl_dist.cluster.options import LaunchError
from gtl_dist.io import atomic_write_json, read_json
from gtl_dist.locks import flocked
from gtl_dist.processes import pid_alive
from gtl_dist.log import get_logger

log = get_logger("cluster.run_lock")

FLOCK_NAME = "launcher.flock"  # the file locked; never replaced or deleted
RECORD_NAME = "launcher.lock"  # who holds it


class RunDirBusy(LaunchError):
    """Another launcher holds the run directory; the message names it and what to do."""


@dataclass
class Holder:
    pid: int
    host: str
    started: float
    command: str = ""

    def __str__(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"PID {self.pid} on host {self.host} (started {when}" + (f"; {self.command})" if self.command else ")")


@contextmanager
def hold_run_dir(run_dir: str | os.PathLike, command: str = "") -> Iterator[Holder]:
    """Hold ``run_dir`` for this launcher for the block (creating the folder); raises RunDirBusy
    when another launcher holds it."""
    root = Path(run_dir)
    record = root / RECORD_NAME
    with flocked(root / FLOCK_NAME, wait=False) as got:
        if not got:
            raise RunDirBusy(_busy(root, _live_holder(record)))
        previous = _read_holder(record)
        if previous is not None:
            _take_over(root, previous)
        me = Holder(os.getpid(), socket.gethostname(), time.time(), command)
        atomic_write_json(record, asdict(me))
        try:
            yield me
        finally:
            record.unlink(missing_ok=True)


def _read_holder(record: Path) -> Optional[Holder]:
    try:
        return Holder(**read_json(record))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # damaged or foreign: the flock alone decides
        log.warning("%s: not a launcher record; ignoring it", record)
        return None


def _live_holder(record: Path) -> Optional[Holder]:
    """The record of the launcher holding the lock. One that has just taken it writes its record
    right after, so a missing record, or one of a dead process of this host, is read again a few
    times (2 s) first."""
    for _ in range(20):
        holder = _read_holder(record)
        if holder is not None and (holder.host != socket.gethostname() or pid_alive(holder.pid, holder.started)):
            return holder
        time.sleep(0.1)
    return holder


def _busy(root: Path, holder: Optional[Holder]) -> str:
    who = f"launcher {holder}" if holder else "a launcher that has not recorded itself yet"
    return (f"{root / RECORD_NAME}: {root} is held by {who}. One launcher drives a run directory "
            f"at a time: wait for it to end, follow it with `python launchers/status.py --run-dir "
            f"{root}`, or stop it (kill {holder.pid if holder else '<pid>'} on its host) and launch "
            f"again; finished tasks are kept")


def _take_over(root: Path, holder: Holder) -> None:
    record = root / RECORD_NAME
    if holder.host != socket.gethostname():
        raise RunDirBusy(
            f"{record}: recorded by launcher {holder}, whose PID cannot be checked from host "
            f"{socket.gethostname()}; its lock ({root / FLOCK_NAME}) is free here, so it ended "
            f"without cleaning up, or this filesystem does not share locks between hosts. If no "
            f"launcher of {root} runs on {holder.host} any more, delete {record} and launch again; "
            f"otherwise wait for it or follow it with `python launchers/status.py --run-dir {root}`")
    why = ("does not hold the lock, so its PID now belongs to another process" if pid_alive(holder.pid)
           else "ended without releasing the run directory")
    log.warning("%s: taking over from launcher %s, which %s", record, holder, why)

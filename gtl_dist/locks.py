"""Advisory locks between processes: ``fcntl.flock`` on a lock file.

A lock file is created once and never replaced or deleted while in use (replacing it would let
two processes lock two different files of one name), so it holds no content; whoever needs to say
who holds a lock writes that to another file. The kernel releases a flock when its holder exits,
however it exits (crash, ``kill -9``), so a dead process never keeps a lock. flock locks belong
to an open file, not to a process: two threads that each open the file exclude each other too.

Shared filesystems: Linux's NFS client (NFSv4, or v3 with lockd) turns flock into byte-range locks
that every client sees, GPFS supports it, and Lustre does with its ``flock`` mount option. With
Lustre's ``localflock`` or NFS mounted ``nolock`` / ``local_lock=flock`` a lock is seen only on the
host that took it; it still excludes processes of one host, and gtl_dist/cluster/run_lock.py
covers launchers on two hosts with the holder it records.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class LockError(OSError):
    """The filesystem refused to lock a file; the message names it and the fix."""


@contextmanager
def flocked(path: str | os.PathLike, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold a flock on ``path`` (created, with its folder, if missing) for the block: exclusive, or
    ``shared`` with other shared holders. Yields True; with ``wait=False`` it yields False at once,
    holding nothing, when another holder's lock conflicts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        yield _lock(fd, path, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, path: Path, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode)
    except BlockingIOError:
        return False
    except OSError as exc:  # ENOLCK, ENOSYS, EOPNOTSUPP: a filesystem without flock
        raise LockError(exc.errno, f"{path}: cannot lock ({exc.strerror}); this filesystem does not "
                        f"support flock (e.g. Lustre without the flock mount option, NFS without "
                        f"lockd): put the run directory and shards.dir on one that does") from None
    return True

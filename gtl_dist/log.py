"""Console logging and progress output (TensorBoard lives in ``gtl_dist.train.metrics``).

On a terminal, long loops show a progress bar; in batch jobs (SLURM logs, CI) they print a
plain line every few seconds instead, so logs stay readable.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

# Who is logging, added to every line once known: the rank (set where torch.distributed starts)
# and the pipeline task (set where a task starts), e.g. "[12:00:01 r1 ratio/physics/0.05]".
_CONTEXT: dict[str, str] = {}


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.where = "".join(f" {_CONTEXT[k]}" for k in ("rank", "task") if k in _CONTEXT)
        return True


def setup_logging(level: str | int | None = None) -> None:
    """Send the ``gtl_dist`` loggers to stderr as ``[time rank task] message``.

    Programs call this once, in their ``main`` (launchers, scripts, a pipeline task's process);
    importing gtl_dist configures no handler. The level defaults to $GTL_LOG_LEVEL or INFO.
    """
    logger = logging.getLogger("gtl_dist")
    logger.setLevel(level or os.environ.get("GTL_LOG_LEVEL", "INFO"))
    if any(isinstance(f, _ContextFilter) for h in logger.handlers for f in h.filters):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(logging.Formatter("[%(asctime)s%(where)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)


def set_log_context(*, rank: int | None = None, task: str | None = None) -> None:
    """Name the rank and/or the task in every later log line of this process."""
    if rank is not None:
        _CONTEXT["rank"] = f"r{rank}"
    if task is not None:
        _CONTEXT["task"] = task


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("gtl_dist") else f"gtl_dist.{name}")


def _stdout_to_devnull() -> None:
    """From now on, what this process prints goes nowhere (its reader has gone)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def say(line: str) -> None:
    """Print one line of a command's progress now. A reader that stops reading (``| head``)
    does not stop the command: the rest of its output goes nowhere."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        _stdout_to_devnull()


@contextmanager
def quiet_closed_stdout() -> Iterator[None]:
    """Let a command's reader stop early (``status.py | head``): the output it no longer reads is
    dropped quietly, without a BrokenPipeError traceback, and the command exits as it would have
    (a closed pipe raised inside the block ends the block, as at its end)."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()


def is_interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("GTL_NO_PROGRESS_BAR") is None


class Progress:
    """A minimal progress reporter: a redrawn bar on a TTY, periodic log lines otherwise."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", every_s: float = 10.0,
                 enabled: bool = True, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.every_s = every_s
        self.enabled = enabled
        self.tty = is_interactive()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.postfix = ""
        self.log = get_logger("progress")

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if not self.enabled:
            return
        if self.tty:
            if now - self.last > 0.2 or done:
                self.last = now
                sys.stderr.write("\r" + self._line(now) + ("\n" if done else ""))
                sys.stderr.flush()
        elif now - self.last >= self.every_s or done:
            self.last = now
            self.log.info(self._line(now))

    def _line(self, now: float) -> str:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.n / elapsed
        if self.total:
            frac = min(self.n / self.total, 1.0)
            width = 24
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
            core = f"{self.desc} [{bar}] {self.n}/{self.total} {rate:.2f} {self.unit}/s eta {eta_s}"
        else:
            core = f"{self.desc} {self.n} {rate:.2f} {self.unit}/s"
        return core + (f" {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.enabled and self.tty and (self.total is None or self.n < self.total):
            sys.stderr.write("\n")

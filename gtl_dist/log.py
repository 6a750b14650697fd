"""Console logging and progress output (TensorBoard lives in ``gtl_dist.train.metrics``).

On a terminal, long loops show a progress bar; in batch jobs (SLURM logs, CI) they print a
plain line every few seconds instead, so logs stay readable.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_CONFIGURED = False


def setup_logging(level: str | int | None = None, rank: int | None = None) -> None:
    """Configure the root ``gtl_dist`` logger once: ``[time rank] message`` on stderr."""
    global _CONFIGURED
    if level is None:
        level = os.environ.get("GTL_LOG_LEVEL", "INFO")
    logger = logging.getLogger("gtl_dist")
    logger.setLevel(level)
    if _CONFIGURED:
        return
    prefix = "" if rank is None else f" r{rank}"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s{prefix}] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    setup_logging()
    return logging.getLogger(name if name.startswith("gtl_dist") else f"gtl_dist.{name}")


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


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True) -> Iterator[T]:
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = Progress(total, desc, unit, enabled=enabled)
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:
        bar.close()

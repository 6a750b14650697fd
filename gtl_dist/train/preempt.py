"""Preemption: a signal sets a flag, the ranks agree at a step boundary, save together, then stop.

SLURM sends its warning signal (``--signal=USR2@…``, or SIGTERM on preemption) to every process
of the job step, but not necessarily at the same moment, and a ZeRO checkpoint is a collective
that every rank must enter together (docs/operations.md). So the handler only records the signal;
the training loop folds the flag into its per-step all-reduce (MAX over ranks: one rank's signal
stops everyone), saves at that step on every rank, flushes its logs, and then:

- if another handler was installed before ours (submitit installs one for USR2 that, on global
  rank 0, calls the job's ``checkpoint()`` and requeues it), rank 0 calls it now, after the
  collective save (save first, then hand over, so the requeued job finds the checkpoint);
- otherwise ``run_stage`` returns ``StageResult(status="preempted")`` and the CLI exits with
  :data:`EXIT_PREEMPTED` so a wrapper script (or SLURM's ``RequeueExit``) can requeue.
"""

from __future__ import annotations

import signal
from typing import Any

from gtl_dist.log import get_logger

log = get_logger("train.preempt")

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again" — the stage saved and can resume.
EXIT_PREEMPTED = 75
PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionGuard:
    """Installs flag-setting handlers for USR2 and TERM; remembers the handlers it replaced."""

    def __init__(self, signals: tuple[int, ...] = PREEMPT_SIGNALS):
        self.signals = signals
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}

    def install(self) -> "PreemptionGuard":
        for sig in self.signals:
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum not in self.received:
            self.received.append(signum)
            log.warning("received %s: will save and stop at the next step boundary",
                        signal.Signals(signum).name)

    def flags(self) -> list[float]:
        """One entry per watched signal (1.0 if this rank received it), for the loop to sum
        over ranks: the stop is agreed collectively, and so is which signal caused it."""
        return [float(sig in self.received) for sig in self.signals]

    def agreed(self, summed_flags: list[float]) -> list[int]:
        """The signals any rank received, from the summed :meth:`flags`."""
        return [sig for sig, n in zip(self.signals, summed_flags) if n > 0]

    def hand_over(self, is_main: bool, signals: list[int]) -> bool:
        """After the collective save, on rank 0: call the handler that was installed before ours
        for the agreed signal — USR2's first (submitit's checkpoint-and-requeue, which may exit
        the process). It runs even when only another rank was signalled. Returns True when a
        handler was called."""
        if not is_main:
            return False
        for sig in sorted(signals, key=lambda s: s != signal.SIGUSR2):
            handler = self.previous.get(sig)
            if callable(handler):
                log.info("handing %s over to the previously installed handler %r",
                         signal.Signals(sig).name, handler)
                self.uninstall()
                handler(sig, None)
                return True
        return False

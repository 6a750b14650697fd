"""Preemption: a signal sets a flag, the ranks agree at a step boundary, save together, then stop.

SLURM sends its warning signal (``--signal=USR2@…``, or SIGTERM on preemption) to every process
of the job step, but not necessarily at the same moment, and a ZeRO checkpoint is a collective
that every rank must enter together (infra_anchors §2.3). So the handler only records the signal;
the training loop folds the flag into its per-step all-reduce (MAX over ranks: one rank's signal
stops everyone), saves at that step on every rank, flushes its logs, and then:

- if another handler was installed before ours (submitit installs one for USR2 that, on global
  rank 0, calls the job's ``checkpoint()`` and requeues it), rank 0 calls it now, after the
  collective save — the V7/V8 pattern;
- otherwise ``run_stage`` returns ``StageResult(status="preempted")`` and the CLI exits with
  :data:`EXIT_PREEMPTED` so a wrapper script (or SLURM's ``RequeueExit``) can requeue.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Optional

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

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def chained_handler(self) -> Optional[tuple[int, Callable]]:
        """The earlier handler to hand over to: USR2's if USR2 came (submitit's requeue), else
        the first received signal's; None when it is the default action or ignored."""
        order = sorted(self.received, key=lambda s: s != signal.SIGUSR2)
        for sig in order:
            handler = self.previous.get(sig)
            if callable(handler):
                return sig, handler
        return None

    def hand_over(self, is_main: bool) -> bool:
        """After the collective save: on rank 0 call the earlier handler (it may requeue and exit
        the process). Returns True when one was called."""
        found = self.chained_handler()
        if found is None or not is_main:
            return False
        sig, handler = found
        log.info("handing %s over to the previously installed handler %r",
                 signal.Signals(sig).name, handler)
        self.uninstall()
        handler(sig, None)
        return True

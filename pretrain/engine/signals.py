"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint and a clean exit with EXIT_PREEMPTED.

A handler only sets a flag. The trainer all-reduces the flag every step so that every rank sees a
signal that reached any one of them, and all ranks save at the same step. SLURM sends SIGUSR1 before
the time limit (``--signal=USR1@120``) and SIGTERM on preemption; rerunning the same command with
the same run directory resumes from the checkpoint.
"""
from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 99
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("received %s: will checkpoint at the end of this step and exit with status %d",
                        self.signal_name, EXIT_PREEMPTED)

    def install(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

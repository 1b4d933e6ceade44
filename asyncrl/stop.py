"""SIGTERM and SIGINT during a run: checkpoint at the next step boundary, then stop.

The first signal only sets ``requested``; the run loop sees it after the step in progress, writes a
checkpoint and stops the workers; the command then exits 143 (SIGTERM) or 130 (SIGINT). A second signal
stops at once: SIGINT raises ``KeyboardInterrupt``, SIGTERM ``SystemExit(143)``, both unwinding so the
store server and Ray are still stopped on the way out.
"""

from __future__ import annotations

import logging
import signal
import sys

log = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
"""The shell's code for a process ended by each signal (128 + its number)."""


class StopSignals:
    """The SIGTERM/SIGINT handlers of a run's driver (main thread); ``install()`` them before the run starts."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def install(self) -> StopSignals:
        for signum in EXIT_CODES:
            signal.signal(signum, self._handle)
        return self

    @property
    def requested(self) -> bool:
        """Whether a signal asked the run to checkpoint and stop."""
        return self.received is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.received] if self.received is not None else 0

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            sys.exit(EXIT_CODES[signal.Signals(signum)])
        self.received = signal.Signals(signum)
        log.warning(
            "%s: writing a checkpoint after the step in progress, then stopping (send it again to stop now)",
            self.received.name,
        )

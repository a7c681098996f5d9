"""SIGTERM / SIGINT during training: finish the step, save, exit with the signal's status.

A scheduler preempting a job sends SIGTERM; a person presses Ctrl-C. Either way the step in
flight is finished and saved rather than lost; a second Ctrl-C stops at once. The handler
stays installed until the run is over, final validation and export included, so a signal
at the very end cannot lose the run either (the weights are saved before the validation).
An interrupted run exits 143 (SIGTERM) or 130 (SIGINT), as if killed by the signal, so a
scheduler can tell it from a finished one.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

EXIT_STATUS = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


class StopRequest:
    """A context manager that turns SIGTERM/SIGINT into a flag the loop checks each step."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(
            f"{self.signal_name}: finishing the current step, then saving a checkpoint",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self):
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def exit_status(signal_name: str | None) -> int:
    """The exit status of a run stopped by `signal_name` (143 when it is not known)."""
    return EXIT_STATUS.get(signal_name or "", EXIT_STATUS["SIGTERM"])

"""A Faust worker whose stop on SIGINT/SIGTERM has a deadline.

Faust's stop flushes its producer and commits before it returns; with the broker gone
both wait without end (seen: "Flush producer buffer..." for over 70 s, until SIGKILL).
Past the deadline the process exits with status 1 and one error line. Nothing is lost
by it: what was not committed is read again by the next worker (every output's id
derives from its input's, so a replayed batch yields the same records).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import faust

log = logging.getLogger(__name__)

# Exit status when the deadline ended the stop (not a clean stop, not a crash of ours).
EXIT_STOP_TIMEOUT = 1


class BoundedStopWorker(faust.Worker):
    """`faust.Worker`, plus: the stop a signal starts must end within `stop_timeout_s`
    seconds, and a second signal during the stop ends the process at once."""

    def __init__(self, *args: Any, stop_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Faust's start-up spinner writes a backspace and a show-cursor escape even when
        # its output is not a terminal: a worker's log file got "\b\x1b[?25h" glued to
        # the line after start-up. Without a spinner Faust logs "Ready" instead.
        if not self.stdout.isatty():
            self.spinner = None
        self._stop_timeout_s = stop_timeout_s
        self._deadline: threading.Timer | None = None

    def _schedule_shutdown(self, signum: signal.Signals) -> None:
        if self._deadline is not None:
            self._exit(f"second {signum.name} while stopping")
        # A thread, not the event loop: the loop may be the thing that is stuck.
        self._deadline = threading.Timer(
            self._stop_timeout_s,
            self._exit,
            args=(f"the stop did not finish within {self._stop_timeout_s:g} s",),
        )
        self._deadline.daemon = True
        self._deadline.start()
        super()._schedule_shutdown(signum)

    def _exit(self, why: str) -> None:
        log.error(
            "exiting without a clean stop (%s; is Kafka reachable?): what was not "
            "committed is read again by the next worker",
            why,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_STOP_TIMEOUT)

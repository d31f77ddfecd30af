"""SIGINT and SIGTERM stop a command the same way (issue 10, defect 6).

systemd stops a unit with SIGTERM; an operator presses Ctrl-C. Either raises
:class:`~billing_cli._errors.Interrupted` in the main thread — a ``KeyboardInterrupt``:
the requests in flight are aborted, locks are released, the run is recorded as
``interrupted`` and the process exits 128 + the signal number (130, 143). During a store
operation the signal is held until it ends (``billing_cli._interrupt``): the page being
applied commits (or rolls back, if it fails), then the run stops. A second signal exits
at once with the same status (the store is kill-safe: a half-applied page is rolled back
by the database itself).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from billing_cli import _interrupt
from billing_cli._errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Install the handlers for the duration of a command (main thread only; the previous
    handlers come back after, so in-process callers such as tests keep theirs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            os.write(2, b"error: interrupted again; exiting at once\n")
            os._exit(128 + signum)
        stopping = True
        if not _interrupt.defer(signum):  # held while a store operation finishes
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

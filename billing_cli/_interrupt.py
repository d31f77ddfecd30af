"""Store operations finish (or roll back) before a stop signal takes effect.

The stop signals (see ``cli/_signals``) raise :class:`~billing_cli._errors.Interrupted`
in the main thread. Raised in the middle of a database call, that can leave a PostgreSQL
connection with a command still in progress, so the run could not even be recorded as
interrupted. Inside :func:`protected` (every store operation) the signal is held instead
and raised the moment the operation ends: a page being applied is committed, then the
run stops. A page is bounded, so this costs a fraction of a second; a second signal still
exits at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from billing_cli._errors import Interrupted

_depth = 0
_pending: int | None = None


def _main() -> bool:
    return threading.current_thread() is threading.main_thread()


def defer(signum: int) -> bool:
    """Called by the signal handler: True when the signal is held for later."""
    global _pending
    if _depth > 0:
        _pending = signum
        return True
    return False


@contextmanager
def protected() -> Iterator[None]:
    global _depth, _pending
    if not _main():
        yield  # signal handlers run in the main thread only
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)

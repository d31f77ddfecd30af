"""Which process a run belongs to, and whether that process is gone.

A run records its pid and host (``runs.pid``, ``runs.host``). A run without an outcome
whose process no longer exists was killed before it could say how it ended (SIGKILL, the
OOM killer, a power cut): ``billing status`` shows it as *abandoned*. Only the host that
ran it can tell; for a run of another host the answer is "unknown", never a guess.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from billing_cli._time import NS_PER_SECOND


def this_host() -> str:
    return socket.gethostname()


def process_gone(pid: int | None, host: str | None, started_at_ns: int) -> bool | None:
    """True when the process that started a run at ``started_at_ns`` no longer exists;
    False while it runs; None when this host cannot tell (another host, no pid)."""
    if pid is None or host is None or host != this_host():
        return None
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a process of another user has this pid: look closer
    stat = _proc_stat(pid)
    if stat is None:
        return False  # no /proc: the pid exists, assume it is the run's
    state, started_ns = stat
    if state in ("Z", "X"):
        return True  # exited, not yet reaped by its parent
    # The pid was reused by a process that started after the run did.
    return started_ns is not None and started_ns > started_at_ns + NS_PER_SECOND


def _proc_stat(pid: int) -> tuple[str, int | None] | None:
    """(state, start time in epoch ns) of ``pid`` from Linux's /proc, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    fields = text[text.rfind(")") + 2 :].split()
    state = fields[0] if fields else "?"
    try:
        ticks = int(fields[19])  # field 22 of stat(5): starttime, clock ticks after boot
        boot_s = _boot_time_s()
        hz = os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return state, None
    if boot_s is None:
        return state, None
    return state, boot_s * NS_PER_SECOND + ticks * NS_PER_SECOND // hz


def _boot_time_s() -> int | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None

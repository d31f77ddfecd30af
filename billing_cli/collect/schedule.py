"""When ``billing collect`` pulls a source, and from where (DESIGN §7). Pure: no I/O."""

from __future__ import annotations

from billing_cli._time import NS_PER_SECOND
from billing_cli.store.base import Checkpoint

# A source is due when at least interval - slack has elapsed since its last attempt, so a
# cron job firing a second early still collects a source whose interval is one minute.
DUE_SLACK_FRACTION = 0.25
DUE_SLACK_MAX_S = 15.0


def is_due(checkpoint: Checkpoint | None, interval_s: float, now: int) -> bool:
    if checkpoint is None or checkpoint.last_attempted_at_ns is None:
        return True
    slack = min(interval_s * DUE_SLACK_FRACTION, DUE_SLACK_MAX_S)
    elapsed_s = (now - checkpoint.last_attempted_at_ns) / NS_PER_SECOND
    return elapsed_s >= interval_s - slack


def pull_start(
    checkpoint: Checkpoint | None, since_ns: int | None, now: int, overlap_ns: int, lookback_ns: int
) -> int:
    """Where a source's pull starts: the checkpoint minus the overlap, else ``--since``,
    else the initial lookback; never after ``now``."""
    if checkpoint is not None and checkpoint.last_successful_until_ns is not None:
        start = checkpoint.last_successful_until_ns - overlap_ns
    elif since_ns is not None:
        start = since_ns
    else:
        start = now - lookback_ns
    return min(start, now)

"""Strict UTC time handling. Timestamps are integers of nanoseconds since the Unix epoch.

Exporters emit RFC3339 with up to nanosecond precision; Python's ``datetime`` stops at
microseconds, so we parse to integer nanoseconds ourselves. A timestamp without a zone
is refused: guessing a zone would move bytes between minute buckets.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

NS_PER_SECOND = 1_000_000_000
NS_PER_MINUTE = 60 * NS_PER_SECOND

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TimeFormatError(ValueError):
    """A timestamp or duration is not in the accepted strict form."""


def parse_rfc3339_ns(text: str) -> int:
    """Parse an RFC3339 timestamp with a mandatory zone into UTC epoch nanoseconds."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise TimeFormatError(
            f"not an RFC3339 timestamp with a zone: {text!r} (expected e.g. 2026-11-24T10:00:00Z)"
        )
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    try:
        dt = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        raise TimeFormatError(f"invalid timestamp {text!r}: {exc}") from None
    frac = m.group(7) or ""
    ns = int(frac.ljust(9, "0")) if frac else 0
    offset_s = 0
    if m.group(9):
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise TimeFormatError(f"invalid zone offset in {text!r}")
        offset_s = (oh * 3600 + om * 60) * (1 if m.group(9) == "+" else -1)
    seconds = (dt - _EPOCH) // timedelta(seconds=1) - offset_s
    return seconds * NS_PER_SECOND + ns


def format_rfc3339_ns(ns: int) -> str:
    """Format epoch nanoseconds as RFC3339 UTC ending in ``Z`` (fraction only when non-zero)."""
    seconds, frac = divmod(ns, NS_PER_SECOND)
    base = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        return f"{base}.{frac:09d}".rstrip("0") + "Z"
    return base + "Z"


def ns_to_datetime(ns: int) -> datetime:
    """UTC datetime (microsecond precision) for display and zone arithmetic."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


def datetime_to_ns(dt: datetime) -> int:
    if dt.tzinfo is None:
        raise TimeFormatError("naive datetime: a zone is required")
    delta = dt - _EPOCH
    return (delta.days * 86400 + delta.seconds) * NS_PER_SECOND + delta.microseconds * 1000


def minute_floor_ns(ns: int) -> int:
    return ns - ns % NS_PER_MINUTE


def now_ns() -> int:
    return time.time_ns()


def parse_duration_seconds(text: str) -> float:
    """Parse ``30s``, ``2m``, ``1h``, ``1h30m``, ``500ms``, ``7d`` into seconds (> 0)."""
    cleaned = text.strip()
    if not cleaned or _DURATION.sub("", cleaned) != "":
        raise TimeFormatError(f"not a duration: {text!r} (expected e.g. 30s, 2m, 1h)")
    total = sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION.findall(cleaned))
    if total <= 0:
        raise TimeFormatError(f"duration must be positive: {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """Compact human duration: ``45s``, ``12m``, ``3h05m``, ``2d04h``."""
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def parse_time_arg(text: str, *, now: int | None = None) -> int:
    """Parse a command-line time: RFC3339 with a zone, or a duration meaning "that long ago"."""
    try:
        return parse_rfc3339_ns(text)
    except TimeFormatError:
        pass
    try:
        ago = parse_duration_seconds(text.removeprefix("-"))
    except TimeFormatError:
        raise TimeFormatError(
            f"not a time: {text!r} (use RFC3339 with a zone, e.g. 2026-11-24T10:00:00Z, "
            "or a duration ago, e.g. 2h)"
        ) from None
    return (now if now is not None else now_ns()) - int(ago * NS_PER_SECOND)

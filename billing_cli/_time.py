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
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})", re.ASCII)
_NO_ZONE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?", re.ASCII)
# At most 30 digits a number: anything longer is no duration (and int() of thousands of
# digits would raise instead of saying so).
_DURATION = re.compile(r"(\d{1,30})(ms|s|m|h|d)", re.ASCII)
_DURATION_NS = {
    "ms": 1_000_000,
    "s": NS_PER_SECOND,
    "m": 60 * NS_PER_SECOND,
    "h": 3600 * NS_PER_SECOND,
    "d": 86400 * NS_PER_SECOND,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# What the store can hold: times are signed 64-bit integers of nanoseconds in both back ends
# (1677-09-21T00:12:43.145224192Z .. 2262-04-11T23:47:16.854775807Z). Every time flag is
# checked against this range when it is parsed, so an impossible value is a flag error,
# never a database error halfway through a command.
STORE_MIN_NS = -(2**63)
STORE_MAX_NS = 2**63 - 1
# No duration may exceed what fits in that range either (about 292 years).
MAX_DURATION_NS = STORE_MAX_NS


class TimeFormatError(ValueError):
    """A timestamp or duration is not in the accepted strict form."""


def parse_rfc3339_ns(text: str) -> int:
    """Parse an RFC3339 timestamp with a mandatory zone into UTC epoch nanoseconds."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise TimeFormatError(
            f"not an RFC3339 timestamp with a zone: {shown(text)} "
            "(expected e.g. 2026-11-24T10:00:00Z)"
        )
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    try:
        dt = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        raise TimeFormatError(f"invalid timestamp {shown(text)}: {exc}") from None
    frac = m.group(7) or ""
    ns = int(frac.ljust(9, "0")) if frac else 0
    offset_s = 0
    if m.group(9):
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise TimeFormatError(f"invalid zone offset in {shown(text)}")
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


def parse_duration_ns(text: str) -> int:
    """Parse ``30s``, ``2m``, ``1h``, ``1h30m``, ``500ms``, ``7d`` into exact nanoseconds (> 0)."""
    cleaned = text.strip()
    if not cleaned or _DURATION.sub("", cleaned) != "":
        raise TimeFormatError(f"not a duration: {shown(text)} (expected e.g. 30s, 2m, 1h)")
    total = sum(int(n) * _DURATION_NS[u] for n, u in _DURATION.findall(cleaned))
    if total <= 0:
        raise TimeFormatError(f"duration must be positive: {shown(text)}")
    if total > MAX_DURATION_NS:
        raise TimeFormatError(f"duration {shown(text)} is too long (at most about 292 years)")
    return total


def parse_duration_seconds(text: str) -> float:
    """Parse ``30s``, ``2m``, ``1h``, ``1h30m``, ``500ms``, ``7d`` into seconds (> 0)."""
    return parse_duration_ns(text) / NS_PER_SECOND


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


def in_store_range(ns: int) -> bool:
    return STORE_MIN_NS <= ns <= STORE_MAX_NS


def store_range_text() -> str:
    return f"{format_rfc3339_ns(STORE_MIN_NS)} .. {format_rfc3339_ns(STORE_MAX_NS)}"


def parse_date_ns(text: str) -> int:
    """A plain date ``YYYY-MM-DD``: its first instant, 00:00:00 UTC."""
    m = _DATE.fullmatch(text)
    if m is None:
        raise TimeFormatError(f"not a date: {shown(text)} (expected e.g. 2026-11-01)")
    try:
        day = datetime(int(m.group(1)), int(m.group(2)), int(m.group(3)), tzinfo=UTC)
    except ValueError as exc:
        raise TimeFormatError(f"invalid date {shown(text)}: {exc}") from None
    return datetime_to_ns(day)


def parse_time_arg(text: str, *, now: int | None = None) -> int:
    """Parse a command-line time: RFC3339 with a zone, a plain date (``2026-11-01``, meaning
    00:00:00Z), or a duration meaning "that long ago". The result always fits the store."""
    value = text.strip()
    if _RFC3339.fullmatch(value):
        ns = parse_rfc3339_ns(value)
    elif _DATE.fullmatch(value):
        ns = parse_date_ns(value)
    elif _DURATION.sub("", value.removeprefix("-")) == "" and value.removeprefix("-"):
        ns = (now if now is not None else now_ns()) - parse_duration_ns(value.removeprefix("-"))
    elif _NO_ZONE.fullmatch(value):
        raise TimeFormatError(
            f"{shown(text)} has no zone: add Z (UTC) or an offset, e.g. {value[:10]}T00:00:00Z"
        )
    else:
        raise TimeFormatError(
            f"not a time: {shown(text)} (use RFC3339 with a zone, e.g. 2026-11-24T10:00:00Z, "
            "a date, e.g. 2026-11-24, or a duration ago, e.g. 2h)"
        )
    if not in_store_range(ns):
        raise TimeFormatError(
            f"{shown(text)} is outside the times billing can store ({store_range_text()})"
        )
    return ns


def shown(text: str, max_chars: int = 60) -> str:
    """``text`` quoted for an error message, cut so that no input can flood a message.

    A cut value ends with ``…`` inside its quotes, right after the last character kept:
    the redaction of remote text recognises a secret cut there by that mark.
    """
    if len(text) <= max_chars:
        return repr(text)
    return repr(text[: max_chars - 1] + "…")

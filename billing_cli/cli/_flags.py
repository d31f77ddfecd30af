"""Time and duration flags: parsed once, with one-line ``UsageError``s naming the flag."""

from __future__ import annotations

from billing_cli._errors import UsageError
from billing_cli._time import TimeFormatError, parse_duration_seconds, parse_time_arg
from billing_cli.core.periods import PeriodFormatError, parse_period


def time_flag(flag: str, value: str | None, *, now: int | None = None) -> int | None:
    """RFC3339 with a zone, or a duration meaning "that long ago" (relative to ``now``)."""
    if value is None:
        return None
    try:
        return parse_time_arg(value, now=now)
    except TimeFormatError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def period_flag(flag: str, value: str | None) -> int | None:
    """An accounting period ``YYYY-MM`` (a calendar month, UTC): its start."""
    if value is None:
        return None
    try:
        return parse_period(value)
    except PeriodFormatError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def duration_flag(flag: str, value: str) -> float:
    """A duration such as ``30s``, ``5m`` or ``1h``, in seconds."""
    try:
        return parse_duration_seconds(value)
    except TimeFormatError as exc:
        raise UsageError(f"{flag}: {exc}") from None

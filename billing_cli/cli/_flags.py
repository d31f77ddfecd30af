"""Flag values every command shares, parsed once, with one-line ``UsageError``s naming the flag.

Times and ids are checked here against what the store can hold (64-bit integers), so an
impossible value is a flag error (exit 2) before any database or exporter is touched.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from billing_cli._errors import UsageError
from billing_cli._time import (
    TimeFormatError,
    format_rfc3339_ns,
    parse_duration_seconds,
    parse_time_arg,
    shown,
)
from billing_cli.core.periods import PeriodFormatError, parse_period

MAX_ID = 2**63 - 1  # ids are signed 64-bit integers in both back ends
_DIGITS = re.compile(r"[0-9]+", re.ASCII)


def time_flag(flag: str, value: str | None, *, now: int | None = None) -> int | None:
    """RFC3339 with a zone, a plain date (00:00:00Z), or a duration meaning "that long ago"
    (relative to ``now``); always within the store's range."""
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


def until_flag(flag: str, value: str | None, *, now: int) -> tuple[int, bool]:
    """An end time for a range whose future cannot exist yet (data is collected up to now):
    ``(until, capped)``, ``until`` at most ``now``; missing means now."""
    until = time_flag(flag, value, now=now)
    if until is None:
        return now, False
    if until > now:
        return now, True
    return until, False


def capped_note(flag: str, value: str, now: int) -> str:
    return f"note: {flag} {value} is in the future; using now ({format_rfc3339_ns(now)})"


def duration_flag(flag: str, value: str) -> float:
    """A duration such as ``30s``, ``5m`` or ``1h``, in seconds."""
    try:
        return parse_duration_seconds(value)
    except TimeFormatError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def id_flag(what: str, value: str) -> int:
    """A positive integer id as the store holds it (1 .. 2^63-1)."""
    text = value.strip()
    if not _DIGITS.fullmatch(text):
        raise UsageError(f"{what} {shown(value)} is not a number")
    if len(text.lstrip("0")) > len(str(MAX_ID)):  # before int(): it refuses 4,300+ digits
        raise UsageError(f"{what} {shown(value)} is out of range (1 .. {MAX_ID})")
    n = int(text)
    if not 1 <= n <= MAX_ID:
        raise UsageError(f"{what} {shown(value)} is out of range (1 .. {MAX_ID})")
    return n


def source_option(help: str) -> Any:
    """The one ``-s/--source ID`` flag (repeatable) of every command that selects sources
    (``typer.Option`` is typed ``Any`` for use as a default; here it goes in ``Annotated``)."""
    return typer.Option("--source", "-s", metavar="ID", help=f"{help} Repeatable.")


# For commands whose --source selects which sources to read or pull (``status`` may use it
# too): ``source: SourcesOption = None``.
SourcesOption = Annotated[list[str] | None, source_option("Only this source (by source_id).")]

# Tables for people fit 80 columns; --wide shows every column (and full ids) instead.
WideOption = Annotated[
    bool, typer.Option("--wide", "-w", help="Every column and full ids (wider than 80 columns).")
]

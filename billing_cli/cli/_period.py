"""What ``billing period``, ``statement`` and ``rerate`` share: statement lines, the
close header, and opening an existing store for writing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from billing_cli._errors import StoreError
from billing_cli._time import format_rfc3339_ns
from billing_cli.cli._context import AppContext
from billing_cli.cli._rows import _sqlite_path
from billing_cli.core.money import format_amount
from billing_cli.core.periods import format_period
from billing_cli.core.statement import Statement, StatementTotals

if TYPE_CHECKING:
    from billing_cli.store.base import PeriodClose, Store

STATEMENT_COLUMNS = (
    "period",
    "line",
    "uuid",
    "email",
    "corrects_period",
    "currency",
    "uplink_bytes",
    "downlink_bytes",
    "total_bytes",
    "included_bytes_used",
    "rated_bytes",
    "charges",
    "adjustments",
    "amount",
    "rule_versions",
)
TOTALS_COLUMNS = (
    "currency",
    "accounts",
    "uplink_bytes",
    "downlink_bytes",
    "total_bytes",
    "included_bytes_used",
    "rated_bytes",
    "charges",
    "adjustments",
    "amount",
)
ZERO = format_amount(0)


@contextmanager
def open_store_for_writing(app: AppContext, *, migrate: bool = True) -> Iterator[Store]:
    """Open the store to write; a missing SQLite file is an error (nothing to act on).
    ``migrate=False`` (a dry run) leaves an older schema as it is: refused, not upgraded."""
    path = _sqlite_path(app.db_url)
    if path is not None and not path.exists():
        raise StoreError(
            f"database {path} does not exist: nothing collected yet "
            "(run `billing collect` or `billing ingest FILE`, or point --db at the database)"
        )
    from billing_cli.store import open_store

    store = open_store(app.db_url, migrate=migrate)
    try:
        yield store
    finally:
        store.close()


def statement_lines(st: Statement) -> Iterator[dict[str, Any]]:
    """The statement as flat lines (CSV rows, JSON ``lines``): per account its ``account``
    line, then one ``carried`` line per closed period it corrects; a ``total`` per
    currency. ``rule_versions`` is a list (CSV joins it with ``;``)."""
    period = format_period(st.period_start_ns)
    for a in st.accounts:
        yield {
            "period": period,
            "line": "account",
            "uuid": a.uuid,
            "email": a.email,
            "corrects_period": "",
            "currency": a.currency,
            "uplink_bytes": a.uplink_bytes,
            "downlink_bytes": a.downlink_bytes,
            "total_bytes": a.total_bytes,
            "included_bytes_used": a.included_bytes,
            "rated_bytes": a.rated_bytes,
            "charges": format_amount(a.charges_nano),
            "adjustments": format_amount(a.adjustments_nano),
            "amount": format_amount(a.amount_nano),
            "rule_versions": list(a.rule_versions),
        }
        for c in a.carried:
            yield {
                "period": period,
                "line": "carried",
                "uuid": a.uuid,
                "email": a.email,
                "corrects_period": format_period(c.corrects_period),
                "currency": a.currency,
                "uplink_bytes": c.uplink_bytes,
                "downlink_bytes": c.downlink_bytes,
                "total_bytes": c.uplink_bytes + c.downlink_bytes,
                "included_bytes_used": c.included_bytes,
                "rated_bytes": c.rated_bytes,
                "charges": ZERO,
                "adjustments": format_amount(c.amount_nano),
                "amount": format_amount(c.amount_nano),
                "rule_versions": list(a.rule_versions),
            }
    for t in st.totals:
        yield {
            "period": period,
            "line": "total",
            "uuid": "",
            "email": "",
            "corrects_period": "",
            "currency": t.currency,
            "uplink_bytes": t.uplink_bytes,
            "downlink_bytes": t.downlink_bytes,
            "total_bytes": t.total_bytes,
            "included_bytes_used": t.included_bytes,
            "rated_bytes": t.rated_bytes,
            "charges": format_amount(t.charges_nano),
            "adjustments": format_amount(t.adjustments_nano),
            "amount": format_amount(t.amount_nano),
            "rule_versions": [],
        }


def totals_json(t: StatementTotals) -> dict[str, Any]:
    return {
        "currency": t.currency,
        "accounts": t.accounts,
        "uplink_bytes": t.uplink_bytes,
        "downlink_bytes": t.downlink_bytes,
        "total_bytes": t.total_bytes,
        "included_bytes_used": t.included_bytes,
        "rated_bytes": t.rated_bytes,
        "charges": format_amount(t.charges_nano),
        "adjustments": format_amount(t.adjustments_nano),
        "amount": format_amount(t.amount_nano),
    }


def close_of(store: Store, period: int) -> PeriodClose | None:
    return next((c for c in store.closed_periods() if c.period_start_ns == period), None)


def close_fields(close: PeriodClose | None) -> dict[str, Any]:
    if close is None:
        return {"state": "open", "closed_at": None, "close_run_id": None, "closed_by": None}
    return {
        "state": "closed",
        "closed_at": format_rfc3339_ns(close.closed_at_ns),
        "close_run_id": close.run_id,
        "closed_by": close.actor,
    }


def close_text(close: PeriodClose | None) -> str:
    if close is None:
        return "open"
    return (
        f"closed {format_rfc3339_ns(close.closed_at_ns)} by {close.actor or '?'}"
        f" (run {close.run_id})"
    )

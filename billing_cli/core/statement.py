"""Statements (DESIGN §5a): what a period's ledger says per account. Pure.

A statement is built only from the postings *accounted in* its period (a store adds them
up per account, currency, corrected period and rule version: :class:`StatementPart`) and
each account's email. Postings are never changed, and once a period is closed none is
added to it, so the statement of a closed period is the same today and in a year.

Per account (uuid, currency): the period's own usage (bytes, included bytes used, rated
bytes) and its ``charges`` (the amount of the postings for the period's own buckets),
then the ``adjustments`` carried in from closed periods — one line per period corrected
— and ``amount = charges + adjustments``, what to invoice. A totals line per currency.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple


class StatementPart(NamedTuple):
    """The sums of one account's postings in a period that share a currency, a corrected
    period (``None``: the period's own buckets) and a rule version."""

    uuid: str
    currency: str
    corrects_period: int | None
    rule_version: str
    uplink_bytes: int
    downlink_bytes: int
    rated_bytes: int
    included_bytes: int
    amount_nano: int


@dataclass(frozen=True)
class CarriedAdjustment:
    """Corrections of one closed period, carried into this statement."""

    corrects_period: int
    uplink_bytes: int
    downlink_bytes: int
    rated_bytes: int
    included_bytes: int
    amount_nano: int


@dataclass(frozen=True)
class AccountStatement:
    uuid: str
    email: str
    currency: str
    uplink_bytes: int  # the period's own buckets
    downlink_bytes: int
    rated_bytes: int
    included_bytes: int
    charges_nano: int
    carried: tuple[CarriedAdjustment, ...]
    rule_versions: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return self.uplink_bytes + self.downlink_bytes

    @property
    def adjustments_nano(self) -> int:
        return sum(c.amount_nano for c in self.carried)

    @property
    def amount_nano(self) -> int:
        return self.charges_nano + self.adjustments_nano


@dataclass(frozen=True)
class StatementTotals:
    currency: str
    accounts: int
    uplink_bytes: int
    downlink_bytes: int
    rated_bytes: int
    included_bytes: int
    charges_nano: int
    adjustments_nano: int

    @property
    def total_bytes(self) -> int:
        return self.uplink_bytes + self.downlink_bytes

    @property
    def amount_nano(self) -> int:
        return self.charges_nano + self.adjustments_nano


@dataclass(frozen=True)
class Statement:
    period_start_ns: int
    accounts: tuple[AccountStatement, ...]  # by uuid, then currency
    totals: tuple[StatementTotals, ...]  # by currency


def build_statement(
    period_start_ns: int, parts: Iterable[StatementPart], emails: Mapping[str, str]
) -> Statement:
    """Assemble a statement from the summed postings of the period (any order)."""
    own: dict[tuple[str, str], list[int]] = {}
    carried: dict[tuple[str, str], dict[int, list[int]]] = {}
    versions: dict[tuple[str, str], set[str]] = {}
    for p in parts:
        key = (p.uuid, p.currency)
        versions.setdefault(key, set()).add(p.rule_version)
        own.setdefault(key, [0, 0, 0, 0, 0])
        if p.corrects_period is None:
            slot = own[key]
        else:
            slot = carried.setdefault(key, {}).setdefault(p.corrects_period, [0, 0, 0, 0, 0])
        for i, v in enumerate(
            (p.uplink_bytes, p.downlink_bytes, p.rated_bytes, p.included_bytes, p.amount_nano)
        ):
            slot[i] += v
    accounts = tuple(
        AccountStatement(
            uuid=uuid,
            email=emails.get(uuid, ""),
            currency=currency,
            uplink_bytes=own[(uuid, currency)][0],
            downlink_bytes=own[(uuid, currency)][1],
            rated_bytes=own[(uuid, currency)][2],
            included_bytes=own[(uuid, currency)][3],
            charges_nano=own[(uuid, currency)][4],
            carried=tuple(
                CarriedAdjustment(period, *sums)
                for period, sums in sorted(carried.get((uuid, currency), {}).items())
            ),
            rule_versions=tuple(sorted(versions[(uuid, currency)])),
        )
        for uuid, currency in sorted(own)
    )
    totals: dict[str, list[int]] = {}
    for a in accounts:
        t = totals.setdefault(a.currency, [0] * 7)
        for i, v in enumerate(
            (
                1,
                a.uplink_bytes,
                a.downlink_bytes,
                a.rated_bytes,
                a.included_bytes,
                a.charges_nano,
                a.adjustments_nano,
            )
        ):
            t[i] += v
    return Statement(
        period_start_ns,
        accounts,
        tuple(StatementTotals(currency, *totals[currency]) for currency in sorted(totals)),
    )

"""Reads of buckets and postings for ``billing usage`` / ``billing ledger`` (and statements).

Streamed in the contract order (bucket time, then the series key in byte order on both
back ends), filtered in SQL. Streaming readers do not hold the store's lock while
suspended: a consumer may stop iterating at any point.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, cast

from billing_cli.store import _periods
from billing_cli.store.base import LedgerRow, RowFilter, UsageRow
from billing_cli.store.plumbing import StoreBase


class ReadsPart(StoreBase):
    """``iter_usage`` and ``iter_ledger``."""

    def _where(
        self, flt: RowFilter, time_col: str, *, ledger: bool = False
    ) -> tuple[str, list[Any]]:
        conds: list[str] = []
        params: list[Any] = []
        for col, val in (("node_id", flt.node_id), ("env", flt.env), ("uuid", flt.uuid)):
            if val is not None:
                conds.append(f"s.{col} = ?")
                params.append(val)
        if flt.uuids:
            conds.append(f"s.uuid IN ({','.join('?' * len(flt.uuids))})")
            params.extend(flt.uuids)
        if ledger:
            # (the accounting period selects the table itself: see iter_ledger)
            for cond, bound in (
                ("l.created_at_ns >= ?", flt.posted_since_ns),
                ("l.created_at_ns < ?", flt.posted_until_ns),
            ):
                if bound is not None:
                    conds.append(cond)
                    params.append(bound)
        if flt.since_ns is not None:
            conds.append(f"{time_col} >= ?")
            params.append(flt.since_ns)
        if flt.until_ns is not None:
            conds.append(f"{time_col} < ?")
            params.append(flt.until_ns)
        if flt.series_filters:
            conds.append(
                "(" + " OR ".join("(s.node_id = ? AND s.env = ?)" for _ in flt.series_filters) + ")"
            )
            for node_id, env in flt.series_filters:
                params.extend((node_id, env))
        return (" AND ".join(conds) or "1 = 1"), params

    def _order(self, *cols: str) -> str:
        c = self.db.order_collate
        return ", ".join(f"{col}{c}" if col.startswith("s.") else col for col in cols)

    def iter_usage(self, flt: RowFilter) -> Iterator[UsageRow]:
        where, params = self._where(flt, "b.bucket_start_ns")
        sql = (
            "SELECT s.node_id, s.env, s.uuid, s.inbound_tag, b.bucket_start_ns, b.uplink_bytes,"
            " b.downlink_bytes FROM buckets b JOIN series s ON s.series_id = b.series_id"
            f" WHERE (b.uplink_bytes <> 0 OR b.downlink_bytes <> 0) AND {where} ORDER BY "
            + self._order("b.bucket_start_ns", "s.node_id", "s.env", "s.uuid", "s.inbound_tag")
        )
        with self._guard("read usage", lock=False):
            for r in self.db.stream(sql, params):
                yield UsageRow(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]))

    def iter_ledger(self, flt: RowFilter) -> Iterator[LedgerRow]:
        where, params = self._where(flt, "l.bucket_start_ns", ledger=True)
        source = (
            "ledger_postings"
            if flt.period_start_ns is None
            else f"({_periods.accounted_in(flt.period_start_ns)})"
        )
        sql = (
            "SELECT l.entry_id, s.node_id, s.env, s.uuid, s.inbound_tag, l.bucket_start_ns,"
            " l.revision, l.entry_type, l.rated_bytes, l.amount_nano, l.currency,"
            " l.pricing_rule_version, l.run_id, l.created_at_ns, l.period_start_ns,"
            " l.uplink_bytes, l.downlink_bytes, l.included_bytes"
            f" FROM {source} l JOIN series s ON s.series_id = l.series_id"
            f" WHERE {where} ORDER BY "
            + self._order(
                "l.bucket_start_ns", "s.node_id", "s.env", "s.uuid", "s.inbound_tag", "l.revision"
            )
        )
        with self._guard("read the ledger", lock=False):
            for r in self.db.stream(sql, params):
                yield LedgerRow(
                    entry_id=int(r[0]),
                    node_id=r[1],
                    env=r[2],
                    uuid=r[3],
                    inbound_tag=r[4],
                    bucket_start_ns=int(r[5]),
                    revision=int(r[6]),
                    entry_type=cast(Literal["charge", "adjustment"], r[7]),
                    rated_bytes=int(r[8]),
                    amount_nano=int(r[9]),
                    currency=r[10],
                    pricing_rule_version=r[11],
                    run_id=int(r[12]),
                    created_at_ns=int(r[13]),
                    period_start_ns=int(r[14]),
                    uplink_bytes=int(r[15]),
                    downlink_bytes=int(r[16]),
                    included_bytes=int(r[17]),
                )

"""PostgreSQL back end (psycopg 3): same schema semantics and results as SQLite.

One transaction per ``apply``; observations go in with COPY, heads with one
``UPDATE ... FROM unnest(...)``. Key sets are arrays passed to ``unnest`` so a page's
lookups are one statement with a handful of parameters, whatever its size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import psycopg

from billing_cli.core.periods import next_period, period_of
from billing_cli.store.dialect import (
    _ADD_UUID_USAGE,
    _BUCKET_COLS,
    _LEDGER_COLS,
    _OBS_COLS,
    Dialect,
    KeyCol,
    Row,
)
from billing_cli.store.sql import SqlStore

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# A range partition's bound as pg_get_expr prints it.
_BOUND = re.compile(r"FOR VALUES FROM \('?(-?\d+|MINVALUE)'?\) TO \('?(-?\d+|MAXVALUE)'?\)")

# Column types of the hot bulk inserts (binary COPY); other inserts use text COPY.
_COPY_TYPES: dict[tuple[str, tuple[str, ...]], list[str]] = {
    ("observations", _OBS_COLS): ["int8", "int8", "int8", "int8", "text", "int8", "text", "int8"],
    ("buckets", _BUCKET_COLS): ["int8"] * 8,
    ("ledger_postings", _LEDGER_COLS): [
        "int8",
        "int8",
        "int8",
        "text",
        "int8",
        "int8",
        "text",
        "text",
        "int8",
        "int8",
        "int8",
        "int8",
        "int8",
        "int8",
    ],
}


class PostgresDialect(Dialect):
    name: Literal["sqlite", "postgres"] = "postgres"
    errors = (psycopg.Error,)
    order_collate = ' COLLATE "C"'  # byte order, identical to SQLite's BINARY collation
    keyset_chunk = 50_000
    lock_series = " FOR UPDATE OF s"  # rows locked in series_id order: no lock-order deadlock

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        self._sql: dict[str, str] = {}
        # Month ranges [start, end) whose partitions are known to exist (this process).
        self._months: list[tuple[int, int]] = []
        if read_only:
            # Readers never write (DESIGN §8): the server refuses it, whatever the code does.
            try:
                self.conn.execute("SET default_transaction_read_only = on")
            except BaseException:
                self.conn.close()
                raise

    def q(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = sql.replace("%", "%%").replace("?", "%s")
            self._sql[sql] = out
        return out

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self.conn.cursor() as cur:
            if params:
                cur.execute(self.q(sql), params)
            else:
                cur.execute(sql)  # no parameters: the text is used verbatim (DDL)
            return cur.fetchall() if cur.description else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(self.q(sql), rows)

    def execute_count(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.conn.cursor() as cur:
            cur.execute(self.q(sql), params)
            return int(cur.rowcount)

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Row]:
        with self.conn.cursor() as cur:
            yield from cur.stream(self.q(sql), params)

    def keyset(
        self, name: str, cols: Sequence[KeyCol], rows: Sequence[Row]
    ) -> tuple[str, list[Any]]:
        arrays = ", ".join(f"?::{t}[]" for _, t in cols)  # placeholders rewritten by q()
        names = ", ".join(c for c, _ in cols)
        params: list[Any] = [list(col) for col in zip(*rows, strict=True)]
        return f"{name}({names}) AS (SELECT * FROM unnest({arrays}))", params

    @contextmanager
    def _tx(self, *, commit: bool) -> Iterator[None]:
        with self.conn.transaction(force_rollback=not commit):
            yield

    def transaction(self) -> AbstractContextManager[None]:
        return self._tx(commit=True)

    def rolled_back(self) -> AbstractContextManager[None]:
        return self._tx(commit=False)

    def has_table(self, name: str) -> bool:
        # In the schema the store would create it in (the first of the search_path).
        rows = self.execute(
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = ?",
            (name,),
        )
        return bool(rows[0][0])

    def migration_lock(self) -> None:
        # Two first-use processes must not both create the schema.
        self.execute("SELECT pg_advisory_xact_lock(?)", (0x62696C6C,))

    def lock_periods(self, *, exclusive: bool) -> None:
        # A transaction-level advisory lock, per schema: a close (exclusive) waits for the
        # writers of postings in flight (shared) and holds new ones until it commits;
        # writers never block each other. Unlike LOCK TABLE it needs no table privilege,
        # and the two-key form never collides with the one-key per-source locks.
        fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        self.execute(f"SELECT {fn}(hashtext('billing:periods'), hashtext(current_schema()))")

    def lock_nodes(self, nodes: Sequence[tuple[str, str]]) -> None:
        # Two-key advisory locks like lock_periods; a hash collision between two nodes
        # only serialises their writers.
        for node, env in nodes:
            self.execute(
                "SELECT pg_advisory_xact_lock(hashtext('billing:node:' || ? || '/' || ?),"
                " hashtext(current_schema()))",
                (node, env),
            )

    def lock_retention(self, *, exclusive: bool) -> None:
        # The same kind of lock as lock_periods, its own key: a compaction raising the cut
        # waits for the applies in flight (each read the old cut) and holds new ones until
        # it commits; applies never block each other.
        fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        self.execute(f"SELECT {fn}(hashtext('billing:retention'), hashtext(current_schema()))")

    def bulk_insert(self, table: str, cols: Sequence[str], rows: Sequence[Row]) -> None:
        types = _COPY_TYPES.get((table, tuple(cols)))
        fmt = " (FORMAT BINARY)" if types else ""
        with (
            self.conn.cursor() as cur,
            cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN{fmt}") as copy,
        ):
            if types:
                # Binary COPY with declared types: no per-value type lookup or text
                # formatting on either side.
                copy.set_types(types)
            write = copy.write_row
            for r in rows:
                write(r)

    def add_uuid_usage(self, rows: Sequence[Row]) -> None:
        u, ps, du, dd, last = (list(c) for c in zip(*rows, strict=True))
        self.execute(
            _ADD_UUID_USAGE.replace(
                "VALUES (?,?,?,?,?)",
                "SELECT * FROM unnest(?::text[], ?::bigint[], ?::bigint[], ?::bigint[],"
                " ?::bigint[])",
            ),
            (u, ps, du, dd, last),
        )

    def update_buckets(self, rows: Sequence[Row]) -> None:
        up, down, rated, amount, rev, inc, sid, start = (list(c) for c in zip(*rows, strict=True))
        self.execute(
            "UPDATE buckets b SET uplink_bytes = v.up, downlink_bytes = v.down,"
            " rated_bytes = v.rated, amount_nano = v.amount, revision = v.rev,"
            " included_bytes = v.inc"
            " FROM unnest(?::bigint[], ?::bigint[], ?::bigint[], ?::bigint[], ?::bigint[],"
            " ?::bigint[], ?::bigint[], ?::bigint[])"
            " AS v(up, down, rated, amount, rev, inc, sid, start)"
            " WHERE b.series_id = v.sid AND b.bucket_start_ns = v.start",
            (up, down, rated, amount, rev, inc, sid, start),
        )

    def update_heads(self, rows: Sequence[Row]) -> None:
        t, up, down, ep, sid = (list(c) for c in zip(*rows, strict=True))
        self.execute(
            "UPDATE series s SET head_collected_at_ns = v.t, head_uplink = v.up,"
            " head_downlink = v.down, head_epoch = v.ep"
            " FROM unnest(?::bigint[], ?::bigint[], ?::bigint[], ?::text[], ?::bigint[])"
            " AS v(t, up, down, ep, sid) WHERE s.series_id = v.sid",
            (t, up, down, ep, sid),
        )

    def close_runs(self, rows: Sequence[Row]) -> None:
        u, sid = (list(c) for c in zip(*rows, strict=True))
        self.execute(
            "UPDATE observations o SET until_ns = v.u"
            " FROM unnest(?::bigint[], ?::bigint[]) AS v(u, sid) WHERE o.series_id = v.sid"
            " AND o.collected_at_ns = (SELECT max(p.collected_at_ns) FROM observations p"
            " WHERE p.series_id = v.sid)",
            (u, sid),
        )

    def ensure_partitions(self, instants: Iterable[int]) -> None:
        if not self.partitioned:
            return
        months = self._months
        missing: dict[int, int] = {}
        for t in instants:
            if any(lo <= t < hi for lo, hi in months):
                continue  # the hot path: a page's months exist (a handful of ranges)
            m = period_of(t)
            if m not in missing:
                missing[m] = max(_INT64_MIN, min(_INT64_MAX, t))
        if not missing:
            return
        in_tx = self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        with nullcontext() if in_tx else self.conn.transaction():
            # Creators of one schema queue here (two collectors reaching a new month at
            # once): the second finds the partitions there. The lock is taken before
            # any table lock of this transaction, and the creation's own (SHARE UPDATE
            # EXCLUSIVE on the parents) does not conflict with applies in flight.
            self.execute(
                "SELECT pg_advisory_xact_lock(hashtext('billing:partitions'),"
                " hashtext(current_schema()))"
            )
            for t in missing.values():
                self.execute("SELECT billing_ensure_month(?)", (t,))
        if not in_tx:
            # Only what is committed is remembered: a dry run's partitions are rolled back.
            months.extend((m, next_period(m)) for m in missing)

    def month_partitions(self, table: str) -> list[tuple[str, int | None, int | None]]:
        if not self.partitioned:
            return []
        rows = self.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass(format('%I.%I', current_schema(), ?::text))",
            (table,),
        )
        out: list[tuple[str, int | None, int | None]] = []
        for name, bound in rows:
            m = _BOUND.fullmatch(bound)
            if m is None:
                continue  # not a month partition of ours (an operator's DEFAULT, say)
            lo, hi = (None if v == "MINVALUE" or v == "MAXVALUE" else int(v) for v in m.groups())
            out.append((str(name), lo, hi))
        return sorted(out, key=lambda p: -(2**64) if p[1] is None else p[1])

    def close(self) -> None:
        self.conn.close()


class PostgresStore(SqlStore):
    """A PostgreSQL database selected by a ``postgresql://`` URL."""

    def __init__(
        self, url: str, url_for_display: str, *, read_only: bool = False, migrate: bool = True
    ) -> None:
        super().__init__(
            PostgresDialect(url, read_only=read_only),
            url_for_display,
            read_only=read_only,
            migrate=migrate,
        )

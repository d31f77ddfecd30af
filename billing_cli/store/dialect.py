"""How the store talks to one database: the :class:`Dialect` interface, no billing logic.

``sqlite.py`` and ``postgres.py`` implement it; everything that decides *what* is written
(``write/``), read (``reads.py``) or recorded (``runs.py``, ``integrity.py``) is written
once against it. Also here: the column lists of the hot tables, which the write model
names in its bulk writes and PostgreSQL's binary COPY types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

Row = tuple[Any, ...]
KeyCol = tuple[str, Literal["bigint", "text"]]


class Dialect(ABC):
    """How to talk to one database; no billing logic here."""

    name: Literal["sqlite", "postgres"]
    errors: tuple[type[Exception], ...]
    order_collate: str = ""  # appended to ORDER BY text columns (binary order everywhere)
    # Appended to the series lookup of apply(). SQLite needs nothing (BEGIN IMMEDIATE
    # already serialises writers); PostgreSQL locks the touched series rows so two
    # concurrent applies to one series cannot both meter against the same head.
    lock_series: str = ""
    # Load the series of a (node_id, env) a page touches in bulk by one range scan of the
    # series key index (and keep those the page names) instead of a key-set join. SQLite
    # only: on PostgreSQL the scan would also lock the untouched series rows.
    scan_series: bool = False

    @abstractmethod
    def q(self, sql: str) -> str:
        """Rewrite ``?`` placeholders for this driver."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    @abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abstractmethod
    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Row]: ...

    @abstractmethod
    def keyset(
        self, name: str, cols: Sequence[KeyCol], rows: Sequence[Row]
    ) -> tuple[str, list[Any]]:
        """A CTE fragment ``name(cols) AS (...)`` holding ``rows``, and its parameters."""

    keyset_chunk: int = 5000  # rows per key-set query

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """One atomic unit, committed at exit (rolled back on an exception)."""

    @abstractmethod
    def rolled_back(self) -> AbstractContextManager[None]:
        """Like :meth:`transaction` (same write locks), but always rolled back at exit."""

    @abstractmethod
    def has_table(self, name: str) -> bool:
        """Whether ``name`` is a table of the store's schema (without creating anything)."""

    @abstractmethod
    def bulk_insert(self, table: str, cols: Sequence[str], rows: Sequence[Row]) -> None:
        """Append rows to a table (executemany / COPY)."""

    @abstractmethod
    def add_uuid_usage(self, rows: Sequence[Row]) -> None:
        """Rows: (uuid, period_start_ns, d_uplink, d_downlink, bucket_start_ns): add the
        byte deltas to ``uuid_period_usage`` and raise its latest bucket start."""

    @abstractmethod
    def update_buckets(self, rows: Sequence[Row]) -> None:
        """Rows: (uplink, downlink, rated, amount, revision, included, series_id,
        bucket_start_ns)."""

    def insert_observations(self, rows: Sequence[Row]) -> None:
        """Rows: (series_id, collected_at_ns, uplink, downlink, epoch, run_id, source_id,
        until_ns)."""
        self.bulk_insert("observations", _OBS_COLS, rows)

    def close_runs(self, rows: Sequence[Row]) -> None:
        """Rows: (until_ns, series_id): end each series' open run (its latest row) at
        ``until_ns``. Before the rows that follow it are inserted."""
        self.executemany(
            "UPDATE observations SET until_ns = ? WHERE series_id = ? AND collected_at_ns ="
            " (SELECT max(p.collected_at_ns) FROM observations p WHERE p.series_id = ?)",
            [(u, sid, sid) for u, sid in rows],
        )

    @abstractmethod
    def update_heads(self, rows: Sequence[Row]) -> None:
        """Rows: (collected_at_ns, uplink, downlink, epoch, series_id)."""

    @abstractmethod
    def close(self) -> None: ...

    def migration_lock(self) -> None:  # noqa: B027 - optional hook, SQLite needs none
        """Serialise concurrent first-use migrations (inside the migration transaction)."""

    def lock_periods(self, *, exclusive: bool) -> None:  # noqa: B027 - SQLite needs none
        """Inside a transaction: shared by writers of postings, exclusive for a close
        (SQLite's BEGIN IMMEDIATE already serialises every writer)."""

    def lock_nodes(self, nodes: Sequence[tuple[str, str]]) -> None:  # noqa: B027 - SQLite needs none
        """Inside a transaction, in sorted order: one writer at a time per (node_id, env),
        until commit. A run's extension reads the node's item times; an item of the same
        node committed meanwhile without the series would be claimed by the run."""

    def lock_retention(self, *, exclusive: bool) -> None:  # noqa: B027 - SQLite needs none
        """Inside a transaction: shared by every apply (it meters against observations
        at or after the cut it reads), exclusive for raising the cut."""

    @abstractmethod
    def execute_count(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""

    # Whether observations, buckets and ledger postings are partitioned by month (set
    # once the schema is known: PostgreSQL from schema version 8; SQLite never).
    partitioned: bool = False

    def ensure_partitions(self, instants: Iterable[int]) -> None:  # noqa: B027 - SQLite: one file
        """Make sure the month partitions holding these instants (epoch ns) exist. Outside
        a transaction they are created in one of their own, committed (and remembered, so
        a month's partitions cost one catalog look-up per process); inside one (a dry run)
        they go with it."""

    def month_partitions(self, table: str) -> list[tuple[str, int | None, int | None]]:
        """The month partitions of ``table``: (name, lower bound, upper bound), in time
        order; None for an unbounded end. Empty when the table is not partitioned."""
        return []


# The hot tables' columns, in the order bulk writes give them.
_OBS_COLS = (
    "series_id",
    "collected_at_ns",
    "uplink_total",
    "downlink_total",
    "counter_epoch",
    "run_id",
    "source_id",
    "until_ns",
)
_BUCKET_COLS = (
    "series_id",
    "bucket_start_ns",
    "uplink_bytes",
    "downlink_bytes",
    "rated_bytes",
    "amount_nano",
    "revision",
    "included_bytes",
)
_LEDGER_COLS = (
    "series_id",
    "bucket_start_ns",
    "revision",
    "entry_type",
    "rated_bytes",
    "amount_nano",
    "currency",
    "pricing_rule_version",
    "run_id",
    "created_at_ns",
    "period_start_ns",
    "uplink_bytes",
    "downlink_bytes",
    "included_bytes",
)
_ADD_UUID_USAGE = (
    "INSERT INTO uuid_period_usage AS t (uuid, period_start_ns, uplink_bytes, downlink_bytes,"
    " last_bucket_start_ns) VALUES (?,?,?,?,?) ON CONFLICT (uuid, period_start_ns) DO UPDATE SET"
    " uplink_bytes = t.uplink_bytes + excluded.uplink_bytes,"
    " downlink_bytes = t.downlink_bytes + excluded.downlink_bytes,"
    " last_bucket_start_ns = CASE WHEN excluded.last_bucket_start_ns > t.last_bucket_start_ns"
    " THEN excluded.last_bucket_start_ns ELSE t.last_bucket_start_ns END"
)

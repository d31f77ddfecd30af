"""SQLite back end (the default): a file opened with the standard library's ``sqlite3``,
WAL journal.

Not through sqlite-utils, which DESIGN §6 names: the store needs explicit
``BEGIN IMMEDIATE`` transactions, ``WITHOUT ROWID`` tables, triggers and bulk
``executemany`` — all plain SQL, where sqlite-utils's table API adds nothing — and
importing it cost about 0.1 s in every cron run.

Durability choice: ``journal_mode=WAL`` with ``synchronous=NORMAL``. A killed process
never loses or half-applies a committed transaction (the WAL is written before COMMIT
returns; an interrupted transaction is simply absent on the next open). Only an OS crash
or power loss can drop the last few *committed* pages — and then their checkpoints go
with them (same transaction), so the next collect re-fetches them: invariant 4 holds and
FULL's per-commit fsync is not worth its cost on the ingest hot path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal
from urllib.parse import quote

from billing_cli.store.dialect import _ADD_UUID_USAGE, Dialect, KeyCol, Row
from billing_cli.store.sql import SqlStore

# SQLite's default limit of host parameters per statement is 32766.
_MAX_PARAMS = 30000


def _enable_wal(conn: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """Switch a new database file to WAL, waiting out concurrent first opens.

    The journal mode is stored in the file, so only the first open of a new database
    switches it; that switch needs an exclusive lock for which SQLite does not call the
    busy handler. Two cron runs (or ``status`` beside the first ``collect``) opening a new
    file together would otherwise fail with "database is locked".
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


# SQLite's lock bytes on the database file (os_unix.c): a SHARED lock is a read lock on
# these 510 bytes, the EXCLUSIVE lock a writer needs to checkpoint at close a write lock.
_PENDING_BYTE = 0x40000000
_SHARED_FIRST = _PENDING_BYTE + 2
_SHARED_SIZE = 510


class _Snapshot:
    """A read of a WAL database that no connection has open (no ``-wal`` file): every
    committed page is in the main file, so it is read as an immutable file, which creates
    no ``-wal``/``-shm`` (the directory may be read-only; files made by this user could
    lock the collector's user out later).

    A shared lock on the file's SHARED byte range keeps a writer that starts meanwhile from
    checkpointing into the file when it closes (it then leaves its WAL for the next one);
    any other change to the file while we read (an automatic checkpoint of a big WAL) is
    detected from its size/mtime and reported instead of returning a torn read.
    """

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB, _SHARED_SIZE, _SHARED_FIRST)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise sqlite3.OperationalError("database is locked") from None
                    time.sleep(0.05)  # a writer is checkpointing at close: wait for it
            self.stamp = self._stamp()
        except BaseException:
            os.close(self.fd)
            raise

    def _stamp(self) -> tuple[int, int, int]:
        st = os.fstat(self.fd)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def check(self) -> None:
        if self._stamp() != self.stamp:
            raise sqlite3.OperationalError(
                "the file changed while it was read (a collector checkpointed it); run the "
                "command again"
            )

    def close(self) -> None:
        os.close(self.fd)


def _uri(path: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"file:{quote(os.path.abspath(path))}?{query}"


class SQLiteDialect(Dialect):
    name: Literal["sqlite", "postgres"] = "sqlite"
    errors = (sqlite3.Error,)
    keyset_chunk = _MAX_PARAMS // 4  # rows of up to 4 columns stay under the limit
    scan_series = True

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self._snapshot: _Snapshot | None = None
        if read_only:
            self.conn = self._connect_read_only(path)
            return
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn = conn
        conn.execute("PRAGMA busy_timeout = 30000")
        if path != ":memory:":
            _enable_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        # Pages of one apply touch the b-tree leaves of every active series; a 64 MiB page
        # cache (default 2 MiB) keeps them resident instead of re-reading them per page.
        conn.execute("PRAGMA cache_size = -65536")
        conn.execute("PRAGMA temp_store = MEMORY")
        # Checkpoint the WAL every 256 MiB of frames (4 KiB pages): each apply re-dirties
        # one leaf per active series, so rarer checkpoints copy each page back once for
        # many commits (12% fewer bytes written, ~10% faster ingest at 16k-sample pages).
        # The WAL file is on disk, not in memory; it is checkpointed and removed on close.
        conn.execute("PRAGMA wal_autocheckpoint = 65536")
        # The version table and the schema are created by SqlStore._migrate, inside one
        # BEGIN IMMEDIATE transaction: concurrent first opens wait for each other there.

    def _connect_read_only(self, path: str) -> sqlite3.Connection:
        """``mode=ro``: no schema, no journal switch, no write lock, ever (DESIGN §8).

        With a writer at work (its ``-wal`` exists) the reader joins its WAL through the
        existing ``-shm`` (readable is enough, SQLite >= 3.22); otherwise the file is read
        as an immutable snapshot (see :class:`_Snapshot`)."""
        if os.path.exists(path + "-wal"):
            uri = _uri(path, mode="ro")
        else:
            self._snapshot = _Snapshot(path, timeout_s=30.0)
            uri = _uri(path, mode="ro", immutable="1")
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only = 1")
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA cache_size = -65536")
        except BaseException:
            if self._snapshot is not None:
                self._snapshot.close()
            raise
        return conn

    def q(self, sql: str) -> str:
        return sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        rows = self.conn.execute(sql, params).fetchall()
        if self._snapshot is not None:
            self._snapshot.check()
        return rows

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def execute_count(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self.conn.execute(sql, params).rowcount)

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Row]:
        yield from self.conn.execute(sql, params)
        if self._snapshot is not None:
            self._snapshot.check()

    def keyset(
        self, name: str, cols: Sequence[KeyCol], rows: Sequence[Row]
    ) -> tuple[str, list[Any]]:
        one = "(" + ",".join("?" * len(cols)) + ")"
        names = ", ".join(c for c, _ in cols)
        params = [v for r in rows for v in r]
        return f"{name}({names}) AS (VALUES {','.join([one] * len(rows))})", params

    @contextmanager
    def _tx(self, *, commit: bool) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT" if commit else "ROLLBACK")

    def transaction(self) -> AbstractContextManager[None]:
        return self._tx(commit=True)

    def rolled_back(self) -> AbstractContextManager[None]:
        return self._tx(commit=False)

    def has_table(self, name: str) -> bool:
        rows = self.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        )
        return bool(rows[0][0])

    def bulk_insert(self, table: str, cols: Sequence[str], rows: Sequence[Row]) -> None:
        marks = ",".join("?" * len(cols))
        self.conn.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", rows)

    def add_uuid_usage(self, rows: Sequence[Row]) -> None:
        self.conn.executemany(_ADD_UUID_USAGE, rows)

    def update_buckets(self, rows: Sequence[Row]) -> None:
        self.conn.executemany(
            "UPDATE buckets SET uplink_bytes = ?, downlink_bytes = ?, rated_bytes = ?,"
            " amount_nano = ?, revision = ?, included_bytes = ?"
            " WHERE series_id = ? AND bucket_start_ns = ?",
            rows,
        )

    def update_heads(self, rows: Sequence[Row]) -> None:
        self.conn.executemany(
            "UPDATE series SET head_collected_at_ns = ?, head_uplink = ?, head_downlink = ?,"
            " head_epoch = ? WHERE series_id = ?",
            rows,
        )

    def close(self) -> None:
        self.conn.close()
        if self._snapshot is not None:
            # After the connection: closing any descriptor of the file drops this
            # process's locks on it, so the lock goes last.
            self._snapshot.close()
            self._snapshot = None


class SQLiteStore(SqlStore):
    """The default store: one SQLite file."""

    def __init__(
        self,
        path: str,
        url_for_display: str | None = None,
        *,
        read_only: bool = False,
        migrate: bool = True,
    ) -> None:
        super().__init__(
            SQLiteDialect(path, read_only=read_only),
            url_for_display or path,
            read_only=read_only,
            migrate=migrate,
        )

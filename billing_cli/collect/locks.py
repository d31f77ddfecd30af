"""Per-source locks, so overlapping runs never process one source twice (DESIGN §7).

Cron starts ``billing collect`` every minute; a slow run may still hold some sources when
the next one starts, and several hosts may share one database. Every run therefore takes
a non-blocking lock per source before pulling it and skips (not fails) a source another
run holds. The lock is held until that source's last page is committed.

* SQLite: a lock file per source in ``<database>.locks/`` (``filelock``: ``flock`` on
  POSIX, released by the kernel if the process dies, so a killed run never leaves a stale
  lock behind). SQLite databases are local files, so a local lock is the right scope.
* PostgreSQL: a session advisory lock on a dedicated connection per held source,
  ``pg_try_advisory_lock(hashtext('billing:' || current_schema() || ':' || source_id))``
  — collectors on several hosts sharing one database exclude each other, and the server
  drops the lock when the connection dies. The schema is part of the key so that two
  deployments in different schemas of one database do not block each other.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from filelock import FileLock, Timeout

from billing_cli._errors import StoreError
from billing_cli.store import parse_database_url

if TYPE_CHECKING:
    import psycopg


class SourceLock(Protocol):
    def release(self) -> None: ...


class Locker(Protocol):
    def try_acquire(self, source_id: str) -> SourceLock | None:
        """Take the source's lock without waiting; ``None`` when another run holds it."""
        ...

    def close(self) -> None: ...


def is_postgres_url(url: str) -> bool:
    return parse_database_url(url).backend == "postgres"


def sqlite_path(url: str) -> str:
    """The file behind a SQLite store URL (plain path or ``sqlite:///path``)."""
    return parse_database_url(url).sqlite_path


def lock_dir_for(db_url: str) -> Path:
    return Path(sqlite_path(db_url) + ".locks")


def locker_for(db_url: str) -> Locker:
    if is_postgres_url(db_url):
        return AdvisoryLocker(db_url)
    path = sqlite_path(db_url)
    if path in ("", ":memory:"):
        return ThreadLocker()
    return FileLocker(lock_dir_for(db_url))


_SAFE = re.compile(r"[A-Za-z0-9._-]{1,100}")


def _file_name(source_id: str) -> str:
    if _SAFE.fullmatch(source_id) and not source_id.startswith("."):
        return f"{source_id}.lock"
    digest = hashlib.sha256(source_id.encode()).hexdigest()[:16]
    return f"source-{digest}.lock"


class _FileSourceLock:
    def __init__(self, lock: FileLock) -> None:
        self._lock = lock

    def release(self) -> None:
        self._lock.release(force=True)


class FileLocker:
    """One ``flock``-ed file per source next to the SQLite database."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def try_acquire(self, source_id: str) -> SourceLock | None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the lock directory {self.directory}: {exc.strerror}; "
                "make the database's folder writable"
            ) from None
        # thread_local=False: the writer thread may release what it acquired for a worker.
        lock = FileLock(str(self.directory / _file_name(source_id)), thread_local=False)
        try:
            lock.acquire(timeout=0, blocking=False)
        except Timeout:
            return None
        except OSError as exc:
            raise StoreError(
                f"cannot lock {self.directory / _file_name(source_id)}: {exc.strerror}"
            ) from None
        return _FileSourceLock(lock)

    def close(self) -> None:
        return None


class _ThreadSourceLock:
    def __init__(self, owner: ThreadLocker, source_id: str) -> None:
        self._owner = owner
        self._source_id = source_id

    def release(self) -> None:
        with self._owner.mutex:
            self._owner.held.discard(self._source_id)


class ThreadLocker:
    """In-process only (an in-memory SQLite database cannot be shared across processes)."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.held: set[str] = set()

    def try_acquire(self, source_id: str) -> SourceLock | None:
        with self.mutex:
            if source_id in self.held:
                return None
            self.held.add(source_id)
        return _ThreadSourceLock(self, source_id)

    def close(self) -> None:
        return None


_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtext('billing:' || current_schema() || ':' || %s))"
_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtext('billing:' || current_schema() || ':' || %s))"


class _AdvisorySourceLock:
    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], source_id: str) -> None:
        self._conn = conn
        self._source_id = source_id

    def release(self) -> None:
        try:
            self._conn.execute(_UNLOCK_SQL, (self._source_id,))
        except Exception:  # noqa: BLE001, S110 - closing the session releases it anyway
            pass
        finally:
            self._conn.close()


class AdvisoryLocker:
    """A PostgreSQL session advisory lock per source, each on its own connection."""

    def __init__(self, url: str) -> None:
        self.url = url

    def try_acquire(self, source_id: str) -> SourceLock | None:
        import psycopg

        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL to lock source '{source_id}': "
                f"{type(exc).__name__}; check the database URL and that the server is up"
            ) from None
        try:
            row = conn.execute(_LOCK_SQL, (source_id,)).fetchone()
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(
                f"cannot take the advisory lock for source '{source_id}': {type(exc).__name__}"
            ) from None
        if not row or not row[0]:
            conn.close()
            return None
        return _AdvisorySourceLock(conn, source_id)

    def close(self) -> None:
        return None

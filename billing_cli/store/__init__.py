"""Stores: ``open_store(url)`` picks the back end (DESIGN §6).

A ``postgresql://`` or ``postgres://`` URL selects PostgreSQL; ``sqlite:///path`` or any
plain path selects a SQLite file. Every failure to open is a one-line ``StoreError`` that
shows the URL with its password redacted.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from billing_cli._errors import StoreError
from billing_cli.store.base import Store

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_USERINFO = re.compile(r"(://[^/@\s:]*):[^@\s]*@")


def redact_url(url: str) -> str:
    """The URL with any password (userinfo or ``password=`` parameter) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^@/]*@", "//***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class DatabaseTarget:
    """What a ``--db`` value points at. The one parser every caller uses."""

    backend: Literal["sqlite", "postgres"]
    url: str
    sqlite_path: str = ""  # the file (or ":memory:") for SQLite; empty for PostgreSQL


def parse_database_url(url: str) -> DatabaseTarget:
    """``postgresql://``/``postgres://`` (any case) is PostgreSQL; ``sqlite:///rel.db``,
    ``sqlite:////abs.db`` or a plain path is a SQLite file; any other scheme is refused."""
    m = _SCHEME.match(url)
    scheme = m.group(1).lower() if m else None
    if scheme in ("postgresql", "postgres"):
        return DatabaseTarget("postgres", url)
    if scheme is not None and scheme != "sqlite":
        raise StoreError(
            f"unsupported database URL {redact_url(url)!r}: use postgresql://... or a SQLite "
            "file path (--db / BILLING_DATABASE_URL)"
        )
    path = url
    if scheme == "sqlite":
        rest = url[len("sqlite://") :]
        # sqlite:///rel.db -> rel.db; sqlite:////abs.db -> /abs.db; sqlite:// -> :memory:
        path = rest[1:] if rest.startswith("/") else rest
        path = path or ":memory:"
    return DatabaseTarget("sqlite", url, path)


def open_store(url: str, *, read_only: bool = False, migrate: bool = True) -> Store:
    """Open the store at ``url``: migrated on first use, or with ``read_only`` for the read
    commands — nothing is created, migrated or locked, a missing database or one without
    the billing schema is a ``StoreError`` ("no billing data in ..."), and the session
    cannot write (SQLite ``mode=ro``, PostgreSQL ``default_transaction_read_only``).
    ``migrate=False`` (dry runs) opens for writing but, like a reader, creates and
    migrates nothing: its writes are rolled back, its database must already be there."""
    target = parse_database_url(url)
    if target.backend == "postgres":
        return _open_postgres(url, read_only=read_only, migrate=migrate)
    return _open_sqlite(target.sqlite_path, read_only=read_only, migrate=migrate)


def _open_sqlite(path: str, *, read_only: bool = False, migrate: bool = True) -> Store:
    from billing_cli.store.sqlite import SQLiteStore

    if not path:
        raise StoreError("empty database path: pass --db FILE or set BILLING_DATABASE_URL")
    if path == ":memory:" and (read_only or not migrate):
        raise StoreError("no billing data in :memory: (a new in-memory database is empty)")
    if path != ":memory:":
        file = Path(path).expanduser()
        parent = file.parent
        if (read_only or not migrate) and not file.exists():
            raise StoreError(
                f"database {path} does not exist: nothing collected yet "
                "(run `billing collect` or `billing ingest FILE`, or point --db at the database)"
            )
        if not parent.is_dir():
            raise StoreError(
                f"database {path}: directory {parent} does not exist;"
                " create it or pass another --db"
            )
        path = str(file)
    try:
        return SQLiteStore(path, read_only=read_only, migrate=migrate)
    except sqlite3.Error as exc:
        raise StoreError(f"database {path}: cannot open SQLite file: {exc}") from None
    except OSError as exc:
        raise StoreError(f"database {path}: cannot open: {exc.strerror or exc}") from None


def _open_postgres(url: str, *, read_only: bool = False, migrate: bool = True) -> Store:
    import psycopg

    from billing_cli.store.postgres import PostgresStore

    shown = redact_url(url)
    try:
        return PostgresStore(url, shown, read_only=read_only, migrate=migrate)
    except psycopg.Error as exc:
        # psycopg messages can echo connection parameters; keep the first line only and
        # never the raw URL.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "password" in first.lower():
            first = "authentication failed"
        # A malformed URL is quoted back whole by libpq: never with its password.
        first = _USERINFO.sub(r"\1:***@", first.replace(url, shown))
        raise StoreError(f"database {shown}: cannot connect: {first}") from None


__all__ = ["open_store", "redact_url"]

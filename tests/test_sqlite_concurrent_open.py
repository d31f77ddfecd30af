"""Several processes opening one new SQLite database at once (two cron runs on a fresh
deployment, ``status`` beside the first ``collect``) all succeed: none sees "locked"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OPEN = "from billing_cli.store import open_store; open_store({db!r}).close()"


def test_concurrent_first_opens_all_succeed(tmp_path: Path) -> None:
    for trial in range(6):
        db = str(tmp_path / f"fresh-{trial}.db")
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN.format(db=db)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        failed = [
            e.strip().splitlines()[-1] for p, e in zip(procs, errors, strict=True) if p.returncode
        ]
        assert failed == [], f"trial {trial}: {failed}"


def test_opening_a_current_schema_takes_no_write_lock(tmp_path: Path) -> None:
    """A collect opening the store while another writer holds the lock (a long page, a
    dry run's page) must not queue for the lock just to see the schema is current: it
    used to fail after busy_timeout with "could not migrate the schema: database is
    locked"."""
    import sqlite3
    import threading

    from billing_cli.store import open_store

    db = str(tmp_path / "b.db")
    open_store(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held
    opened: list[object] = []

    def open_it() -> None:
        try:
            opened.append(open_store(db))
        except Exception as exc:  # reported below
            opened.append(exc)

    thread = threading.Thread(target=open_it, daemon=True)
    thread.start()
    thread.join(10)  # far below the 30 s busy_timeout an attempt at the lock would wait
    holder.rollback()
    holder.close()
    assert not thread.is_alive(), "opening the store waited for the write lock"
    store = opened[0]
    assert not isinstance(store, Exception), store
    store.close()  # type: ignore[attr-defined]

"""Read commands (``status``, ``usage``, ``ledger``, ``integrity list``) never write (DESIGN
§8): no schema creation, no migration, no write lock — on both back ends.

* a database without the billing schema is "no billing data in ..." (exit 4), and stays
  as it was (PostgreSQL: no table or view created);
* they answer at once while another process holds the SQLite write lock (a dry run, a
  collect), instead of waiting for it to migrate;
* SQLite opens with ``mode=ro``; in a read-only directory (a read-only bind mount as root,
  permission bits otherwise) they work and create no file;
* a schema newer than this billing is still exit 4; an older one is read as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from _read_data import REGISTRY, populate
from conftest import CliRunnerFn

from billing_cli.store import open_store
from billing_cli.store.schema import SCHEMA_VERSION
from billing_cli.store.sql import SqlStore

ROOT = Path(__file__).resolve().parent.parent

READS = [
    ("status",),
    ("usage", "--json"),
    ("ledger", "--json"),
    ("integrity", "list", "--json"),
]


def _tables(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        return sorted(
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()"
            )
        )


@pytest.mark.postgres
@pytest.mark.parametrize("args", READS, ids=lambda a: " ".join(a))
def test_reads_on_an_empty_postgres_database_create_nothing(
    cli: CliRunnerFn, postgres_url: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    (tmp_path / "sources.toml").write_text(REGISTRY)
    res = cli("--db", postgres_url, *args)
    assert res.exit_code == 4, res.output
    assert res.stderr.startswith("error: no billing data in postgresql://"), res.stderr
    assert len(res.stderr.splitlines()) == 1
    assert _tables(postgres_url) == []


@pytest.mark.parametrize("args", READS, ids=lambda a: " ".join(a))
def test_reads_on_a_sqlite_file_without_the_schema(
    cli: CliRunnerFn, tmp_path: Path, args: tuple[str, ...]
) -> None:
    (tmp_path / "sources.toml").write_text(REGISTRY)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    before = other.read_bytes()
    res = cli("--db", str(other), *args)
    assert res.exit_code == 4, res.output
    assert res.stderr.startswith(f"error: no billing data in {other}"), res.stderr
    assert other.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db", "sources.toml"]


@pytest.mark.parametrize("args", READS, ids=lambda a: " ".join(a))
def test_a_newer_schema_is_refused_by_reads(
    cli: CliRunnerFn, db_url: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    (tmp_path / "sources.toml").write_text(REGISTRY)
    populate(db_url)
    s = open_store(db_url)
    db = cast(SqlStore, s).db
    with db.transaction():
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    s.close()
    res = cli("--db", db_url, *args)
    assert res.exit_code == 4, res.output
    assert "newer than this billing supports" in res.stderr


def test_an_older_schema_is_not_migrated_by_a_reader(cli: CliRunnerFn, db_url: str) -> None:
    populate(db_url)
    # A database the previous release left: its version says 1 (tables are what matters
    # least here: a reader must not touch them either way).
    s = open_store(db_url)
    cast(SqlStore, s).db.execute("DELETE FROM schema_version WHERE version > 1")
    s.close()
    for args in (
        ("usage", "--json"),
        ("ledger",),
        ("integrity", "list"),
        ("statement", "--period", "2026-11"),
        ("period", "list"),
    ):
        res = cli("--db", db_url, *args)
        assert res.exit_code == 4, (args, res.output)
        assert res.stderr.count("\n") == 1
        assert "has schema version 1, older than this billing" in res.stderr
        assert "the next `billing collect` or `billing ingest` migrates it" in res.stderr
    assert _raw_version(db_url) == 1  # nothing was migrated


def _raw_version(url: str) -> int:
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    else:
        import sqlite3

        con = sqlite3.connect(url)
        try:
            row = con.execute("SELECT max(version) FROM schema_version").fetchone()
        finally:
            con.close()
    assert row is not None
    return int(row[0])


@pytest.mark.postgres
def test_a_read_only_postgres_store_cannot_write(postgres_url: str) -> None:
    populate(postgres_url)
    s = open_store(postgres_url, read_only=True)
    try:
        from billing_cli._errors import StoreError

        with pytest.raises(StoreError, match="read-only transaction"):
            s.start_run("ingest", [])
    finally:
        s.close()


def test_a_read_only_sqlite_store_cannot_write(tmp_path: Path) -> None:
    url = str(tmp_path / "b.db")
    populate(url)
    s = open_store(url, read_only=True)
    try:
        from billing_cli._errors import StoreError

        with pytest.raises(StoreError, match=r"readonly|read-only|query_only"):
            s.start_run("ingest", [])
    finally:
        s.close()


# --- locks ------------------------------------------------------------------------------------


def _billing(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "EXPORTER_"))}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "billing_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("args", READS, ids=lambda a: " ".join(a))
def test_reads_answer_while_another_process_holds_the_write_lock(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """What blocked behind a 37-second dry run: the reader tried to migrate (BEGIN
    IMMEDIATE) and waited out the 30 s busy timeout."""
    (tmp_path / "sources.toml").write_text(REGISTRY)
    url = str(tmp_path / "b.db")
    populate(url)
    writer = sqlite3.connect(url, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE runs SET outcome = outcome")
        started = time.monotonic()
        res = _billing("--db", url, *args, cwd=tmp_path, timeout=25)
        assert res.returncode in (0, 1), res.stderr  # status: 1 = sources not healthy
        assert "locked" not in res.stderr
        assert time.monotonic() - started < 20
    finally:
        writer.execute("ROLLBACK")
        writer.close()


# --- a read-only directory ---------------------------------------------------------------


def _can_bind_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind -o ro / /mnt 2>/dev/null || exit 3"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.fixture
def read_only_dir() -> Iterator[tuple[Path, list[str]]]:
    """A directory the reading process cannot write to, and the command prefix that runs a
    program so. As root (who ignores permission bits) a read-only bind mount in a private
    mount namespace; otherwise plain permission bits."""
    base = Path(tempfile.mkdtemp(prefix="billing-ro-"))
    d = base / "data"
    d.mkdir()
    if os.geteuid() == 0:
        if not _can_bind_mount():
            shutil.rmtree(base)
            pytest.skip("running as root without unshare/mount: cannot make a read-only dir")
        # mount --bind -o ro DIR DIR, then exec the command: it sees EROFS on every write.
        prefix = ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{d}" "{d}" && exec "$@"', "-"]
        yield d, prefix
    else:
        yield d, []
        d.chmod(0o755)
    shutil.rmtree(base, ignore_errors=True)


def _seal(d: Path) -> None:
    if os.geteuid() != 0:
        for p in d.iterdir():
            p.chmod(0o444)
        d.chmod(0o555)


def _run_in(prefix: list[str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "EXPORTER_"))}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [*prefix, sys.executable, "-m", "billing_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_read_only_dir_is_really_read_only(read_only_dir: tuple[Path, list[str]]) -> None:
    d, prefix = read_only_dir
    _seal(d)
    res = subprocess.run(
        [*prefix, "sh", "-c", f'touch "{d}/probe"'], capture_output=True, text=True, check=False
    )
    assert res.returncode != 0
    assert not (d / "probe").exists()


@pytest.mark.parametrize("args", READS, ids=lambda a: " ".join(a))
def test_reads_work_in_a_read_only_directory(
    read_only_dir: tuple[Path, list[str]], tmp_path: Path, args: tuple[str, ...]
) -> None:
    d, prefix = read_only_dir
    url = str(d / "billing.db")
    populate(url)  # cleanly closed: no -wal/-shm left, the usual state between collects
    (tmp_path / "sources.toml").write_text(REGISTRY)
    _seal(d)
    before = sorted(os.listdir(d))
    res = _run_in(prefix, tmp_path, "--db", url, *args)
    assert res.returncode in (0, 1), res.stderr  # status: 1 = sources never collected
    assert "readonly" not in res.stderr
    assert "read-only" not in res.stderr
    assert sorted(os.listdir(d)) == before == ["billing.db"]
    if args[0] == "usage":
        assert len(json.loads(res.stdout)) == 5


def test_reads_join_a_running_writer_without_creating_files(tmp_path: Path) -> None:
    """With a writer at work (-wal and -shm exist) the reader uses them, creates nothing,
    and sees what the writer has committed."""
    url = str(tmp_path / "b.db")
    populate(url)
    writer = sqlite3.connect(url, isolation_level=None)
    try:
        writer.execute("UPDATE runs SET outcome = 'x' WHERE run_id = 1")  # committed in WAL
        assert Path(url + "-wal").exists()
        names = sorted(os.listdir(tmp_path))
        s = open_store(url, read_only=True)
        try:
            assert cast(SqlStore, s).db.execute("SELECT outcome FROM runs WHERE run_id = 1") == [
                ("x",)
            ]
        finally:
            s.close()
        assert sorted(os.listdir(tmp_path)) == names
    finally:
        writer.close()


def test_a_snapshot_read_does_not_stop_a_writer(tmp_path: Path) -> None:
    """No -wal: the reader reads the file as an immutable snapshot, under a shared lock. A
    writer that starts meanwhile works; its closing checkpoint waits for a later close."""
    url = str(tmp_path / "b.db")
    populate(url)
    assert not Path(url + "-wal").exists()
    reader = open_store(url, read_only=True)
    try:
        # Another process (POSIX locks do not separate connections of one process).
        code = (
            "import sys; from billing_cli.store import open_store; s = open_store(sys.argv[1]);"
            " s.start_run('ingest', []); s.close()"
        )
        subprocess.run([sys.executable, "-c", code, url], check=True, timeout=60)
        rows = cast(SqlStore, reader).db.execute("SELECT count(*) FROM runs")
        assert rows == [(2,)]  # the snapshot: the writer's run is not in it
    finally:
        reader.close()
    again = open_store(url, read_only=True)
    try:
        assert cast(SqlStore, again).db.execute("SELECT count(*) FROM runs") == [(3,)]
    finally:
        again.close()


def test_a_snapshot_that_changes_underneath_is_an_error_not_a_torn_read(tmp_path: Path) -> None:
    from billing_cli._errors import StoreError

    url = str(tmp_path / "b.db")
    populate(url)
    reader = open_store(url, read_only=True)
    try:
        # Something rewrites the file while we read (what a big WAL's automatic checkpoint
        # does). In this process, so the shared lock does not stop it: POSIX locks do not
        # separate one process's descriptors.
        con = sqlite3.connect(url, isolation_level=None)
        con.execute("PRAGMA journal_mode = DELETE")  # writes straight into the file
        con.execute("UPDATE runs SET outcome = 'changed'")
        con.close()
        with pytest.raises(StoreError, match="changed while it was read"):
            reader.list_checkpoints()
    finally:
        reader.close()


@pytest.mark.postgres
def test_integrity_ack_on_an_empty_database_creates_nothing(
    cli: CliRunnerFn, postgres_url: str
) -> None:
    res = cli("--db", postgres_url, "integrity", "ack", "--all-open")
    assert res.exit_code == 4, res.output
    assert "no billing data in" in res.stderr
    assert _tables(postgres_url) == []

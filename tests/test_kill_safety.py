"""Kill safety: ``billing ingest`` SIGKILLed at several points, then run again, converges.

A real subprocess (``python -m billing_cli ingest``) applies a synthetic NDJSON file in
small atomic batches; it is killed during validation, right after its first committed
batch, and at later points of progress (seen from outside, in the database). Ingesting
again must converge to exactly what one uninterrupted ingest into a fresh database
produces: the same buckets, the same ledger sum per bucket, one charge per bucket, and a
store that opens cleanly.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from billing_cli.store import open_store
from billing_cli.store.base import RowFilter

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 60_000
BATCH = 3_000

REGISTRY = """\
[pricing]
currency = "USD"
unit = "MB"
price_per_unit = "0.013"
rule_version = "kill-test"
included_bytes_default = 300000000
"""


@pytest.fixture(scope="module")
def snapshot_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kill") / "big.ndjson"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_snapshots.py"),
            "--series", "600",
            "--nodes", "2",
            "--samples", str(SAMPLES),
            "--restarts", "4",
            "--out", str(path),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "DATABASE_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _cmd(db: str, registry: Path, data: Path) -> list[str]:
    return [
        sys.executable, "-m", "billing_cli",
        "--db", db, "--registry", str(registry),
        "ingest", "--json", "--batch-samples", str(BATCH), str(data),
    ]  # fmt: skip


def _start(db: str, registry: Path, data: Path, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        _cmd(db, registry, data),
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _count(db: str, table: str) -> int:
    """Committed rows of ``table``, read from outside (what a crash would leave)."""
    try:
        if db.startswith("postgresql://"):
            import psycopg

            with psycopg.connect(db, autocommit=True) as conn:
                row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        else:
            if not Path(db).exists():
                return 0
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
                row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    except Exception:  # table not created yet
        return 0
    return int(row[0]) if row else 0


def _observations(db: str) -> int:
    return _count(db, "counter_observations")


def _items(db: str) -> int:
    """Applied items: the progress polled while ingest runs (a few rows, where counting
    observations expands every run and was slower than the rest of a fast ingest)."""
    return _count(db, "node_items")


def _kill(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL; True when the process was still running (a real kill, not a late one)."""
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return alive


def _snapshot(db: str) -> tuple[list[tuple[Any, ...]], dict[tuple[Any, ...], int], Counter[Any]]:
    store = open_store(db)  # must open cleanly after the kills
    try:
        usage = sorted(
            (u.node_id, u.env, u.uuid, u.inbound_tag, u.bucket_start_ns, u.uplink_bytes,
             u.downlink_bytes)
            for u in store.iter_usage(RowFilter())
        )  # fmt: skip
        sums: dict[tuple[Any, ...], int] = {}
        charges: Counter[Any] = Counter()
        for row in store.iter_ledger(RowFilter()):
            key = (row.node_id, row.env, row.uuid, row.inbound_tag, row.bucket_start_ns)
            sums[key] = sums.get(key, 0) + row.amount_nano
            if row.entry_type == "charge":
                charges[key] += 1
        return usage, sums, charges
    finally:
        store.close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kill-registry") / "sources.toml"
    path.write_text(REGISTRY)
    return path


@pytest.fixture(scope="module")
def clean_db(
    tmp_path_factory: pytest.TempPathFactory, registry: Path, snapshot_file: Path
) -> tuple[str, int]:
    """The reference: one uninterrupted ingest into a fresh SQLite database."""
    tmp = tmp_path_factory.mktemp("clean")
    db = str(tmp / "clean.db")
    clean = subprocess.run(
        _cmd(db, registry, snapshot_file), cwd=tmp, env=_env(), capture_output=True
    )
    assert clean.returncode == 0, clean.stderr.decode()
    summary = orjson.loads(clean.stdout)
    assert summary["new_observations"] == summary["samples"] > 0
    assert summary["batches"] > 10
    return db, int(summary["samples"])


def _run_kill_scenario(
    db: str, clean: tuple[str, int], registry: Path, data: Path, cwd: Path
) -> None:
    clean_db, total = clean

    # 1. Killed almost at once: during start-up or the validation pass; nothing written.
    proc = _start(db, registry, data, cwd)
    time.sleep(0.15)
    _kill(proc)
    partial = _observations(db)
    assert partial < total

    # 2.-4. Killed once the database shows progress beyond the previous run's (the first
    # committed batch, then a quarter of the rest each time), after a different short delay
    # each time so that the kill lands at different points of the next batch's transaction.
    cut_short = 0
    items_total = _items(clean_db)
    for quarter, jitter in ((False, 0.0), (True, 0.013), (True, 0.037)):
        proc = _start(db, registry, data, cwd)
        # A quarter of the items left: the kill lands well before the end however fast
        # the store has become.
        done = _items(db)
        target = done + (max(1, (items_total - done) // 4) if quarter else 1)
        deadline = time.monotonic() + 30
        while _items(db) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "ingest made no progress"
            time.sleep(0.005)
        time.sleep(jitter)
        assert _kill(proc), "ingest finished before it could be killed: make the input larger"
        now = _observations(db)
        # Earlier batches stay committed. A kill may land after the last batch's commit
        # (the process still finishing its run): then everything is there, never more.
        assert partial < now <= total
        cut_short += now < total
        partial = now
    assert cut_short, "no kill landed before the last batch: make the input larger"

    # Finally run to completion: it converges.
    final = subprocess.run(_cmd(db, registry, data), cwd=cwd, env=_env(), capture_output=True)
    assert final.returncode == 0, final.stderr.decode()
    assert b"Traceback" not in final.stderr
    out = orjson.loads(final.stdout)
    assert out["duplicates"] + out["new_observations"] == total
    assert out["conflicts"] == 0

    got, want = _snapshot(db), _snapshot(clean_db)
    assert got[0] == want[0], "buckets differ from a clean ingest"
    assert got[1] == want[1], "ledger sums per bucket differ from a clean ingest"
    assert sum(got[1].values()) == sum(want[1].values()) > 0
    assert set(got[2].values()) == {1}, "a bucket has more than one charge posting"
    assert got[2] == want[2]

    # Once more: a pure replay changes nothing.
    again = subprocess.run(_cmd(db, registry, data), cwd=cwd, env=_env(), capture_output=True)
    assert again.returncode == 0
    assert orjson.loads(again.stdout)["duplicates"] == total
    assert _snapshot(db) == got


def test_kill_safety_sqlite(
    tmp_path: Path, registry: Path, snapshot_file: Path, clean_db: tuple[str, int]
) -> None:
    db = str(tmp_path / "killed.db")
    _run_kill_scenario(db, clean_db, registry, snapshot_file, tmp_path)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.postgres
def test_kill_safety_postgres(
    tmp_path: Path,
    registry: Path,
    snapshot_file: Path,
    clean_db: tuple[str, int],
    postgres_url: str,
) -> None:
    # The clean reference is SQLite: both back ends must also give identical results.
    _run_kill_scenario(postgres_url, clean_db, registry, snapshot_file, tmp_path)

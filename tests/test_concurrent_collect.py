"""Two ``billing collect`` PROCESSES on one database at the same time (SQLite and PostgreSQL).

Every source must be processed by exactly one of them (the other skips it because of the
per-source lock, or finds it no longer due once it holds the lock), and the totals must
be exact. The simulator counts requests per node, so double processing would show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from _collect_support import assert_no_secrets, expected_usage, fleet_end_ns, store_usage
from simfleet import DEFAULT_PRICING, SimFleet, sim_fleet  # noqa: F401  (fixture)

NODES = 4


def _spawn(registry: Path, db: str, cwd: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "EXPORTER_"))}
    env.pop("DATABASE_URL", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "billing_cli",
            "--registry",
            str(registry),
            "--db",
            db,
            "collect",
            "--json",
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _run_two(sim: SimFleet, db: str, tmp_path: Path) -> list[tuple[int, dict[str, object], str]]:
    registry = sim.dir / "sources.toml"
    registry.write_text(sim.registry_toml + DEFAULT_PRICING)
    for node in sim.fleet.nodes.values():
        # The first answer of every node is slow, so the two runs overlap for sure.
        node.set_fault("slow", times=1, delay_s=1.5)
    procs = [_spawn(registry, db, tmp_path)]
    time.sleep(0.2)
    procs.append(_spawn(registry, db, tmp_path))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        results.append((p.returncode, orjson.loads(out), out.decode() + err.decode()))
    return results


def _check(sim: SimFleet, db: str, results: list[tuple[int, dict[str, object], str]]) -> None:
    assert_no_secrets([text for _, _, text in results], sim.secrets())
    codes = sorted(code for code, _, _ in results)
    # One run did the work (0); the other found every source locked (75) or, if it got
    # a lock only after the first run committed, no longer due (0, nothing_due).
    assert codes[0] == 0, results
    assert codes[1] in (0, 75), results
    ok_by_source: dict[str, int] = {}
    for _, doc, _ in results:
        for row in doc["sources"]:  # type: ignore[attr-defined]
            assert row["status"] in ("ok", "skipped"), row
            if row["status"] == "ok":
                ok_by_source[row["source_id"]] = ok_by_source.get(row["source_id"], 0) + 1
    assert ok_by_source == {n: 1 for n in sim.fleet.nodes}, results
    for node_id, node in sim.fleet.nodes.items():
        # One pull of one chunk: exactly one request starts it (the rest follow cursors).
        starts = [q for ep, q in node.requests if ep == "window" and "cursor" not in q]
        assert len(starts) == 1, (node_id, starts)
        ats = node.collected_ats()
        assert store_usage(db, node_id) == expected_usage(node, ats[0], ats[-1])


@pytest.mark.slow
def test_two_processes_on_one_sqlite_database(
    sim_fleet: Callable[..., SimFleet],
    tmp_path: Path,
) -> None:
    sim = sim_fleet(nodes=NODES, series=20, minutes=20, end_ns=fleet_end_ns(), bearer=True)
    db = str(tmp_path / "billing.db")
    results = _run_two(sim, db, tmp_path)
    _check(sim, db, results)
    assert (tmp_path / "billing.db.locks").is_dir()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_processes_on_one_postgres_database(
    sim_fleet: Callable[..., SimFleet],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    sim = sim_fleet(nodes=NODES, series=20, minutes=20, end_ns=fleet_end_ns(), bearer=True)
    results = _run_two(sim, postgres_url, tmp_path)
    _check(sim, postgres_url, results)


@pytest.mark.slow
def test_killed_collect_leaves_a_consistent_store_and_no_stale_lock(
    sim_fleet: Callable[..., SimFleet],
    tmp_path: Path,
) -> None:
    """SIGKILL a collect in the middle of its pages; the next run gives exact totals."""
    import signal

    from billing_cli.store import open_store

    sim = sim_fleet(nodes=2, series=10, minutes=100, end_ns=fleet_end_ns())
    registry = sim.dir / "sources.toml"
    registry.write_text("[defaults]\npage_limit = 3\n\n" + sim.registry_toml + DEFAULT_PRICING)
    for node in sim.fleet.nodes.values():
        node.set_fault("slow", delay_s=0.1)  # ~35 pages per node: plenty of time to kill
    db = str(tmp_path / "billing.db")
    args = [
        sys.executable,
        "-m",
        "billing_cli",
        "--registry",
        str(registry),
        "--db",
        db,
        "collect",
        "--since",
        "3h",
        "--json",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if Path(db).exists() and store_usage(db):
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    partial = {n: store_usage(db, n) for n in sim.fleet.nodes}
    assert any(partial.values()), "the kill came too late to test anything"
    store = open_store(db)
    try:
        for cp in store.list_checkpoints():
            # Whatever the checkpoint claims is covered must really be in the store.
            if cp.last_successful_until_ns is not None:
                node = sim.fleet.node(cp.source_id)
                covered = [t for t in node.collected_ats() if t < cp.last_successful_until_ns]
                assert store_usage(db, cp.source_id) == expected_usage(
                    node, covered[0], covered[-1]
                )
    finally:
        store.close()

    for node in sim.fleet.nodes.values():
        node.clear_faults()
    out = subprocess.run(
        [*args[:-3], "--source", "node-01", "--source", "node-02", "--since", "3h", "--json"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()  # not 75: the kernel dropped the locks
    doc = orjson.loads(out.stdout)
    assert [s["status"] for s in doc["sources"]] == ["ok", "ok"]
    for node_id, node in sim.fleet.nodes.items():
        ats = node.collected_ats()
        assert store_usage(db, node_id) == expected_usage(node, ats[0], ats[-1])

"""SIGTERM is handled like SIGINT (issue 10, defect 6), with real processes and signals.

``billing collect``, ``reconcile`` and ``ingest`` run as ``python -m billing_cli``
subprocesses; collect and reconcile talk to a hostile exporter whose second request never
answers, so the run is mid-flight (one page committed, one request stuck) when the signal
arrives. Expected: exit 143 (SIGTERM) or 130 (SIGINT) within seconds — the stuck request
does not hold the run — one ``error:`` line, the run recorded ``interrupted``, the locks
released (the next run is not skipped). A SIGKILLed run leaves a ``runs`` row without an
outcome whose process is gone: ``billing status`` shows it as ``abandoned``. Both back ends.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from hostile_exporter import (
    SOURCE,
    HostileExporter,
    Reply,
    Request,
    hostile,
    item,
    sample,
    subprocess_env,
    wait_for,
    window_page,
)

from billing_cli._time import NS_PER_MINUTE
from billing_cli.store import open_store
from billing_cli.store.sql import SqlStore

__all__ = ["hostile"]

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STOP_WITHIN_S = 5.0


def pages_then_hang(t0: int) -> Callable[[Request], Reply]:
    """Page 1 at once (one item, has_more); every later page never answers."""

    def handler(req: Request) -> Reply:
        if "cursor" in req.query:
            return Reply(hang=True)
        items = [
            item(t0, [sample("u1", 1000, 2000)]),
            item(t0 + NS_PER_MINUTE, [sample("u1", 1500, 2500)]),
        ]
        return Reply(body=window_page(items, next_cursor="page-2", has_more=True))

    return handler


def normal(t0: int) -> Callable[[Request], Reply]:
    def handler(req: Request) -> Reply:
        return Reply(body=window_page([item(t0 + 2 * NS_PER_MINUTE, [sample("u1", 1600, 2600)])]))

    return handler


def start(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "billing_cli", *args],
        cwd=cwd,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen[bytes], signum: int) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running 30 s after {signal.Signals(signum).name}")
    return proc.returncode, err.decode(), time.monotonic() - t0


def committed(db: str) -> bool:
    """The first page is in: its cursor is in the checkpoint (read from outside)."""
    try:
        store = open_store(db)
    except Exception:
        return False
    try:
        cp = store.get_checkpoint(SOURCE)
        return cp is not None and cp.last_cursor == "page-2"
    except Exception:
        return False
    finally:
        store.close()


def runs(db: str) -> list[tuple[Any, ...]]:
    store = open_store(db)
    try:
        return cast(SqlStore, store).db.execute(
            "SELECT run_id, kind, outcome, pid, host FROM runs ORDER BY run_id"
        )
    finally:
        store.close()


def last_results(db: str) -> dict[str, tuple[str, str | None]]:
    store = open_store(db)
    try:
        return {k: (v.outcome, v.error) for k, v in store.last_source_results().items()}
    finally:
        store.close()


def setup(hostile: HostileExporter, tmp_path: Path) -> tuple[Path, int]:
    t0 = time.time_ns() - 20 * NS_PER_MINUTE
    registry = hostile.registry(tmp_path / "sources.toml", extra='request_timeout = "30s"')
    hostile.handler = pages_then_hang(t0)
    return registry, t0


def mid_flight(hostile: HostileExporter, db: str) -> None:
    assert wait_for(lambda: len(hostile.requests) >= 2 and committed(db)), "never got mid-flight"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_collect_mid_flight(
    hostile: HostileExporter, tmp_path: Path, db_url: str, signum: int, code: int
) -> None:
    registry, t0 = setup(hostile, tmp_path)
    proc = start(["--registry", str(registry), "--db", db_url, "collect", "--json"], tmp_path)
    mid_flight(hostile, db_url)
    rc, err, took = stop(proc, signum)
    name = signal.Signals(signum).name
    assert rc == code, err
    assert took < STOP_WITHIN_S, f"took {took:.1f}s to stop: a stuck request held the run"
    assert err.strip().splitlines()[-1] == f"error: interrupted by {name}"
    assert "Traceback" not in err
    # The run says how it ended, and what each source did; the first page stays committed.
    (run,) = runs(db_url)
    assert run[1:3] == ("collect", "interrupted")
    outcome, error = last_results(db_url)[SOURCE]
    assert outcome == "interrupted"
    assert name in (error or "")
    store = open_store(db_url)
    try:
        cp = store.get_checkpoint(SOURCE)
        assert cp is not None
        assert cp.last_successful_until_ns is None  # the chunk did not finish
        assert cp.consecutive_failures == 0  # an interruption is not the source's failure
    finally:
        store.close()
    # The lock was released: the next run collects it (exit 0, not 75 "skipped").
    hostile.handler = normal(t0)
    again = subprocess.run(
        [sys.executable, "-m", "billing_cli", "--registry", str(registry), "--db", db_url,
         "collect", "--source", SOURCE, "--json"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr.decode()
    assert orjson.loads(again.stdout)["sources"][0]["status"] == "ok"


def test_sigterm_stops_reconcile_mid_flight(
    hostile: HostileExporter, tmp_path: Path, db_url: str
) -> None:
    registry, _ = setup(hostile, tmp_path)
    args = ["--registry", str(registry), "--db", db_url, "reconcile", "--source", SOURCE]
    proc = start([*args, "--since", "30m", "--json"], tmp_path)
    assert wait_for(lambda: len(hostile.requests) >= 2), "never got mid-flight"
    time.sleep(0.3)
    rc, err, took = stop(proc, signal.SIGTERM)
    assert rc == 143, err
    assert took < STOP_WITHIN_S
    assert err.strip().splitlines()[-1] == "error: interrupted by SIGTERM"
    assert [r[1:3] for r in runs(db_url)] == [("reconcile", "interrupted")]
    assert last_results(db_url)[SOURCE][0] == "interrupted"


def test_sigterm_stops_ingest_between_or_inside_batches(tmp_path: Path, db_url: str) -> None:
    data = tmp_path / "big.ndjson"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_snapshots.py"), "--series", "400",
         "--samples", "200000", "--out", str(data)],
        check=True, capture_output=True,
    )  # fmt: skip
    proc = start(
        ["--db", db_url, "ingest", "--batch-samples", "1000", "--json", str(data)], tmp_path
    )

    def applying() -> bool:
        try:
            return any(r[1] == "ingest" for r in runs(db_url)) and observations(db_url) > 0
        except Exception:
            return False

    assert wait_for(applying, timeout_s=60), "ingest never started applying"
    rc, err, took = stop(proc, signal.SIGTERM)
    assert rc == 143, err
    assert took < STOP_WITHIN_S
    assert err.strip().splitlines()[-1] == "error: interrupted by SIGTERM"
    assert [r[1:3] for r in runs(db_url)] == [("ingest", "interrupted")], err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_input_is_read_writes_nothing(
    tmp_path: Path, db_url: str, signum: int, code: int
) -> None:
    """The input is read (and spooled) before anything is written: a stop then leaves the
    database as it was, without even a run row. The writer keeps stdin open, so the ingest
    is certainly still reading when the signal arrives."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "billing_cli", "--db", db_url, "ingest", "--batch-samples",
         "100", "--json", "-"],
        cwd=tmp_path, env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    lines = b"".join(
        orjson.dumps(
            {"node_id": "n", "env": "e",
             "collected_at": f"2026-11-18T{m // 60:02d}:{m % 60:02d}:05Z",
             "samples": [sample(f"u{k}", m * 10, m * 20) for k in range(20)]}
        ) + b"\n"
        for m in range(600)
    )  # fmt: skip
    assert len(lines) > 4 * 65536  # more than a pipe holds: once written, it is being read
    proc.stdin.write(lines)
    proc.stdin.flush()
    rc, err, took = stop(proc, signum)
    proc.stdin.close()
    assert rc == code, err
    assert took < STOP_WITHIN_S
    assert err.strip().splitlines()[-1] == f"error: interrupted by {signal.Signals(signum).name}"
    if not db_url.startswith("postgresql"):
        assert not Path(db_url).exists()  # not even opened
    assert runs(db_url) == []
    assert observations(db_url) == 0


def observations(db: str) -> int:
    store = open_store(db)
    try:
        return int(cast(SqlStore, store).db.execute("SELECT count(*) FROM observations")[0][0])
    finally:
        store.close()


def test_a_sigkilled_run_is_shown_abandoned_by_status(
    hostile: HostileExporter, tmp_path: Path, db_url: str
) -> None:
    registry, _ = setup(hostile, tmp_path)
    proc = start(["--registry", str(registry), "--db", db_url, "collect", "--json"], tmp_path)
    mid_flight(hostile, db_url)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    ((run_id, kind, outcome, pid, host),) = runs(db_url)
    assert (kind, outcome, pid) == ("collect", None, proc.pid)
    assert host
    status = subprocess.run(
        [sys.executable, "-m", "billing_cli", "--registry", str(registry), "--db", db_url,
         "status", "--json"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    doc = orjson.loads(status.stdout)
    last_run = doc["sources"][0]["last_run"]
    assert (last_run["run_id"], last_run["outcome"]) == (run_id, "abandoned")
    assert f"process {proc.pid}" in last_run["error"]
    table = subprocess.run(
        [sys.executable, "-m", "billing_cli", "--registry", str(registry), "--db", db_url,
         "status"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, check=False, timeout=60,
        text=True,
    )  # fmt: skip
    assert "collect abandoned" in table.stdout
    assert f"never finished: its process {proc.pid} on" in table.stdout
    # status only reads: the row is still without an outcome.
    assert runs(db_url)[0][2] is None

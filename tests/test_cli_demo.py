"""``billing demo`` end to end: real HTTPS servers, real SQLite, the real commands.

The database the demo leaves is checked against the simulator's own counters (the truth),
computed here independently of billing's metering code.
"""

from __future__ import annotations

import socket
from collections import defaultdict
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest

from billing_cli._errors import ExitCode
from billing_cli._time import minute_floor_ns
from billing_cli.cli.app import run
from billing_cli.demo import (
    MARKER,
    SOURCE_B,
    DemoError,
    DemoFolderError,
    DemoResult,
    run_demo,
)
from billing_cli.simulator.server import Fleet
from billing_cli.store import open_store
from billing_cli.store.base import RowFilter

pytestmark = pytest.mark.slow


def expected_usage(fleet: Fleet, node_id: str) -> dict[str, tuple[int, int]]:
    """uuid -> (uplink, downlink) billed from every item the node serves, by the rules:
    the first item is a baseline; a drop in either direction is a restart (count ``cur``)."""
    node = fleet.node(node_id)
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    prev: dict[str, tuple[int, int]] | None = None
    for at in node.collected_ats():
        cur = node.totals(at)
        if prev is not None:
            for uuid, (up, down) in cur.items():
                pu, pd = prev[uuid]
                if up < pu or down < pd:
                    du, dd = up, down
                else:
                    du, dd = up - pu, down - pd
                out[uuid][0] += du
                out[uuid][1] += dd
        prev = cur
    return {u: (v[0], v[1]) for u, v in out.items() if v != [0, 0]}


def quiet_demo(folder: Path, **kw: Any) -> tuple[DemoResult, list[str]]:
    lines: list[str] = []
    result = run_demo(folder, say=lines.append, global_args=["-q"], quiet=True, **kw)
    return result, lines


def assert_closed(ports: list[int]) -> None:
    for port in ports:
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def test_demo_end_to_end_matches_the_simulator(cli: Any, tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    res = cli("demo", "--dir", str(folder))
    assert res.exit_code == 0, res.output
    out = res.stdout
    # Narration and every step's output are there, in order.
    steps = ["1. First collect", "2. Xray restarts", "3. ", "4. Reconcile", "5. Health", "6. Usage"]
    positions = [out.index(s) for s in steps]
    assert positions == sorted(positions)
    for cmd in ("$ billing collect", "$ billing reconcile", "$ billing status", "$ billing usage"):
        assert cmd in out
    assert "healthy" in out
    assert "disabled" in out
    assert "Simulated exporters stopped." in out
    assert "Traceback" not in res.output
    # Its own files, no secret on screen.
    token = (folder / "secrets" / "token-b").read_text().strip()
    assert token not in res.output
    assert token not in (folder / "sources.toml").read_text()
    assert (folder / "tls" / "billing-client.key").stat().st_mode & 0o077 == 0
    assert (folder / MARKER).is_file()

    # The reconcile step reports the net money it posted: what its run added to the ledger.
    section = out[out.index("$ billing reconcile") : out.index("5. Health")]
    row = next(line.split() for line in section.splitlines() if line.startswith(SOURCE_B))
    shown = Decimal(row[5])  # source status new buckets bytesΔ amount missing
    store = open_store(str(folder / "billing.db"))
    try:
        (rec,) = [r for r in store.last_source_results().values() if r.kind == "reconcile"]
        posted = [r for r in store.iter_ledger(RowFilter()) if r.run_id == rec.run_id]
    finally:
        store.close()
    assert any(r.entry_type == "charge" for r in posted)  # the new bucket of the split
    assert any(r.entry_type == "adjustment" for r in posted)  # the old one
    assert shown == Decimal(sum(r.amount_nano for r in posted)) / 10**9
    assert "net money the run" in out

    # The folder is a working billing setup afterwards: status --json says healthy.
    st = cli(
        "status",
        "--json",
        "--registry",
        str(folder / "sources.toml"),
        "--db",
        str(folder / "billing.db"),
    )
    assert st.exit_code == 0, st.output
    assert '"healthy": true' in st.stdout


def test_demo_database_is_exact_and_the_late_item_was_repaired(tmp_path: Path) -> None:
    result, lines = quiet_demo(tmp_path / "demo")
    assert [code for _, code in result.steps] == [0] * len(result.steps)
    assert [cmd.split()[1] for cmd, _ in result.steps] == [
        "collect",
        "collect",
        "collect",
        "reconcile",
        "status",
        "usage",
        "ledger",
    ]
    assert_closed(result.ports)

    truth: dict[tuple[str, str], tuple[int, int]] = {}
    for node_id, fleet in result.fleets.items():
        for uuid, v in expected_usage(fleet, node_id).items():
            truth[(node_id, uuid)] = v
    # Node a restarted (a drop), node b got a late item: both are in the truth.
    node_b = result.fleets["node-b"].node("node-b")
    assert result.late_item_ns in node_b.collected_ats()

    store = open_store(str(result.database))
    try:
        got: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        late_bucket_rows = 0
        rated = Decimal(0)
        for row in store.iter_usage(RowFilter()):
            got[(row.node_id, row.uuid)][0] += row.uplink_bytes
            got[(row.node_id, row.uuid)][1] += row.downlink_bytes
            if row.node_id == "node-b" and row.bucket_start_ns == minute_floor_ns(
                result.late_item_ns
            ):
                late_bucket_rows += 1
            # price 0.05 per GB, charge total: each bucket rounded half-even to 1e-9 once.
            amount = Decimal(row.total_bytes) * Decimal("0.05") / Decimal(10**9)
            rated += amount.quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN)
        ledger = list(store.iter_ledger(RowFilter()))
        reconciles = [r for r in store.last_source_results().values() if r.kind == "reconcile"]
    finally:
        store.close()
    assert {k: (v[0], v[1]) for k, v in got.items()} == truth
    # Only a reconcile could deliver the late item (outside the collect overlap).
    assert late_bucket_rows > 0
    assert [r.source_id for r in reconciles] == [SOURCE_B]
    assert reconciles[0].counts.get("new_observations", 0) > 0
    # The ledger, adjustments included, sums to the rating of the final buckets.
    assert sum(r.amount_nano for r in ledger) == int(rated * 10**9)
    assert any(r.entry_type == "adjustment" for r in ledger)
    assert {r.node_id for r in ledger} == {"node-a", "node-b"}
    assert any("Reconcile" in line for line in lines)


def test_rerun_replaces_only_its_own_files(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    quiet_demo(folder)
    (folder / "my-notes.txt").write_text("keep me")
    first_token = (folder / "secrets" / "token-b").read_text()
    result, _ = quiet_demo(folder)
    assert (folder / "my-notes.txt").read_text() == "keep me"
    assert (folder / "secrets" / "token-b").read_text() != first_token
    assert [code for _, code in result.steps] == [0] * 7


def test_refuses_to_wipe_a_folder_it_did_not_make(cli: Any, tmp_path: Path) -> None:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "sources.toml").write_text("# the real registry")
    res = cli("demo", "--dir", str(folder))
    assert res.exit_code == ExitCode.CONFIG
    assert "refusing to wipe" in res.stderr
    assert str(folder) in res.stderr
    assert (folder / "sources.toml").read_text() == "# the real registry"
    assert sorted(p.name for p in folder.iterdir()) == ["sources.toml"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DemoFolderError):
        quiet_demo(afile)


def test_servers_stop_when_a_step_fails_or_is_interrupted(tmp_path: Path) -> None:
    seen: list[list[int]] = []

    def failing_reconcile(args: list[str]) -> int:
        return 1 if "reconcile" in args else run(args)

    def interrupted_status(args: list[str]) -> int:
        return 130 if "status" in args else run(args)

    def record(result: DemoResult) -> None:  # pragma: no cover - never reached
        seen.append(result.ports)

    ports: list[int] = []

    def spy(fn: Any) -> Any:
        def wrapped(args: list[str]) -> int:
            # Ports of the servers running right now: read from the registry being used.
            text = Path(args[args.index("--registry") + 1]).read_text()
            for line in text.splitlines():
                if line.startswith("base_url") and ":9/" not in line:
                    ports.append(int(line.split(":")[2].split("/")[0]))
            return int(fn(args))

        return wrapped

    with pytest.raises(DemoError, match="reconcile"):
        quiet_demo(tmp_path / "d1", run_billing=spy(failing_reconcile), keep_running=record)
    assert ports
    assert_closed(sorted(set(ports)))
    ports.clear()
    with pytest.raises(KeyboardInterrupt):
        quiet_demo(tmp_path / "d2", run_billing=spy(interrupted_status), keep_running=record)
    assert ports
    assert_closed(sorted(set(ports)))
    assert seen == []


def test_quiet_demo_prints_nothing(cli: Any, tmp_path: Path) -> None:
    res = cli("-q", "demo", "--dir", str(tmp_path / "demo"))
    assert res.exit_code == 0, res.output
    assert res.stdout == ""


def test_keep_running_advances_the_fleet_until_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing_cli.demo import keep_serving

    calls: list[int] = []
    real_advance = Fleet.advance

    def advance(self: Fleet, minutes: int = 1) -> None:
        if len(calls) == 4:
            raise KeyboardInterrupt  # the operator's Ctrl-C while serving
        calls.append(minutes)
        real_advance(self, minutes)

    said: list[str] = []
    serve = keep_serving(said.append, tick_s=0.01)

    # Fleet.advance is only patched for the serving phase, not for the demo's own steps.
    def serve_patched(result: DemoResult) -> None:
        with monkeypatch.context() as m:
            m.setattr(Fleet, "advance", advance)
            before = {n: len(f.node(n).collected_ats()) for n, f in result.fleets.items()}
            serve(result)
            after = {n: len(f.node(n).collected_ats()) for n, f in result.fleets.items()}
        assert sum(after.values()) - sum(before.values()) == 4
        # While serving, the exporters answer: the port is open.
        for port in result.ports:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

    result, lines = quiet_demo(tmp_path / "demo", keep_running=serve_patched)
    assert calls == [1, 1, 1, 1]
    assert any("Ctrl-C" in line for line in said)
    assert lines[-1] == "Simulated exporters stopped."
    assert_closed(result.ports)


def test_default_folder_is_billing_demo_in_the_working_directory(cli: Any, tmp_path: Path) -> None:
    res = cli("-q", "demo")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "billing-demo" / MARKER).is_file()
    assert (tmp_path / "billing-demo" / "billing.db").is_file()

"""Tables for people at 80 columns, on a real pseudo-terminal (what ``stty size`` says).

Every table (``sources list``, ``usage``, ``ledger``, ``integrity list``, ``collect``,
``reconcile`` and the demo's) must fit: no line runs past the right edge, every header
is whole (no ``sour…``), long ids are shortened, and free text (errors, details) is
printed below the table. ``--wide`` shows every column. (``billing status`` has its own.)

Also here: log lines on a terminal go through the progress bar's console (printed above
the bar, never onto its line), and the bar of a long single-source pull moves per chunk
and shows pages and samples.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path

import pytest
from _collect_support import fleet_end_ns
from _pty import PtyResult, Screen, run_in_pty
from simfleet import DEFAULT_PRICING, SimFleet, sim_fleet  # noqa: F401  (fixture)

from billing_cli._time import NS_PER_MINUTE
from billing_cli.core.types import Item, Rejection, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import Batch

ROOT = Path(__file__).resolve().parent.parent
NODES = ["frankfurt-prod-1", "tokyo-prod-2"]
TAG = "vless-reality-in"


def _fits(res: PtyResult, headers: list[str]) -> Screen:
    screen = res.screen
    assert res.exit_code in (0, 1), str(screen)
    assert screen.wrapped == [], f"lines wider than 80 columns:\n{screen}"
    text = screen.text
    for line in text:
        assert len(line) <= 80, line
    header = next(
        (line for line in text if all(h in line.split("  ") or h in line for h in headers)), None
    )
    assert header is not None, f"no header line with {headers}:\n{screen}"
    for h in headers:
        assert re.search(rf"(^|\s){re.escape(h)}(\s|$)", header), (h, header)
    assert "Traceback" not in str(screen)
    return screen


@pytest.fixture
def data_db(tmp_path: Path) -> str:
    """Realistic widths: long node names and envs, real uuids, long integrity details."""
    url = str(tmp_path / "billing.db")
    pricing = Pricing(price_per_unit="0.05", unit="GB", currency="USD")
    uuids = [str(uuidlib.UUID(int=i * 7919 + 1, version=4)) for i in range(4)]
    t0 = 1_795_000_000 * 1_000_000_000
    t0 -= t0 % NS_PER_MINUTE
    items = []
    for m in range(4):
        for node in NODES:
            up, down = (m + 1) * 7_123_456_789, (m + 1) * 31_987_654_321
            samples = [
                Sample(u, f"{u[:4]}@example.org", TAG, up * (k + 1), down * (k + 1))
                for k, u in enumerate(uuids)
            ]
            items.append(
                Item(t0 + m * NS_PER_MINUTE + 5_000_000_000, node, "production", "1", samples)
            )
    late_sample = Sample(uuids[0], "x@example.org", TAG, 21_000_000_000, 93_000_000_000)
    late = Item(t0 + 2 * NS_PER_MINUTE + 40_000_000_000, NODES[0], "production", "1", [late_sample])
    store = open_store(url)
    try:
        run = store.start_run("ingest", [])
        rej = Rejection(t0, NODES[1], "production", uuids[2], TAG,
                        "uplink_bytes_total: not a JSON integer (got a float: 1.5e+12); the sample "
                        "is refused and the rest of the item is kept")  # fmt: skip
        store.apply(Batch(items, run, pricing, "frankfurt-prod-1", rejections=[rej]))
        store.apply(Batch([late], run, pricing, "frankfurt-prod-1"))
        store.record_integrity_event(
            "identity_mismatch",
            node_id="frankfurt-prod-1-impostor",
            env="production",
            source_id="frankfurt-prod-1",
            detail="source 'frankfurt-prod-1': page 1 of chunk 2026-11-24T09:00:00Z is from "
            "node_id 'frankfurt-prod-1-impostor' env 'production' but the registry says node_id "
            "'frankfurt-prod-1' env 'production'; nothing from it was applied",
        )
    finally:
        store.close()
    return url


@pytest.mark.parametrize(
    ("args", "headers"),
    [
        (("usage",), ["bucket (UTC)", "node_id", "env", "uuid", "tag", "bytes"]),
        (("usage", "--by", "hour"), ["bucket (UTC)", "node_id", "uuid", "bytes"]),
        (("usage", "--totals"), ["uuid", "uplink", "downlink", "total"]),
        (("ledger",), ["bucket (UTC)", "uuid", "node_id", "type", "bytes", "amount", "cur"]),
        (("ledger", "--totals"), ["uuid", "rated bytes", "amount", "currency"]),
        (("integrity", "list"), ["id", "kind", "source", "uuid", "collected at (UTC)"]),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, tuple) else None,
)
def test_read_tables_fit_80_columns(
    data_db: str, tmp_path: Path, args: tuple[str, ...], headers: list[str]
) -> None:
    screen = _fits(run_in_pty(["--db", data_db, *args], cwd=tmp_path), headers)
    text = str(screen)
    if args != ("usage", "--totals") and args != ("ledger", "--totals"):
        assert "…" in text  # uuids shortened (full ones in --wide, JSON and CSV)
    if args[0] == "integrity":
        # The details are below the table, whole, one per event.
        assert "nothing from it was applied" in text.replace("\n", " ")
        assert re.search(r"^ \d+: source 'frankfurt-prod-1'", text, re.M)


def test_wide_shows_every_column(data_db: str, tmp_path: Path) -> None:
    res = run_in_pty(["--db", data_db, "ledger", "--wide"], cols=320, cwd=tmp_path)
    assert res.exit_code == 0
    text = str(res.screen)
    for col in ("entry_id", "inbound_tag", "revision", "pricing_rule_version", "created_at"):
        assert col in text
    assert "…" not in text


def test_sources_list_fits_80_columns(tmp_path: Path) -> None:
    res = run_in_pty(
        ["--registry", str(ROOT / "sources.example.toml"), "sources", "list"], cwd=tmp_path
    )
    screen = _fits(res, ["id", "node/env", "auth", "on", "url"])
    assert "jp-1" in str(screen)


# --- collect, reconcile and the demo against a simulated fleet -----------------------------


@pytest.fixture
def fleet_env(sim_fleet: Callable[..., SimFleet], tmp_path: Path) -> tuple[SimFleet, Path, str]:
    sim = sim_fleet(nodes=NODES, env="production", series=12, minutes=20, end_ns=fleet_end_ns())
    registry = sim.write_registry(extra=DEFAULT_PRICING)
    return sim, registry, str(tmp_path / "billing.db")


def test_collect_and_reconcile_tables_fit_80_columns(
    fleet_env: tuple[SimFleet, Path, str], tmp_path: Path
) -> None:
    sim, registry, db = fleet_env
    sim.fleet.node(NODES[1]).set_fault("status", status=503)  # an error to show below
    base = ["--registry", str(registry), "--db", db]
    screen = _fits(
        run_in_pty([*base, "collect"], cwd=tmp_path),
        ["source", "status", "samples", "new", "buckets", "postings", "lag"],
    )
    text = str(screen)
    assert re.search(rf"^ {NODES[1]}: error: source '{NODES[1]}'", text, re.M), text
    sim.fleet.node(NODES[1]).clear_faults()
    screen = _fits(
        run_in_pty([*base, "reconcile", "--all", "--since", "2h", "--dry-run"], cwd=tmp_path),
        ["source", "status", "new", "buckets", "bytes Δ", "amount USD", "missing min"],
    )
    assert re.search(r"dry run:\s+nothing was written", str(screen))


def test_the_demo_fits_80_columns(tmp_path: Path) -> None:
    res = run_in_pty(["demo", "--dir", str(tmp_path / "d")], cwd=tmp_path)
    screen = res.screen
    assert res.exit_code == 0, str(screen)
    # The demo folder's own path is the only thing that may be long (the test's tmp dir).
    wide = [screen.text[r] for r in screen.wrapped]
    assert all(str(tmp_path)[:30] in line for line in wide), wide
    text = str(screen)
    for needle in ("collect run 1", "amount USD", "Usage totals per uuid", "Ledger totals"):
        assert needle in text


# --- progress and logs ---------------------------------------------------------------------


def test_retry_warnings_print_above_the_progress_bar(
    fleet_env: tuple[SimFleet, Path, str], tmp_path: Path
) -> None:
    """A 503 is retried with a WARNING log line while the bar is on screen: the line must
    stand on its own (the bar redrawn below it), not be written into the bar's line."""
    sim, registry, db = fleet_env
    node = sim.fleet.node(NODES[0])
    node.set_fault("status", times=2, status=503)  # faults apply in the order they were set
    node.set_fault("slow", delay_s=0.4)
    res = run_in_pty(
        ["--registry", str(registry), "--db", db, "collect", "--source", NODES[0]], cwd=tmp_path
    )
    assert res.exit_code == 0, str(res.screen)
    assert "━" in res.raw  # the bar was drawn
    lines = res.screen.text
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 2, "\n".join(lines)
    for line in warnings:
        # On a line of its own, from the first column: the bar was cleared first.
        assert re.match(r"(\[[^\]]*\])?\s*WARNING ", line), line
        assert "━" not in line, line
        assert "collect" not in line, line
    assert " ".join(lines).count("retrying in") == 2


@pytest.mark.parametrize(
    "command", [("reconcile", "--dry-run"), ("collect",)], ids=["reconcile", "collect"]
)
def test_a_long_single_source_pull_shows_chunks_pages_and_samples(
    sim_fleet: Callable[..., SimFleet], tmp_path: Path, command: tuple[str, ...]
) -> None:
    """It showed 0/1 for a minute: the bar now counts chunks, its text pages and samples."""
    sim = sim_fleet(nodes=["solo"], series=8, minutes=180, end_ns=fleet_end_ns())
    registry = sim.write_registry(extra=DEFAULT_PRICING)
    registry.write_text('[defaults]\nchunk = "30m"\npage_limit = 5\n' + registry.read_text())
    sim.fleet.node("solo").set_fault("slow", delay_s=0.05)
    open_store(str(tmp_path / "b.db")).close()  # what a dry run compares against
    res = run_in_pty(
        ["--registry", str(registry), "--db", str(tmp_path / "b.db"), command[0],
         "--source", "solo", "--since", "4h", *command[1:]],
        cwd=tmp_path,
    )  # fmt: skip
    assert res.exit_code == 0, str(res.screen)
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", res.raw)
    # Chunks of 30 minutes over 4 hours: the bar counts them, the text names them.
    assert re.search(r"solo \d\d-\d\d \d\d:\d\d: page [1-9]\d*, [1-9][\d,]* samples", frames)
    assert re.search(r" [1-7]/8 ", frames), "the bar never moved between 0/8 and 8/8"
    assert ("reconcile (dry run)" if command[0] == "reconcile" else "collect solo") in frames

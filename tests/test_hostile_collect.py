"""``billing collect`` (and reconcile, status, integrity) against a hostile exporter over
real TLS, on both back ends (issue 10, "a hostile or broken exporter")."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import CliResult, CliRunnerFn
from hostile_exporter import (
    ENV,
    NODE,
    SOURCE,
    TOKEN,
    HostileExporter,
    Reply,
    Request,
    hostile,
    item,
    sample,
    window_page,
)

from billing_cli._time import NS_PER_MINUTE, format_rfc3339_ns
from billing_cli.store import open_store
from billing_cli.store.sql import SqlStore

__all__ = ["hostile"]


@dataclass
class Run:
    cli: CliRunnerFn
    registry: Path
    db: str
    outputs: list[str] = field(default_factory=list)

    def __call__(self, *args: str) -> CliResult:
        res = self.cli("--registry", str(self.registry), "--db", self.db, *args)
        self.outputs += [res.stdout, res.stderr]
        return res

    def json(self, *args: str, code: int | None = None) -> Any:
        res = self(*args, "--json")
        if code is not None:
            assert res.exit_code == code, res.output
        return orjson.loads(res.stdout)

    def collect(self, code: int | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = self.json("collect", "--source", SOURCE, code=code)
        return doc["sources"][0]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        extra = ("--kind", kind) if kind else ()
        out: list[dict[str, Any]] = self.json("integrity", "list", "--all", *extra, code=0)
        return out


@pytest.fixture
def run(hostile: HostileExporter, cli: CliRunnerFn, tmp_path: Path, db_url: str) -> Run:
    # One attempt per request: the retries of a 500 would only slow these tests down.
    registry = hostile.registry(tmp_path / "sources.toml", defaults="retry_attempts = 1")
    return Run(cli, registry, db_url)


def now_minus(minutes: int) -> int:
    return time.time_ns() - minutes * NS_PER_MINUTE


def serve(hostile: HostileExporter, items: list[dict[str, Any]], **page: Any) -> None:
    hostile.handler = lambda req: Reply(body=window_page(items, **page))


def dump(db: str) -> bytes:
    """Every byte the database holds that a leak could be in."""
    if not db.startswith("postgresql"):
        files = Path(db).parent.glob(Path(db).name + "*")
        return b"".join(p.read_bytes() for p in files if p.is_file())
    store = open_store(db)
    try:
        sql = store if isinstance(store, SqlStore) else None
        assert sql is not None
        names = sql.db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema ="
            " current_schema() AND table_type = 'BASE TABLE'"
        )
        return b"".join(repr(sql.db.execute(f'SELECT * FROM "{n}"')).encode() for (n,) in names)
    finally:
        store.close()


# --- rejections cannot fill the disk --------------------------------------------------------


def test_rejections_cannot_fill_the_disk(hostile: HostileExporter, run: Run, db_url: str) -> None:
    """The issue's attack: a 1 MiB invalid collected_at on an item of 1,000 samples, which
    the overlap re-delivers every minute."""
    bad = item("x" * (1 << 20), [sample(f"u{i}", i, i) for i in range(1000)])
    good = item(now_minus(1), [sample("ok", 10, 10)])  # inside every overlap's window
    serve(hostile, [bad, good])
    for _ in range(3):
        src = run.collect(code=0)
        assert (src["rejected"], src["new_observations"] + src["duplicates"]) == (1000, 1)
    (event,) = run.events("rejected")
    assert len(event["detail"]) <= 320
    assert event["detail"].endswith("(1000 samples)")
    assert "(1048576 characters)" in event["detail"]
    if not db_url.startswith("postgresql"):
        assert Path(db_url).stat().st_size < 2 << 20


# --- values that reject one sample, identical on both back ends ------------------------------


def test_absurd_values_reject_one_sample_and_both_stores_agree(
    hostile: HostileExporter, run: Run
) -> None:
    t = now_minus(10)
    at = format_rfc3339_ns(t)
    good = [sample("ok", 100, 200)]
    page = orjson.dumps(
        {
            "node_id": NODE,
            "env": ENV,
            "snapshots": [
                item(t - NS_PER_MINUTE, [sample("ok", 0, 0)]),
                {"collected_at": "9999-12-31T23:59:59Z", "samples": [sample("y9999")]},
                {"collected_at": "0001-01-01T00:00:00Z", "samples": [sample("y0001")]},
                item(t, [*good, sample("nul\u0000", 1, 1), sample("u" * 5000, 1, 1)]),
            ],
            "has_more": False,
        }
    )
    # Numbers json cannot write: spliced in as text.
    huge = (
        '{"collected_at":"' + at + '","samples":['
        '{"uuid":"inf","inbound_tag":"","uplink_bytes_total":1e400,"downlink_bytes_total":0},'
        '{"uuid":"digits","inbound_tag":"","uplink_bytes_total":' + "9" * 309
        + ',"downlink_bytes_total":0},'
        '{"uuid":"ok2","inbound_tag":"","uplink_bytes_total":5,"downlink_bytes_total":5}]}'
    )  # fmt: skip
    body = page.replace(b'],"has_more"', b"," + huge.encode() + b'],"has_more"')
    hostile.handler = lambda req: Reply(body=body)
    src = run.collect(code=0)
    assert src["rejected"] == 6
    assert src["status"] == "ok"
    usage = run.json("usage", code=0)
    assert [(u["uuid"], u["total_bytes"]) for u in usage] == [("ok", 300)]
    events = sorted((e["uuid"], e["collected_at"], e["detail"]) for e in run.events("rejected"))
    assert events == sorted([
        ("", at, "uuid contains a NUL character"),
        ("", at, "uuid is 5000 characters long (at most 128)"),
        # One event per item and reason: the two out-of-range counters are one.
        ("", at, "uplink_bytes_total is out of range (beyond 2^63) (2 samples)"),
        ("y0001", None, "invalid item: collected_at '0001-01-01T00:00:00Z' is outside the range"
         " billing can store (1678-01-01 to 2262-01-01)"),
        ("y9999", None, "invalid item: collected_at '9999-12-31T23:59:59Z' is outside the range"
         " billing can store (1678-01-01 to 2262-01-01)"),
    ])  # fmt: skip


# --- items outside the requested window -----------------------------------------------------


def test_items_outside_the_requested_window_are_rejected(
    hostile: HostileExporter, run: Run, db_url: str
) -> None:
    inside = now_minus(5)
    items = [
        item("1970-01-01T00:00:00Z", [sample("u1", 0, 0)]),  # would re-baseline u1
        item(inside - NS_PER_MINUTE, [sample("u1", 1000, 1000)]),
        item(inside, [sample("u1", 1500, 1500)]),
        item("2200-01-01T00:00:00Z", [sample("u1", 9999, 9999)]),  # buckets in 2200
        item(time.time_ns() + 2 * NS_PER_MINUTE, [sample("u1", 2000, 2000)]),  # after until
    ]
    serve(hostile, items)
    src = run.collect(code=0)
    assert src["rejected"] == 3
    usage = run.json("usage", code=0)
    assert [(u["bucket_start"], u["total_bytes"]) for u in usage] == [
        (format_rfc3339_ns(inside - inside % NS_PER_MINUTE), 1000)
    ]
    reasons = sorted((e["collected_at"][:4], e["detail"]) for e in run.events("rejected"))
    assert reasons == [
        ("1970", "collected_at is outside the window it was requested for"),
        (str(time.gmtime().tm_year), "collected_at is outside the window it was requested for"),
        ("2200", "collected_at is later than now plus the 5m clock-skew allowance"),
    ]
    # Rejected items do not count as the source's freshest data.
    store = open_store(db_url)
    try:
        cp = store.get_checkpoint(SOURCE)
        assert cp is not None
        assert cp.newest_collected_at_ns == inside
    finally:
        store.close()


# --- an echoed secret -----------------------------------------------------------------------


def echo(mode: str, t: int) -> Any:
    def handler(req: Request) -> Reply:
        tok = req.token
        assert tok == TOKEN
        if mode == "error_body":
            return Reply(status=500, body=f"denied {tok}".encode(), content_type="text/plain")
        if mode == "window_start":
            return Reply(body=window_page([], window_start=tok))
        if mode == "node_id":
            return Reply(body=window_page([item(t, [sample()])], node_id=f"evil-{tok}"))
        if mode == "item_node_id":
            return Reply(body=window_page([item(t, [sample()], node_id=tok)]))
        if mode == "collected_at":
            return Reply(body=window_page([item(f"{tok}T", [sample("u1", 1, 1)])]))
        if mode == "long_collected_at":  # cut inside the token when quoted
            return Reply(body=window_page([item("z" * 190 + tok * 3, [sample()])]))
        if mode.startswith("cut_at_"):  # 61..64 characters: the time parser's quote cuts
            n = int(mode.removeprefix("cut_at_"))  # it at 59, inside the token
            return Reply(body=window_page([item(("z" * n + tok)[-n:], [sample()])]))
        if mode == "sample":
            s = sample(f"id-{tok}", 5, 5, email=f"{tok}@x")
            return Reply(body=window_page([item(t, [s, sample("fine", 5, 5)])]))
        if mode == "escaped":  # a JSON escape hides the token from a byte search
            raw = window_page([item(t, [sample("u-" + tok, 1, 1)])])
            hidden = b"\\u%04x" % ord(tok[0]) + tok[1:].encode()
            return Reply(body=raw.replace(b'"u-' + tok.encode(), b'"u-' + hidden))
        if mode == "cursor":
            if req.query.get("cursor") == f"c-{tok}":
                return Reply(body=window_page([item(t + 1, [sample("ok", 9, 9)])]))
            return Reply(
                body=window_page([item(t, [sample("ok", 8, 8)])], next_cursor=f"c-{tok}",
                                 has_more=True)
            )  # fmt: skip
        raise AssertionError(mode)

    return handler


MODES = ["error_body", "window_start", "node_id", "item_node_id", "collected_at",
         "long_collected_at", "cut_at_61", "cut_at_64", "sample", "escaped",
         "cursor"]  # fmt: skip


def test_a_secret_echoed_by_the_exporter_is_never_printed_or_stored(
    hostile: HostileExporter, run: Run, db_url: str
) -> None:
    t = now_minus(5)
    for mode in MODES:
        hostile.handler = echo(mode, t)
        run("-vv", "collect", "--source", SOURCE)  # text logs; httpx logs each URL (cursor)
        run("--log-format", "json", "-v", "collect", "--source", SOURCE, "--json")
        run("reconcile", "--source", SOURCE, "--since", "10m", "--json")
        run("status", "--json")  # the last error of this mode
    run("reconcile", "--source", SOURCE, "--since", "10m")
    run("status")
    run("integrity", "list", "--all")
    run("integrity", "list", "--all", "--json")
    assert len(hostile.requests) >= 3 * len(MODES)
    joined = "\n".join(run.outputs)
    assert "[redacted]" in joined  # the echoes really happened and were caught
    assert TOKEN not in joined
    assert TOKEN[:12] not in joined  # not even the start of it, where a quote was cut
    assert TOKEN.encode() not in dump(db_url)
    assert TOKEN[:12].encode() not in dump(db_url)
    # The sample carrying the token was rejected, the other one kept.
    usage = run.json("usage", code=0)
    assert {u["uuid"] for u in usage} <= {"u1", "fine", "ok"}


# --- cursors ------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [60_000, 65_536])
def test_a_huge_cursor_is_a_protocol_error_of_the_source(
    hostile: HostileExporter, run: Run, length: int
) -> None:
    serve(hostile, [item(now_minus(5), [sample()])], next_cursor="c" * length, has_more=True)
    res = run("collect", "--source", SOURCE, "--json")
    assert res.exit_code == 1, res.output  # not 70 (InvalidURL)
    src = orjson.loads(res.stdout)["sources"][0]
    assert f"next_cursor is {length} characters long (at most 4096)" in src["error"]
    assert len(hostile.requests) == 1  # refused at once, never sent back


def test_endless_distinct_cursors_end_with_the_time_budget(
    hostile: HostileExporter, run: Run
) -> None:
    counter = iter(range(10**9))
    t = now_minus(5)

    def endless(req: Request) -> Reply:
        cursor = f"{next(counter):08d}" * 500  # 4,000 characters, never the same
        return Reply(body=window_page([item(t, [sample()])], next_cursor=cursor, has_more=True))

    hostile.handler = endless
    t0 = time.monotonic()
    res = run("collect", "--source", SOURCE, "--source-timeout", "2s", "--json")
    assert time.monotonic() - t0 < 20
    assert res.exit_code == 1, res.output
    assert "time budget of 2s" in orjson.loads(res.stdout)["sources"][0]["error"]
    assert len(hostile.requests) > 10


# --- the source budget while a request is in flight ------------------------------------------


def test_the_source_timeout_holds_while_headers_trickle(
    hostile: HostileExporter, cli: CliRunnerFn, tmp_path: Path
) -> None:
    registry = hostile.registry(tmp_path / "slow.toml", extra='request_timeout = "50s"')
    hostile.handler = lambda req: Reply(body=window_page([]), head_delay_s=0.3)
    result: list[CliResult] = []
    db = str(tmp_path / "slow.db")

    def go() -> None:
        result.append(
            cli("--registry", str(registry), "--db", db, "collect", "--source-timeout", "2s",
                "--json")
        )  # fmt: skip

    t0 = time.monotonic()
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(40)
    took = time.monotonic() - t0
    assert not thread.is_alive(), "collect ran past its --source-timeout"
    assert took < 6, f"took {took:.1f}s with --source-timeout 2s"
    (res,) = result
    assert res.exit_code == 1, res.output
    assert "time budget of 2s" in orjson.loads(res.stdout)["sources"][0]["error"]


# --- a mis-identified source --------------------------------------------------------------


def test_a_misidentified_source_is_one_event_per_distinct_claim(
    hostile: HostileExporter, run: Run
) -> None:
    t = now_minus(5)
    serve(hostile, [item(t, [sample()])], node_id="someone-else")
    for _ in range(4):  # cron, every minute
        assert run.collect(code=1)["status"] == "failed"
    assert [e["node_id"] for e in run.events("identity_mismatch")] == ["someone-else"]
    serve(hostile, [item(t, [sample()])], node_id="a-third")
    run.collect(code=1)
    run.collect(code=1)
    assert [e["node_id"] for e in run.events("identity_mismatch")] == ["someone-else", "a-third"]

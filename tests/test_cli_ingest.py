"""``billing ingest`` end to end through the real CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import CliResult, CliRunnerFn

from billing_cli.store import open_store
from billing_cli.store.base import RowFilter

REGISTRY = """\
[[sources]]
source_id = "node-a-prod"
node_id = "node-a"
env = "prod"
base_url = "https://node-a.example.net:9550"
auth_mode = "bearer"
credential_ref = "env:BILLING_TOKEN_A"
ca_bundle_ref = "system"

[pricing]
currency = "EUR"
unit = "B"
price_per_unit = "0.001"
rule_version = "test-1"
"""


# Yesterday (UTC): inside the default retention horizon (35 days) whenever the suite runs.
DAY = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")


def s(uuid: str, up: Any, down: Any, tag: str = "vless-in") -> dict[str, Any]:
    return {
        "uuid": uuid,
        "email": f"{uuid}@example.com",
        "inbound_tag": tag,
        "uplink_bytes_total": up,
        "downlink_bytes_total": down,
    }


def it(minute: int, samples: list[dict[str, Any]], node: str = "node-a") -> dict[str, Any]:
    return {
        "node_id": node,
        "env": "prod",
        "collected_at": f"{DAY}T10:{minute:02d}:05.123456789Z",
        "counter_epoch": "boot-1",
        "samples": samples,
    }


ITEMS = [
    it(0, [s("u1", 100, 1000), s("u2", 0, 0)]),  # baselines
    it(1, [s("u1", 300, 1500), s("u2", 50, 50)]),  # u1 +700, u2 +100
    it(2, [s("u1", 300, 1500), s("u2", 60, 70), s("u3", -1, 5)]),  # u1 idle, u2 +30, u3 bad
]


def ndjson(items: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(i) + b"\n" for i in items)


def run_json(cli: CliRunnerFn, *args: str, input: bytes | None = None) -> dict[str, Any]:
    res = cli(*args, "--json", input=input)
    assert "Traceback" not in res.output
    assert res.exit_code == 0, res.output
    out: dict[str, Any] = orjson.loads(res.stdout)
    return out


def state(db_url: str) -> tuple[list[tuple[Any, ...]], dict[tuple[Any, ...], int], int]:
    """Buckets, ledger sum per bucket, and the number of postings."""
    store = open_store(db_url)
    try:
        usage = sorted(
            (u.node_id, u.uuid, u.inbound_tag, u.bucket_start_ns, u.uplink_bytes, u.downlink_bytes)
            for u in store.iter_usage(RowFilter())
        )
        sums: dict[tuple[Any, ...], int] = {}
        n = 0
        for row in store.iter_ledger(RowFilter()):
            key = (row.node_id, row.uuid, row.inbound_tag, row.bucket_start_ns)
            sums[key] = sums.get(key, 0) + row.amount_nano
            n += 1
        return usage, sums, n
    finally:
        store.close()


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "sources.toml"
    path.write_text(REGISTRY)
    return path


def test_summary_numbers_exact_and_reingest_is_noop(
    cli: CliRunnerFn, tmp_path: Path, db_url: str, registry: Path
) -> None:
    f = tmp_path / "in.ndjson"
    f.write_bytes(ndjson(ITEMS))
    first = run_json(cli, "--db", db_url, "ingest", str(f))
    assert {k: first[k] for k in first if k not in ("run_id", "source_id")} == {
        "items": 3,
        "samples": 6,
        "new_observations": 6,
        "duplicates": 0,
        "conflicts": 0,
        "rejected_samples": 1,
        "beyond_retention": 0,
        "anomalies": 0,
        "buckets_changed": 3,
        "postings": 3,
        "adjustments": 0,
        "batches": 1,
        "charged_amount": "0.830000000",  # 830 bytes at 0.001 EUR/B
        "charge_amount": "0.830000000",
        "adjustment_amount": "0.000000000",
        "currency": "EUR",
    }
    usage, sums, postings = state(db_url)
    assert [(u[1], u[4], u[5]) for u in usage] == [("u1", 200, 500), ("u2", 50, 50), ("u2", 10, 20)]
    assert sum(sums.values()) == 830_000_000
    assert postings == 3

    again = run_json(cli, "--db", db_url, "ingest", str(f))
    assert (again["new_observations"], again["duplicates"]) == (0, 6)
    assert (again["buckets_changed"], again["postings"], again["conflicts"]) == (0, 0, 0)
    assert again["run_id"] != first["run_id"]
    assert state(db_url) == (usage, sums, postings)


def test_conflicting_redelivery_is_recorded_not_applied(
    cli: CliRunnerFn, tmp_path: Path, db_url: str, registry: Path
) -> None:
    f = tmp_path / "in.json"
    f.write_bytes(orjson.dumps(ITEMS))
    run_json(cli, "--db", db_url, "ingest", str(f))
    before = state(db_url)
    conflict = tmp_path / "conflict.json"
    conflict.write_bytes(orjson.dumps([it(1, [s("u1", 999, 1500), s("u2", 50, 50)])]))
    out = run_json(cli, "--db", db_url, "ingest", str(conflict))
    assert (out["conflicts"], out["duplicates"], out["new_observations"]) == (1, 1, 0)
    assert state(db_url) == before  # first delivery kept, nothing overwritten
    store = open_store(db_url)
    try:
        assert sum(store.integrity_event_counts().values()) >= 2  # the rejection + conflict
    finally:
        store.close()


def test_source_match_applies(
    cli: CliRunnerFn, tmp_path: Path, db_url: str, registry: Path
) -> None:
    page = {"node_id": "node-a", "env": "prod", "snapshots": ITEMS, "has_more": False}
    out = run_json(
        cli, "--db", db_url, "ingest", "--source", "node-a-prod", "-", input=orjson.dumps(page)
    )
    assert (out["source_id"], out["new_observations"], out["rejected_samples"]) == (
        "node-a-prod",
        6,
        1,
    )


def test_source_mismatch_writes_nothing(
    cli: CliRunnerFn, tmp_path: Path, db_url: str, registry: Path
) -> None:
    f = tmp_path / "mixed.ndjson"
    # The mismatch is the LAST item: earlier valid items must not be written either.
    f.write_bytes(ndjson([*ITEMS, it(3, [s("u9", 1, 1)], node="node-b")]))
    res = cli("--db", db_url, "ingest", "--source", "node-a-prod", str(f))
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert err.count("\n") == 0
    assert "item 4" in err
    assert "node_id='node-b'" in err
    assert "node_id='node-a'" in err
    assert "node-a-prod" in err
    assert "nothing written" in err
    assert state(db_url) == ([], {}, 0)


def test_stdin_and_small_batches_give_the_same_result(
    cli: CliRunnerFn, tmp_path: Path, db_url: str, registry: Path
) -> None:
    out = run_json(cli, "--db", db_url, "ingest", "--batch-samples", "2", "-", input=ndjson(ITEMS))
    assert out["batches"] == 3  # an item is never split: 2, 2, 3 samples
    assert (out["new_observations"], out["buckets_changed"], out["postings"]) == (6, 3, 3)
    assert out["charged_amount"] == "0.830000000"


def test_bad_ndjson_line_writes_nothing(
    cli: CliRunnerFn, tmp_path: Path, db_url: str, registry: Path
) -> None:
    f = tmp_path / "bad.ndjson"
    f.write_bytes(ndjson(ITEMS) + b'{"collected_at": \n')
    res = cli("--db", db_url, "ingest", "--batch-samples", "1", str(f))
    assert res.exit_code == 3
    assert "Traceback" not in res.output
    assert "line 4: invalid JSON" in res.stderr
    assert "nothing written" in res.stderr
    assert state(db_url) == ([], {}, 0)


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        (None, 3, "no such file"),
        (b"", 3, "empty input"),
        (b"{not json}", 3, "invalid JSON"),
        (b'{"node_id": "n", "env": "e", "items": {}}', 3, "items: expected an array"),
        (b'[{"collected_at": "2026-11-24T10:00:00Z", "samples": []}]', 3, "node_id missing"),
        (b"\xff\xfe garbage", 3, "invalid JSON"),
    ],
)
def test_unparseable_input_exit_3(
    cli: CliRunnerFn, tmp_path: Path, content: bytes | None, code: int, message: str
) -> None:
    f = tmp_path / "input.json"
    if content is not None:
        f.write_bytes(content)
    res = cli("ingest", str(f))
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "billing.db").exists()


def test_directory_and_unknown_source(cli: CliRunnerFn, tmp_path: Path, registry: Path) -> None:
    res = cli("ingest", str(tmp_path))
    assert (res.exit_code, "is a directory" in res.stderr) == (3, True)
    f = tmp_path / "in.ndjson"
    f.write_bytes(ndjson(ITEMS))
    res = cli("ingest", "--source", "nope", str(f))
    assert res.exit_code == 2
    assert "no source 'nope'" in res.stderr
    assert "Traceback" not in res.output


def test_without_registry_rates_at_zero_with_warning(cli: CliRunnerFn, tmp_path: Path) -> None:
    f = tmp_path / "in.ndjson"
    f.write_bytes(ndjson(ITEMS))
    res = cli("ingest", "--json", str(f))
    assert res.exit_code == 0, res.output
    assert res.stderr.count("warning: no registry") == 1
    out = orjson.loads(res.stdout)
    assert (out["new_observations"], out["charged_amount"]) == (6, "0.000000000")
    # --source needs the registry: a clear config error, not a silent zero rating.
    res = cli("ingest", "--source", "node-a-prod", str(f))
    assert res.exit_code == 2
    assert "sources.toml" in res.stderr


def test_a_registry_without_pricing_rates_at_zero_with_warning(
    cli: CliRunnerFn, tmp_path: Path
) -> None:
    f = tmp_path / "in.ndjson"
    f.write_bytes(ndjson(ITEMS))
    reg = tmp_path / "sources.toml"
    reg.write_text(REGISTRY.split("[pricing]")[0])
    res = cli("ingest", "--json", str(f))
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == [
        f"warning: {reg.name}: no [pricing] table: everything rates at zero "
        "(add [pricing] with price_per_unit to rate)"
    ]
    assert orjson.loads(res.stdout)["charged_amount"] == "0.000000000"
    # An explicit zero price is a decision, not an accident: no warning.
    reg.write_text(REGISTRY.replace('price_per_unit = "0.001"', 'price_per_unit = "0"'))
    res = cli("ingest", str(f))
    assert (res.exit_code, "warning" in res.stderr) == (0, False)


def test_table_output_and_quiet(cli: CliRunnerFn, tmp_path: Path, registry: Path) -> None:
    f = tmp_path / "in.ndjson"
    f.write_bytes(ndjson(ITEMS))
    res: CliResult = cli("ingest", str(f))
    assert res.exit_code == 0
    for label in (
        "items",
        "samples",
        "new observations",
        "duplicates",
        "conflicts",
        "rejected samples",
        "buckets changed",
        "ledger postings",
    ):
        assert label in res.stdout
    assert "0.830000000 EUR" in res.stdout
    res = cli("-q", "ingest", str(f))
    assert (res.exit_code, res.stdout, res.stderr) == (0, "", "")


def test_help_has_examples(cli: CliRunnerFn) -> None:
    res = cli("ingest", "--help")
    assert res.exit_code == 0
    assert "Examples:" in res.stdout
    assert "billing ingest -" in res.stdout or "| billing ingest -" in res.stdout


def test_bad_samples_recorded_valid_rest_applied(
    cli: CliRunnerFn, tmp_path: Path, db_url: str, registry: Path
) -> None:
    good0, good1 = it(0, [s("ok", 0, 0)]), it(1, [s("ok", 1000, 0)])
    bad = it(
        1,
        [
            s("neg", -1, 0),
            s("flt", 1.5, 0),
            s("str", "10", 0),
            s("bool", True, 0),
            s("big", 2**63, 0),
            s("", 1, 1),
            s("ok", 5, 5),  # duplicate of a series already in this item (item 2 below)
        ],
        node="node-a",
    )
    bad["collected_at"] = f"{DAY}T10:01:30Z"
    bad["samples"].insert(0, s("ok", 1500, 0))
    no_zone = it(2, [s("ok", 2000, 0), s("x", 1, 1)])
    no_zone["collected_at"] = f"{DAY}T10:02:05"
    # 2^64 and beyond written by hand: one sample rejected, not the document.
    huge = (
        b'{"node_id":"node-a","env":"prod","collected_at":"'
        + f"{DAY}T10:03:05Z".encode()
        + b'","samples":['
        b'{"uuid":"huge","inbound_tag":"vless-in","uplink_bytes_total":'
        b'340282366920938463463374607431768211456,"downlink_bytes_total":0},'
        b'{"uuid":"ok","inbound_tag":"vless-in","uplink_bytes_total":2500,'
        b'"downlink_bytes_total":0}]}\n'
    )
    f = tmp_path / "bad.ndjson"
    f.write_bytes(ndjson([good0, good1, bad, no_zone]) + huge)
    out = run_json(cli, "--db", db_url, "ingest", str(f))
    # 7 bad samples in `bad`, 2 in the zone-less item, 1 huge.
    assert out["rejected_samples"] == 10
    assert (out["items"], out["samples"], out["new_observations"]) == (4, 4, 4)
    usage, _, _ = state(db_url)
    # ok: 0 -> 1000 (10:01) -> 1500 (10:01:30) -> 2500 (10:03); the zone-less 2000 is gone.
    assert [(u[1], u[3] % 3_600_000_000_000 // 60_000_000_000, u[4]) for u in usage] == [
        ("ok", 1, 1500),
        ("ok", 3, 1000),
    ]
    store = open_store(db_url)
    try:
        # One event per item and reason: the zone-less item's two samples are one event.
        assert sum(store.integrity_event_counts().values()) == 9
    finally:
        store.close()


def test_store_unreachable_exit_4(cli: CliRunnerFn, tmp_path: Path) -> None:
    f = tmp_path / "in.ndjson"
    f.write_bytes(ndjson(ITEMS))
    res = cli("--db", str(tmp_path / "missing-dir" / "x.db"), "ingest", str(f))
    assert res.exit_code == 4
    assert "Traceback" not in res.output
    assert "missing-dir" in res.stderr


def test_apply_reads_exactly_what_was_validated(
    cli: CliRunnerFn, tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that grows once it has been read (an exporter appending): the tail is not
    applied unvalidated; it is picked up by the next ingest."""
    from billing_cli.cli import ingest

    f = tmp_path / "growing.ndjson"
    f.write_bytes(ndjson(ITEMS))
    original = ingest._read_input

    def read_then_append(*args: Any, **kwargs: Any) -> Any:
        parsed = original(*args, **kwargs)
        with f.open("ab") as out:  # foreign node: --source would refuse it
            out.write(ndjson([it(3, [s("u9", 1, 1)], node="node-b")]))
        return parsed

    monkeypatch.setattr(ingest, "_read_input", read_then_append)
    out = run_json(cli, "ingest", "--source", "node-a-prod", "--batch-samples", "2", str(f))
    assert (out["items"], out["new_observations"], out["batches"]) == (3, 6, 3)
    monkeypatch.setattr(ingest, "_read_input", original)
    res = cli("ingest", "--source", "node-a-prod", str(f))
    assert res.exit_code == 1
    assert "item 4" in res.stderr


def runs_and_observations(db_url: str) -> tuple[list[Any], int]:
    store = open_store(db_url)
    try:
        db = store.db  # type: ignore[attr-defined]
        runs = db.execute("SELECT kind, outcome FROM runs ORDER BY run_id")
        return [tuple(r) for r in runs], int(db.execute("SELECT count(*) FROM observations")[0][0])
    finally:
        store.close()


@pytest.mark.parametrize("bad", ["last line", "identity"])
def test_a_late_failure_writes_nothing_not_even_a_run_row(
    cli: CliRunnerFn, tmp_path: Path, db_url: str, registry: Path, bad: str
) -> None:
    """Many batches are read (and spooled) before the bad line or the foreign item at the
    end: none of them reaches the database, and no run is recorded."""
    items = [it(m % 60, [s(f"u{k}", m * 10, m * 20) for k in range(5)]) for m in range(40)]
    tail = (
        b'{"collected_at": \n'
        if bad == "last line"
        else ndjson([it(59, [s("u9", 1, 1)], node="node-b")])
    )
    f = tmp_path / "late.ndjson"
    f.write_bytes(ndjson(items) + tail)
    res = cli("--db", db_url, "ingest", "--source", "node-a-prod", "--batch-samples", "5", str(f))
    assert res.exit_code == (3 if bad == "last line" else 1), res.output
    assert "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.strip().endswith("nothing written")
    assert runs_and_observations(db_url) == ([], 0)


def test_the_input_is_parsed_once_with_the_gc_paused(
    cli: CliRunnerFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from billing_cli.cli import ingest

    calls: list[bool] = []  # gc.isenabled() at every batch the parser hands over
    original = ingest.iter_ingest

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(gc.isenabled())
        for batch in original(*args, **kwargs):
            calls.append(gc.isenabled())
            yield batch

    monkeypatch.setattr(ingest, "iter_ingest", counting)
    f = tmp_path / "in.ndjson"
    f.write_bytes(ndjson(ITEMS))
    out = run_json(cli, "ingest", "--batch-samples", "2", str(f))
    assert out["batches"] == 3
    assert calls == [False] * 4  # one parse (3 batches), never a second one; GC paused
    assert gc.isenabled()  # and back on afterwards


def test_a_named_pipe_is_read_once(cli: CliRunnerFn, tmp_path: Path) -> None:
    """Process substitution (`billing ingest <(xz -dc archive.ndjson.xz)`) hands over a
    pipe, which cannot be read twice or seeked."""
    import os
    import threading

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with fifo.open("wb") as w:
            w.write(ndjson(ITEMS))

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        out = run_json(cli, "ingest", "--batch-samples", "2", str(fifo))
    finally:
        writer.join(timeout=10)
    assert (out["items"], out["new_observations"], out["batches"]) == (3, 6, 3)


def test_spooled_and_in_memory_batches_give_the_same_result(
    cli: CliRunnerFn, tmp_path: Path, db_url: str, registry: Path
) -> None:
    """One batch is applied from memory; many go through the spool. Rejections, conflicts,
    emails, epochs, empty items and several nodes come back exactly."""
    rows = [
        it(0, [s("u1", 100, 1000), s("u2", 0, 0, tag="")]),
        it(0, [s("u1", 5, 5), s("x", 1.5, 0)], node="node-b"),
        {**it(1, [s("u1", 300, 1500), s("u2", 50, 50, tag="")]), "counter_epoch": None},
        {**it(1, [], node="node-b"), "samples": None},
        it(2, [{**s("u1", 300, 1500), "email": "renamed@example.org"}, s("u3", -1, 5)]),
        {**it(3, [s("u1", 400, 1600), s("u2", 60, 70, tag="")]), "counter_epoch": 7},
        {**it(2, [s("u1", 350, 1550)]), "collected_at": "2026-11-24T10:02:35Z"},  # late
        it(1, [s("u1", 999, 1500)]),  # conflicts with the 10:01 item
        {**it(4, [s("u1", 1, 1)]), "collected_at": "2026-11-24T10:04:05"},  # no zone
    ]
    f = tmp_path / "mixed.ndjson"
    f.write_bytes(ndjson(rows))
    results = []
    for batch, db in (("1000000", db_url), ("1", str(tmp_path / "spooled.db"))):
        out = run_json(cli, "--db", db, "ingest", "--batch-samples", batch, str(f))
        results.append(({k: v for k, v in out.items() if k not in ("run_id", "batches")}, db))
        assert out["batches"] == (1 if batch != "1" else 8)
    (one, db_one), (many, db_many) = results
    assert one == many
    assert (one["conflicts"], one["rejected_samples"]) == (1, 3)
    assert state(db_one) == state(db_many)


def test_a_spool_that_cannot_be_written_writes_nothing(
    cli: CliRunnerFn, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from billing_cli.cli import _spool

    def full(self: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_spool.Spool, "_write_record", full)
    f = tmp_path / "in.ndjson"
    f.write_bytes(ndjson(ITEMS))
    res = cli("--db", db_url, "ingest", "--batch-samples", "2", str(f))
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output
    (line,) = res.stderr.strip().splitlines()
    assert "No space left on device" in line
    assert "TMPDIR" in line
    assert line.endswith("nothing written")
    assert runs_and_observations(db_url) == ([], 0)


def test_one_store_transaction_per_batch(
    cli: CliRunnerFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing_cli.store.sql import SqlStore

    sizes: list[int] = []
    original = SqlStore.apply

    def apply(self: SqlStore, batch: Any) -> Any:
        sizes.append(sum(len(i.samples) for i in batch.items))
        return original(self, batch)

    monkeypatch.setattr(SqlStore, "apply", apply)
    items = [it(m, [s(f"u{k}", m, m) for k in range(3)]) for m in range(10)]
    f = tmp_path / "in.ndjson"
    f.write_bytes(ndjson(items))
    out = run_json(cli, "ingest", "--batch-samples", "7", str(f))
    assert sizes == [9, 9, 9, 3]  # whole items, about --batch-samples each, in input order
    assert out["batches"] == 4


def test_stdin_garbage_exit_3_nothing_written(cli: CliRunnerFn, tmp_path: Path) -> None:
    res = cli("ingest", "-", input=b'{"collected_at": "2026-11-24T10:00:00Z", "samples": [}\n')
    assert res.exit_code == 3
    assert res.stderr.startswith("error: stdin: ")
    assert "Traceback" not in res.output
    assert not (tmp_path / "billing.db").exists()


def test_reading_holds_about_one_batch_in_memory(tmp_path: Path) -> None:
    """Memory is bounded by a batch for NDJSON: the validated batches wait on disk, not in
    memory (measured against holding every parsed batch, in the same process)."""
    import sys
    import tracemalloc

    from billing_cli.cli import ingest
    from billing_cli.cli._spool import Spool
    from billing_cli.wire import iter_ingest

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import make_snapshots

    f = tmp_path / "fleet.ndjson"
    with f.open("wb") as out:
        items = make_snapshots.generate(
            series=500, minutes=200, nodes=1, active=0.3, restarts=1, seed=3, full_items=True
        )
        assert make_snapshots.write(out, items, "ndjson", 1) == 100_000

    def peak(work: Any) -> int:
        tracemalloc.start()
        try:
            with f.open("rb") as stream:
                work(stream)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    held: list[Any] = []
    everything = peak(lambda stream: held.extend(iter_ingest(stream, 2_000)))
    held.clear()
    with Spool(directory=tmp_path) as spool:
        spooled = peak(lambda stream: ingest._read_input(stream, "f", 2_000, None, None, spool))
        assert len(spool) == 50
    assert spooled < everything / 8, (spooled, everything)

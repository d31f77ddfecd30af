"""What a hostile exporter can make the store write, on both back ends: one rejection
event per item and reason (with its sample count), never stored twice when the overlap
re-delivers it; one identity-mismatch event per distinct claim; runs that know their
process, so a killed one shows as abandoned."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import cast

import pytest

from billing_cli.core.types import Item, Rejection, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import Batch, Store
from billing_cli.store.integrity import MAX_REJECTION_EVENTS_PER_ITEM
from billing_cli.store.sql import SqlStore

M = 60_000_000_000
T0 = 1_790_000_000 * 1_000_000_000 - (1_790_000_000 * 1_000_000_000) % M
BAD_TIME = (
    "invalid item: collected_at: not an RFC3339 timestamp with a zone: 'xxx…' (1048576 characters)"
)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    yield s
    s.close()


def rejected(store: Store) -> list[tuple[str, str, str]]:
    return [(e.uuid, e.inbound_tag, e.detail) for e in store.iter_integrity_events(kind="rejected")]


def test_one_event_per_item_and_reason_with_the_sample_count(store: Store) -> None:
    run = store.start_run("collect", ["s"])
    bad_item = [Rejection(None, "n", "e", f"u{i}", "", BAD_TIME) for i in range(1000)]
    other = [
        Rejection(T0, "n", "e", "a", "t", "uplink_bytes_total is negative (-1)"),
        Rejection(T0, "n", "e", "b", "t", "uplink_bytes_total is negative (-1)"),
        Rejection(T0, "n", "e", "c", "t", "uuid contains a NUL character"),
    ]
    good = Item(T0, "n", "e", None, [Sample("ok", "", "t", 1, 1)])
    report = store.apply(Batch([good], run, Pricing(), "s", rejections=bad_item + other))
    # Counts stay per sample (run results, health's rejection share).
    assert report.rejected == 1003
    assert report.rejection_reasons == {
        BAD_TIME: 1000,
        "uplink_bytes_total is negative (-1)": 2,
        "uuid contains a NUL character": 1,
    }
    assert sorted(rejected(store)) == sorted(
        [
            ("", "", f"{BAD_TIME} (1000 samples)"),
            ("", "t", "uplink_bytes_total is negative (-1) (2 samples)"),
            ("c", "t", "uuid contains a NUL character"),
        ]
    )
    assert report.new_observations == 1


def test_a_redelivered_rejection_is_not_stored_twice(store: Store) -> None:
    rejections = [Rejection(None, "n", "e", f"u{i}", "", BAD_TIME) for i in range(50)]
    rejections.append(Rejection(T0, "n", "e", "x", "t", "uuid contains a NUL character"))
    for minute in range(5):  # the overlap re-delivers the same bad item every minute
        run = store.start_run("collect", ["s"])
        good = Item(T0 + minute * M, "n", "e", None, [Sample("ok", "", "t", minute, minute)])
        report = store.apply(Batch([good], run, Pricing(), "s", rejections=rejections))
        assert report.rejected == 51
    assert len(rejected(store)) == 2
    # Another source delivering the same bad item says the same: still one event each.
    run = store.start_run("reconcile", ["s2"])
    store.apply(Batch([], run, Pricing(), "s2", rejections=rejections))
    assert len(rejected(store)) == 2
    # A different bad item is a new event.
    store.apply(Batch([], run, Pricing(), "s", rejections=[rejections[-1]._replace(uuid="y")]))
    assert len(rejected(store)) == 3


def test_an_item_with_many_distinct_reasons_has_a_bounded_number_of_events(store: Store) -> None:
    run = store.start_run("collect", ["s"])
    many = [
        Rejection(T0, "n", "e", f"u{i}", "t", f"uplink_bytes_total is negative (-{i})")
        for i in range(500)
    ]
    store.apply(Batch([], run, Pricing(), "s", rejections=many))
    events = rejected(store)
    assert len(events) == MAX_REJECTION_EVENTS_PER_ITEM + 1
    assert ("", "", "480 more rejected samples of this item, 480 other reasons") in events


def test_an_identity_mismatch_is_recorded_once_per_distinct_claim(store: Store) -> None:
    def mismatch(node: str) -> bool:
        return store.record_identity_mismatch(
            source_id="s", node_id=node, env="prod", collected_at_ns=None, run_id=1,
            detail=f"source 's': page is from node_id '{node}'",
        )  # fmt: skip

    assert mismatch("other") is True
    for _ in range(5):  # every minute, the same wrong exporter
        assert mismatch("other") is False
    assert mismatch("third") is True  # the claim changed
    assert mismatch("other") is True  # ... and changed back
    store.record_success("s", "n", "prod", 10**19 // 5)  # far "later" than the events
    assert mismatch("other") is True  # a new episode after the source was fine again
    kinds = [(e.kind, e.node_id) for e in store.iter_integrity_events(source_id="s")]
    assert kinds == [("identity_mismatch", n) for n in ("other", "third", "other", "other")]


def test_a_run_knows_its_process_and_a_dead_one_is_abandoned(store: Store) -> None:
    mine = store.start_run("collect", ["a"])
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(child.stdout)
    db = cast(SqlStore, store).db
    dead = store.start_run("collect", ["a", "b"])
    db.execute("UPDATE runs SET pid = ? WHERE run_id = ?", (dead_pid, dead))
    remote = store.start_run("ingest", [])
    db.execute("UPDATE runs SET host = ? WHERE run_id = ?", ("another-host.example", remote))
    finished = store.start_run("collect", ["a"])
    store.finish_run(finished, "ok", {})

    unfinished = {r.run_id: r for r in store.unfinished_runs()}
    assert set(unfinished) == {mine, dead, remote}
    assert unfinished[mine].pid == os.getpid()
    assert unfinished[mine].process_gone is False
    assert unfinished[dead].process_gone is True
    assert unfinished[remote].process_gone is None  # another host: cannot tell
    assert [(r.run_id, r.sources) for r in store.abandoned_runs()] == [(dead, ["a", "b"])]

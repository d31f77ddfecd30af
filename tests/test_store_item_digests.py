"""Items already applied whole are recognised by their digest and skipped (item_digests).

The shortcut must be invisible except in speed: the same reports, buckets, ledger,
integrity events and series emails as the exact per-observation path
(``remember_items_ns = None``). A
changed item is never skipped, and an item with a conflict is never remembered.
"""

from __future__ import annotations

import random
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_convergence import PRICING, Fleet, deliveries, fleets

from billing_cli._time import NS_PER_MINUTE, parse_rfc3339_ns
from billing_cli.core.types import Item, Sample
from billing_cli.store import open_store
from billing_cli.store.base import ApplyReport, Batch, RowFilter, Store
from billing_cli.store.sql import SqlStore
from billing_cli.store.write.grouping import REMEMBER_ITEMS_NS

T0 = parse_rfc3339_ns("2026-05-04T10:00:00Z")


def _item(minute: int, series: int = 50, *, bump: int = 0, node: str = "n1") -> Item:
    samples = [
        Sample(f"u{s:03d}", f"u{s}@example.com", "vless", minute * 1000 * (s % 3) + bump, s)
        for s in range(series)
    ]
    return Item(T0 + minute * NS_PER_MINUTE + 7, node, "prod", "e1", samples)


def _counts(r: ApplyReport) -> tuple[int, ...]:
    return (
        r.items,
        r.samples,
        r.new_observations,
        r.duplicates,
        r.conflicts,
        r.anomalies,
        r.buckets_changed,
        r.postings,
        r.adjustments,
    )


def _state(store: Store) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    usage = [
        (r.node_id, r.uuid, r.bucket_start_ns, r.uplink_bytes, r.downlink_bytes)
        for r in store.iter_usage(RowFilter())
    ]
    ledger = [
        (r.node_id, r.uuid, r.bucket_start_ns, r.revision, r.rated_bytes, r.amount_nano)
        for r in store.iter_ledger(RowFilter())
    ]
    # The same events; their order (ids) follows the grouping of a page, not a rule.
    events = sorted(
        (e.kind, e.node_id, e.uuid, e.collected_at_ns, e.detail)
        for e in store.iter_integrity_events(open_only=False)
    )
    emails = [
        tuple(r)
        for r in cast(SqlStore, store).db.execute(
            "SELECT node_id, uuid, inbound_tag, email FROM series ORDER BY node_id, uuid"
        )
    ]
    return usage, ledger, events, emails


def _digests(store: Store) -> list[tuple[int, str]]:
    rows = cast(SqlStore, store).db.execute(
        "SELECT collected_at_ns, node_id FROM item_digests ORDER BY collected_at_ns"
    )
    return [(int(r[0]), r[1]) for r in rows]


def _apply(store: Store, items: list[Item]) -> ApplyReport:
    return store.apply(Batch(items, store.start_run("ingest", ["t"]), PRICING, "t"))


def test_exact_replay_is_skipped_without_reading_observations(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(db_url)
    try:
        page = [_item(m) for m in range(5)]
        _apply(store, page)
        before = _state(store)

        def must_not_run(*_: object) -> None:
            raise AssertionError("an exact replay must not reach the per-series path")

        monkeypatch.setattr(SqlStore, "_apply_observations", must_not_run)
        r = _apply(store, page)
        assert (r.samples, r.duplicates, r.new_observations, r.postings) == (250, 250, 0, 0)
        assert _state(store) == before
    finally:
        store.close()


def test_changed_item_is_applied_and_its_conflict_never_remembered(db_url: str) -> None:
    store = open_store(db_url)
    try:
        _apply(store, [_item(m) for m in range(3)])
        remembered = _digests(store)
        changed = _item(2, bump=1)  # same node and collected_at, other totals
        for _ in range(2):  # not skipped the second time either: the conflict stays loud
            r = _apply(store, [changed])
            assert (r.conflicts, r.duplicates, r.new_observations) == (50, 0, 0)
        # ... in every run's report, but stored once: the overlap re-sends it every minute.
        events = list(store.iter_integrity_events(kind="conflict"))
        assert len(events) == 50
        # Other totals again are other findings.
        assert _apply(store, [_item(2, bump=2)]).conflicts == 50
        assert len(list(store.iter_integrity_events(kind="conflict"))) == 100
        assert _digests(store) == remembered
        # the original content is still recognised
        assert _apply(store, [_item(2)]).duplicates == 50
    finally:
        store.close()


def test_only_items_near_the_newest_of_their_node_are_remembered(db_url: str) -> None:
    store = open_store(db_url)
    try:
        minutes = range(0, 30, 3)
        _apply(store, [_item(m, 5) for m in minutes] + [_item(1, 5, node="n2")])
        newest = T0 + 27 * NS_PER_MINUTE + 7
        expected = [
            (T0 + m * NS_PER_MINUTE + 7, "n1")
            for m in minutes
            if T0 + m * NS_PER_MINUTE + 7 >= newest - REMEMBER_ITEMS_NS
        ]
        assert len(expected) == 4  # minutes 18..27 of n1
        assert _digests(store) == sorted([*expected, (T0 + NS_PER_MINUTE + 7, "n2")])
        # an older item replayed takes the exact path and gives the same counts
        r = _apply(store, [_item(0, 5)])
        assert (r.duplicates, r.new_observations) == (5, 0)
    finally:
        store.close()


def test_items_before_1970_are_applied_beside_others(db_url: str) -> None:
    store = open_store(db_url)
    try:
        early = Item(-3600 * 10**9, "n9", "prod", None, [Sample("u", "", "t", 5, 5)])
        r = _apply(store, [_item(0, 3), early, _item(1, 3)])
        assert (r.items, r.new_observations) == (3, 7)
        assert _apply(store, [early]).duplicates == 1
    finally:
        store.close()


def _email(store: Store, uuid: str) -> str:
    rows = cast(SqlStore, store).db.execute("SELECT email FROM series WHERE uuid = ?", (uuid,))
    return str(rows[0][0])


def _one(minute: int, email: str, total: int) -> Item:
    return Item(
        T0 + minute * NS_PER_MINUTE, "n1", "prod", "e1", [Sample("u", email, "t", total, 0)]
    )


@pytest.mark.parametrize(
    "pages",
    [
        [[_one(0, "old@x", 1), _one(1, "new@x", 2)], [_one(0, "old@x", 1)]],  # replay
        [[_one(1, "new@x", 2)], [_one(0, "old@x", 1)]],  # a late item
        [[_one(1, "new@x", 2), _one(0, "old@x", 1)]],  # one page, out of order
        [[_one(0, "old@x", 1)], [_one(1, "new@x", 2), _one(0, "old@x", 1)]],
    ],
    ids=["replay", "late", "unordered-page", "overlap"],
)
@pytest.mark.parametrize("remember", [True, False], ids=["digests", "exact"])
def test_series_email_is_that_of_its_latest_observation(
    db_url: str, pages: list[list[Item]], remember: bool
) -> None:
    store = open_store(db_url)
    if not remember:
        cast(SqlStore, store).remember_items_ns = None
    try:
        for page in pages:
            _apply(store, page)
        assert _email(store, "u") == "new@x"
    finally:
        store.close()


def test_item_with_a_counter_beyond_64_bits_is_refused_not_remembered(tmp_path: Any) -> None:
    from billing_cli._errors import StoreError

    store = open_store(str(tmp_path / "b.db"))
    try:
        big = Item(T0, "n1", "prod", None, [Sample("u", "", "t", 2**64, 0)])
        with pytest.raises(StoreError, match="64-bit"):
            _apply(store, [big])
        assert _digests(store) == []
    finally:
        store.close()


def _run_both(fleet: Fleet, rnd: random.Random, make: Any) -> None:
    """Every page's report and the final state are the same with and without digests."""
    pages = deliveries(fleet.items, rnd)
    pages.append(list(fleet.items))  # a full replay at the end
    results = []
    for remember in (REMEMBER_ITEMS_NS, None):
        store = make()
        cast(SqlStore, store).remember_items_ns = remember
        try:
            reports = [_counts(_apply(store, p)) for p in pages]
            results.append((reports, _state(store)))
        finally:
            store.close()
    assert results[0] == results[1]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleet=fleets(), rnd=st.randoms(use_true_random=False))
def test_reports_and_state_equal_the_exact_path(fleet: Fleet, rnd: random.Random) -> None:
    _run_both(fleet, rnd, lambda: open_store(":memory:"))

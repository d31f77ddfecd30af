"""Integrity events outside ``apply``: record, list, acknowledge (both back ends)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from billing_cli.core.types import Item, Rejection, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import Batch, Store

M = 60_000_000_000
T0 = 1_790_000_000 * 1_000_000_000 - (1_790_000_000 * 1_000_000_000) % M
PRICING = Pricing(price_per_unit="0.5", unit="KB", currency="EUR", rule_version="r7")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    yield s
    s.close()


def _item(t: int, up: int) -> Item:
    return Item(t, "n1", "prod", None, [Sample("a", "a@x", "vless", up, up)])


def _seed(store: Store) -> int:
    """A conflict and a rejection of source s1 through ``apply``; returns the run id."""
    run = store.start_run("ingest", ["s1"])
    store.apply(Batch([_item(T0, 0), _item(T0 + M, 100)], run, PRICING, "s1"))
    rej = Rejection(T0 + M, "n1", "prod", "bad", "vless", "uplink_bytes_total: not an integer")
    store.apply(Batch([_item(T0 + M, 999)], run, PRICING, "s1", rejections=[rej]))
    return run


def test_record_then_list_with_every_field(store: Store) -> None:
    run = _seed(store)
    store.record_integrity_event(
        "identity_mismatch",
        node_id="node-x",
        env="staging",
        source_id="s2",
        run_id=run,
        collected_at_ns=T0 + 7,
        detail="source 's2': page 1 is from node_id 'node-x'",
    )
    events = list(store.iter_integrity_events())
    # apply writes a batch's rejections and conflicts in its own order; ids are ascending.
    assert sorted(e.kind for e in events[:2]) == ["conflict", "rejected"]
    assert events[2].kind == "identity_mismatch"
    assert [e.id for e in events] == sorted(e.id for e in events)
    last = events[-1]
    assert (last.node_id, last.env, last.uuid, last.inbound_tag) == ("node-x", "staging", "", "")
    assert (last.source_id, last.run_id, last.collected_at_ns) == ("s2", run, T0 + 7)
    assert last.acknowledged_at_ns is None
    assert last.created_at_ns > 0
    assert "node-x" in last.detail
    rej = next(e for e in events if e.kind == "rejected")
    assert (rej.uuid, rej.inbound_tag, rej.source_id) == ("bad", "vless", "s1")
    # Filters: source, kind, since (created_at, inclusive).
    assert [e.kind for e in store.iter_integrity_events(source_id="s2")] == ["identity_mismatch"]
    assert [e.kind for e in store.iter_integrity_events(kind="rejected")] == ["rejected"]
    assert list(store.iter_integrity_events(since_ns=last.created_at_ns + 1)) == []
    assert [e.id for e in store.iter_integrity_events(since_ns=last.created_at_ns)] == [last.id]
    assert store.integrity_event_counts() == {"s1": 2, "s2": 1}


def test_acknowledge_by_ids_source_and_all(store: Store) -> None:
    _seed(store)
    store.record_integrity_event("identity_mismatch", node_id="x", env="e", detail="d")
    first, second, unattributed = list(store.iter_integrity_events())
    conflict, rejected = (first, second) if first.kind == "conflict" else (second, first)
    assert unattributed.source_id is None
    assert store.integrity_event_counts() == {"s1": 2, "": 1}

    assert store.acknowledge_integrity_events([conflict.id], at_ns=111) == 1
    # Already acknowledged: not counted again and its time is kept.
    assert store.acknowledge_integrity_events([conflict.id, 999_999], at_ns=222) == 0
    assert store.integrity_event_counts() == {"s1": 1, "": 1}
    assert [e.id for e in store.iter_integrity_events()] == sorted([rejected.id, unattributed.id])
    every = {e.id: e.acknowledged_at_ns for e in store.iter_integrity_events(open_only=False)}
    assert every == {conflict.id: 111, rejected.id: None, unattributed.id: None}

    # ids narrowed by source: the unattributed event is not of s1.
    assert store.acknowledge_integrity_events([unattributed.id], source_id="s1", at_ns=3) == 0
    assert store.acknowledge_integrity_events(None, source_id="s1", at_ns=333) == 1
    assert store.integrity_event_counts() == {"": 1}
    assert store.acknowledge_integrity_events([], at_ns=4) == 0
    assert store.acknowledge_integrity_events(None, at_ns=444) == 1
    assert store.integrity_event_counts() == {}
    assert store.acknowledge_integrity_events(None, at_ns=555) == 0
    every = {e.id: e.acknowledged_at_ns for e in store.iter_integrity_events(open_only=False)}
    assert every == {conflict.id: 111, rejected.id: 333, unattributed.id: 444}


def test_unknown_kind_is_refused_by_the_schema(store: Store) -> None:
    from billing_cli._errors import StoreError

    with pytest.raises(StoreError, match="record an integrity event"):
        store.record_integrity_event("bogus", node_id="n", env="e", detail="d")  # type: ignore[arg-type]
    assert list(store.iter_integrity_events(open_only=False)) == []

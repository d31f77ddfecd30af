"""The store's bulk shortcuts give exactly the results of the general paths.

Pages naming many series of one node take SQLite's series range scan (``scan_series``,
at least ``_SCAN_MIN`` keys of one node/env); overlap re-deliveries are dropped by the
exact-key duplicate check when the item digests (tests/test_store_item_digests.py) do not
already recognise them. Both are compared with the same deliveries applied through the
key-set join (``scan_series`` off) and with one clean in-order delivery.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from billing_cli._time import NS_PER_MINUTE, parse_rfc3339_ns
from billing_cli.core.types import Item, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import Batch, RowFilter, Store
from billing_cli.store.sql import SqlStore
from billing_cli.store.write.observations import _SCAN_MIN

P = Pricing(price_per_unit="0.05", unit="GB", rule_version="t")
T0 = parse_rfc3339_ns("2026-03-10T12:00:00Z")


def _item(minute: int, series: range, node: str = "n1", *, bump: int = 0) -> Item:
    samples = [
        Sample(
            f"u{s:04d}",
            f"u{s}@example.com",
            "vless",
            minute * 1000 * (s % 3) + s + bump,
            minute * 700 * (s % 2) + s,
        )
        for s in series
    ]
    return Item(T0 + minute * NS_PER_MINUTE, node, "prod", "e1", samples)


def _state(store: Store) -> tuple[list[object], list[object], list[object]]:
    usage = list(store.iter_usage(RowFilter()))
    ledger = [
        (
            r.node_id,
            r.uuid,
            r.bucket_start_ns,
            r.revision,
            r.entry_type,
            r.rated_bytes,
            r.amount_nano,
        )
        for r in store.iter_ledger(RowFilter())
    ]
    heads = store.db.execute(  # type: ignore[attr-defined]
        "SELECT node_id, uuid, head_collected_at_ns, head_uplink, head_downlink FROM series"
        " ORDER BY node_id, uuid"
    )
    return list(usage), ledger, [tuple(h) for h in heads]


def _deliver(store: Store, pages: list[list[Item]]) -> list[tuple[int, int, int]]:
    run = store.start_run("ingest", ["t"])
    out = []
    for page in pages:
        r = store.apply(Batch(page, run, P, "t"))
        out.append((r.duplicates, r.new_observations, r.conflicts))
    return out


def _pages() -> list[list[Item]]:
    wide = range(3 * _SCAN_MIN)  # more than twice the narrow page: key-set fallback
    narrow = range(_SCAN_MIN + 10)
    late = _item(3, narrow)
    return [
        [_item(m, wide) for m in range(0, 3)],
        [_item(m, wide) for m in range(4, 6)],
        # overlap re-delivery (exact duplicates) plus new minutes, many series of n1
        [_item(m, narrow) for m in range(4, 8)],
        # a genuinely late item (minute 3 was never delivered) and a conflict at minute 7
        [late, _item(7, narrow, bump=5), _item(8, narrow)],
        # a second node: only scanned series of its own
        [_item(m, narrow, "n2") for m in range(0, 4)],
        [_item(m, narrow, "n2") for m in range(2, 6)],
    ]


def test_scan_and_duplicate_paths_match_keyset_and_clean(tmp_path: Path) -> None:
    fast = open_store(str(tmp_path / "fast.db"))
    slow = open_store(str(tmp_path / "slow.db"))
    slow.db.scan_series = False  # type: ignore[attr-defined]
    for s in (fast, slow):  # these paths are reached only without the item digests
        cast(SqlStore, s).remember_items_ns = None
    assert fast.db.scan_series is True  # type: ignore[attr-defined]
    try:
        counts_fast = _deliver(fast, _pages())
        counts_slow = _deliver(slow, _pages())
        assert counts_fast == counts_slow
        # the overlap page really re-delivered duplicates; the late page had a conflict
        assert counts_fast[2][0] == 2 * len(range(_SCAN_MIN + 10))
        assert counts_fast[3][2] == len(range(_SCAN_MIN + 10))
        assert _state(fast) == _state(slow)
    finally:
        fast.close()
        slow.close()


@pytest.mark.parametrize("remember", [True, False], ids=["digests", "exact-key"])
@pytest.mark.parametrize("scan", [True, False])
def test_overlap_redelivery_equals_clean_delivery(
    tmp_path: Path, scan: bool, remember: bool
) -> None:
    series = range(_SCAN_MIN + 1)
    clean = open_store(str(tmp_path / "clean.db"))
    replay = open_store(str(tmp_path / "replay.db"))
    replay.db.scan_series = scan  # type: ignore[attr-defined]
    if not remember:  # the exact-key duplicate check instead of the item digests
        cast(SqlStore, replay).remember_items_ns = None
    try:
        _deliver(clean, [[_item(m, series) for m in range(10)]])
        counts = _deliver(
            replay,
            [[_item(m, series) for m in range(lo, min(lo + 4, 10))] for lo in range(0, 10, 2)],
        )
        # every page after the first re-delivers two minutes of the previous one
        assert [c[0] for c in counts] == [0] + [2 * len(series)] * 4
        assert _state(clean) == _state(replay)
    finally:
        clean.close()
        replay.close()

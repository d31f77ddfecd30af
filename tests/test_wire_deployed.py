"""The deployed exporter's wire, byte for byte (DESIGN §2a; fixtures in fixtures/deployed/).

These are the responses of ``ai-workspace-xstream/xray-exporter`` (``internal/snapshot``)
as Go writes them; ``fixtures/deployed/README.md`` says how each byte follows from its
source. billing must take every one of them as the normal case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from billing_cli._time import parse_rfc3339_ns
from billing_cli.wire import WireFormatError, parse_ingest, parse_latest, parse_window_page

FIXTURES = Path(__file__).parent / "fixtures" / "deployed"
ALICE = "0b8e6f5c-3d2a-4b1e-9f7c-1a2b3c4d5e6f"
LEGACY = "legacy-user-42"


def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_a_window_page_is_per_account_samples_with_blank_inbound_tags() -> None:
    page = parse_window_page(raw("window_page.json"))
    assert (page.node_id, page.env, page.has_more) == ("tokyo-1", "prod", True)
    # Verbatim: the exporter's cursor is its last item's time with trailing zeros trimmed.
    assert page.next_cursor == "2026-11-24T10:01:00.5Z"
    assert page.rejections == []
    assert [i.collected_at_ns for i in page.items] == [
        parse_rfc3339_ns("2026-11-24T10:00:00Z"),
        parse_rfc3339_ns("2026-11-24T10:01:00.500000000Z"),
    ]
    assert all(i.counter_epoch is None for i in page.items)  # no epoch on this wire
    first = page.items[0]
    assert [(s.uuid, s.email, s.inbound_tag) for s in first.samples] == [
        (ALICE, "alice@example.com", ""),
        (LEGACY, "", ""),
    ]
    assert [(s.uplink_total, s.downlink_total) for s in first.samples] == [(1000, 5000), (0, 0)]


def test_the_last_page_has_no_next_cursor_and_an_item_without_samples_is_null() -> None:
    page = parse_window_page(raw("window_last_page.json"))
    assert (page.has_more, page.next_cursor) == (False, None)
    assert page.rejections == []
    assert [len(i.samples) for i in page.items] == [2, 2, 0]
    assert page.items[0].collected_at_ns == parse_rfc3339_ns("2026-11-24T10:02:00.361170742Z")
    assert page.items[1].collected_at_ns == parse_rfc3339_ns("2026-11-24T10:03:00.361170000Z")
    assert page.items[2].collected_at_ns == parse_rfc3339_ns("2026-11-24T10:04:00.000000001Z")


def test_an_empty_window_is_nothing_new_not_an_identity_problem() -> None:
    page = parse_window_page(raw("window_empty.json"))
    assert (page.node_id, page.env) == (None, None)
    assert (page.items, page.rejections, page.has_more, page.next_cursor) == ([], [], False, None)


def test_items_without_identity_on_a_page_without_identity_cannot_be_attributed() -> None:
    body = (
        b'{"node_id":"","env":"","snapshots":'
        b'[{"collected_at":"2026-11-24T10:00:00Z","samples":[]}]}'
    )
    with pytest.raises(WireFormatError, match="node_id missing"):
        parse_window_page(body)


def test_latest_is_one_snapshot_carrying_its_identity() -> None:
    items, rejections = parse_latest(raw("latest.json"))
    assert rejections == []
    assert [(i.node_id, i.env, len(i.samples)) for i in items] == [("tokyo-1", "prod", 2)]
    assert {s.uuid: (s.uplink_total, s.downlink_total) for s in items[0].samples} == {
        ALICE: (2600, 19100),
        LEGACY: (400, 1200),
    }


def test_the_exporter_store_file_is_a_bare_array_of_snapshots() -> None:
    items, rejections = parse_ingest(raw("snapshots.json"))
    assert rejections == []
    assert [(i.node_id, i.env) for i in items] == [("tokyo-1", "prod")] * 5
    assert [len(i.samples) for i in items] == [2, 2, 2, 2, 0]
    assert {s.inbound_tag for i in items for s in i.samples} == {""}


def test_blank_and_named_inbound_tags_are_different_series_of_one_account() -> None:
    body = (
        b'{"node_id":"n","env":"e","items":[{"collected_at":"2026-11-24T10:00:00Z","samples":['
        b'{"uuid":"u","inbound_tag":"","uplink_bytes_total":1,"downlink_bytes_total":2},'
        b'{"uuid":"u","inbound_tag":"vless-in","uplink_bytes_total":3,"downlink_bytes_total":4},'
        b'{"uuid":"v","uplink_bytes_total":5,"downlink_bytes_total":6},'
        b'{"uuid":"v","inbound_tag":null,"uplink_bytes_total":7,"downlink_bytes_total":8}]}]}'
    )
    page = parse_window_page(body)
    kept = [(s.uuid, s.inbound_tag, s.uplink_total) for s in page.items[0].samples]
    # An absent or null tag is the blank one too, so v's second sample is a duplicate.
    assert kept == [("u", "", 1), ("u", "vless-in", 3), ("v", "", 5)]
    assert [(r.uuid, r.inbound_tag) for r in page.rejections] == [("v", "")]
    assert "duplicate sample" in page.rejections[0].reason

"""The wire parser against hostile values: each rejects one sample or one item, never the
page, and nothing unbounded or unstorable gets through (issue 10, "a hostile or broken
exporter")."""

from __future__ import annotations

import json
from typing import Any

import pytest

from billing_cli._time import parse_rfc3339_ns
from billing_cli.wire import (
    MAX_CURSOR_CHARS,
    MAX_REASON_CHARS,
    WireFormatError,
    parse_ingest,
    parse_window_page,
)

TS = "2026-11-24T10:00:05Z"


def sample(uuid: str = "u1", up: Any = 10, down: Any = 20, **kw: Any) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "email": kw.pop("email", f"{uuid[:20]}@example.com"),
        "inbound_tag": kw.pop("tag", "vless"),
        "uplink_bytes_total": up,
        "downlink_bytes_total": down,
        **kw,
    }


def raw_page(items: list[Any], **kw: Any) -> bytes:
    doc: dict[str, Any] = {"node_id": "node-a", "env": "prod", "items": items, **kw}
    return json.dumps(doc).encode()


def one_good_one_bad(bad_sample_json: str) -> bytes:
    """A page whose second sample is given as raw JSON text (values json cannot write)."""
    good = json.dumps(sample("good"))
    return (
        '{"node_id":"node-a","env":"prod","items":[{"collected_at":"' + TS + '","samples":['
        + good + "," + bad_sample_json + "]}]}"
    ).encode()  # fmt: skip


@pytest.mark.parametrize(
    ("counter", "reason"),
    [
        ("1e400", "out of range"),
        ("-1e400", "out of range"),
        ("9" * 309, "out of range"),
        ("9" * 5000, "out of range"),  # beyond Python's int-from-string digit limit too
        ("18446744073709551616", "out of range"),
    ],
)
def test_an_absurd_counter_rejects_its_sample_not_the_page(counter: str, reason: str) -> None:
    bad = '{"uuid":"bad","inbound_tag":"vless","uplink_bytes_total":' + counter
    bad += ',"downlink_bytes_total":1}'
    wp = parse_window_page(one_good_one_bad(bad))
    assert [s.uuid for i in wp.items for s in i.samples] == ["good"]
    assert [r.uuid for r in wp.rejections] == ["bad"]
    assert reason in wp.rejections[0].reason
    assert len(wp.rejections[0].reason) <= MAX_REASON_CHARS


def test_a_lone_surrogate_still_refuses_the_page_on_the_fallback_path() -> None:
    # orjson refuses lone surrogates; the stdlib fallback (taken for the huge number) must
    # not let one through to the store, which cannot encode it.
    bad = '{"uuid":"\\ud800","inbound_tag":"vless","uplink_bytes_total":1e400,'
    bad += '"downlink_bytes_total":1}'
    with pytest.raises(WireFormatError, match="surrogate"):
        parse_window_page(one_good_one_bad(bad))


@pytest.mark.parametrize(
    "ts",
    [
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00Z",
        "2262-04-12T00:00:00Z",
        "1600-01-01T00:00:00Z",
    ],
)
def test_a_collected_at_the_store_cannot_hold_rejects_the_item(ts: str) -> None:
    wp = parse_window_page(
        raw_page(
            [
                {"collected_at": ts, "samples": [sample("far")]},
                {"collected_at": TS, "samples": [sample("near")]},
            ]
        )
    )
    assert [i.collected_at_ns for i in wp.items] == [parse_rfc3339_ns(TS)]
    assert [(r.uuid, r.collected_at_ns) for r in wp.rejections] == [("far", None)]
    assert "outside the range billing can store" in wp.rejections[0].reason


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("uuid", "a\u0000b", "uuid contains a NUL character"),
        ("uuid", "u" * 5000, "uuid is 5000 characters long"),
        ("inbound_tag", "t\u0000", "inbound_tag contains a NUL character"),
        ("inbound_tag", "t" * 129, "inbound_tag is 129 characters long"),
        ("email", "e\u0000@x", "email contains a NUL character"),
        ("email", "e" * 400, "email is 400 characters long"),
    ],
)
def test_sample_text_fields_are_bounded_and_free_of_nul(
    field: str, value: str, reason: str
) -> None:
    bad = sample("bad")
    bad[field] = value
    wp = parse_window_page(raw_page([{"collected_at": TS, "samples": [sample("ok"), bad]}]))
    assert [s.uuid for i in wp.items for s in i.samples] == ["ok"]
    assert len(wp.rejections) == 1
    r = wp.rejections[0]
    assert reason in r.reason
    # The rejection itself carries nothing unstorable.
    assert "\x00" not in r.uuid + r.inbound_tag
    assert len(r.uuid) <= 128


def test_a_long_or_nul_counter_epoch_rejects_the_item() -> None:
    for epoch, reason in (("e" * 200, "counter_epoch is 200 characters"), ("\u0000", "NUL")):
        wp = parse_window_page(
            raw_page([{"collected_at": TS, "counter_epoch": epoch, "samples": [sample()]}])
        )
        assert wp.items == []
        assert reason in wp.rejections[0].reason


@pytest.mark.parametrize(
    "doc",
    [
        {"node_id": "n" * 200, "env": "prod", "items": []},
        {"node_id": "node-a", "env": "p\u0000", "items": []},
        {"node_id": "node-a", "env": "prod", "items": [{"node_id": "x" * 5000, "env": "prod",
                                                         "collected_at": TS, "samples": []}]},
        {"node_id": "node-a", "env": "prod", "source_id": "s" * 5000, "items": []},
    ],
)  # fmt: skip
def test_an_identity_that_cannot_be_stored_is_a_format_error(doc: dict[str, Any]) -> None:
    with pytest.raises(WireFormatError) as err:
        parse_window_page(json.dumps(doc).encode())
    assert len(str(err.value)) < 400


def test_a_huge_invalid_collected_at_is_quoted_short() -> None:
    huge = "x" * (1 << 20)
    samples = [sample(f"u{i}") for i in range(1000)]
    wp = parse_window_page(raw_page([{"collected_at": huge, "samples": samples}]))
    assert len(wp.rejections) == 1000
    reasons = {r.reason for r in wp.rejections}
    assert len(reasons) == 1
    (reason,) = reasons
    assert len(reason) <= MAX_REASON_CHARS
    assert "1048576 characters" in reason


def test_a_huge_window_start_is_quoted_short() -> None:
    with pytest.raises(WireFormatError) as err:
        parse_window_page(raw_page([], window_start="y" * 100_000))
    assert len(str(err.value)) < 400


def test_a_cursor_beyond_the_bound_is_a_format_error() -> None:
    assert parse_window_page(raw_page([], next_cursor="c" * MAX_CURSOR_CHARS)).next_cursor
    with pytest.raises(WireFormatError, match="next_cursor is 65536 characters"):
        parse_window_page(raw_page([], next_cursor="c" * 65536))


def test_ingest_gets_the_same_bounds() -> None:
    line = json.dumps(
        {"collected_at": TS, "node_id": "n", "env": "e", "samples": [sample("a\u0000")]}
    )
    items, rejections = parse_ingest(line.encode() + b"\n")
    assert [len(i.samples) for i in items] == [0]
    assert "NUL" in rejections[0].reason

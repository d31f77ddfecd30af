"""The wire parser: every accepted shape, verbatim cursors, and the bad-input matrix."""

from __future__ import annotations

import io
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_cli._time import parse_rfc3339_ns
from billing_cli.core.types import Item, Sample
from billing_cli.wire import (
    WireFormatError,
    iter_ingest,
    parse_ingest,
    parse_latest,
    parse_window_page,
)

TS = "2026-11-24T10:00:05.123456789Z"
TS_NS = parse_rfc3339_ns(TS)


def sample(
    uuid: str = "u1", tag: str = "vless-in", up: Any = 10, down: Any = 20, **kw: Any
) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "email": f"{uuid}@example.com",
        "inbound_tag": tag,
        "uplink_bytes_total": up,
        "downlink_bytes_total": down,
        **kw,
    }


def item(samples: list[Any] | None = None, ts: Any = TS, **kw: Any) -> dict[str, Any]:
    return {"collected_at": ts, "samples": [sample()] if samples is None else samples, **kw}


def page(items: list[Any], key: str = "items", **kw: Any) -> bytes:
    doc: dict[str, Any] = {"node_id": "node-a", "env": "prod", key: items, "has_more": False}
    doc.update(kw)
    # stdlib json: orjson cannot encode integers beyond 64 bits, which some tests need.
    return json.dumps(doc).encode()


# --- shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["items", "snapshots"])
def test_window_page_items_or_snapshots(key: str) -> None:
    raw = page(
        [item(counter_epoch="boot-1"), item([sample("u2")], ts="2026-11-24T10:01:05Z")],
        key=key,
        source_id="src-a",
        window_start="2026-11-24T10:00:00Z",
        window_end="2026-11-24T10:05:00Z",
        emitted_at="2026-11-24T10:05:01.5+00:00",
    )
    wp = parse_window_page(raw)
    assert wp.source_id == "src-a"
    assert (wp.node_id, wp.env) == ("node-a", "prod")
    assert wp.window_start_ns == parse_rfc3339_ns("2026-11-24T10:00:00Z")
    assert wp.window_end_ns == parse_rfc3339_ns("2026-11-24T10:05:00Z")
    assert wp.emitted_at_ns == parse_rfc3339_ns("2026-11-24T10:05:01.5Z")
    assert wp.rejections == []
    assert wp.items[0] == Item(
        TS_NS, "node-a", "prod", "boot-1", [Sample("u1", "u1@example.com", "vless-in", 10, 20)]
    )
    assert wp.items[1].counter_epoch is None
    assert wp.items[1].samples[0].uuid == "u2"


def test_item_identity_overrides_page_and_falls_back() -> None:
    wp = parse_window_page(page([item(node_id="node-b", env="dev"), item()]))
    assert [(i.node_id, i.env) for i in wp.items] == [("node-b", "dev"), ("node-a", "prod")]


@pytest.mark.parametrize(
    "cursor",
    [
        "2026-11-24T10:00:05.123456789Z",
        "2026-11-24T10:00:05.100000000Z",  # trailing zeros must survive
        "2026-11-24T10:00:05.000000001+00:00|u-7",
        None,
    ],
)
def test_next_cursor_is_verbatim(cursor: str | None) -> None:
    wp = parse_window_page(page([item()], next_cursor=cursor, has_more=cursor is not None))
    assert wp.next_cursor == cursor
    assert wp.has_more is (cursor is not None)


def test_counter_epoch_int_and_string_compare_equal() -> None:
    wp = parse_window_page(
        page([item(counter_epoch=7), item(counter_epoch="7"), item(counter_epoch="")])
    )
    assert [i.counter_epoch for i in wp.items] == ["7", "7", None]


def test_large_counters_exact_above_2_53() -> None:
    big = 2**63 - 1
    wp = parse_window_page(page([item([sample(up=2**53 + 1, down=big)])]))
    s = wp.items[0].samples[0]
    assert (s.uplink_total, s.downlink_total) == (2**53 + 1, big)
    assert type(s.uplink_total) is int


def test_email_optional() -> None:
    s = sample()
    del s["email"]
    wp = parse_window_page(page([item([s, sample("u2", email=None)])]))
    assert [x.email for x in wp.items[0].samples] == ["", ""]
    assert wp.rejections == []


def test_parse_latest_with_fallback_identity() -> None:
    items, rej = parse_latest(orjson.dumps(item()), node_id="legacy", env="default")
    assert rej == []
    assert (items[0].node_id, items[0].env) == ("legacy", "default")
    items, _ = parse_latest(orjson.dumps(item(node_id="n", env="e")), node_id="legacy", env="x")
    assert (items[0].node_id, items[0].env) == ("n", "e")
    with pytest.raises(WireFormatError, match="node_id missing"):
        parse_latest(orjson.dumps(item()))


def _ingest_shapes() -> dict[str, bytes]:
    a = item(node_id="node-a", env="prod")
    b = item([sample("u2")], ts="2026-11-24T10:01:05Z", node_id="node-b", env="prod")
    return {
        "array": orjson.dumps([a, b]),
        "ndjson": b"\n" + orjson.dumps(a) + b"\n\n" + orjson.dumps(b) + b"\n",
        "snapshot_store": orjson.dumps({"snapshots": [a, b]}),
        "pretty_snapshot_store": orjson.dumps({"snapshots": [a, b]}, option=orjson.OPT_INDENT_2),
        "window": orjson.dumps(
            {"node_id": "node-a", "env": "prod", "items": [a, b], "has_more": False}
        ),
    }


@pytest.mark.parametrize("shape", list(_ingest_shapes()))
def test_parse_ingest_every_shape(shape: str) -> None:
    items, rej = parse_ingest(_ingest_shapes()[shape])
    assert rej == []
    assert [(i.node_id, i.collected_at_ns, [s.uuid for s in i.samples]) for i in items] == [
        ("node-a", TS_NS, ["u1"]),
        ("node-b", parse_rfc3339_ns("2026-11-24T10:01:05Z"), ["u2"]),
    ]


def test_parse_ingest_single_item_and_bom() -> None:
    items, _ = parse_ingest(b"\xef\xbb\xbf" + orjson.dumps(item(node_id="n", env="e")))
    assert len(items) == 1


def test_iter_ingest_batches_bounded_and_items_whole() -> None:
    lines = [
        orjson.dumps(
            item(
                [sample(f"u{j}") for j in range(3)],
                ts=f"2026-11-24T10:{m:02d}:00Z",
                node_id="n",
                env="e",
            )
        )
        for m in range(10)
    ]
    batches = list(iter_ingest(io.BytesIO(b"\n".join(lines)), batch_samples=5))
    # 3 samples per item, batch closes at >= 5: 2 items (6 samples) per batch.
    assert [len(b[0]) for b in batches] == [2, 2, 2, 2, 2]
    assert sum(len(i.samples) for b in batches for i in b[0]) == 30


# --- bad input matrix: recorded rejections, valid rest kept ---------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (sample("bad", up=-1), "uplink_bytes_total is negative"),
        (sample("bad", down=1.5), "downlink_bytes_total must be a JSON integer"),
        (sample("bad", up=10.0), "got float"),
        (sample("bad", up="10"), "got string"),
        (sample("bad", up=True), "got boolean"),
        (sample("bad", up=None), "uplink_bytes_total is missing"),
        (sample("bad", up=2**63), "out of range"),
        (sample("bad", down=2**64 - 1), "out of range"),
        (sample("bad", up=2**64), "out of range"),
        (sample("bad", up=10**30), "out of range"),
        (sample("", tag="t"), "uuid is missing"),
        (sample("bad", tag=7), "inbound_tag must be a string"),
        (sample("bad", email=5), "email must be a string"),
        (sample(uuid=5), "uuid must be a string"),  # type: ignore[arg-type]
        ("not-an-object", "sample must be an object"),
    ],
)
def test_bad_sample_rejected_rest_kept(bad: Any, reason: str) -> None:
    raw = page([item([sample("good1"), bad, sample("good2")])])
    wp = parse_window_page(raw)
    assert [s.uuid for s in wp.items[0].samples] == ["good1", "good2"]
    assert len(wp.rejections) == 1
    r = wp.rejections[0]
    assert reason in r.reason
    assert (r.collected_at_ns, r.node_id, r.env) == (TS_NS, "node-a", "prod")


def test_integer_beyond_64_bits_in_raw_json_rejects_one_sample() -> None:
    # Written by hand: some JSON encoders would refuse the value.
    raw = (
        b'{"node_id":"n","env":"e","has_more":false,"items":[{"collected_at":"'
        + TS.encode()
        + b'","samples":[{"uuid":"a","inbound_tag":"t","uplink_bytes_total":'
        b'123456789012345678901234567890,"downlink_bytes_total":1},'
        b'{"uuid":"b","inbound_tag":"t","uplink_bytes_total":1,"downlink_bytes_total":2}]}]}'
    )
    wp = parse_window_page(raw)
    assert [s.uuid for s in wp.items[0].samples] == ["b"]
    assert "out of range" in wp.rejections[0].reason
    assert wp.rejections[0].uuid == "a"


def test_duplicate_sample_in_one_item_keeps_first() -> None:
    wp = parse_window_page(page([item([sample("u1", up=1), sample("u1", up=999), sample("u2")])]))
    assert [(s.uuid, s.uplink_total) for s in wp.items[0].samples] == [("u1", 1), ("u2", 10)]
    assert "duplicate" in wp.rejections[0].reason
    # Same uuid on another inbound is another series, not a duplicate.
    wp = parse_window_page(page([item([sample("u1", tag="a"), sample("u1", tag="b")])]))
    assert len(wp.items[0].samples) == 2


def test_duplicate_after_invalid_first_is_rejected_too() -> None:
    wp = parse_window_page(page([item([sample("u1", up=-1), sample("u1", up=5)])]))
    assert wp.items[0].samples == []
    assert len(wp.rejections) == 2


@pytest.mark.parametrize(
    ("ts", "reason"),
    [
        ("2026-11-24T10:00:00", "with a zone"),
        ("2026-11-24 10:00", "with a zone"),
        ("2026-13-24T10:00:00Z", "invalid timestamp"),
        (1795514400, "must be an RFC3339 string"),
        (None, "collected_at is missing"),
    ],
)
def test_bad_collected_at_rejects_whole_item(ts: Any, reason: str) -> None:
    good = item([sample("ok")], ts="2026-11-24T10:01:00Z")
    bad = item([sample("x1"), sample("x2")], ts=ts)
    wp = parse_window_page(page([bad, good]))
    assert [i.samples[0].uuid for i in wp.items] == ["ok"]
    assert [r.uuid for r in wp.rejections] == ["x1", "x2"]
    assert all(reason in r.reason and r.reason.startswith("invalid item") for r in wp.rejections)
    assert all(r.collected_at_ns is None for r in wp.rejections)


@pytest.mark.parametrize(
    ("bad_item", "reason"),
    [
        (item(counter_epoch=1.5), "counter_epoch must be a string or an integer"),
        (item(counter_epoch=True), "counter_epoch must be a string or an integer"),
        ({"collected_at": TS}, "samples is missing"),
        ({"collected_at": TS, "samples": {"a": 1}}, "samples must be an array"),
    ],
)
def test_bad_item_fields_recorded(bad_item: dict[str, Any], reason: str) -> None:
    wp = parse_window_page(page([bad_item, item([sample("ok")])]))
    assert [s.uuid for i in wp.items for s in i.samples] == ["ok"]
    assert len(wp.rejections) >= 1
    assert reason in wp.rejections[0].reason


# --- structural garbage: WireFormatError, one line, says where -------------------------------


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "invalid JSON"),
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (
            b'{"env":"prod","items":[{"collected_at":"2026-11-24T10:00:05Z","samples":[]}]}',
            "node_id missing",
        ),
        (
            b'{"node_id":"n","items":[{"collected_at":"2026-11-24T10:00:05Z","samples":[]}]}',
            "env missing",
        ),
        (b'{"node_id":"n","env":"e"}', "neither 'items' nor 'snapshots'"),
        (b'{"node_id":"n","env":"e","items":{}}', r"items: expected an array"),
        (b'{"node_id":"n","env":"e","items":[1]}', r"items\[0\]: expected an object"),
        (b'{"node_id":"n","env":"e","items":[],"next_cursor":5}', "next_cursor"),
        (b'{"node_id":"n","env":"e","items":[],"has_more":"yes"}', "has_more"),
        (b'{"node_id":"n","env":"e","items":[],"window_start":"yesterday"}', "window_start"),
        (b'{"node_id":7,"env":"e","items":[]}', "node_id: expected a string"),
        (b'{"node_id":"n","env":"e","items":[], "x": NaN}', "invalid JSON"),
    ],
)
def test_window_page_structural_errors(raw: bytes, match: str) -> None:
    with pytest.raises(WireFormatError, match=match) as exc:
        parse_window_page(raw)
    assert "\n" not in str(exc.value)


def test_item_without_identity_is_a_format_error() -> None:
    with pytest.raises(WireFormatError, match=r"items\[1\]\.env missing"):
        parse_ingest(orjson.dumps([item(node_id="n", env="e"), item(node_id="n")]))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "empty input"),
        (b"  \n\n", "empty input"),
        (b"42", "expected a JSON object or array"),
        (b'{"hello": 1}', "unrecognised document"),
        (orjson.dumps(item(node_id="n", env="e")) + b"\n{broken\n", r"^line 2: invalid JSON"),
        (
            orjson.dumps(item(node_id="n", env="e")) + b"\n\n" + orjson.dumps(item(node_id="n")),
            r"^line 3: env missing",
        ),
        (orjson.dumps(item(node_id="n", env="e")) + b"\n[1]\n", r"^line 2: expected an item"),
        (b'{\n  "snapshots": [\n  }', "invalid JSON"),
    ],
)
def test_ingest_structural_errors(raw: bytes, match: str) -> None:
    with pytest.raises(WireFormatError, match=match) as exc:
        parse_ingest(raw)
    assert "\n" not in str(exc.value)


def test_ndjson_bad_sample_is_rejection_not_error() -> None:
    raw = b"\n".join(
        orjson.dumps(item([sample("ok"), sample("neg", up=-5)], node_id="n", env="e"))
        for _ in range(2)
    )
    items, rej = parse_ingest(raw)
    assert [s.uuid for i in items for s in i.samples] == ["ok", "ok"]
    assert [r.uuid for r in rej] == ["neg", "neg"]


# --- property: every sample is either kept exactly or rejected, never lost -----------------

_counter = st.one_of(
    st.integers(min_value=0, max_value=2**63 - 1),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)
_ident = st.one_of(st.sampled_from(["u1", "u2", "u3"]), st.just(""), st.integers(0, 3))
_sample = st.fixed_dictionaries(
    {
        "uuid": _ident,
        "uplink_bytes_total": _counter,
        "downlink_bytes_total": _counter,
    },
    optional={
        "email": st.one_of(st.text(max_size=3), st.none(), st.integers()),
        # Blank or absent: the account-level series (the deployed exporter's only kind).
        "inbound_tag": st.one_of(st.sampled_from(["a", "b", ""]), st.none(), st.integers(0, 1)),
    },
)


def _expected_valid(samples: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """An independent, obviously-correct statement of the rules."""

    def ok_counter(v: Any) -> bool:
        return type(v) is int and 0 <= v < 2**63

    seen: set[tuple[str, str]] = set()
    out = []
    for s in samples:
        uuid, email = s["uuid"], s.get("email")
        tag = s.get("inbound_tag")
        tag = "" if tag is None else tag
        keyed = isinstance(uuid, str) and uuid != "" and isinstance(tag, str)
        valid = (
            keyed
            and ok_counter(s["uplink_bytes_total"])
            and ok_counter(s["downlink_bytes_total"])
            and (email is None or (isinstance(email, str) and "\x00" not in email))
            and (uuid, tag) not in seen
        )
        if keyed:
            seen.add((uuid, tag))
        if valid:
            out.append((uuid, email or "", tag, s["uplink_bytes_total"], s["downlink_bytes_total"]))
    return out


@given(st.lists(_sample, max_size=12))
def test_property_kept_or_rejected(samples: list[dict[str, Any]]) -> None:
    raw = json.dumps(
        {"node_id": "n", "env": "e", "items": [{"collected_at": TS, "samples": samples}]}
    ).encode()
    wp = parse_window_page(raw)
    kept = [tuple(s) for s in wp.items[0].samples]
    assert kept == _expected_valid(samples)
    assert len(kept) + len(wp.rejections) == len(samples)
    assert all(r.reason and "\n" not in r.reason for r in wp.rejections)


def test_email_kept_in_items_mixing_samples_with_and_without_it() -> None:
    plain = sample("u1")
    del plain["email"]
    for order in ([plain, sample("u2")], [sample("u2"), plain]):
        wp = parse_window_page(page([item(order)]))
        assert {x.uuid: x.email for x in wp.items[0].samples} == {"u1": "", "u2": "u2@example.com"}
        assert wp.rejections == []

"""The NDJSON fast path of ``billing ingest`` decides exactly what the exact path decides.

``wire._clean_lines()`` decodes a line straight into typed structures (msgspec) and returns
``None`` at the first doubt; the exact path (orjson, then the per-sample checks that word
every rejection) takes over then. For any input, ingesting with the fast path must give
the same items, rejections and errors as without it, byte for byte: that is what these
properties check, on lines built from valid and invalid values of every field, with
duplicate keys, numbers no 64-bit integer holds, and random byte damage.
"""

from __future__ import annotations

import io
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_cli import wire
from billing_cli.core.types import Item, Sample

MISSING: Any = object()


class Obj(list[tuple[str, Any]]):
    """A JSON object as its list of members: it may name a key twice."""


keys = st.sampled_from(["u1", "u2", "ü-3", "", "x" * 128, "x" * 129, "a\x00b"])
emails = st.sampled_from([MISSING, "a@example.org", "", None, 7, "e" * 321, "\x00"])
tags = st.sampled_from([MISSING, "vless-in", "", None, 3, "t" * 129, "\x00"])
counters = st.one_of(
    st.integers(min_value=0, max_value=2**63 - 1),
    st.sampled_from(
        [MISSING, -1, 0, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -(2**63) - 1,
         1.5, 5.0, True, False, "10", None, [], {}]
    ),
)  # fmt: skip
extras = st.sampled_from([MISSING, 1, "x", None, float("inf"), 10**400, [[[]]], {"a": {}}])
times = st.sampled_from(
    [MISSING, "2026-11-24T10:00:05.123456789Z", "2026-11-24T10:01:00Z",
     "2026-11-24T10:00:05+02:00", "2026-11-24T10:00:05", "2026-13-24T10:00:05Z", "", None, 5,
     "1600-01-01T00:00:00Z", "2262-06-01T00:00:00Z", "x" * 70, "2026-11-24t10:00:05z"]
)  # fmt: skip
identities = st.sampled_from([MISSING, "node-a", "", None, 5, "n" * 129, "n\x00"])
epochs = st.sampled_from(
    [MISSING, None, "", "boot-1", 7, -3, 0, 2**63, 2**64 - 1, 2**64, 2**70, True, 1.5,
     "e" * 129, "e\x00", []]
)  # fmt: skip


def mostly(draw: st.DrawFn, usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> Any:
    """Usually a valid value, one time in five anything: most lines are nearly clean, so
    the fast path is taken often and each of its refusals is reached on its own."""
    return draw(odd if draw(st.integers(0, 4)) == 0 else usual)


def present(value: Any) -> bool:
    return value is not MISSING


def _field(pairs: list[tuple[str, Any]], name: str, value: Any) -> None:
    if value is not MISSING:
        pairs.append((name, value))


@st.composite
def samples(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 30)) == 0:
        return draw(st.sampled_from([5, "s", None, [], [1, 2]]))
    pairs: list[tuple[str, Any]] = []
    ok_key = st.sampled_from(["u1", "u2", "ü-3"])
    ok_counter = st.integers(min_value=0, max_value=2**63 - 1)
    _field(pairs, "uuid", mostly(draw, ok_key, st.one_of(keys, st.sampled_from([MISSING, 5]))))
    _field(pairs, "email", mostly(draw, st.sampled_from([MISSING, "a@example.org"]), emails))
    _field(pairs, "inbound_tag", mostly(draw, st.sampled_from(["", "vless-in"]), tags))
    _field(pairs, "uplink_bytes_total", mostly(draw, ok_counter, counters))
    _field(pairs, "downlink_bytes_total", mostly(draw, ok_counter, counters))
    _field(pairs, "other", mostly(draw, st.just(MISSING), extras))
    if draw(st.integers(0, 10)) == 0 and pairs:  # a duplicate key: the last one counts
        name, _ = draw(st.sampled_from(pairs))
        pairs.append((name, draw(st.one_of(keys, counters).filter(present))))
    return Obj(draw(st.permutations(pairs)))


@st.composite
def clean_samples(draw: st.DrawFn, with_email: bool) -> list[Any]:
    n = draw(st.integers(0, 4))
    out = []
    for k in range(n):
        # Mostly the same names line after line (the exporter's shape), which the fast path
        # recognises without checking them again.
        tag = mostly(draw, st.just(["", "vless-in"][k % 2]), st.just("other"))
        pairs = [("uuid", f"u{k}"), ("inbound_tag", tag)]
        if with_email:
            pairs.append(("email", f"u{k}@example.org"))
        pairs += [
            ("uplink_bytes_total", draw(st.integers(0, 2**63 - 1))),
            ("downlink_bytes_total", draw(st.integers(0, 2**63 - 1))),
        ]
        out.append(Obj(pairs))
    return out


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    pairs: list[tuple[str, Any]] = []
    _field(pairs, "node_id", mostly(draw, st.just("node-a"), identities))
    _field(pairs, "env", mostly(draw, st.just("prod"), identities))
    _field(pairs, "collected_at", mostly(draw, st.just("2026-11-24T10:00:05.5Z"), times))
    _field(pairs, "counter_epoch", mostly(draw, st.sampled_from([MISSING, "boot-1", 7]), epochs))
    clean = draw(st.integers(0, 2)) == 0
    sample_list: Any
    if clean:
        sample_list = draw(clean_samples(draw(st.booleans())))
    else:
        sample_list = mostly(
            draw, st.lists(samples(), max_size=4), st.sampled_from([MISSING, None, "x", 5, {}])
        )
    if draw(st.integers(0, 4)) == 0 and sample_list and isinstance(sample_list, list):
        sample_list.append(sample_list[0])  # the same series twice
    _field(pairs, "samples", sample_list)
    _field(pairs, "items", mostly(draw, st.just(MISSING), st.just([])))
    _field(pairs, "extra", mostly(draw, st.just(MISSING), extras))
    if draw(st.integers(0, 10)) == 0 and pairs:
        name, _ = draw(st.sampled_from(pairs))
        pairs.append((name, draw(st.one_of(identities, times, epochs).filter(present))))
    raw = encode(Obj(draw(st.permutations(pairs))))
    if draw(st.integers(0, 8)) == 0:  # damage: one byte replaced, inserted or removed
        at = draw(st.integers(0, len(raw)))
        byte = bytes([draw(st.integers(0, 255))])
        how = draw(st.sampled_from(["replace", "insert", "delete"]))
        raw = raw[:at] + (b"" if how == "delete" else byte) + raw[at + (how != "insert") :]
    return raw


def encode(value: Any) -> bytes:
    """JSON with what no dict holds (duplicate keys) and what orjson will not write
    (integers beyond 64 bits, ``1e400`` for an infinity)."""
    if isinstance(value, Obj):
        return b"{" + b",".join(encode(k) + b":" + encode(v) for k, v in value) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(encode(v) for v in value) + b"]"
    if isinstance(value, float) and value == float("inf"):
        return b"1e400"
    if isinstance(value, dict):
        return b"{" + b",".join(encode(k) + b":" + encode(v) for k, v in value.items()) + b"}"
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def ingest(data: bytes, batch: int) -> Any:
    try:
        out = list(wire.iter_ingest(io.BytesIO(data), batch))
    except wire.WireFormatError as exc:
        return ("error", str(exc))
    return ("ok", repr(out), out)


def exact_only(data: bytes, batch: int) -> Any:
    with pytest.MonkeyPatch.context() as m:
        m.setattr(wire, "_clean_lines", lambda: lambda line: None)
        return ingest(data, batch)


@given(st.lists(lines(), min_size=1, max_size=6), st.integers(1, 8))
def test_the_fast_path_changes_nothing(body: list[bytes], batch: int) -> None:
    # A clean first line: the input is NDJSON (what the fast path is for).
    head = orjson.dumps(
        {"node_id": "n", "env": "e", "collected_at": "2026-11-24T10:00:00Z", "samples": []}
    )
    data = b"\n".join([head, *body]) + b"\n"
    assert ingest(data, batch) == exact_only(data, batch)


@given(lines())
def test_a_line_the_fast_path_takes_is_the_exact_paths_item(line: bytes) -> None:
    fast = wire._clean_lines()(line)
    if fast is None:
        return
    rejections: list[Any] = []
    exact = wire._checked_line(line, 1, rejections)
    assert rejections == []
    assert repr(fast) == repr(exact)
    assert type(fast) is Item
    assert all(type(s) is Sample for s in fast.samples)


@pytest.mark.parametrize(
    "doc",
    [
        {"node_id": "n", "env": "e", "collected_at": "2026-11-24T10:00:05.1Z",
         "counter_epoch": "boot-1",
         "samples": [{"uuid": "u1", "email": "a@b", "inbound_tag": "vless-in",
                      "uplink_bytes_total": 1, "downlink_bytes_total": 2}]},
        {"node_id": "n", "env": "e", "collected_at": "2026-11-24T10:00:05Z", "counter_epoch": 7,
         "samples": [{"uuid": "u1", "inbound_tag": "", "uplink_bytes_total": 0,
                      "downlink_bytes_total": 2**63 - 1}]},
        {"node_id": "n", "env": "e", "collected_at": "2026-11-24T10:00:05Z", "samples": None},
        {"samples": [], "collected_at": "2026-11-24T10:00:05Z", "env": "e", "node_id": "n",
         "counter_epoch": ""},
    ],
)  # fmt: skip
def test_the_exporters_shapes_take_the_fast_path(doc: dict[str, Any]) -> None:
    line = orjson.dumps(doc) + b"\n"
    fast = wire._clean_lines()(line)
    assert fast is not None
    assert repr(fast) == repr(wire._checked_line(line, 1, []))


@pytest.mark.parametrize(
    "extra",
    [b'"\x80tems":[]', b'"x":"\xff"', b'"x":"\\ud800"', b'"x":"a\x01"', b'"x":[1,]', b'"x":01'],
)
def test_what_a_decoder_might_skip_unread_is_refused_as_before(extra: bytes) -> None:
    """Found by the property above: msgspec skips an unknown field without checking its
    UTF-8, where orjson refuses the document. Unknown fields take the exact path."""
    line = (
        b'{"node_id":"n","env":"e","collected_at":"2026-11-24T10:00:05Z","samples":[],'
        + extra
        + b"}\n"
    )
    assert wire._clean_lines()(line) is None
    head = b'{"node_id":"n","env":"e","collected_at":"2026-11-24T10:00:00Z","samples":[]}\n'
    with pytest.raises(wire.WireFormatError, match=r"^line 2: invalid JSON"):
        list(wire.iter_ingest(io.BytesIO(head + line), 10))

"""The exporter simulator: wire contract, determinism, counters, late items, faults, CLI."""

from __future__ import annotations

import itertools
import os
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import orjson
import pytest
from simfleet import SimFleet, sim_fleet

from billing_cli._time import NS_PER_MINUTE, parse_rfc3339_ns
from billing_cli.collect.transport import SourceClient, build_transport_config
from billing_cli.registry.load import parse_registry_text
from billing_cli.registry.model import SourceConfig
from billing_cli.simulator import Fleet, SimNode, format_cursor, format_deployed_time
from billing_cli.wire import parse_window_page

__all__ = ["sim_fleet"]

NODE = "node-01"


def as_source(table: dict[str, object]) -> SourceConfig:
    """A registry ``[[sources]]`` table as the validated entry the transport reads."""
    return SourceConfig.model_validate({"request_timeout": "5s", **table})


def window(
    node: SimNode, since: int, until: int, limit: int = 100, cursor: str | None = None
) -> tuple[int, dict[str, object]]:
    q = {"since": format_cursor(since), "until": format_cursor(until), "limit": str(limit)}
    if cursor is not None:
        q["cursor"] = cursor
    resp = node.handle("window", q, {})
    json_body = resp.headers.get("Content-Type") == "application/json" and resp.body
    return resp.status, orjson.loads(resp.body) if json_body else {}


def items_of(doc: dict[str, object]) -> list[dict[str, object]]:
    key = "snapshots" if "snapshots" in doc else "items"
    value = doc[key]
    assert isinstance(value, list)
    return value


def all_pages(node: SimNode, since: int, until: int, limit: int) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    cursor = None
    for _ in range(1000):
        status, doc = window(node, since, until, limit, cursor)
        assert status == 200
        out.append(doc)
        if not doc["has_more"]:
            return out
        cursor = doc["next_cursor"]
        assert isinstance(cursor, str)
    raise AssertionError("pagination did not end")


# --- wire contract -------------------------------------------------------------------------


def test_pagination_with_nanosecond_cursors_covers_window_once() -> None:
    fleet = Fleet(1, series=5, minutes=25, wire="rich")
    node = fleet.node(NODE)
    times = node.collected_ats()
    assert len(times) == 25
    assert all(t % 1_000_000_000 != 0 for t in times)  # nanosecond fractions
    pages = all_pages(node, times[0] - 1, times[-1] + 1, limit=4)
    assert len(pages) == 7
    seen = [parse_rfc3339_ns(str(it["collected_at"])) for p in pages for it in items_of(p)]
    assert seen == times
    cursors = [p["next_cursor"] for p in pages[:-1]]
    for c in cursors:
        assert isinstance(c, str)
        # opaque, but in fact RFC3339 with exactly nine fraction digits
        assert len(c.split(".")[1]) == len("123456789Z")
    assert pages[-1]["next_cursor"] is None


def test_since_until_inclusive() -> None:
    node = Fleet(1, series=3, minutes=10).node(NODE)
    times = node.collected_ats()
    _, doc = window(node, times[2], times[5])
    got = [parse_rfc3339_ns(str(it["collected_at"])) for it in items_of(doc)]
    assert got == times[2:6]


def test_page_shape_parses_with_wire_and_items_key() -> None:
    for key in ("snapshots", "items"):
        fleet = Fleet(1, series=4, minutes=3, items_key=key, wire="rich")  # type: ignore[arg-type]
        node = fleet.node(NODE)
        times = node.collected_ats()
        resp = node.handle(
            "window", {"since": format_cursor(times[0]), "until": format_cursor(times[-1])}, {}
        )
        doc = orjson.loads(resp.body)
        assert key in doc
        page = parse_window_page(resp.body)
        assert (page.node_id, page.env) == (NODE, "prod")
        assert [it.collected_at_ns for it in page.items] == times
        assert page.rejections == []
        assert all(len(it.samples) == 4 for it in page.items)
        assert {it.counter_epoch for it in page.items} == {"1"}


def test_counters_above_2_53_are_exact_integers() -> None:
    node = Fleet(1, series=3, minutes=2).node(NODE)
    t = node.collected_ats()[-1]
    _, doc = window(node, t, t)
    sample0 = items_of(doc)[0]["samples"][0]  # type: ignore[index]
    assert sample0["uplink_bytes_total"] >= 2**53  # type: ignore[index]
    assert sample0["uplink_bytes_total"] == node.totals(t)[node.uuids[0]][0]  # type: ignore[index]


def test_deterministic_from_seed() -> None:
    end = 1_800_000_000 * 10**9
    a = Fleet(2, series=20, minutes=5, seed=7, end_ns=end)
    b = Fleet(2, series=20, minutes=5, seed=7, end_ns=end)
    c = Fleet(2, series=20, minutes=5, seed=8, end_ns=end)
    for nid in a.nodes:
        ta = a.node(nid).collected_ats()
        assert ta == b.node(nid).collected_ats()
        assert a.node(nid).totals(ta[-1]) == b.node(nid).totals(ta[-1])
        assert a.node(nid).uuids == b.node(nid).uuids
        assert a.node(nid).uuids != c.node(nid).uuids
    assert a.node("node-01").uuids != a.node("node-02").uuids
    assert max(a.node("node-01").collected_ats()) < end


def test_activity_fraction_and_monotonic_counters() -> None:
    node = Fleet(1, series=1000, minutes=6, activity=0.3).node(NODE)
    times = node.collected_ats()
    for prev, cur in itertools.pairwise(times):
        p, c = node.totals(prev), node.totals(cur)
        changed = sum(1 for u in node.uuids if c[u] != p[u])
        assert 230 <= changed <= 370
        assert all(c[u][0] >= p[u][0] and c[u][1] >= p[u][1] for u in node.uuids)
        assert cur - prev == NS_PER_MINUTE


def test_advance_adds_minutes_after_history() -> None:
    fleet = Fleet(2, series=2, minutes=3)
    before = fleet.node(NODE).collected_ats()
    fleet.advance(2)
    after = fleet.node(NODE).collected_ats()
    assert after[:3] == before
    assert after[3:] == [before[-1] + NS_PER_MINUTE, before[-1] + 2 * NS_PER_MINUTE]
    assert len(fleet.node("node-02").collected_ats()) == 5


@pytest.mark.parametrize("with_epoch", [True, False])
def test_counter_restart(with_epoch: bool) -> None:
    fleet = Fleet(1, series=50, minutes=3, activity=0.5, wire="rich")
    node = fleet.node(NODE)
    node.restart_counters(with_epoch=with_epoch)
    fleet.advance(1)
    times = node.collected_ats()
    before, after = node.totals(times[-2]), node.totals(times[-1])
    assert sum(v[0] for v in after.values()) < sum(v[0] for v in before.values())
    _, doc = window(node, times[-2], times[-1])
    epochs = [it.get("counter_epoch") for it in items_of(doc)]
    assert epochs == (["1", "2"] if with_epoch else ["1", "1"])


def test_restart_without_any_epoch() -> None:
    fleet = Fleet(1, series=5, minutes=2, epoch=None, wire="rich")
    node = fleet.node(NODE)
    node.restart_counters(with_epoch=False)
    fleet.advance(1)
    t = node.collected_ats()
    _, doc = window(node, t[0], t[-1])
    assert all("counter_epoch" not in it for it in items_of(doc))


def test_late_item_appears_after_delay_with_interpolated_totals() -> None:
    fleet = Fleet(1, series=10, minutes=5)
    node = fleet.node(NODE)
    times = node.collected_ats()
    late = node.add_late_item(appear_after_minutes=2)
    assert times[-2] < late < times[-1]
    assert late not in node.collected_ats()
    _, doc = window(node, times[0], times[-1])
    assert len(items_of(doc)) == 5
    fleet.advance(1)
    assert late not in node.collected_ats()
    fleet.advance(1)
    assert late in node.collected_ats()
    _, doc = window(node, times[-2], times[-1])
    assert [parse_rfc3339_ns(str(i["collected_at"])) for i in items_of(doc)] == [
        times[-2],
        late,
        times[-1],
    ]
    lo, mid, hi = node.totals(times[-2]), node.totals(late), node.totals(times[-1])
    for u in node.uuids:
        assert lo[u][0] <= mid[u][0] <= hi[u][0]
        assert lo[u][1] <= mid[u][1] <= hi[u][1]


# --- auth and faults (no sockets) ---------------------------------------------------------


def test_bearer_required() -> None:
    fleet = Fleet(1, series=2, minutes=2, tokens=True)
    node = fleet.node(NODE)
    assert node.handle("latest", {}, {}).status == 401
    assert node.handle("latest", {}, {"authorization": "Bearer nope"}).status == 401
    good = {"authorization": f"Bearer {fleet.tokens[NODE]}"}
    assert node.handle("latest", {}, good).status == 200


def test_status_fault_n_times_then_success() -> None:
    node = Fleet(1, series=2, minutes=2).node(NODE)
    node.set_fault("status", times=2, status=502)
    assert [node.handle("latest", {}, {}).status for _ in range(3)] == [502, 502, 200]


def test_429_carries_retry_after() -> None:
    node = Fleet(1, series=2, minutes=2).node(NODE)
    node.set_fault("429", times=1, retry_after="4")
    resp = node.handle("latest", {}, {})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "4"


def test_fault_endpoint_filter() -> None:
    node = Fleet(1, series=2, minutes=2).node(NODE)
    node.set_fault("status", endpoint="window")
    assert node.handle("latest", {}, {}).status == 200
    t = node.collected_ats()
    assert window(node, t[0], t[-1])[0] == 503


def test_cursor_loop_and_empty_has_more() -> None:
    node = Fleet(1, series=2, minutes=10).node(NODE)
    t = node.collected_ats()
    node.set_fault("cursor_loop")
    _, first = window(node, t[0], t[-1], limit=2)
    cursor = first["next_cursor"]
    assert isinstance(cursor, str)
    _, second = window(node, t[0], t[-1], limit=2, cursor=cursor)
    assert second["next_cursor"] == cursor
    assert second["has_more"] is True
    node.clear_faults()
    node.set_fault("empty_has_more", times=1)
    _, doc = window(node, t[0], t[-1])
    assert items_of(doc) == []
    assert doc["has_more"] is True


@pytest.mark.parametrize("where", ["page", "item"])
def test_wrong_node_id(where: str) -> None:
    node = Fleet(1, series=2, minutes=2).node(NODE)
    node.set_fault("wrong_node_id", where=where)
    t = node.collected_ats()
    _, doc = window(node, t[0], t[-1])
    page_node = doc["node_id"]
    item_nodes = {it["node_id"] for it in items_of(doc)}
    if where == "page":
        assert page_node != NODE
        assert item_nodes == {NODE}
    else:
        assert page_node == NODE
        assert NODE not in item_nodes


def test_truncate_oversize_redirect_slow() -> None:
    node = Fleet(1, series=2, minutes=2).node(NODE)
    node.set_fault("truncate", times=1)
    resp = node.handle("latest", {}, {})
    assert resp.truncate_at == len(resp.body) // 2
    node.set_fault("oversize", times=1, size=50_000, content_length=False)
    resp = node.handle("latest", {}, {})
    assert len(resp.body) == 50_000
    assert resp.content_length is False
    orjson.loads(resp.body)  # still valid JSON: the cap is what must refuse it
    node.set_fault("redirect", times=1, location="https://other.example/x")
    resp = node.handle("latest", {}, {})
    assert (resp.status, resp.headers["Location"]) == (302, "https://other.example/x")
    node.set_fault("slow", times=1, delay_s=0.25)
    assert node.handle("latest", {}, {}).delay_s == 0.25


def test_bad_requests_are_400_on_the_rich_wire() -> None:
    node = Fleet(1, series=2, minutes=2, wire="rich").node(NODE)
    assert node.handle("window", {}, {}).status == 400
    assert node.handle("window", {"since": "yesterday", "until": "now"}, {}).status == 400
    t = format_cursor(node.collected_ats()[0])
    assert node.handle("window", {"since": t, "until": t, "cursor": "x"}, {}).status == 400


# --- over the network -----------------------------------------------------------------------


def test_plain_http_loopback_and_routing() -> None:
    with Fleet(["a", "b"], series=2, minutes=2) as fleet:
        assert fleet.url.startswith("http://127.0.0.1:")
        r = httpx.get(fleet.base_url("b") + "/v1/snapshots/latest")
        assert r.status_code == 200
        assert r.json()["node_id"] == "b"
        assert httpx.get(fleet.url + "/nodes/zz/v1/snapshots/latest").status_code == 404
        # Several nodes: nothing at the root (a one-node fleet answers there, see below).
        assert httpx.get(fleet.url + "/v1/snapshots/latest").status_code == 404


def test_truncated_body_over_tls_is_a_protocol_failure(sim_fleet: object) -> None:
    sim: SimFleet = sim_fleet(mtls=False)  # type: ignore[operator]
    sim.fleet.node(NODE).set_fault("truncate")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(
            sim.fleet.base_url(NODE) + "/v1/snapshots/latest",
            verify=ssl.create_default_context(cafile=str(sim.pki.ca)),
            timeout=5,
        )


def test_registry_snippet_round_trips_through_build_transport_config(
    sim_fleet: object,
) -> None:
    sim: SimFleet = sim_fleet(nodes=2, mtls=True, bearer=True)  # type: ignore[operator]
    doc = tomllib.loads(sim.registry_toml)
    assert [s["source_id"] for s in doc["sources"]] == ["node-01", "node-02"]
    for s in doc["sources"]:
        assert s["auth_mode"] == "mtls+bearer"
        token_file = Path(s["credential_ref"].removeprefix("file:"))
        assert os.stat(token_file).st_mode & 0o077 == 0
        for token in sim.fleet.tokens.values():
            assert token not in sim.registry_toml  # refs, never secrets
    # The registry's own loader accepts the snippet, and the transport works from it.
    registry = parse_registry_text(sim.registry_toml, sim.dir / "sources.toml")
    for src in registry.sources:
        with SourceClient(build_transport_config(src)) as client:
            last = sim.fleet.node(src.node_id).last_collected_at
            assert last is not None
            page = parse_window_page(client.get_window(last - 5 * NS_PER_MINUTE, last, 10, None))
        assert page.node_id == src.node_id
        assert len(page.items) == 6


def test_cli_help_has_examples() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "billing_cli.simulator", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Examples:" in out
    assert "--cert-dir" in out


def test_cli_serves_and_prints_registry(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "billing_cli.simulator",
            "--nodes",
            "2",
            "--series",
            "3",
            "--minutes",
            "4",
            "--tick",
            "0",
            "--cert-dir",
            str(tmp_path / "certs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while len([x for x in lines if x.startswith("[[sources]]")]) < 2 or lines[-1].strip():
            line = proc.stdout.readline()
            assert line, "simulator exited early"
            lines.append(line)
        doc = tomllib.loads("".join(lines))
        src = doc["sources"][1]
        assert src["auth_mode"] == "mtls"
        with SourceClient(build_transport_config(as_source(src))) as client:
            body = client.get_latest()
        assert orjson.loads(body)["node_id"] == "node-02"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)  # also closes the pipes


# --- the deployed exporter's wire (the default) ---------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "deployed"


def _key_order(doc: object) -> object:
    """The structure of a JSON document: keys in order, values replaced by their type."""
    if isinstance(doc, dict):
        return [(k, _key_order(v)) for k, v in doc.items()]
    if isinstance(doc, list):
        return [_key_order(doc[0])] if doc else []
    return type(doc).__name__


def test_deployed_pages_have_the_exporters_shape_byte_for_byte() -> None:
    fleet = Fleet(1, series=2, minutes=5, env="prod")
    node = fleet.node(NODE)
    t = node.collected_ats()
    first = node.handle("window", {"since": format_cursor(t[0]), "limit": "2"}, {})
    assert first.headers["Content-Type"] == "application/json"
    assert first.body.endswith(b"}\n")
    assert first.body.count(b"\n") == 1
    doc = orjson.loads(first.body)
    fixture = orjson.loads((FIXTURES / "window_page.json").read_bytes())
    assert _key_order(doc) == _key_order(fixture)
    assert doc["next_cursor"] == format_deployed_time(t[1])  # trimmed, not nine digits
    assert {s["inbound_tag"] for it in doc["snapshots"] for s in it["samples"]} == {""}
    assert all("counter_epoch" not in it for it in doc["snapshots"])
    last = node.handle("window", {"since": format_cursor(t[0]), "cursor": doc["next_cursor"]}, {})
    last_doc = orjson.loads(last.body)
    assert "next_cursor" not in last_doc
    assert last_doc["has_more"] is False
    assert [parse_rfc3339_ns(i["collected_at"]) for i in last_doc["snapshots"]] == t[2:]
    empty = node.handle("window", {"since": format_cursor(t[-1] + 1)}, {})
    assert empty.body == (FIXTURES / "window_empty.json").read_bytes()


def test_deployed_times_are_rfc3339nano_with_trailing_zeros_trimmed() -> None:
    assert format_deployed_time(1_795_514_400_000_000_000) == "2026-11-24T10:00:00Z"
    assert format_deployed_time(1_795_514_400_500_000_000) == "2026-11-24T10:00:00.5Z"
    assert format_deployed_time(1_795_514_400_361_170_742) == "2026-11-24T10:00:00.361170742Z"


def test_deployed_parameters_are_lenient_and_never_400() -> None:
    node = Fleet(1, series=2, minutes=90).node(NODE)
    t = node.collected_ats()
    # A bad since/until becomes now-1h/now; a bad cursor is ignored; a bad limit is 1000.
    for query in (
        {},
        {"since": "yesterday", "until": "now"},
        {"cursor": "garbage", "limit": "many"},
        {"limit": "0"},
        {"limit": "5000"},
    ):
        before = time.time_ns()
        resp = node.handle("window", query, {})
        after = time.time_ns()
        assert resp.status == 200
        got = [parse_rfc3339_ns(i["collected_at"]) for i in orjson.loads(resp.body)["snapshots"]]
        hour = 3600 * 10**9
        assert got in ([x for x in t if x >= before - hour], [x for x in t if x >= after - hour])


def test_deployed_errors_are_text_plain() -> None:
    fleet = Fleet(1, series=2, minutes=0, tokens=True)
    node = fleet.node(NODE)
    unauthorized = node.handle("latest", {}, {})
    assert (unauthorized.status, unauthorized.body) == (401, b"unauthorized\n")
    assert unauthorized.body == (FIXTURES / "unauthorized.txt").read_bytes()
    assert unauthorized.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "WWW-Authenticate" not in unauthorized.headers
    good = {"authorization": f"Bearer {fleet.tokens[NODE]}"}
    missing = node.handle("latest", {}, good)  # no snapshot yet
    assert (missing.status, missing.body) == (404, (FIXTURES / "latest_404.txt").read_bytes())
    fleet.advance(1)
    latest = node.handle("latest", {}, good)
    assert latest.status == 200
    assert _key_order(orjson.loads(latest.body)) == _key_order(
        orjson.loads((FIXTURES / "latest.json").read_bytes())
    )
    assert fleet.dispatch("/metrics", {}, {}).body == b"404 page not found\n"


def test_deployed_store_file_is_a_bare_array_and_empty_samples_differ_from_the_window(
    tmp_path: Path,
) -> None:
    node = Fleet(1, series=2, minutes=3).node(NODE)
    path = node.write_store_file(tmp_path / "snapshots.json")
    assert os.stat(path).st_mode & 0o777 == 0o600
    raw = path.read_bytes()
    assert raw.startswith(b"[{")
    assert raw.endswith(b"}]")
    doc = orjson.loads(raw)
    fixture = orjson.loads((FIXTURES / "snapshots.json").read_bytes())
    assert _key_order(doc[0]) == _key_order(fixture[0])
    assert [parse_rfc3339_ns(i["collected_at"]) for i in doc] == node.collected_ats()
    # A node whose Xray has no users: null in the window (Go's clone), [] in the file.
    idle = Fleet(1, series=0, minutes=1).node(NODE)
    t = idle.collected_ats()[0]
    assert b'"samples":null' in idle.handle("window", {"since": format_cursor(t)}, {}).body
    assert b'"samples":[]' in idle.store_file_bytes()


def test_a_one_node_fleet_answers_at_the_root_like_an_exporter() -> None:
    with Fleet(1, series=2, minutes=2) as fleet:
        r = httpx.get(fleet.url + "/v1/snapshots/latest")
        assert r.status_code == 200
        assert r.json()["node_id"] == NODE


def test_rich_wire_keeps_tags_epochs_and_page_metadata() -> None:
    node = Fleet(1, series=3, minutes=2, wire="rich").node(NODE)
    t = node.collected_ats()
    _, doc = window(node, t[0], t[-1])
    assert {"window_start", "window_end", "emitted_at"} <= set(doc)
    assert {s["inbound_tag"] for it in items_of(doc) for s in it["samples"]} == {  # type: ignore[index]
        "vless-in",
        "vmess-in",
        "trojan-in",
    }
    assert {it["counter_epoch"] for it in items_of(doc)} == {"1"}

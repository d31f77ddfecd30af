"""Protocol edge cases of the pull loop, with respx answering for the exporters.

The real ``SourceClient`` (httpx) and the real SQLite store are used; only the network is
replaced. What is checked: what reaches the exporter (cursors verbatim, chunk bounds),
what reaches the store (which pages, with which checkpoint) and how failures are scoped.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import respx

from billing_cli._time import NS_PER_MINUTE, NS_PER_SECOND, format_rfc3339_ns, parse_rfc3339_ns
from billing_cli.collect.collector import (
    ExporterClient,
    PullSettings,
    PullTask,
    SourceLike,
    plan_chunks,
    run_sources,
)
from billing_cli.collect.transport import SourceClient, TransportConfig
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import RowFilter, Store

T0 = parse_rfc3339_ns("2026-11-24T10:00:00Z")
BASE = "https://exporter.test"
WINDOW = f"{BASE}/v1/snapshots/window"
LATEST = f"{BASE}/v1/snapshots/latest"


@dataclass(frozen=True)
class Src:
    source_id: str = "node-a"
    node_id: str = "node-a"
    env: str = "prod"
    api: str = "window"
    base_url: str = BASE


def item(minute: int, total: int, *, node: str | None = None, uuid: str = "u1") -> dict[str, Any]:
    doc: dict[str, Any] = {
        "collected_at": format_rfc3339_ns(T0 + minute * NS_PER_MINUTE + 123_456_789),
        "counter_epoch": "1",
        "samples": [
            {
                "uuid": uuid,
                "email": f"{uuid}@example.com",
                "inbound_tag": "vless",
                "uplink_bytes_total": total,
                "downlink_bytes_total": 2 * total,
            }
        ],
    }
    if node is not None:
        doc["node_id"] = node
        doc["env"] = "prod"
    return doc


def page(
    items: list[dict[str, Any]],
    *,
    cursor: str | None = None,
    more: bool = False,
    node: str = "node-a",
    key: str = "snapshots",
) -> httpx.Response:
    doc = {"node_id": node, "env": "prod", key: items, "next_cursor": cursor, "has_more": more}
    return httpx.Response(200, content=orjson.dumps(doc))


def factory(base_url: str = BASE) -> Any:
    def make(source: SourceLike) -> AbstractContextManager[ExporterClient]:
        cfg = TransportConfig(
            source_id=source.source_id,
            base_url=getattr(source, "base_url", base_url),
            auth_mode="none",
            ssl_context=ssl.create_default_context(),
            retry_attempts=3,
            budget_s=30,
        )
        return SourceClient(cfg, sleep=lambda _s: None)

    return make


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(str(tmp_path / "billing.db"))
    yield s
    s.close()


def pull(
    store: Store,
    tasks: list[PullTask],
    *,
    chunk_s: float = 3600,
    page_limit: int = 2,
    concurrency: int = 4,
) -> dict[str, Any]:
    run_id = store.start_run("collect", [t.source.source_id for t in tasks])
    return run_sources(
        store,
        tasks,
        factory(),
        pricing=Pricing(),
        run_id=run_id,
        settings=PullSettings(chunk_s=chunk_s, page_limit=page_limit, budget_s=30),
        concurrency=concurrency,
    )


def test_plan_chunks_are_half_open_and_cover_the_range() -> None:
    h = 3600 * NS_PER_SECOND
    assert plan_chunks(0, 3 * h + 5, h) == [(0, h), (h, 2 * h), (2 * h, 3 * h), (3 * h, 3 * h + 5)]
    assert plan_chunks(10, 10, h) == []
    assert plan_chunks(10, 5, h) == []


@respx.mock
def test_cursors_are_sent_back_verbatim_and_checkpoint_moves_on_last_page(store: Store) -> None:
    # Nanosecond cursors with a form a re-formatter would change (trailing zeros, offset).
    c1 = "2026-11-24T10:01:00.123456780+00:00"
    c2 = "opaque/+=cursor two"
    route = respx.get(WINDOW).mock(
        side_effect=[
            page([item(0, 100), item(1, 150)], cursor=c1, more=True),
            page([item(2, 180), item(3, 200)], cursor=c2, more=True),
            page([item(4, 260)]),
        ]
    )
    until = T0 + 10 * NS_PER_MINUTE
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=until)])
    o = out["node-a"]
    assert o.status == "ok", o.error
    assert o.pages == 3
    assert o.report.items == 5
    assert o.report.new_observations == 5
    sent = [dict(call.request.url.params) for call in route.calls]
    assert [p.get("cursor") for p in sent] == [None, c1, c2]
    assert sent[0]["since"] == format_rfc3339_ns(T0)
    # until is inclusive on the wire: the half-open chunk asks for until - 1 ns.
    assert sent[0]["until"] == format_rfc3339_ns(until - 1)
    assert all(p["limit"] == "2" for p in sent)
    cp = store.get_checkpoint("node-a")
    assert cp is not None
    assert cp.last_successful_until_ns == until
    assert cp.consecutive_failures == 0
    assert cp.last_error is None


@respx.mock
def test_long_catch_up_is_split_into_chunks_each_checkpointed(store: Store) -> None:
    route = respx.get(WINDOW).mock(side_effect=lambda request: page([]))
    until = T0 + 3 * 3600 * NS_PER_SECOND + 30 * NS_PER_SECOND
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=until)])
    assert out["node-a"].status == "ok"
    bounds = [
        (
            parse_rfc3339_ns(c.request.url.params["since"]),
            parse_rfc3339_ns(c.request.url.params["until"]),
        )
        for c in route.calls
    ]
    h = 3600 * NS_PER_SECOND
    assert bounds == [
        (T0, T0 + h - 1),
        (T0 + h, T0 + 2 * h - 1),
        (T0 + 2 * h, T0 + 3 * h - 1),
        (T0 + 3 * h, until - 1),
    ]
    assert out["node-a"].chunks_completed == 4
    cp = store.get_checkpoint("node-a")
    assert cp is not None
    assert cp.last_successful_until_ns == until


@respx.mock
def test_repeated_cursor_is_a_protocol_error_and_checkpoint_stays(store: Store) -> None:
    respx.get(WINDOW).mock(
        side_effect=[
            page([item(0, 100), item(1, 150)], cursor="c1", more=True),
            page([item(2, 180), item(3, 200)], cursor="c1", more=True),
        ]
    )
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=T0 + 10 * NS_PER_MINUTE)])
    o = out["node-a"]
    assert o.status == "failed"
    assert "repeated a cursor" in (o.error or "")
    assert "node-a" in (o.error or "")
    # The first page was fine and is committed; the looping page is not applied.
    assert o.pages == 1
    assert o.report.new_observations == 2
    cp = store.get_checkpoint("node-a")
    assert cp is not None
    assert cp.last_successful_until_ns is None
    assert cp.consecutive_failures == 1
    assert cp.last_error is not None
    assert "\n" not in cp.last_error


@respx.mock
def test_has_more_with_an_empty_page_is_a_protocol_error(store: Store) -> None:
    respx.get(WINDOW).mock(side_effect=[page([], cursor="c1", more=True)])
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=T0 + NS_PER_MINUTE)])
    assert out["node-a"].status == "failed"
    assert "page is empty" in (out["node-a"].error or "")


@respx.mock
def test_has_more_without_cursor_is_a_protocol_error(store: Store) -> None:
    respx.get(WINDOW).mock(side_effect=[page([item(0, 1)], cursor=None, more=True)])
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=T0 + NS_PER_MINUTE)])
    assert "has_more without next_cursor" in (out["node-a"].error or "")


@pytest.mark.parametrize("where", ["page", "item"])
@respx.mock
def test_identity_mismatch_fails_source_and_applies_nothing_of_that_page(
    store: Store, where: str
) -> None:
    bad = (
        page([item(2, 180), item(3, 200)], node="node-b", cursor="c2", more=True)
        if where == "page"
        else page([item(2, 180), item(3, 200, node="node-b")], cursor="c2", more=True)
    )
    respx.get(WINDOW).mock(
        side_effect=[page([item(0, 100), item(1, 150)], cursor="c1", more=True), bad]
    )
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=T0 + 10 * NS_PER_MINUTE)])
    o = out["node-a"]
    assert o.status == "failed"
    assert "node_id 'node-b'" in (o.error or "")
    assert o.report.new_observations == 2  # page 1 only: nothing of the bad page
    cp = store.get_checkpoint("node-a")
    assert cp is not None
    assert cp.last_successful_until_ns is None
    # One open identity_mismatch event names what the exporter claimed, not the registry.
    (ev,) = store.iter_integrity_events()
    assert ev.kind == "identity_mismatch"
    assert (ev.node_id, ev.env, ev.uuid, ev.inbound_tag) == ("node-b", "prod", "", "")
    assert (ev.source_id, ev.detail) == ("node-a", o.error)
    item_at = T0 + 3 * NS_PER_MINUTE + 123_456_789
    assert ev.collected_at_ns == (None if where == "page" else item_at)
    assert ev.run_id is not None
    assert store.integrity_event_counts() == {"node-a": 1}


@respx.mock
def test_items_shape_and_snapshots_shape_both_work(store: Store) -> None:
    respx.get(WINDOW).mock(side_effect=[page([item(0, 100), item(1, 300)], key="items")])
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=T0 + 5 * NS_PER_MINUTE)])
    assert out["node-a"].status == "ok", out["node-a"].error
    assert out["node-a"].report.new_observations == 2
    # Second observation: 200 up + 400 down in minute 1.
    assert out["node-a"].report.buckets_changed == 1


@respx.mock
def test_one_failing_source_does_not_stop_the_others(store: Store) -> None:
    good = Src()
    bad = Src(source_id="node-b", node_id="node-b", base_url="https://bad.test")
    respx.get(WINDOW).mock(side_effect=lambda request: page([item(0, 100), item(1, 200)]))
    respx.get("https://bad.test/v1/snapshots/window").mock(
        return_value=httpx.Response(500, content=b"boom")
    )
    until = T0 + 5 * NS_PER_MINUTE
    out = pull(
        store,
        [PullTask(good, since_ns=T0, until_ns=until), PullTask(bad, since_ns=T0, until_ns=until)],
    )
    assert out["node-a"].status == "ok"
    assert out["node-b"].status == "failed"
    assert "HTTP 500" in (out["node-b"].error or "")
    assert "after 3 attempts" in (out["node-b"].error or "")
    a = store.get_checkpoint("node-a")
    b = store.get_checkpoint("node-b")
    assert a is not None
    assert a.last_successful_until_ns == until
    assert b is not None
    assert b.last_successful_until_ns is None
    assert b.consecutive_failures == 1


@respx.mock
def test_5xx_then_success_is_retried_within_the_run(store: Store) -> None:
    respx.get(WINDOW).mock(
        side_effect=[
            httpx.Response(503, headers={"Retry-After": "0"}),
            httpx.Response(502),
            page([item(0, 100)]),
        ]
    )
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=T0 + NS_PER_MINUTE)])
    assert out["node-a"].status == "ok", out["node-a"].error


@respx.mock
def test_redirect_is_refused_not_followed(store: Store) -> None:
    elsewhere = respx.get("https://elsewhere.test/x").mock(return_value=page([item(0, 1)]))
    respx.get(WINDOW).mock(
        return_value=httpx.Response(302, headers={"Location": "https://elsewhere.test/x"})
    )
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=T0 + NS_PER_MINUTE)])
    assert out["node-a"].status == "failed"
    assert "redirect" in (out["node-a"].error or "")
    assert not elsewhere.called


@respx.mock
def test_latest_api_applies_one_item_and_advances_to_its_time(store: Store) -> None:
    doc = item(7, 500, node="node-a")
    respx.get(LATEST).mock(return_value=httpx.Response(200, content=orjson.dumps(doc)))
    out = pull(store, [PullTask(Src(api="latest"), since_ns=T0, until_ns=T0 + NS_PER_MINUTE)])
    assert out["node-a"].status == "ok", out["node-a"].error
    assert out["node-a"].report.new_observations == 1
    cp = store.get_checkpoint("node-a")
    assert cp is not None
    assert cp.last_successful_until_ns == parse_rfc3339_ns(doc["collected_at"])


@respx.mock
def test_latest_api_wrong_node_fails(store: Store) -> None:
    respx.get(LATEST).mock(
        return_value=httpx.Response(200, content=orjson.dumps(item(7, 500, node="node-z")))
    )
    out = pull(store, [PullTask(Src(api="latest"), since_ns=T0, until_ns=T0 + NS_PER_MINUTE)])
    assert out["node-a"].status == "failed"
    assert out["node-a"].report.new_observations == 0


@respx.mock
def test_reconcile_mode_never_touches_the_checkpoint(store: Store) -> None:
    respx.get(WINDOW).mock(side_effect=lambda request: page([item(0, 100), item(1, 200)]))
    run_id = store.start_run("reconcile", ["node-a"])
    out = run_sources(
        store,
        [PullTask(Src(), since_ns=T0, until_ns=T0 + 5 * NS_PER_MINUTE, advance_checkpoint=False)],
        factory(),
        pricing=Pricing(),
        run_id=run_id,
        settings=PullSettings(collect_bucket_changes=True),
        record_checkpoints=False,
    )
    assert out["node-a"].status == "ok"
    assert out["node-a"].report.new_observations == 2
    assert len(out["node-a"].report.bucket_changes) == 1
    assert store.get_checkpoint("node-a") is None


@respx.mock
def test_budget_exhausted_before_any_chunk_is_a_failure(store: Store) -> None:
    respx.get(WINDOW).mock(side_effect=lambda request: page([]))
    ticks = iter(range(0, 10**15, 40 * NS_PER_SECOND))
    run_id = store.start_run("collect", ["node-a"])
    out = run_sources(
        store,
        [PullTask(Src(), since_ns=T0, until_ns=T0 + NS_PER_MINUTE)],
        factory(),
        pricing=Pricing(),
        run_id=run_id,
        settings=PullSettings(budget_s=30),
        clock=lambda: next(ticks),
    )
    assert out["node-a"].status == "failed"
    assert "time budget" in (out["node-a"].error or "")


@respx.mock
def test_failure_in_a_later_chunk_keeps_the_earlier_chunks_checkpoint(store: Store) -> None:
    h = 3600 * NS_PER_SECOND
    calls = {"n": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if parse_rfc3339_ns(request.url.params["since"]) >= T0 + h:
            return page([item(61, 900)], node="node-x")  # second chunk: wrong identity
        return page([item(0, 100), item(1, 200)])

    respx.get(WINDOW).mock(side_effect=answer)
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=T0 + 2 * h)])
    assert out["node-a"].status == "failed"
    assert out["node-a"].chunks_completed == 1
    cp = store.get_checkpoint("node-a")
    assert cp is not None
    assert cp.last_successful_until_ns == T0 + h  # never ahead of the committed data
    assert cp.consecutive_failures == 1


class _FailingStore:
    """Delegates to a real store but fails every apply for one source."""

    def __init__(self, inner: Store, bad: str) -> None:
        self.inner = inner
        self.bad = bad

    def apply(self, batch: Any) -> Any:
        if batch.source_id == self.bad:
            from billing_cli._errors import StoreError

            raise StoreError("database is locked (simulated)")
        return self.inner.apply(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@respx.mock
def test_a_store_failure_fails_only_that_source(store: Store) -> None:
    respx.get(WINDOW).mock(side_effect=lambda request: page([item(0, 100), item(1, 200)]))
    respx.get("https://b.test/v1/snapshots/window").mock(
        side_effect=lambda request: page([item(0, 100), item(1, 200)], node="node-b")
    )
    failing: Any = _FailingStore(store, "node-b")
    until = T0 + 5 * NS_PER_MINUTE
    out = pull(
        failing,
        [
            PullTask(Src(), since_ns=T0, until_ns=until),
            PullTask(
                Src(source_id="node-b", node_id="node-b", base_url="https://b.test"),
                since_ns=T0,
                until_ns=until,
            ),
        ],
    )
    assert out["node-a"].status == "ok"
    assert out["node-b"].status == "failed"
    assert "database is locked" in (out["node-b"].error or "")
    b = store.get_checkpoint("node-b")
    assert b is not None
    assert b.last_successful_until_ns is None
    assert b.consecutive_failures == 1


def test_collect_table_renders_every_column() -> None:
    from rich.console import Console

    from billing_cli.cli.collect import collect_lines, collect_table
    from billing_cli.collect.collector import SourceOutcome
    from billing_cli.store.base import ApplyReport

    ok = SourceOutcome("node-a", "node-a", "prod", "ok", pages=3)
    ok.report = ApplyReport(items=5, samples=50, new_observations=40, duplicates=10)
    bad = SourceOutcome("node-b", "node-b", "prod", "failed", error="source 'node-b': [/] boom")
    console = Console(width=200, record=True)
    console.print(collect_table([ok, bad], {}, T0, 7, wide=True))
    for label, line in collect_lines([ok, bad]):
        console.print(f"{label}: {line}", markup=False, highlight=False)
    text = console.export_text()
    assert "collect run 7" in text
    for header in ("source", "status", "pages", "samples", "new", "dup", "buckets", "lag"):
        assert header in text
    assert "node-a" in text
    assert "failed" in text
    assert "[/] boom" in text  # printed literally, not as rich markup
    narrow = Console(width=200, record=True)
    narrow.print(collect_table([ok, bad], {}, T0, 7))
    assert "pages" not in narrow.export_text()  # --wide only


@respx.mock
def test_a_rejected_item_of_another_node_is_an_identity_failure(store: Store) -> None:
    foreign = item(1, 200, node="node-b")
    foreign["collected_at"] = "yesterday"  # invalid: the item becomes rejections
    respx.get(WINDOW).mock(side_effect=[page([item(0, 100), foreign])])
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=T0 + 5 * NS_PER_MINUTE)])
    assert out["node-a"].status == "failed"
    assert "rejected item" in (out["node-a"].error or "")
    assert out["node-a"].report.new_observations == 0
    assert [(e.kind, e.node_id) for e in store.iter_integrity_events()] == [
        ("identity_mismatch", "node-b")
    ]


@respx.mock
def test_a_rejected_sample_of_this_node_is_recorded_and_the_rest_applied(store: Store) -> None:
    good = item(1, 200)
    good["samples"].append(dict(good["samples"][0], uuid="u2", uplink_bytes_total="12"))
    respx.get(WINDOW).mock(side_effect=[page([item(0, 100), good])])
    out = pull(store, [PullTask(Src(), since_ns=T0, until_ns=T0 + 5 * NS_PER_MINUTE)])
    assert out["node-a"].status == "ok", out["node-a"].error
    assert out["node-a"].report.rejected == 1
    assert out["node-a"].report.new_observations == 2


# --- the deployed exporter's exact bytes -----------------------------------------------------

DEPLOYED = Path(__file__).parent / "fixtures" / "deployed"


def deployed(name: str, status: int = 200) -> httpx.Response:
    ctype = "application/json" if name.endswith(".json") else "text/plain; charset=utf-8"
    return httpx.Response(
        status, content=(DEPLOYED / name).read_bytes(), headers={"Content-Type": ctype}
    )


@respx.mock
def test_the_deployed_exporters_pages_byte_for_byte_bill_exactly(store: Store) -> None:
    """Chunk 1: the two pages (blank tags, trimmed cursor, samples null); chunk 2: the
    identity-less empty page. Both chunks complete; every byte lands in its minute."""
    start = parse_rfc3339_ns("2026-11-24T10:00:00Z")
    route = respx.get(WINDOW).mock(
        side_effect=[
            deployed("window_page.json"),
            deployed("window_last_page.json"),
            deployed("window_empty.json"),
        ]
    )
    src = Src(source_id="tokyo-1", node_id="tokyo-1")
    out = pull(store, [PullTask(src, start, start + 2 * 3600 * NS_PER_SECOND)])
    assert (out["tokyo-1"].status, out["tokyo-1"].report.rejected) == ("ok", 0)
    assert route.calls[1].request.url.params["cursor"] == "2026-11-24T10:01:00.5Z"
    cp = store.get_checkpoint("tokyo-1")
    assert cp is not None
    assert cp.last_successful_until_ns == start + 2 * 3600 * NS_PER_SECOND
    assert cp.newest_collected_at_ns == parse_rfc3339_ns("2026-11-24T10:04:00.000000001Z")
    usage = {
        (u.uuid, u.inbound_tag, u.bucket_start_ns - start): u.total_bytes
        for u in store.iter_usage(RowFilter())
    }
    alice = "0b8e6f5c-3d2a-4b1e-9f7c-1a2b3c4d5e6f"
    assert usage == {
        (alice, "", 1 * NS_PER_MINUTE): 4500,
        (alice, "", 2 * NS_PER_MINUTE): 11000,
        (alice, "", 3 * NS_PER_MINUTE): 200,
        ("legacy-user-42", "", 1 * NS_PER_MINUTE): 300,
        ("legacy-user-42", "", 3 * NS_PER_MINUTE): 1300,
    }


@respx.mock
def test_the_deployed_latest_404_is_no_snapshot_yet_and_other_404s_fail(store: Store) -> None:
    respx.get(LATEST).mock(side_effect=[deployed("latest_404.txt", 404), deployed("latest.json")])
    src = Src(source_id="tokyo-1", node_id="tokyo-1", api="latest")
    first = pull(store, [PullTask(src, T0, T0)])["tokyo-1"]
    assert (first.status, first.report.items) == ("ok", 0)
    assert first.note is not None
    assert "no snapshot yet" in first.note
    second = pull(store, [PullTask(src, T0, T0)])["tokyo-1"]
    assert (second.status, second.report.items, second.note) == ("ok", 1, None)
    respx.get(LATEST).mock(return_value=httpx.Response(404, content=b"404 page not found\n"))
    third = pull(store, [PullTask(src, T0, T0)])["tokyo-1"]
    assert third.status == "failed"
    assert "answered HTTP 404 for /v1/snapshots/latest (404 page not found)" in (third.error or "")


@respx.mock
def test_the_deployed_401_is_an_auth_error(store: Store) -> None:
    respx.get(WINDOW).mock(return_value=deployed("unauthorized.txt", 401))
    out = pull(store, [PullTask(Src(), T0, T0 + NS_PER_MINUTE)])["node-a"]
    assert out.status == "failed"
    assert "answered HTTP 401 (unauthorized)" in (out.error or "")

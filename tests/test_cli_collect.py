"""``billing collect`` end to end: the real CLI against the simulated fleet over real TLS.

Certificates come from a per-test trustme CA; every test ends by checking that none of
the secrets in play (tokens, private keys, a redirect URL's token) appeared in any
captured output line or in the database file.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from _collect_support import (
    Env,
    MakeEnv,
    assert_no_secrets,
    expected_usage,
    fleet_end_ns,
    make,  # noqa: F401  (fixture)
    only,
    store_usage,
    usage_rows,
)
from conftest import CliRunnerFn
from simfleet import SimFleet, sim_fleet  # noqa: F401  (fixture)

from billing_cli._time import NS_PER_MINUTE, format_rfc3339_ns, parse_rfc3339_ns
from billing_cli.simulator import format_cursor
from billing_cli.store import open_store
from billing_cli.store.base import Batch, CheckpointAdvance

# Tests that advance the simulated fleet need the overlap to reach back over its history
# (the simulator's new minutes are a little in the past, see _collect_support.HEADROOM_MIN).
WIDE_OVERLAP = 'overlap = "45m"'


def all_items(env: Env, node_id: str = "node-01") -> dict[str, int]:
    node = env.sim.fleet.node(node_id)
    ats = node.collected_ats()
    return expected_usage(node, ats[0], ats[-1])


def checkpoint_until(env: Env, source_id: str = "node-01") -> int | None:
    store = open_store(env.db)
    try:
        cp = store.get_checkpoint(source_id)
        return cp.last_successful_until_ns if cp else None
    finally:
        store.close()


# --- TLS and auth ----------------------------------------------------------------------


def test_mtls_collect_gives_exact_totals(make: MakeEnv) -> None:
    env = make(nodes=2, mtls=True, series=10, minutes=10)
    doc = env.json("collect")
    assert doc["outcome"] == "ok"
    assert doc["exit_code"] == 0
    for sid in ("node-01", "node-02"):
        row = only(doc, sid)
        assert row["status"] == "ok", row
        assert row["items"] == 10
        assert row["samples"] == 100
        assert row["new_observations"] == 100
        assert row["error"] is None
        # Lag is the age of the newest snapshot received (the fleet's history is old).
        newest = env.sim.fleet.node(sid).collected_ats()[-1]
        assert row["newest_collected_at"] == format_rfc3339_ns(newest)
        assert row["lag_seconds"] == pytest.approx((time.time_ns() - newest) / 1e9, abs=30)
        assert store_usage(env.db, sid) == all_items(env, sid)


def test_bearer_with_pinned_ca(make: MakeEnv) -> None:
    env = make(mtls=False, bearer=True, series=5, minutes=5)
    assert "bearer" in env.registry.read_text()
    doc = env.json("collect")
    assert only(doc)["status"] == "ok"
    assert store_usage(env.db) == all_items(env)


def test_plain_output_under_cron_is_a_summary(make: MakeEnv) -> None:
    env = make(series=3, minutes=3)
    res = env.run("collect")
    assert res.exit_code == 0, res.output
    assert "collect run 1: 1 ok, 0 failed, 0 skipped" in res.stdout
    # A second run right away: nothing is due, nothing printed, exit 0.
    res = env.run("collect")
    assert res.exit_code == 0
    assert res.stdout == ""


def test_wrong_ca_fails_the_source(make: MakeEnv, tmp_path: Path) -> None:
    env = make(series=3, minutes=3)
    other = tmp_path / "other-ca.pem"
    other.write_bytes(trustme.CA().cert_pem.bytes())
    env.registry.write_text(env.registry.read_text().replace(str(env.sim.pki.ca), str(other)))
    doc = env.json("collect", expect=1)
    row = only(doc)
    assert row["status"] == "failed"
    assert "not signed by a trusted CA" in row["error"]
    assert "node-01" in row["error"]
    assert checkpoint_until(env) is None


def test_hostname_mismatch_then_server_name_fixes_it(make: MakeEnv) -> None:
    bad = make(series=3, minutes=3, server_names=("exporter.internal",))
    row = only(bad.json("collect", expect=1))
    assert row["status"] == "failed"
    assert "not valid for '127.0.0.1'" in row["error"]
    assert "server_name" in row["error"]

    good = make(
        series=3, minutes=3, server_names=("exporter.internal",), server_name="exporter.internal"
    )
    assert "server_name" in good.registry.read_text()
    assert only(good.json("collect"))["status"] == "ok"
    wrong = make(series=3, minutes=3, server_names=("exporter.internal",), server_name="other.name")
    row = only(wrong.json("collect", expect=1))
    assert "not valid for 'other.name'" in row["error"]


def test_missing_client_certificate(make: MakeEnv) -> None:
    env = make(series=3, minutes=3, mtls=True, bearer=True)
    env.sim.mtls = False  # the server still demands a client certificate
    env.registry.write_text(env.sim.registry_toml)
    assert 'auth_mode = "bearer"' in env.registry.read_text()
    row = only(env.json("collect", expect=1))
    assert row["status"] == "failed"
    assert "client certificate" in row["error"]


def test_wrong_token_is_an_auth_error(make: MakeEnv) -> None:
    env = make(series=3, minutes=3, mtls=False, bearer=True)
    wrong = "not-the-right-token-" + "x" * 20
    env.sim.extra_secrets.append(wrong)
    (env.sim.dir / "token-node-01").write_text(wrong + "\n")
    row = only(env.json("collect", expect=1))
    assert row["status"] == "failed"
    assert "HTTP 401" in row["error"]
    assert checkpoint_until(env) is None


# --- transport faults -------------------------------------------------------------------


def test_5xx_then_success(make: MakeEnv) -> None:
    env = make(series=3, minutes=3)
    env.sim.fleet.node("node-01").set_fault("status", times=2, status=503)
    row = only(env.json("collect"))
    assert row["status"] == "ok"
    assert store_usage(env.db) == all_items(env)
    assert len(env.sim.fleet.node("node-01").requests) == 3


def test_redirect_is_not_followed(make: MakeEnv) -> None:
    env = make(series=3, minutes=3)
    env.sim.extra_secrets.append("redirect-secret")  # the Location's query must not leak
    env.sim.fleet.node("node-01").set_fault("redirect")
    row = only(env.json("collect", expect=1))
    assert row["status"] == "failed"
    assert "redirects are not followed" in row["error"]
    assert "elsewhere.example" in row["error"]


@pytest.mark.parametrize("content_length", [True, False])
def test_oversize_body_is_refused(make: MakeEnv, content_length: bool) -> None:
    env = make(series=3, minutes=3, defaults="max_response_bytes = 20000")
    env.sim.fleet.node("node-01").set_fault("oversize", size=200_000, content_length=content_length)
    row = only(env.json("collect", expect=1))
    assert row["status"] == "failed"
    assert "max_response_bytes 20000" in row["error"]
    assert store_usage(env.db) == {}


# --- wire-level safety -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["page", "item"])
def test_wrong_node_id_fails_and_checkpoint_stays(make: MakeEnv, where: str) -> None:
    env = make(series=4, minutes=4, defaults=WIDE_OVERLAP)
    assert only(env.json("collect"))["status"] == "ok"
    before_cp = checkpoint_until(env)
    before_rows = usage_rows(env.db)
    env.sim.fleet.advance(2)
    env.sim.fleet.node("node-01").set_fault("wrong_node_id", where=where)
    doc = env.json("collect", "--source", "node-01", expect=1)
    row = only(doc)
    assert row["status"] == "failed"
    assert "node-01-impostor" in row["error"]
    assert row["new_observations"] == 0
    assert checkpoint_until(env) == before_cp
    assert usage_rows(env.db) == before_rows
    # The mismatch is an open integrity event that status counts until acknowledged.
    assert only(env.json("status", expect=None))["open_integrity_events"] == 1
    res = env.run("integrity", "list", "--json")
    (event,) = orjson.loads(res.stdout)
    assert (event["kind"], event["source_id"]) == ("identity_mismatch", "node-01")
    assert event["node_id"] == "node-01-impostor"
    assert event["detail"] == row["error"]
    assert env.run("integrity", "ack", "--source", "node-01").exit_code == 0
    assert only(env.json("status", expect=None))["open_integrity_events"] == 0


def test_cursor_loop_is_a_protocol_error(make: MakeEnv) -> None:
    env = make(series=3, minutes=8, defaults="page_limit = 3")
    env.sim.fleet.node("node-01").set_fault("cursor_loop")
    row = only(env.json("collect", expect=1))
    assert row["status"] == "failed"
    assert "repeated a cursor" in row["error"]
    assert row["pages"] == 1  # the first page was fine and is kept
    assert checkpoint_until(env) is None


def test_empty_has_more_page_is_a_protocol_error(make: MakeEnv) -> None:
    env = make(series=3, minutes=3)
    env.sim.fleet.node("node-01").set_fault("empty_has_more")
    row = only(env.json("collect", expect=1))
    assert "has_more is true but the page is empty" in row["error"]


def test_nanosecond_cursors_across_many_pages(make: MakeEnv) -> None:
    env = make(series=4, minutes=25, defaults="page_limit = 1")
    row = only(env.json("collect"))
    assert row["status"] == "ok"
    assert row["pages"] == 25
    assert row["new_observations"] == 100
    assert row["duplicates"] == 0
    node = env.sim.fleet.node("node-01")
    sent = [q.get("cursor") for ep, q in node.requests if ep == "window"]
    ats = node.collected_ats()
    assert sent == [None] + [format_cursor(t) for t in ats[:-1]]
    assert all(c is None or len(c.split(".")[1]) == 10 for c in sent)  # 9 digits + Z
    assert store_usage(env.db) == all_items(env)


# --- replay, catch-up, late data, restarts ------------------------------------------------


def test_overlap_redelivery_changes_nothing(make: MakeEnv) -> None:
    env = make(series=5, minutes=6, defaults=WIDE_OVERLAP)
    first = only(env.json("collect"))
    rows = usage_rows(env.db)
    again = only(env.json("collect", "--source", "node-01"))
    assert again["status"] == "ok"
    assert again["duplicates"] == first["new_observations"] == 30
    for key in ("new_observations", "buckets_changed", "postings", "conflicts"):
        assert again[key] == 0, key
    assert usage_rows(env.db) == rows


def test_catch_up_after_multi_hour_outage_in_chunks(make: MakeEnv) -> None:
    env = make(series=3, minutes=200)
    node = env.sim.fleet.node("node-01")
    ats = node.collected_ats()
    # The last success was just before the history starts, 3h20m+ ago: an outage.
    last_ok = ats[0] - 3 * NS_PER_MINUTE
    store = open_store(env.db)
    try:
        run_id = store.start_run("collect", ["node-01"])
        store.apply(
            Batch(
                items=[],
                run_id=run_id,
                pricing=env_pricing(),
                checkpoint=CheckpointAdvance("node-01", "node-01", "prod", None, last_ok, last_ok),
            )
        )
    finally:
        store.close()
    row = only(env.json("collect"))
    assert row["status"] == "ok"
    # Several pages per chunk share the chunk's bounds: one entry per chunk, in order.
    windows = list(
        dict.fromkeys(
            (parse_rfc3339_ns(q["since"]), parse_rfc3339_ns(q["until"]))
            for ep, q in node.requests
            if ep == "window"
        )
    )
    assert windows[0][0] == last_ok - 2 * NS_PER_MINUTE  # default overlap
    # Contiguous 1h chunks: each starts 1 ns after the previous one's inclusive end.
    assert len(windows) >= 4
    for (_, end), (nxt, _) in itertools.pairwise(windows):
        assert nxt == end + 1
    assert all(e - s < 3600 * 10**9 for s, e in windows)
    assert row["new_observations"] == 600
    assert store_usage(env.db) == all_items(env)
    cp = checkpoint_until(env)
    assert cp is not None
    assert cp == windows[-1][1] + 1


def env_pricing() -> Any:
    from billing_cli.pricing import Pricing

    return Pricing()


def test_late_item_inside_the_overlap_is_repaired(make: MakeEnv) -> None:
    env = make(series=5, minutes=8, defaults=WIDE_OVERLAP)
    assert only(env.json("collect"))["status"] == "ok"
    node = env.sim.fleet.node("node-01")
    before = usage_rows(env.db)
    late_at = node.add_late_item(appear_after_minutes=0)
    row = only(env.json("collect", "--source", "node-01"))
    assert row["status"] == "ok"
    assert row["new_observations"] == 5
    assert row["buckets_changed"] > 0
    after = usage_rows(env.db)
    assert after != before
    # The late item splits the delta it falls into: same total, exact per series.
    assert sum(a + b for a, b in after.values()) == sum(a + b for a, b in before.values())
    assert store_usage(env.db) == all_items(env)
    assert late_at in node.collected_ats()


@pytest.mark.parametrize("with_epoch", [True, False])
def test_counter_restart(make: MakeEnv, with_epoch: bool) -> None:
    # Without epochs the restart is recognised by the drop alone (DESIGN §4).
    env = make(
        series=5,
        minutes=5,
        defaults=WIDE_OVERLAP,
        activity=1.0,
        epoch="1" if with_epoch else None,
    )
    assert only(env.json("collect"))["status"] == "ok"
    node = env.sim.fleet.node("node-01")
    node.restart_counters(with_epoch=with_epoch)
    env.sim.fleet.advance(3)
    row = only(env.json("collect", "--source", "node-01"))
    assert row["status"] == "ok"
    assert row["new_observations"] == 15
    assert row["anomalies"] == 0
    assert store_usage(env.db) == all_items(env)


# --- command behaviour -------------------------------------------------------------------


def test_one_failing_source_does_not_stop_the_others(make: MakeEnv) -> None:
    env = make(nodes=3, series=3, minutes=3)
    env.sim.fleet.node("node-02").set_fault("status", status=500)
    doc = env.json("collect", expect=1)
    assert doc["outcome"] == "failed"
    assert only(doc, "node-01")["status"] == "ok"
    assert only(doc, "node-03")["status"] == "ok"
    bad = only(doc, "node-02")
    assert bad["status"] == "failed"
    assert "HTTP 500" in bad["error"]
    assert checkpoint_until(env, "node-02") is None
    assert store_usage(env.db, "node-03") == all_items(env, "node-03")
    res = env.run("-q", "collect", "--source", "node-02")
    assert res.exit_code == 1
    assert res.stdout == ""
    assert "node-02" in res.stderr
    assert "HTTP 500" in res.stderr


def test_unknown_and_disabled_sources_are_config_errors(make: MakeEnv) -> None:
    env = make(series=3, minutes=3)
    res = env.run("collect", "--source", "nope")
    assert res.exit_code == 2
    assert "no source 'nope'" in res.stderr
    env.registry.write_text(
        env.registry.read_text().replace(
            'auth_mode = "mtls"', 'auth_mode = "mtls"\nenabled = false'
        )
    )
    res = env.run("collect", "--source", "node-01")
    assert res.exit_code == 2
    assert "disabled" in res.stderr
    res = env.run("collect", "--since", "yesterday-ish")
    assert res.exit_code == 2
    assert "--since" in res.stderr
    assert "Traceback" not in res.output


def test_since_sets_the_first_pull_only(make: MakeEnv) -> None:
    # History older than the 1h initial lookback is reached with --since on the first run.
    env = make(series=3, minutes=120)
    row = only(env.json("collect", "--since", "3h"))
    assert row["status"] == "ok"
    assert row["new_observations"] == 360
    assert store_usage(env.db) == all_items(env)


def test_locked_source_is_skipped_with_exit_75(make: MakeEnv) -> None:
    from billing_cli.collect.locks import locker_for

    env = make(nodes=2, series=3, minutes=3)
    held = locker_for(env.db).try_acquire("node-01")
    assert held is not None
    try:
        doc = env.json("collect", expect=0)
        assert only(doc, "node-01")["status"] == "skipped"
        assert only(doc, "node-02")["status"] == "ok"
        res = env.run("collect", "--source", "node-01", "--json")
        assert res.exit_code == 75, res.output
    finally:
        held.release()
    assert only(env.json("collect", "--source", "node-01"))["status"] == "ok"


def test_mtls_collect_on_both_backends(make: MakeEnv, db_url: str) -> None:
    env = make(nodes=2, series=5, minutes=6, db=db_url)
    doc = env.json("collect")
    assert [s["status"] for s in doc["sources"]] == ["ok", "ok"]
    for sid in ("node-01", "node-02"):
        assert store_usage(env.db, sid) == all_items(env, sid)
    again = env.json("collect", "--source", "node-01")
    assert only(again)["new_observations"] == 0


def test_legacy_exporter_base_url_latest_shim(
    sim_fleet: Callable[..., SimFleet],
    cli: CliRunnerFn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No registry, EXPORTER_BASE_URL set: one implicit source on /latest, one item a run;
    what happened between two runs lands in the later item's minute."""
    sim = sim_fleet(mtls=False, bearer=True, series=4, minutes=3, end_ns=fleet_end_ns())
    node = sim.fleet.node("node-01")
    monkeypatch.setenv("EXPORTER_BASE_URL", sim.fleet.base_url("node-01"))
    monkeypatch.setenv("EXPORTER_NODE_ID", "node-01")
    monkeypatch.setenv("EXPORTER_ENV", "prod")
    monkeypatch.setenv("EXPORTER_CA_BUNDLE_REF", f"file:{sim.pki.ca}")
    monkeypatch.setenv("LEGACY_TOKEN", sim.fleet.tokens["node-01"])
    monkeypatch.setenv("EXPORTER_TOKEN_REF", "env:LEGACY_TOKEN")
    db = str(tmp_path / "legacy.db")
    outputs: list[str] = []

    def collect() -> dict[str, Any]:
        res = cli("--db", db, "collect", "--source", "legacy", "--json")
        outputs.extend([res.stdout, res.stderr])
        assert res.exit_code == 0, res.output
        return only(orjson.loads(res.stdout), "legacy")

    first_at = node.collected_ats()[-1]
    row = collect()
    assert row["items"] == 1
    assert row["new_observations"] == 4
    assert row["buckets_changed"] == 0  # the first item is a baseline
    sim.fleet.advance(3)
    later_at = node.collected_ats()[-1]
    row = collect()
    assert row["items"] == 1
    assert row["new_observations"] == 4
    rows = usage_rows(db)
    # Three minutes of usage, all in the later item's minute.
    assert {k[2] for k in rows} <= {later_at - later_at % NS_PER_MINUTE}
    assert store_usage(db) == expected_usage(node, first_at, later_at)
    assert checkpoint_until(Env(sim, cli, db, tmp_path), "legacy") == later_at
    assert_no_secrets(outputs, sim.secrets())


# --- no silent zero prices -------------------------------------------------------------


def test_without_pricing_collect_warns_that_everything_rates_at_zero(make: MakeEnv) -> None:
    env = make(series=3, minutes=3)
    res = env.run("collect")
    assert res.exit_code == 0, res.output
    assert "warning" not in res.stderr  # priced: nothing to say
    env.registry.write_text(env.sim.registry_toml)  # no [pricing] at all
    res = env.run("collect", "--source", "node-01")
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {env.registry}: no [pricing] table: everything rates at zero "
        "(add [pricing] with price_per_unit to rate)"
    ]
    # -q is errors only; `billing status --json` still reports it ("pricing": "none").
    assert env.run("-q", "collect", "--source", "node-01").stderr == ""


# --- retention -----------------------------------------------------------------------------


def test_collect_refuses_data_beyond_the_horizon_and_compacts_once_a_day(make: MakeEnv) -> None:
    # 1,530 minutes of history with a 1-day horizon: the oldest ~90 items are beyond it.
    env = make(nodes=1, series=2, minutes=1530, defaults='retention = "1d"')
    doc = env.json("collect", "--since", "2d")
    row = only(doc)
    horizon = time.time_ns() - 24 * 60 * NS_PER_MINUTE
    old = [t for t in env.sim.fleet.node("node-01").collected_ats() if t < horizon]
    assert abs(row["beyond_retention"] - 2 * len(old)) <= 2 * 2  # the clock moved meanwhile
    assert row["beyond_retention"] > 0
    assert row["samples"] + row["beyond_retention"] == 2 * 1530
    # The first run of the day started a compaction cycle (nothing older was stored).
    assert doc["compaction"]["ran"] is True
    assert doc["compaction"]["complete"] is True
    # The next run the same day: no new cycle.
    assert env.json("collect", "--source", "node-01")["compaction"] is None
    # A day later (the cycle's start and the cut moved back a day): a new one.
    store = open_store(env.db)
    try:
        db = store.db  # type: ignore[attr-defined]
        with db.transaction():
            db.execute(
                "UPDATE retention_state SET cycle_started_at_ns = cycle_started_at_ns - ?,"
                " cut_ns = cut_ns - ?",
                (24 * 60 * NS_PER_MINUTE, 24 * 60 * NS_PER_MINUTE),
            )
    finally:
        store.close()
    again = env.json("collect", "--source", "node-01")["compaction"]
    assert again["ran"] is True
    assert again["cut"] >= doc["compaction"]["cut"]
    env.check_no_secrets()

"""``billing status``: classification, exit codes and the ``--json`` schema, on both stores.

The store is seeded through its public contract (runs, checkpoint advances, failures,
rejections), exactly as the collector leaves it; ``status`` only reads it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from billing_cli._time import NS_PER_SECOND, now_ns, parse_rfc3339_ns
from billing_cli.cli.status import redact_error
from billing_cli.core.types import Rejection
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import Batch, CheckpointAdvance, SourceRunResult

MINUTE = 60 * NS_PER_SECOND

REGISTRY = """\
[defaults]
collect_interval = "1m"
overlap = "2m"
ca_bundle_ref = "file:/etc/billing/ca.pem"

[[sources]]
source_id = "a"
node_id = "node-a"
env = "prod"
base_url = "https://a.example.net:9550"
auth_mode = "bearer"
credential_ref = "env:TOKEN_A"

[[sources]]
source_id = "b"
node_id = "node-b"
env = "prod"
base_url = "https://b.example.net:9550"
auth_mode = "bearer"
credential_ref = "env:TOKEN_B"
collect_interval = "10m"

[[sources]]
source_id = "off"
node_id = "node-off"
env = "prod"
base_url = "https://off.example.net:9550"
enabled = false
auth_mode = "bearer"
credential_ref = "env:TOKEN_OFF"
"""
NODES = {"a": "node-a", "b": "node-b", "off": "node-off"}


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "sources.toml"
    path.write_text(REGISTRY)
    return path


def seed(
    db: str,
    source_id: str,
    *,
    lag_s: float | None = None,
    failures: int = 0,
    error: str = "source 'x': connect timeout",
    rejections: int = 0,
    counts: dict[str, int] | None = None,
    received: bool = True,
    top_rejection: str | None = None,
) -> None:
    """Leave the store as a collector would: a successful run whose newest snapshot is
    ``lag_s`` old (none at all with ``received=False``), then ``failures`` failed runs."""
    node = NODES[source_id]
    now = now_ns()
    store = open_store(db)
    try:
        run_id = store.start_run("collect", [source_id])
        if lag_s is not None or rejections:
            newest = None if lag_s is None else now - int(lag_s * NS_PER_SECOND)
            store.apply(
                Batch(
                    items=[],
                    run_id=run_id,
                    pricing=Pricing(),
                    source_id=source_id,
                    rejections=[
                        Rejection(now - i * MINUTE, node, "prod", f"u{i}", "t", "invalid sample")
                        for i in range(rejections)
                    ],
                    checkpoint=None
                    if newest is None
                    else CheckpointAdvance(
                        source_id, node, "prod", None, now, now, newest if received else None
                    ),
                )
            )
            if lag_s is not None:
                store.record_success(source_id, node, "prod", newest if not received else now)
        for _ in range(failures):
            store.record_failure(source_id, node, "prod", now, error)
        outcome = "failed" if failures else "ok"
        store.finish_run(
            run_id,
            outcome,
            {
                source_id: SourceRunResult(
                    run_id=run_id,
                    source_id=source_id,
                    kind="collect",
                    started_at_ns=now - NS_PER_SECOND,
                    finished_at_ns=now,
                    outcome=outcome,
                    counts=counts if counts is not None else {"items": 3, "new_observations": 7},
                    error=error if failures else None,
                    top_rejection=top_rejection,
                )
            },
        )
    finally:
        store.close()


def status_json(cli: Any, registry: Path, db: str, *args: str) -> tuple[int, dict[str, Any]]:
    res = cli("status", "--json", "--registry", str(registry), "--db", db, *args)
    assert res.exit_code in (0, 1), res.output
    return res.exit_code, json.loads(res.stdout)


def by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["source_id"]: s for s in doc["sources"]}


def test_all_enabled_healthy_exits_zero_and_disabled_does_not_count(
    cli: Any, registry: Path, db_url: str
) -> None:
    seed(db_url, "a", lag_s=20)
    seed(db_url, "b", lag_s=600)  # 10m interval: default max lag 50m
    code, doc = status_json(cli, registry, db_url)
    assert code == 0
    assert doc["healthy"] is True
    src = by_id(doc)
    assert src["a"]["health"] == "healthy"
    assert src["b"]["health"] == "healthy"
    assert src["off"]["health"] == "disabled"
    assert src["off"]["enabled"] is False
    assert src["off"]["last_successful_until"] is None
    assert doc["summary"] == {"healthy": 2, "degraded": 0, "failing": 0, "disabled": 1}
    assert src["a"]["max_lag_seconds"] == 300  # max(5 x 60s, 5m)
    assert src["b"]["max_lag_seconds"] == 3000  # 5 x 10m
    assert 19 <= src["a"]["lag_seconds"] < 60
    assert src["a"]["last_run"]["counts"] == {"items": 3, "new_observations": 7}
    assert src["a"]["last_run"]["outcome"] == "ok"


def test_lagging_source_is_degraded_then_failing(cli: Any, registry: Path, db_url: str) -> None:
    seed(db_url, "a", lag_s=8 * 60)  # > 5m
    seed(db_url, "b", lag_s=160 * 60)  # > 3 x 50m
    code, doc = status_json(cli, registry, db_url)
    assert code == 1
    assert doc["healthy"] is False
    src = by_id(doc)
    assert src["a"]["health"] == "degraded"
    assert src["a"]["reasons"] == [src["a"]["reasons"][0]]
    assert src["a"]["reasons"][0].startswith("stale: newest snapshot received is 8m old (")
    assert "max lag 300s" in src["a"]["reasons"][0]
    assert src["b"]["health"] == "failing"
    # A wider --max-lag makes both acceptable.
    code, doc = status_json(cli, registry, db_url, "--max-lag", "3h")
    assert code == 0
    assert {s["health"] for s in doc["sources"] if s["enabled"]} == {"healthy"}
    assert by_id(doc)["a"]["max_lag_seconds"] == 10800


def test_failures_degrade_then_fail_and_errors_are_redacted(
    cli: Any, registry: Path, db_url: str
) -> None:
    seed(db_url, "a", lag_s=10)
    seed(db_url, "a", failures=1, error="source 'a': HTTP 401 (Bearer s3cr3t-t0ken-value)")
    seed(db_url, "b", lag_s=10)
    seed(
        db_url,
        "b",
        failures=3,
        error="source 'b': connect\nfailed https://user:hunter2@b.example.net token=abc123",
    )
    code, doc = status_json(cli, registry, db_url)
    assert code == 1
    src = by_id(doc)
    assert src["a"]["health"] == "degraded"
    assert src["a"]["consecutive_failures"] == 1
    assert src["b"]["health"] == "failing"
    assert src["b"]["consecutive_failures"] == 3
    assert src["b"]["last_run"]["outcome"] == "failed"
    text = json.dumps(doc)
    for secret in ("s3cr3t-t0ken-value", "hunter2", "abc123"):
        assert secret not in text
    assert "\n" not in src["b"]["last_error"]
    assert src["a"]["last_error"] == "source 'a': HTTP 401 (Bearer [redacted])"
    table = cli("status", "--registry", str(registry), "--db", db_url)
    assert table.exit_code == 1
    for secret in ("s3cr3t-t0ken-value", "hunter2", "abc123"):
        assert secret not in table.output
    assert "failing" in table.stdout
    assert "degraded" in table.stdout


def test_never_collected_enabled_source_is_failing(
    cli: Any, registry: Path, tmp_path: Path
) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=5)
    code, doc = status_json(cli, registry, db)
    assert code == 1
    b = by_id(doc)["b"]
    assert b["health"] == "failing"
    assert b["reasons"] == ["never collected successfully"]
    assert b["lag_seconds"] is None
    assert b["last_run"] is None
    # Only source a selected: healthy.
    code, doc = status_json(cli, registry, db, "--source", "a")
    assert code == 0
    assert [s["source_id"] for s in doc["sources"]] == ["a"]


def test_open_integrity_events_are_counted_per_source(
    cli: Any, registry: Path, tmp_path: Path
) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=5, rejections=2)
    seed(db, "b", lag_s=5)
    _, doc = status_json(cli, registry, db)
    src = by_id(doc)
    assert src["a"]["open_integrity_events"] == 2
    assert src["b"]["open_integrity_events"] == 0


def test_json_schema_field_names_and_types(cli: Any, registry: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=5)
    _, doc = status_json(cli, registry, db)
    assert set(doc) == {
        "schema_version",
        "generated_at",
        "healthy",
        "summary",
        "unattributed_integrity_events",
        "sources",
        "pricing",
    }
    assert doc["schema_version"] == 2
    assert doc["pricing"] in ("none", "configured")
    assert doc["generated_at"].endswith("Z")
    assert abs(parse_rfc3339_ns(doc["generated_at"]) - now_ns()) < 60 * NS_PER_SECOND
    assert isinstance(doc["healthy"], bool)
    assert isinstance(doc["unattributed_integrity_events"], int)
    types: dict[str, tuple[type, ...]] = {
        "source_id": (str,),
        "node_id": (str,),
        "env": (str,),
        "enabled": (bool,),
        "health": (str,),
        "reasons": (list,),
        "lag_seconds": (float, int, type(None)),
        "max_lag_seconds": (float, int),
        "newest_collected_at": (str, type(None)),
        "last_successful_until": (str, type(None)),
        "last_succeeded_at": (str, type(None)),
        "last_attempted_at": (str, type(None)),
        "consecutive_failures": (int,),
        "last_error": (str, type(None)),
        "refused_share": (float, type(None)),
        "max_refused_share": (float, int),
        "open_integrity_events": (int,),
        "last_run": (dict, type(None)),
    }
    for s in doc["sources"]:
        assert set(s) == set(types), s
        for name, allowed in types.items():
            assert isinstance(s[name], allowed), (name, s[name])
        assert s["health"] in ("healthy", "degraded", "failing", "disabled")
        for ts in (
            "newest_collected_at",
            "last_successful_until",
            "last_succeeded_at",
            "last_attempted_at",
        ):
            if s[ts] is not None:
                assert s[ts].endswith("Z")
                parse_rfc3339_ns(s[ts])
    run = by_id(doc)["a"]["last_run"]
    assert set(run) == {
        "run_id",
        "kind",
        "outcome",
        "started_at",
        "finished_at",
        "duration_seconds",
        "counts",
        "error",
        "top_rejection",
    }
    assert isinstance(run["run_id"], int)
    assert run["kind"] == "collect"
    assert run["started_at"].endswith("Z")
    assert run["finished_at"].endswith("Z")
    assert run["duration_seconds"] == pytest.approx(1.0)
    assert all(isinstance(v, int) for v in run["counts"].values())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--source", "nope"), "--source"),
        (("--max-lag", "soon"), "--max-lag"),
        (("--max-lag", "0s"), "--max-lag"),
    ],
)
def test_configuration_errors_exit_two(
    cli: Any, registry: Path, tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    res = cli("status", "--registry", str(registry), "--db", str(tmp_path / "b.db"), *args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert res.stderr.count("\n") == 1
    assert "Traceback" not in res.output


def test_missing_or_broken_registry_exits_two(cli: Any, tmp_path: Path) -> None:
    res = cli("status", "--registry", str(tmp_path / "missing.toml"))
    assert res.exit_code == 2
    assert "missing.toml" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nsource_id = "x"\n')
    res = cli("status", "--registry", str(bad))
    assert res.exit_code == 2
    assert "bad.toml" in res.stderr


def test_quiet_prints_nothing_but_keeps_the_exit_code(
    cli: Any, registry: Path, tmp_path: Path
) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=5)
    res = cli("-q", "status", "--registry", str(registry), "--db", db)
    assert res.exit_code == 1  # b never collected
    assert res.stdout == ""


def test_redact_error_keeps_one_line_and_hides_credentials() -> None:
    assert redact_error(None) is None
    assert redact_error("  a\n b\tc ") == "a b c"
    assert redact_error("Authorization: xyz") == "Authorization: [redacted]"
    assert redact_error("got -----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY----- x") == (
        "got [redacted key] x"
    )
    assert redact_error("https://u:p4ss@h/x") == "https://u:[redacted]@h/x"
    assert redact_error("source 'a': HTTP 503 after 3 attempts") == (
        "source 'a': HTTP 503 after 3 attempts"
    )


# --- scripts/check_billing_status: the monitoring check over `billing status --json` -------

CHECK = Path(__file__).resolve().parent.parent / "scripts" / "check_billing_status"
BILLING = Path(sys.executable).parent / "billing"


def run_check(registry: Path, db: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "DATABASE_URL"))}
    return subprocess.run(
        [
            sys.executable,
            str(CHECK),
            "--billing",
            str(BILLING),
            *args,
            "--",
            "--registry",
            str(registry),
            "--db",
            db,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_check_script_maps_health_to_nagios_codes(registry: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=5)
    seed(db, "b", lag_s=5)
    ok = run_check(registry, db)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("BILLING OK - 2/2 enabled sources healthy, 1 disabled |")
    assert "lag_a=" in ok.stdout
    assert "failing=0" in ok.stdout

    seed(db, "a", failures=1, error="source 'a': HTTP 503")
    warn = run_check(registry, db)
    assert warn.returncode == 1, warn.stdout
    assert warn.stdout.startswith("BILLING WARNING - 1/2 enabled sources healthy, degraded: a")
    assert "a: degraded: 1 consecutive failure(s) (last error: source 'a': HTTP 503)" in warn.stdout

    seed(db, "b", failures=3, error="source 'b': connect timeout")
    crit = run_check(registry, db)
    assert crit.returncode == 2, crit.stdout
    assert "failing: b" in crit.stdout.splitlines()[0]
    # Only the healthy-but-degraded source selected: WARNING again.
    assert run_check(registry, db, "--source", "a").returncode == 1
    assert run_check(registry, db, "--source", "a", "--source", "b").returncode == 2


def test_check_script_reports_stale_and_refused_sources(registry: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=8 * 60)  # requests fine, data 8 minutes old
    seed(db, "b", lag_s=5, counts={"samples": 0, "rejected": 40}, top_rejection="bad counter")
    res = run_check(registry, db)
    assert res.returncode == 2, res.stdout
    first, *details = res.stdout.splitlines()
    assert "failing: b" in first
    assert "degraded: a" in first
    assert "refused_b=1;0.1;1;0;1" in first
    assert re.search(r"lag_a=48\ds;300;900;0", first), first
    assert any(
        d.startswith("a: degraded: stale: newest snapshot received is 8m old") for d in details
    )
    assert (
        "b: failing: nothing billable: all 40 samples of the last run were refused: bad counter"
        in details
    )


def test_check_script_is_unknown_when_billing_cannot_tell(registry: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "billing.db")
    # A database that does not exist is UNKNOWN, not "never collected" (CRITICAL).
    res = run_check(registry, db)
    assert res.returncode == 3, res.stdout
    assert res.stdout.startswith(
        "BILLING UNKNOWN - billing status exited 4: error: no billing data"
    )
    open_store(db).close()
    res = run_check(registry, db, "--source", "nope")
    assert res.returncode == 3, res.stdout
    assert res.stdout.startswith("BILLING UNKNOWN - billing status exited 2: error:")
    missing = subprocess.run(
        [sys.executable, str(CHECK), "--billing", str(tmp_path / "no-billing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 3
    assert "not found" in missing.stdout


def test_a_missing_database_is_exit_four_and_is_not_created(
    cli: Any, registry: Path, tmp_path: Path
) -> None:
    db = tmp_path / "not-yet.db"
    for args in ((), ("--json",), ("--format", "openmetrics")):
        res = cli("status", "--registry", str(registry), "--db", str(db), *args)
        assert res.exit_code == 4, res.output
        assert res.stdout == ""
        assert (
            res.stderr == f"error: no billing data in {db}: the database does not exist yet"
            " (run `billing collect` first)\n"
        )
    assert not db.exists()


def test_unreachable_database_exits_four(cli: Any, registry: Path) -> None:
    res = cli(
        "status", "--registry", str(registry), "--db", "postgresql://nobody:s3cretpw@127.0.0.1:1/x"
    )
    assert res.exit_code == 4, res.output
    assert res.stderr.count("\n") == 1
    assert "s3cretpw" not in res.stderr


def test_legacy_exporter_base_url_mode_is_reported_as_source_legacy(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXPORTER_BASE_URL", "https://exporter.example.net:9550")
    monkeypatch.setenv("EXPORTER_TOKEN_REF", "env:EXPORTER_TOKEN")
    open_store(str(tmp_path / "billing.db")).close()
    res = cli("status", "--json", "--db", str(tmp_path / "billing.db"))
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    assert [s["source_id"] for s in doc["sources"]] == ["legacy"]
    assert doc["sources"][0]["health"] == "failing"
    assert doc["sources"][0]["max_lag_seconds"] == 300


# --- health from the data (DESIGN §8) ---------------------------------------------------------


def test_a_source_that_answers_but_sends_nothing_new_goes_stale(
    cli: Any, registry: Path, db_url: str
) -> None:
    # Requests succeed (no failure, the request horizon is now), the newest data is old.
    seed(db_url, "a", lag_s=20 * 60)
    code, doc = status_json(cli, registry, db_url, "-s", "a")
    assert code == 1
    a = by_id(doc)["a"]
    assert (a["health"], a["consecutive_failures"]) == ("failing", 0)
    assert a["reasons"][0].startswith("stale: newest snapshot received is 20m old (")
    assert a["last_successful_until"] is not None
    assert 20 * 60 <= a["lag_seconds"] < 21 * 60


def test_no_snapshot_yet_counts_from_the_first_successful_collect(
    cli: Any, registry: Path, db_url: str
) -> None:
    seed(db_url, "a", lag_s=60, received=False)  # first success a minute ago, no data
    code, doc = status_json(cli, registry, db_url, "-s", "a")
    assert (code, by_id(doc)["a"]["health"]) == (0, "healthy")
    assert by_id(doc)["a"]["newest_collected_at"] is None
    code, doc = status_json(cli, registry, db_url, "-s", "a", "--max-lag", "30s")
    assert code == 1
    reason = by_id(doc)["a"]["reasons"][0]
    assert reason.startswith("stale: no snapshot received in the 60s since the first collect")


def test_a_last_run_whose_samples_were_all_refused_is_failing(
    cli: Any, registry: Path, db_url: str
) -> None:
    seed(
        db_url,
        "a",
        lag_s=5,
        counts={"items": 3, "samples": 0, "rejected": 1200},
        top_rejection="inbound_tag must be a string, got integer",
    )
    code, doc = status_json(cli, registry, db_url, "-s", "a")
    assert code == 1
    a = by_id(doc)["a"]
    assert a["health"] == "failing"
    assert a["reasons"] == [
        "nothing billable: all 1,200 samples of the last run were refused: "
        "inbound_tag must be a string, got integer"
    ]
    assert a["refused_share"] == 1.0
    assert a["last_run"]["top_rejection"] == "inbound_tag must be a string, got integer"


def test_more_refused_than_the_allowed_share_is_degraded(
    cli: Any, registry: Path, tmp_path: Path
) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=5, counts={"samples": 800, "rejected": 200}, top_rejection="bad")
    code, doc = status_json(cli, registry, db, "-s", "a")
    assert (code, by_id(doc)["a"]["health"]) == (1, "degraded")
    assert by_id(doc)["a"]["reasons"] == [
        "200 of 1,000 samples of the last run refused (20% > 10%): bad"
    ]
    # The share is a registry setting.
    registry.write_text(
        registry.read_text().replace("[defaults]\n", "[defaults]\nmax_refused_share = 0.25\n")
    )
    code, doc = status_json(cli, registry, db, "-s", "a")
    assert (code, by_id(doc)["a"]["health"]) == (0, "healthy")
    assert by_id(doc)["a"]["max_refused_share"] == 0.25
    # A last run that delivered nothing says nothing about billability.
    seed(db, "a", lag_s=5, counts={"samples": 0, "rejected": 0})
    code, doc = status_json(cli, registry, db, "-s", "a")
    assert (code, by_id(doc)["a"]["refused_share"]) == (0, None)


def test_stale_after_is_a_registry_setting(cli: Any, registry: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=8 * 60)
    assert status_json(cli, registry, db, "-s", "a")[0] == 1
    registry.write_text(
        registry.read_text().replace("[defaults]\n", '[defaults]\nstale_after = "10m"\n')
    )
    code, doc = status_json(cli, registry, db, "-s", "a")
    assert (code, by_id(doc)["a"]["max_lag_seconds"]) == (0, 600)


# --- the table at 80 columns, OpenMetrics ---------------------------------------------------


def test_the_table_fits_80_columns_on_a_real_terminal(registry: Path, tmp_path: Path) -> None:
    import pty
    import select

    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=8 * 60)
    seed(db, "b", failures=3, error="source 'b': " + "a very long error message " * 10)
    pid, fd = pty.fork()
    if pid == 0:  # the child: billing on a terminal 80 columns wide
        os.environ.update(COLUMNS="80", LINES="40", TERM="xterm")
        os.environ.pop("NO_COLOR", None)
        os.execv(str(BILLING), [str(BILLING), "status", "--registry", str(registry), "--db", db])
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", out).decode()
    lines = text.replace("\r", "").splitlines()
    table = [ln for ln in lines if ln.startswith(("source", "a ", "b ", "off"))]
    assert len(table) == 4, text
    assert all(len(ln) <= 80 for ln in table), table
    header = table[0].split()
    assert header == ["source", "health", "lag", "fails", "refused", "events", "last", "run"]
    assert any(ln.startswith("b: last error: source 'b': a very long error") for ln in lines)


def test_wide_adds_columns(
    cli: Any, registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # piped: natural width (xdist sets 80)
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=5)
    narrow = cli("status", "--registry", str(registry), "--db", db, "-s", "a")
    wide = cli("status", "--registry", str(registry), "--db", db, "-s", "a", "--wide")
    assert "newest snapshot" not in narrow.stdout
    assert "newest snapshot" in wide.stdout
    assert "node-a / prod" in wide.stdout


def test_openmetrics_output_parses_with_prometheus_client(
    cli: Any, registry: Path, tmp_path: Path
) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
    from prometheus_client.parser import text_string_to_metric_families as text_parse

    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=30, counts={"samples": 600, "rejected": 0, "bytes": 12345})
    seed(db, "b", failures=3)
    res = cli("status", "--registry", str(registry), "--db", db, "--format", "openmetrics")
    assert res.exit_code == 1  # same verdict as the table
    assert res.stdout.endswith("# EOF\n")
    families = {f.name: f for f in om_parse(res.stdout)}
    # node_exporter's textfile collector reads the classic format: that parses too.
    assert {f.name for f in text_parse(res.stdout)} >= set(families)

    def value(name: str, **labels: str) -> float:
        for sample in families[name].samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        raise AssertionError((name, labels))

    assert value("billing_healthy") == 0
    assert value("billing_source_health", source_id="a", health="healthy") == 1
    assert value("billing_source_health", source_id="a", health="failing") == 0
    assert value("billing_source_health", source_id="b", health="failing") == 1
    assert value("billing_source_health", source_id="off", health="disabled") == 1
    assert 30 <= value("billing_source_lag_seconds", source_id="a") < 90
    assert value("billing_source_max_lag_seconds", source_id="a") == 300
    assert value("billing_source_consecutive_failures", source_id="b") == 3
    assert value("billing_source_last_run_samples", source_id="a") == 600
    assert value("billing_source_last_run_bytes", source_id="a") == 12345
    assert value("billing_source_open_integrity_events", source_id="a") == 0
    assert abs(value("billing_status_generated_timestamp_seconds") - now_ns() / 1e9) < 60
    # b never delivered data: its lag is left out, not invented.
    assert not any(
        s.labels["source_id"] == "b" for s in families["billing_source_lag_seconds"].samples
    )


def test_output_writes_the_file_atomically(cli: Any, registry: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=5)
    target = tmp_path / "textfile" / "billing.prom"
    target.parent.mkdir()
    res = cli(
        "status",
        "--registry",
        str(registry),
        "--db",
        db,
        "-s",
        "a",
        "--format",
        "openmetrics",
        "--output",
        str(target),
    )
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    assert target.read_text().endswith("# EOF\n")
    assert sorted(p.name for p in target.parent.iterdir()) == ["billing.prom"]  # no temp left
    assert os.stat(target).st_mode & 0o777 == 0o644
    bad = cli("status", "--registry", str(registry), "--db", db, "--output", str(target))
    assert bad.exit_code == 2
    assert "--output needs --format json or --format openmetrics" in bad.stderr


def test_pricing_is_reported_so_zero_prices_are_never_silent(
    cli: Any, registry: Path, tmp_path: Path
) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=5)
    _, doc = status_json(cli, registry, db)
    assert doc["pricing"] == "none"  # REGISTRY has no [pricing]: everything rates at zero
    res = cli("status", "--registry", str(registry), "--db", db)
    assert "; pricing: none (no [pricing] table: everything rates at zero" in res.stdout
    registry.write_text(REGISTRY + '\n[pricing]\nprice_per_unit = "0.05"\n')
    _, doc = status_json(cli, registry, db)
    assert doc["pricing"] == "configured"
    res = cli("status", "--registry", str(registry), "--db", db)
    assert "pricing:" not in res.stdout


@pytest.mark.parametrize("target", ["DIR", "/proc/billing.prom", "", "/nonexistent/b.prom"])
def test_output_that_cannot_be_written_is_one_flag_error(
    cli: Any, registry: Path, tmp_path: Path, target: str
) -> None:
    db = str(tmp_path / "billing.db")
    seed(db, "a", lag_s=5)
    if target == "DIR":
        (tmp_path / "dir").mkdir()
        target = str(tmp_path / "dir")
    res = cli("status", "--registry", str(registry), "--db", db, "-s", "a", "--format",
              "openmetrics", "--output", target)  # fmt: skip
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: --output")
    assert res.stderr.count("\n") == 1

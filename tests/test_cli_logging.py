"""``--log-format json``: one JSON object per log line, for journald or a log shipper."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trustme

TOKEN = "s3cr3t-token-for-logging-test"  # a test secret that must never leak


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def failing_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("LOGTEST_TOKEN", TOKEN)
    registry = tmp_path / "sources.toml"
    registry.write_text(
        f"""
[defaults]
retry_attempts = 1

[[sources]]
source_id = "down-1"
node_id = "node-down"
env = "prod"
base_url = "https://127.0.0.1:{_closed_port()}"
auth_mode = "bearer"
credential_ref = "env:LOGTEST_TOKEN"
ca_bundle_ref = "file:{ca_file}"
"""
    )
    return registry


def _json_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # fails the test on any non-JSON line


def test_failed_source_is_one_json_error_line_under_quiet(cli, failing_registry: Path) -> None:
    res = cli("--log-format", "json", "-q", "--registry", str(failing_registry), "collect")
    assert res.exit_code == 1
    assert res.stdout == ""
    records = _json_lines(res.stderr)
    assert len(records) == 1
    rec = records[0]
    assert rec["level"] == "error"
    assert rec["event"] == "collect.source"
    assert rec["source_id"] == "down-1"
    assert rec["status"] == "failed"
    assert "down-1" in str(rec["error"])
    assert {"ts", "msg", "run_id", "samples", "new_observations"} <= rec.keys()
    assert TOKEN not in res.output


def test_verbose_json_logs_every_line_as_json(cli, failing_registry: Path) -> None:
    res = cli("--log-format", "json", "-v", "--registry", str(failing_registry), "collect")
    assert res.exit_code == 1
    records = _json_lines(res.stderr)
    assert any(r.get("event") == "collect.source" for r in records)
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert TOKEN not in res.output


def test_text_format_under_cron_keeps_one_line_errors(cli, failing_registry: Path) -> None:
    res = cli("-q", "--registry", str(failing_registry), "collect")
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: source 'down-1':")
    assert "Traceback" not in res.output

"""Progress bars on a terminal only; under cron (no terminal) nothing but the summary.

Runs the real ``billing`` in a subprocess: ``TTY_COMPATIBLE=1`` makes rich treat the pipe
as a terminal, the way an operator's shell would be.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

ROOT = Path(__file__).resolve().parent.parent
BAR = "━"  # rich's bar glyph


def _billing(args: list[str], cwd: Path, *, terminal: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TTY_COMPATIBLE", "FORCE_COLOR")}
    env.pop("COLUMNS", None)
    if terminal:
        env["TTY_COMPATIBLE"] = "1"
    else:
        env["TTY_COMPATIBLE"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "billing_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def snapshots(tmp_path: Path) -> Path:
    out = tmp_path / "s.ndjson"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_snapshots.py"), "--series", "50",
         "--minutes", "10", "--out", str(out)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("terminal", [True, False])
def test_ingest_progress_only_on_a_terminal(
    tmp_path: Path, snapshots: Path, terminal: bool
) -> None:
    res = _billing(["--db", str(tmp_path / "b.db"), "ingest", str(snapshots)], tmp_path,
                   terminal=terminal)  # fmt: skip
    assert res.returncode == 0, res.stderr
    if terminal:
        assert BAR in res.stderr
    else:
        assert BAR not in res.stderr  # the bar goes to stderr; stdout tables use the glyph too
        assert "samples" in res.stdout  # the summary is still printed


@pytest.mark.parametrize("terminal", [True, False])
def test_collect_progress_only_on_a_terminal(tmp_path: Path, terminal: bool) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "token").write_text("t0ken\n")
    (tmp_path / "token").chmod(0o600)
    (tmp_path / "sources.toml").write_text(
        f"""[defaults]
retry_attempts = 1

[[sources]]
source_id = "down-1"
node_id = "n"
env = "prod"
base_url = "https://127.0.0.1:{port}"
auth_mode = "bearer"
credential_ref = "file:{tmp_path / "token"}"
ca_bundle_ref = "file:{tmp_path / "ca.pem"}"

[pricing]
price_per_unit = "0.01"
"""
    )
    res = _billing(["collect"], tmp_path, terminal=terminal)
    assert res.returncode == 1  # the source is unreachable
    if terminal:
        assert BAR in res.stderr
    else:
        assert BAR not in res.stderr  # the bar goes to stderr; stdout tables use the glyph too
        assert res.stderr.startswith("error: source 'down-1':")

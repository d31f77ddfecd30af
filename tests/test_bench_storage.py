"""Smoke test of ``scripts/bench_storage.py`` (the benchmark itself is not a timed test):
its arguments, and a tiny run of both measurements on each back end, so a change of the
store's API or layout that breaks the benchmark shows here, not at measuring time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _require_postgres

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_storage  # noqa: E402


def test_defaults_are_the_issue_s_shapes_and_the_store_s_horizon() -> None:
    a = bench_storage.parse_args([])
    assert (a.mode, a.samples, a.series, a.days, a.retention_days) == (
        "both",
        1_000_000,
        2000,
        60,
        35,
    )


@pytest.mark.parametrize(
    "argv",
    [["--page-minutes", "7"], ["--days", "0"], ["--no-sqlite"], ["--mode", "weeks"]],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_storage.parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_tiny_run_reports_sizes_per_day_and_compacts(backend: str) -> None:
    pg = ["--no-sqlite", "--pg", _require_postgres()] if backend == "postgres" else []
    sizes = ["--samples", "2000", "--series", "200", "--page-samples", "600"]
    days = ["--days", "3", "--retention-days", "1", "--day-series", "3"]
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_storage.py"), "--json", *pg, *sizes, *days],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    size, per_day = results
    assert (size["mode"], size["backend"], size["samples"]) == ("size", backend, 2000)
    assert size["bytes_per_sample"] > 0
    assert size["tables"]["series"]["rows"] == 200
    assert per_day["backend"] == backend
    assert [d["day"] for d in per_day["days"]] == [1, 2, 3]
    assert [d["samples"] for d in per_day["days"]] == [3 * 1440, 6 * 1440, 9 * 1440]
    # With a 1-day horizon, day 3's daily cycle removes day 1's observations (whole hours;
    # rows, not samples: an idle run is one row).
    assert per_day["days"][0]["observations_removed"] == 0
    assert per_day["days"][2]["observations_removed"] > 0
    assert per_day["flattening_ratio"] is not None
    assert "whole command:" in p.stdout

"""Shared fixtures: hypothesis profiles, both store back ends, a CLI runner."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, settings

from billing_cli.cli.app import hoist_global_options, run

settings.register_profile(
    "ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

POSTGRES_URL = os.environ.get("BILLING_TEST_POSTGRES_URL")


# --- CLI ---------------------------------------------------------------------------------


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunnerFn:
    """Run ``billing ARGS`` in-process through the real error mapping of ``run()``.

    Runs in ``tmp_path`` with a clean environment for the variables billing reads.
    """
    for var in (
        "BILLING_REGISTRY",
        "BILLING_DATABASE_URL",
        "DATABASE_URL",
        "EXPORTER_BASE_URL",
        "EXPORTER_NODE_ID",
        "EXPORTER_ENV",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return CliRunnerFn()


class CliRunnerFn:
    def __call__(self, *args: str, input: str | bytes | None = None) -> CliResult:
        runner = CliRunner()
        with runner.isolation(input=input) as (out, err, _):
            code = run(hoist_global_options(list(args)))
            stdout = out.getvalue().decode()
            stderr = err.getvalue().decode() if err is not None else ""
        return CliResult(code, stdout, stderr)


# --- stores ------------------------------------------------------------------------------


def _require_postgres() -> str:
    if not POSTGRES_URL:
        if os.environ.get("BILLING_REQUIRE_POSTGRES"):
            pytest.fail("BILLING_TEST_POSTGRES_URL is not set but PostgreSQL is required here")
        pytest.skip("PostgreSQL tests need BILLING_TEST_POSTGRES_URL (CI sets it)")
    return POSTGRES_URL


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    import psycopg

    base = _require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as exc:
        if os.environ.get("BILLING_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL at BILLING_TEST_POSTGRES_URL is unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs once per back end: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "billing.db")
    url: str = request.getfixturevalue("postgres_url")
    return url

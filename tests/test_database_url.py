"""``--db`` values: one parser decides the back end for the store, the locks and status."""

from __future__ import annotations

import pytest

from billing_cli._errors import StoreError
from billing_cli.collect.locks import is_postgres_url, sqlite_path
from billing_cli.store import parse_database_url


@pytest.mark.parametrize(
    ("url", "backend", "path"),
    [
        ("billing.db", "sqlite", "billing.db"),
        ("/var/lib/billing/billing.db", "sqlite", "/var/lib/billing/billing.db"),
        ("sqlite:///rel.db", "sqlite", "rel.db"),
        ("sqlite:////var/lib/billing.db", "sqlite", "/var/lib/billing.db"),
        ("sqlite://", "sqlite", ":memory:"),
        ("postgresql://billing@db/billing", "postgres", ""),
        ("postgres://billing@db/billing", "postgres", ""),
        ("POSTGRESQL://billing@db/billing", "postgres", ""),
    ],
)
def test_forms(url: str, backend: str, path: str) -> None:
    target = parse_database_url(url)
    assert (target.backend, target.sqlite_path) == (backend, path)
    # The lock choice follows the same parse as the store (no second parser to drift).
    assert is_postgres_url(url) is (backend == "postgres")
    assert sqlite_path(url) == path


def test_unsupported_scheme_is_one_line_without_password() -> None:
    with pytest.raises(StoreError) as err:
        parse_database_url("mysql://root:hunter2@db/billing")
    assert "hunter2" not in str(err.value)
    assert "postgresql://" in str(err.value)
    assert "\n" not in str(err.value)

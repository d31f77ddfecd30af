"""Assembling a statement from the summed postings of a period (pure)."""

from __future__ import annotations

from billing_cli.core.periods import parse_period
from billing_cli.core.statement import CarriedAdjustment, StatementPart, build_statement

NOV, DEC = parse_period("2026-11"), parse_period("2026-12")


def test_own_usage_and_carried_corrections_are_apart_and_add_up() -> None:
    parts = [
        StatementPart("u2", "EUR", None, "v1", 5, 0, 5, 0, 50),
        StatementPart("u1", "EUR", None, "v2", 10, 20, 30, 10, 200),
        StatementPart("u1", "EUR", None, "v1", 1, 2, 3, 0, 30),
        StatementPart("u1", "EUR", NOV, "v1", 4, 0, 4, 0, 40),
        StatementPart("u1", "EUR", NOV, "v2", -1, 0, -1, 0, -10),
    ]
    st = build_statement(DEC, parts, {"u1": "one@x", "u2": "two@x"})
    assert [a.uuid for a in st.accounts] == ["u1", "u2"]
    u1 = st.accounts[0]
    assert (u1.email, u1.uplink_bytes, u1.downlink_bytes, u1.total_bytes) == ("one@x", 11, 22, 33)
    assert (u1.rated_bytes, u1.included_bytes, u1.charges_nano) == (33, 10, 230)
    assert u1.carried == (CarriedAdjustment(NOV, 3, 0, 3, 0, 30),)
    assert (u1.adjustments_nano, u1.amount_nano) == (30, 260)
    assert u1.rule_versions == ("v1", "v2")
    (tot,) = st.totals
    assert (tot.currency, tot.accounts, tot.total_bytes, tot.rated_bytes) == ("EUR", 2, 38, 38)
    assert (tot.charges_nano, tot.adjustments_nano, tot.amount_nano) == (280, 30, 310)


def test_an_account_with_only_carried_corrections_is_listed() -> None:
    st = build_statement(DEC, [StatementPart("u9", "USD", NOV, "v1", 0, 0, 0, 0, -5)], {})
    (a,) = st.accounts
    assert (a.email, a.total_bytes, a.charges_nano, a.amount_nano) == ("", 0, 0, -5)


def test_currencies_are_never_added_together() -> None:
    parts = [
        StatementPart("u1", "EUR", None, "v1", 1, 0, 1, 0, 10),
        StatementPart("u1", "USD", None, "v2", 2, 0, 2, 0, 20),
    ]
    st = build_statement(DEC, parts, {})
    assert [(a.uuid, a.currency, a.amount_nano) for a in st.accounts] == [
        ("u1", "EUR", 10),
        ("u1", "USD", 20),
    ]
    assert [(t.currency, t.amount_nano) for t in st.totals] == [("EUR", 10), ("USD", 20)]

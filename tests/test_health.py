"""The health rule of ``billing status`` (billing_cli.health), boundary by boundary."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_cli._time import NS_PER_SECOND
from billing_cli.health import (
    Health,
    Verdict,
    all_healthy,
    classify,
    default_max_lag_s,
    lag_seconds,
)

NOW = 1_800_000_000 * NS_PER_SECOND
MAX_LAG = 300.0


def verdict(
    *,
    lag_s: float | None,
    failures: int = 0,
    enabled: bool = True,
    max_lag: float = MAX_LAG,
) -> Verdict:
    until = None if lag_s is None else NOW - int(lag_s * NS_PER_SECOND)
    return classify(
        enabled=enabled,
        last_successful_until_ns=until,
        consecutive_failures=failures,
        now_ns=NOW,
        max_lag_s=max_lag,
    )


@pytest.mark.parametrize(
    ("lag_s", "failures", "expected"),
    [
        (0, 0, Health.HEALTHY),
        (60, 0, Health.HEALTHY),
        (300, 0, Health.HEALTHY),  # exactly max lag is still fine
        (301, 0, Health.DEGRADED),
        (900, 0, Health.DEGRADED),  # exactly 3 x max lag
        (901, 0, Health.FAILING),
        (10, 1, Health.DEGRADED),
        (10, 2, Health.DEGRADED),
        (10, 3, Health.FAILING),
        (10, 50, Health.FAILING),
        (None, 0, Health.FAILING),  # never collected
        (None, 1, Health.FAILING),
        (400, 1, Health.DEGRADED),
        (1000, 1, Health.FAILING),
    ],
)
def test_rule_boundaries(lag_s: float | None, failures: int, expected: Health) -> None:
    assert verdict(lag_s=lag_s, failures=failures).health is expected


def test_disabled_is_never_counted_whatever_its_state() -> None:
    v = verdict(lag_s=None, failures=10, enabled=False)
    assert v.health is Health.DISABLED
    assert v.reasons == ()
    assert all_healthy([v, verdict(lag_s=5)])
    assert not all_healthy([v, verdict(lag_s=5, failures=1)])


def test_reasons_name_every_cause() -> None:
    v = verdict(lag_s=1000, failures=4)
    assert v.health is Health.FAILING
    assert any("lag 1000s" in r for r in v.reasons)
    assert any("4 consecutive failures" in r for r in v.reasons)
    d = verdict(lag_s=400, failures=1)
    assert d.reasons == ("lag 400s > max lag 300s", "1 consecutive failure(s)")
    assert verdict(lag_s=None).reasons == ("never collected successfully",)
    assert verdict(lag_s=1).reasons == ()


def test_lag_is_never_negative_and_none_without_checkpoint() -> None:
    assert lag_seconds(NOW, NOW + 5 * NS_PER_SECOND) == 0
    assert lag_seconds(NOW, None) is None
    assert lag_seconds(NOW, NOW - 1_500_000_000) == 1.5
    assert verdict(lag_s=-30).health is Health.HEALTHY


def test_default_max_lag_has_a_five_minute_floor() -> None:
    assert default_max_lag_s(60, 120) == 300  # 2*60+120 = 240 < 300
    assert default_max_lag_s(300, 120) == 720
    assert default_max_lag_s(0.5, 0) == 300


def test_all_healthy_with_no_enabled_sources_is_true() -> None:
    assert all_healthy([])
    assert all_healthy([verdict(lag_s=None, enabled=False)])


@given(
    lag=st.one_of(st.none(), st.integers(min_value=0, max_value=10**7)),
    failures=st.integers(min_value=0, max_value=100),
    max_lag=st.integers(min_value=1, max_value=10**5),
)
def test_more_lag_or_more_failures_never_improves_health(
    lag: int | None, failures: int, max_lag: int
) -> None:
    rank = {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.FAILING: 2}
    base = verdict(lag_s=lag, failures=failures, max_lag=max_lag)
    worse_fail = verdict(lag_s=lag, failures=failures + 1, max_lag=max_lag)
    assert rank[worse_fail.health] >= rank[base.health]
    if lag is not None:
        worse_lag = verdict(lag_s=lag + max_lag, failures=failures, max_lag=max_lag)
        assert rank[worse_lag.health] >= rank[base.health]
    # healthy exactly when nothing is wrong
    assert (base.health is Health.HEALTHY) == (lag is not None and lag <= max_lag and failures == 0)
    assert (base.health is Health.HEALTHY) == (base.reasons == ())

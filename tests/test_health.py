"""The health rule of ``billing status`` (billing_cli.health), boundary by boundary."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_cli._time import NS_PER_SECOND
from billing_cli.health import (
    Delivery,
    Freshness,
    Health,
    Verdict,
    all_healthy,
    classify,
    lag_seconds,
)

NOW = 1_800_000_000 * NS_PER_SECOND
MAX_LAG = 300.0
SHARE = 0.1


def verdict(
    *,
    lag_s: float | None,
    failures: int = 0,
    enabled: bool = True,
    max_lag: float = MAX_LAG,
    delivery: Delivery | None = None,
    received: bool = True,
    collected: bool | None = None,
) -> Verdict:
    """``lag_s``: age of the newest snapshot (``received``) or of the first success;
    None: never collected successfully."""
    at = None if lag_s is None else NOW - int(lag_s * NS_PER_SECOND)
    return classify(
        enabled=enabled,
        collected_successfully=lag_s is not None if collected is None else collected,
        consecutive_failures=failures,
        freshness=Freshness(
            newest_collected_at_ns=at if received else None,
            first_succeeded_at_ns=None if received else at,
        ),
        delivery=delivery,
        now_ns=NOW,
        max_lag_s=max_lag,
        max_refused_share=SHARE,
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
    if lag_s is not None:  # the same rule while waiting for the first snapshot
        assert verdict(lag_s=lag_s, failures=failures, received=False).health is expected


def test_disabled_is_never_counted_whatever_its_state() -> None:
    v = verdict(lag_s=None, failures=10, enabled=False)
    assert v.health is Health.DISABLED
    assert v.reasons == ()
    assert all_healthy([v, verdict(lag_s=5)])
    assert not all_healthy([v, verdict(lag_s=5, failures=1)])


def test_reasons_name_every_cause() -> None:
    v = verdict(lag_s=1000, failures=4)
    assert v.health is Health.FAILING
    assert v.reasons == (
        "stale: newest snapshot received is 16m old (2027-01-15T07:43:20Z), over 3 x max lag 300s",
        "4 consecutive failures",
    )
    d = verdict(lag_s=400, failures=1)
    assert d.reasons == (
        "stale: newest snapshot received is 6m old (2027-01-15T07:53:20Z), over max lag 300s",
        "1 consecutive failure(s)",
    )
    w = verdict(lag_s=400, received=False)
    assert w.reasons == (
        "stale: no snapshot received in the 6m since the first collect, over max lag 300s",
    )
    assert verdict(lag_s=None).reasons == ("never collected successfully",)
    assert verdict(lag_s=1).reasons == ()


def test_a_successful_request_does_not_make_old_data_fresh() -> None:
    """The request horizon plays no part: only the age of what was received does."""
    assert verdict(lag_s=3600, collected=True).health is Health.FAILING


@pytest.mark.parametrize(
    ("samples", "refused", "expected"),
    [
        (0, 0, Health.HEALTHY),  # nothing delivered: nothing to judge
        (1000, 0, Health.HEALTHY),
        (900, 100, Health.HEALTHY),  # exactly the share
        (899, 101, Health.DEGRADED),
        (1, 999, Health.DEGRADED),
        (0, 1, Health.FAILING),  # nothing billable
        (0, 1200, Health.FAILING),
    ],
)
def test_refused_samples(samples: int, refused: int, expected: Health) -> None:
    v = verdict(lag_s=5, delivery=Delivery(samples, refused, "inbound_tag is missing"))
    assert v.health is expected
    if expected is Health.FAILING:
        assert v.reasons == (
            f"nothing billable: all {refused:,} samples of the last run were refused: "
            "inbound_tag is missing",
        )


def test_all_refused_is_failing_whatever_the_allowed_share() -> None:
    v = classify(
        enabled=True,
        collected_successfully=True,
        consecutive_failures=0,
        freshness=Freshness(NOW, None),
        delivery=Delivery(0, 50, "bad"),
        now_ns=NOW,
        max_lag_s=MAX_LAG,
        max_refused_share=1.0,
    )
    assert v.health is Health.FAILING


def test_lag_is_never_negative_and_none_without_a_reference() -> None:
    assert lag_seconds(NOW, NOW + 5 * NS_PER_SECOND) == 0
    assert lag_seconds(NOW, None) is None
    assert lag_seconds(NOW, NOW - 1_500_000_000) == 1.5
    assert verdict(lag_s=-30).health is Health.HEALTHY


def test_all_healthy_with_no_enabled_sources_is_true() -> None:
    assert all_healthy([])
    assert all_healthy([verdict(lag_s=None, enabled=False)])


@given(
    lag=st.one_of(st.none(), st.integers(min_value=0, max_value=10**7)),
    failures=st.integers(min_value=0, max_value=100),
    max_lag=st.integers(min_value=1, max_value=10**5),
    samples=st.integers(min_value=0, max_value=1000),
    refused=st.integers(min_value=0, max_value=1000),
)
def test_more_lag_failures_or_refusals_never_improve_health(
    lag: int | None, failures: int, max_lag: int, samples: int, refused: int
) -> None:
    rank = {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.FAILING: 2}
    d = Delivery(samples, refused)
    base = verdict(lag_s=lag, failures=failures, max_lag=max_lag, delivery=d)
    worse_fail = verdict(lag_s=lag, failures=failures + 1, max_lag=max_lag, delivery=d)
    assert rank[worse_fail.health] >= rank[base.health]
    worse_refused = verdict(
        lag_s=lag, failures=failures, max_lag=max_lag, delivery=Delivery(samples, refused + 1)
    )
    assert rank[worse_refused.health] >= rank[base.health]
    if lag is not None:
        worse_lag = verdict(lag_s=lag + max_lag, failures=failures, max_lag=max_lag, delivery=d)
        assert rank[worse_lag.health] >= rank[base.health]
    # healthy exactly when nothing is wrong
    share_ok = d.refused_share is None or d.refused_share <= SHARE
    nothing_wrong = lag is not None and lag <= max_lag and failures == 0 and share_ok
    assert (base.health is Health.HEALTHY) == nothing_wrong
    assert (base.health is Health.HEALTHY) == (base.reasons == ())

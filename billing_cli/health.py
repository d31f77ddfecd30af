"""Source health: one pure rule shared by ``billing status`` and its monitoring check.

The rule (documented in the README; change both together):

=========  ==================================================================================
disabled   the source is ``enabled = false``; reported, never counted against health
failing    never collected successfully (no ``last_successful_until``), or
           ``consecutive_failures >= 3``, or lag > 3 × max_lag
degraded   at least one consecutive failure, or lag > max_lag
healthy    otherwise
=========  ==================================================================================

``lag = now - last_successful_until``: how far behind real time the source's billed data is.

Default ``max_lag = max(2 × collect_interval + overlap, 5 min)``, per source. Why:

* a healthy source collected every ``collect_interval`` has a lag between ~0 and one
  interval (plus the run's own duration), so one late or slow run must not page anyone:
  two intervals of slack;
* a collector that holds back the trailing ``overlap`` window still converges, so the
  overlap is added rather than counted as lag;
* the product accepts "minute-level drift ... a short multi-minute window", so nothing
  below five minutes is worth a warning, whatever the interval.

Three failures in a row (three missed minutes with the default timer) or three times the
allowed lag is no longer a blip: that is "failing", which the monitoring check maps to
CRITICAL, while "degraded" maps to WARNING.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from billing_cli._time import NS_PER_SECOND

FAILING_CONSECUTIVE_FAILURES = 3
FAILING_LAG_FACTOR = 3
MIN_MAX_LAG_S = 300.0


class Health(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAILING = "failing"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Verdict:
    health: Health
    reasons: tuple[str, ...]  # why it is not healthy; empty when healthy or disabled
    lag_s: float | None  # None when the source never collected successfully


def default_max_lag_s(collect_interval_s: float, overlap_s: float) -> float:
    """``max(2 × collect_interval + overlap, 5 min)`` in seconds."""
    return max(2 * collect_interval_s + overlap_s, MIN_MAX_LAG_S)


def lag_seconds(now_ns: int, last_successful_until_ns: int | None) -> float | None:
    """Seconds between ``now`` and the data horizon; never negative (clock skew reads as 0)."""
    if last_successful_until_ns is None:
        return None
    return max(0, now_ns - last_successful_until_ns) / NS_PER_SECOND


def classify(
    *,
    enabled: bool,
    last_successful_until_ns: int | None,
    consecutive_failures: int,
    now_ns: int,
    max_lag_s: float,
) -> Verdict:
    """Apply the rule above. Pure: same inputs, same verdict."""
    lag = lag_seconds(now_ns, last_successful_until_ns)
    if not enabled:
        return Verdict(Health.DISABLED, (), lag)
    failing: list[str] = []
    degraded: list[str] = []
    if lag is None:
        failing.append("never collected successfully")
    elif lag > FAILING_LAG_FACTOR * max_lag_s:
        failing.append(f"lag {lag:.0f}s > {FAILING_LAG_FACTOR} x max lag {max_lag_s:.0f}s")
    elif lag > max_lag_s:
        degraded.append(f"lag {lag:.0f}s > max lag {max_lag_s:.0f}s")
    if consecutive_failures >= FAILING_CONSECUTIVE_FAILURES:
        failing.append(f"{consecutive_failures} consecutive failures")
    elif consecutive_failures > 0:
        degraded.append(f"{consecutive_failures} consecutive failure(s)")
    if failing:
        return Verdict(Health.FAILING, tuple(failing + degraded), lag)
    if degraded:
        return Verdict(Health.DEGRADED, tuple(degraded), lag)
    return Verdict(Health.HEALTHY, (), lag)


def all_healthy(verdicts: list[Verdict]) -> bool:
    """True when every enabled source is healthy (disabled ones do not count)."""
    return all(v.health in (Health.HEALTHY, Health.DISABLED) for v in verdicts)

"""Source health: one pure rule shared by ``billing status`` and its monitoring check.

Health is measured from the data, not from the HTTP status (DESIGN §8): an exporter that
answers 200 but has stopped producing snapshots, or whose samples are all refused, bills
nothing, and must not look healthy. The rule (documented in the README; change both
together):

=========  ==================================================================================
disabled   the source is ``enabled = false``; reported, never counted against health
failing    never collected successfully; or ``consecutive_failures >= 3``; or lag >
           3 × max_lag; or every sample the last run delivered was refused
degraded   at least one consecutive failure; or lag > max_lag; or more than
           ``max_refused_share`` of the samples the last run delivered were refused
healthy    otherwise
=========  ==================================================================================

``lag = now - newest collected_at received`` from the source: how old the newest data is,
whatever the requests did. Until a source has delivered anything, its lag counts from its
first successful collect (a new node whose exporter has no snapshot yet is fine for a
while, then stale).

``max_lag`` is the source's ``stale_after`` (registry; default max(5 × collect_interval,
5 min)) or ``billing status --max-lag``. Why five intervals: the exporter snapshots once
a minute and a healthy source is collected every interval, so its newest item is at most
about one interval plus one snapshot period old when status looks; a late or slow run
must not page anyone; and the product accepts "a short multi-minute window", so nothing
below five minutes is worth a warning. Three failures in a row, three times the allowed
lag, or a last run that delivered nothing billable is no longer a blip: "failing", which
the monitoring check maps to CRITICAL, while "degraded" maps to WARNING.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from billing_cli._time import NS_PER_SECOND, format_duration, format_rfc3339_ns

FAILING_CONSECUTIVE_FAILURES = 3
FAILING_LAG_FACTOR = 3


class Health(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAILING = "failing"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Verdict:
    health: Health
    reasons: tuple[str, ...]  # why it is not healthy; empty when healthy or disabled
    lag_s: float | None  # None when nothing says how old the data is (never collected)


@dataclass(frozen=True)
class Freshness:
    """What the store knows about how fresh a source's data is."""

    newest_collected_at_ns: int | None  # newest item received, None if none yet
    first_succeeded_at_ns: int | None  # the reference while nothing has been received


@dataclass(frozen=True)
class Delivery:
    """What the source's last run delivered: samples kept and refused."""

    samples: int
    refused: int
    top_refusal: str | None = None

    @property
    def refused_share(self) -> float | None:
        total = self.samples + self.refused
        return None if total == 0 else self.refused / total


def lag_seconds(now_ns: int, since_ns: int | None) -> float | None:
    """Seconds from ``since_ns`` to ``now``; never negative (clock skew reads as 0)."""
    if since_ns is None:
        return None
    return max(0, now_ns - since_ns) / NS_PER_SECOND


def classify(
    *,
    enabled: bool,
    collected_successfully: bool,
    consecutive_failures: int,
    freshness: Freshness,
    delivery: Delivery | None,
    now_ns: int,
    max_lag_s: float,
    max_refused_share: float,
) -> Verdict:
    """Apply the rule above. Pure: same inputs, same verdict."""
    newest = freshness.newest_collected_at_ns
    lag = lag_seconds(now_ns, newest if newest is not None else freshness.first_succeeded_at_ns)
    if not enabled:
        return Verdict(Health.DISABLED, (), lag)
    failing: list[str] = []
    degraded: list[str] = []
    if not collected_successfully:
        failing.append("never collected successfully")
    elif lag is not None and lag > max_lag_s:
        what = (
            f"newest snapshot received is {format_duration(lag)} old ({format_rfc3339_ns(newest)})"
            if newest is not None
            else f"no snapshot received in the {format_duration(lag)} since the first collect"
        )
        limit = FAILING_LAG_FACTOR * max_lag_s
        if lag > limit:
            failing.append(f"stale: {what}, over {FAILING_LAG_FACTOR} x max lag {max_lag_s:.0f}s")
        else:
            degraded.append(f"stale: {what}, over max lag {max_lag_s:.0f}s")
    if consecutive_failures >= FAILING_CONSECUTIVE_FAILURES:
        failing.append(f"{consecutive_failures} consecutive failures")
    elif consecutive_failures > 0:
        degraded.append(f"{consecutive_failures} consecutive failure(s)")
    share = delivery.refused_share if delivery is not None else None
    if delivery is not None and share is not None:
        why = f": {delivery.top_refusal}" if delivery.top_refusal else ""
        if delivery.samples == 0:  # whatever max_refused_share says: nothing is billed
            failing.append(
                f"nothing billable: all {delivery.refused:,} samples of the last run "
                f"were refused{why}"
            )
        elif share > max_refused_share:
            total = delivery.samples + delivery.refused
            degraded.append(
                f"{delivery.refused:,} of {total:,} samples of the last run refused "
                f"({share:.0%} > {max_refused_share:.0%}){why}"
            )
    if failing:
        return Verdict(Health.FAILING, tuple(failing + degraded), lag)
    if degraded:
        return Verdict(Health.DEGRADED, tuple(degraded), lag)
    return Verdict(Health.HEALTHY, (), lag)


def all_healthy(verdicts: list[Verdict]) -> bool:
    """True when every enabled source is healthy (disabled ones do not count)."""
    return all(v.health in (Health.HEALTHY, Health.DISABLED) for v in verdicts)

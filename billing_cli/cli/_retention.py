"""What ``collect``, ``reconcile``, ``ingest`` and ``compact`` say about retention.

The retention horizon is ``[defaults] retention`` (default 35 days, DESIGN §6): data older
than it is refused and counted as ``beyond_retention``; ``billing compact`` (and collect,
once a day) removes the observations older than it.
"""

from __future__ import annotations

from typing import Any

from billing_cli._time import NS_PER_SECOND, format_rfc3339_ns, parse_duration_seconds
from billing_cli.registry.model import DEFAULT_RETENTION, Registry
from billing_cli.store.base import CompactReport

# collect's own compaction: at most this long per run (a cycle spans several runs).
COLLECT_COMPACT_BUDGET_S = 1.0


def retention_ns(registry: Registry | None) -> int:
    """The registry's retention in nanoseconds (the default without a registry)."""
    seconds = (
        parse_duration_seconds(DEFAULT_RETENTION)
        if registry is None
        else registry.defaults.retention_s
    )
    return int(seconds) * NS_PER_SECOND


def beyond_retention_note(samples: int) -> str:
    return (
        f"{samples:,} samples older than the retention horizon refused (not billed; "
        "see `billing integrity list --kind beyond_retention`)"
    )


def _cut(ns: int) -> str | None:
    return None if ns <= -(2**63) else format_rfc3339_ns(ns)


def compaction_json(r: CompactReport) -> dict[str, Any]:
    return {
        "ran": r.ran,
        "dry_run": r.dry_run,
        "cut_before": _cut(r.cut_before_ns),
        "cut": _cut(r.cut_ns),
        "target": _cut(r.target_ns),
        "complete": r.complete,
        "observations_removed": r.observations_removed,
        "item_digests_removed": r.item_digests_removed,
        "series_kept": r.series_kept,
        "seconds": round(r.seconds, 3),
    }


def compaction_line(r: CompactReport) -> str:
    """One line for people: what was (or would be) removed, and where the cut is."""
    cut = _cut(r.cut_ns) or "none (nothing compacted yet)"
    if r.dry_run:
        return (
            f"compaction would remove {r.observations_removed:,} observations and "
            f"{r.item_digests_removed:,} item digests (keeping each series' last observation"
            f" before the cut: {r.series_kept:,} series); cut {cut}"
        )
    state = "" if r.complete else "; unfinished, the next run continues"
    return (
        f"compaction removed {r.observations_removed:,} observations and "
        f"{r.item_digests_removed:,} item digests (kept each series' last observation before"
        f" the cut: {r.series_kept:,} series); cut {cut}{state}"
    )

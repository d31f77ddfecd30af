"""Dry runs: every page applied in its own transaction, rolled back at once.

A dry run must never block the writers of other sources (the SQLite write lock is one
per file; PostgreSQL's per-uuid quota rows are shared by every node). So each page is
applied in its own transaction that is rolled back at once: the lock is held for one
page, never for the whole run. For the report to stay exact, page k must see what pages
1..k-1 of the same dry run would have written. It does: before page k, inside its
transaction, the genuinely new observations of each earlier page are applied again, page
by page and silently (metering, buckets, rating and postings exactly as the first time;
an observation that was a duplicate or a refused conflict changes nothing, so it is not
kept). Replaying page by page, not merged, keeps even the charge/adjustment split of
later postings identical to a real run.

Cost: page k re-applies the new observations of the pages before it, so a dry run costs
O(pages x new observations) and holds the lock per page for about the time those take to
apply. A reconcile of collected history finds few new observations (cheap); a dry run of
a range that was never collected replays everything each page, so it is refused beyond
``DRY_RUN_MAX_NEW`` new observations (with a one-line error saying so) instead of holding
the lock for longer and longer pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from billing_cli.core.types import Observation
from billing_cli.pricing import Pricing
from billing_cli.store.write.grouping import RawKey


@dataclass
class _DryPage:
    """What one page of a dry run genuinely added: its new observations per series."""

    pricing: Pricing
    observations: dict[RawKey, list[Observation]] = field(default_factory=dict)
    emails: dict[RawKey, str] = field(default_factory=dict)


@dataclass
class _DryRun:
    pages: list[_DryPage] = field(default_factory=list)
    new_observations: int = 0

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

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

from billing_cli._errors import StoreError
from billing_cli._time import now_ns
from billing_cli.core.types import Observation
from billing_cli.pricing import Pricing
from billing_cli.store.base import ApplyReport, Batch
from billing_cli.store.plumbing import gc_paused
from billing_cli.store.write import WriteModel
from billing_cli.store.write.grouping import RawKey

# A dry run re-applies its earlier pages' new observations before every page; past this
# many it stops rather than hold the lock for ever longer. 100,000 re-applied observations
# hold it a few seconds on a loaded 2-core machine (review measured ~17 s at 280,000 and
# 82 s, past SQLite's 30 s busy_timeout for the writers waiting, at 945,000).
DRY_RUN_MAX_NEW = 100_000


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


class DryRunPart(WriteModel):
    """``dry_run()``: the write model with every page rolled back, and replayed."""

    @contextmanager
    def _dry_run(self) -> Iterator[None]:
        if self._dry is not None:
            raise RuntimeError("dry runs do not nest")
        self._dry = _DryRun()
        try:
            yield
        finally:
            self._dry = None

    def dry_run(self) -> AbstractContextManager[None]:
        return self._dry_run()

    def apply(self, batch: Batch) -> ApplyReport:
        if self._dry is not None:
            return self._apply_dry(batch, self._dry)
        return super().apply(batch)

    def _apply_dry(self, batch: Batch, dry: _DryRun) -> ApplyReport:
        page = _DryPage(batch.pricing)
        with self._guard("apply a batch"), gc_paused(), self.db.rolled_back():
            # As an apply does first (before any table is read): a compaction emptying a
            # month partition waits for this page instead of deadlocking with it.
            self.db.lock_retention(exclusive=False)
            if self.db.partitioned:
                # Created inside this rolled-back transaction: a dry run creates nothing.
                self.db.ensure_partitions(
                    o.collected_at_ns
                    for earlier in dry.pages
                    for obs in earlier.observations.values()
                    for o in obs
                )
                self._ensure_partitions(batch)
            for earlier in dry.pages:
                per_key = {k: list(v) for k, v in earlier.observations.items()}
                replay = Batch(items=[], run_id=0, pricing=earlier.pricing)
                self._apply_observations(
                    replay, per_key, dict(earlier.emails), ApplyReport(), [], now_ns()
                )
            report = self._apply(batch, capture=page)
        if page.observations:
            dry.new_observations += sum(len(v) for v in page.observations.values())
            if dry.new_observations > DRY_RUN_MAX_NEW:
                raise StoreError(
                    f"dry run stopped: more than {DRY_RUN_MAX_NEW:,} new observations (this "
                    "range was mostly never collected, and a dry run re-applies them for every "
                    "page); reconcile without --dry-run, or a shorter range"
                )
            dry.pages.append(page)
        return report

"""Retention (DESIGN §6): the horizon, what is refused beyond it, and compaction.

**The horizon** of an apply is ``max(cut, run start - retention)``: ``cut`` is how far
compaction has gone (observations before it are gone, so nothing before it can be metered
exactly), the second term is the policy (``[defaults] retention``, evaluated once per run
from the run's start, so a long ingest does not refuse more as it goes). An item older than
the horizon is refused whole, for every series: counted as ``beyond_retention`` in the
report, recorded as one integrity event per node and batch, never applied, never counted
as a duplicate. An item at or after the horizon is always applicable: its predecessor is
either a retained observation or each series' last observation before the cut, which
compaction keeps — what a store that never compacted would use.

**Compaction** removes the observations older than ``hour(now - retention)``, keeping per
series its last observation before it (what the next delta needs: the run that covers or
precedes the cut, trimmed to start there), and prunes ``item_digests`` and ``node_items``
with them (keeping each node's last item time before the cut). Buckets and the ledger
are never compacted. A cycle first raises the cut (its own transaction, under the
retention lock, so no apply that still meters against older data is in flight), then
deletes in steps of a bounded number of series, each its own transaction: a kill between
steps leaves a consistent store and the next call continues where the last step ended.
``billing collect`` starts a cycle at most once a day and spends a bounded time per run
on it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import orjson

from billing_cli._time import NS_PER_SECOND, format_rfc3339_ns, now_ns
from billing_cli.core.types import Item
from billing_cli.store.base import ApplyReport, Batch, CompactReport
from billing_cli.store.dialect import Row
from billing_cli.store.plumbing import StoreBase

# The cut is hour-aligned: compaction works in whole hours of data.
CHUNK_NS = 3600 * NS_PER_SECOND
# collect starts a new compaction cycle at most this often.
CYCLE_NS = 86400 * NS_PER_SECOND
# Series per compaction step (one transaction each).
COMPACT_SERIES_PER_STEP = 512
BEYOND_RETENTION_REASON = "older than the retention horizon"

_STATE_SQL = (
    "SELECT cut_ns, cycle_started_at_ns, cycle_target_ns, cycle_next"
    " FROM retention_state WHERE id = 1"
)
# THE rule of what compaction removes, the one place that says it: an observation ``o``
# before ``target`` that is not its series' last one before it (the anchor). Parameters:
# target, target. The per-series DELETE steps and the dry run's count apply it as is;
# PostgreSQL's month partitions its set form just below (held equal to it by a test).
REMOVABLE = (
    "o.collected_at_ns < ? AND o.collected_at_ns < (SELECT max(p.collected_at_ns)"
    " FROM observations p WHERE p.series_id = o.series_id AND p.collected_at_ns < ?)"
)
# The anchor is a run (write/idle.py) that may start long before the cut: it is trimmed
# to start at its last observation before the cut (its node's last item time before it,
# or its end), which is the observation a store keeping every sample would keep. Items
# before the cut are pruned except each node's last (the point just before the cut of
# every run spanning it).
_ANCHOR_END = (
    "COALESCE(observations.until_ns, (SELECT s.head_collected_at_ns FROM series s"
    " WHERE s.series_id = observations.series_id))"
)
_LAST_ITEM = (
    "(SELECT max(i.collected_at_ns) FROM series s JOIN node_items i ON i.node_id = s.node_id"
    " AND i.env = s.env WHERE s.series_id = observations.series_id AND i.collected_at_ns < ?)"
)
_TRIM_ANCHORS = (
    "UPDATE observations SET collected_at_ns = CASE"
    f" WHEN {_LAST_ITEM} IS NULL OR {_LAST_ITEM} <= collected_at_ns THEN collected_at_ns"
    f" WHEN {_LAST_ITEM} >= {_ANCHOR_END} THEN {_ANCHOR_END}"
    f" ELSE {_LAST_ITEM} END"
    " WHERE series_id >= ? AND series_id <= ? AND collected_at_ns < ?"
)
_OLD_ITEMS = (
    " FROM node_items WHERE collected_at_ns < ? AND collected_at_ns < (SELECT"
    " max(p.collected_at_ns) FROM node_items p WHERE p.node_id = node_items.node_id"
    " AND p.env = node_items.env AND p.collected_at_ns < ?)"
)
# The same rule as a set, for one month partition {part} wholly before ``target``: its rows
# REMOVABLE does not match (each series' anchor, when it is in that month), found with a
# probe or two per series instead of evaluating REMOVABLE on every row of the month.
# Parameters: target. It must say exactly what REMOVABLE says: tests/test_pg_partitions.py
# checks the two against each other on random histories. A change of the rule without
# such a form sets this to None: partitions are then scanned with REMOVABLE itself
# (correct, as slow as the DELETE steps, still without their dead rows).
KEPT_IN_PARTITION: str | None = (
    "SELECT o.* FROM series s CROSS JOIN LATERAL (SELECT max(p.collected_at_ns) AS t"
    " FROM observations p WHERE p.series_id = s.series_id AND p.collected_at_ns < ?) a"
    " JOIN {part} o ON o.series_id = s.series_id AND o.collected_at_ns = a.t"
)
# A series range's removable observations (parameters: lo, hi, target, target).
_OLD_OBSERVATIONS = (
    " FROM observations AS o WHERE o.series_id >= ? AND o.series_id <= ? AND " + REMOVABLE
)
_ANCHORED_SERIES = (
    "SELECT count(*) FROM series s WHERE s.series_id >= ? AND s.series_id <= ? AND EXISTS"
    " (SELECT 1 FROM observations o WHERE o.series_id = s.series_id AND o.collected_at_ns < ?)"
)


def kept_rows(part: str) -> str:
    """The query of the rows of month partition ``part`` (wholly before the target) that
    compaction keeps; its parameters are :func:`kept_params`."""
    if KEPT_IN_PARTITION is None:
        return f"SELECT * FROM {part} AS o WHERE ({REMOVABLE}) IS NOT TRUE"
    return KEPT_IN_PARTITION.format(part=part)


def kept_params(target: int) -> tuple[int, ...]:
    return (target,) if KEPT_IN_PARTITION is not None else (target, target)


def chunk_floor(t: int, chunk: int = CHUNK_NS) -> int:
    return t - t % chunk


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def beyond_retention_events(refused: list[Item], horizon: int, batch: Batch, now: int) -> list[Row]:
    """One integrity-event row per node (``REJECTION_EVENT_SQL`` columns, fingerprint
    last): how many items and samples, from when to when, and the horizon."""
    by_node: dict[tuple[str, str], list[Item]] = {}
    for it in refused:
        by_node.setdefault((it.node_id, it.env), []).append(it)
    rows: list[Row] = []
    for (node, env), its in by_node.items():
        first = min(it.collected_at_ns for it in its)
        last = max(it.collected_at_ns for it in its)
        samples = sum(len(it.samples) for it in its)
        span = format_rfc3339_ns(first) + (
            "" if first == last else f" to {format_rfc3339_ns(last)}"
        )
        detail = (
            f"{_count(len(its), 'item')}, {_count(samples, 'sample')} at {span}:"
            f" {BEYOND_RETENTION_REASON} {format_rfc3339_ns(horizon)}; refused, not billed"
        )
        # What the event says, not when, by which run or under which horizon: the same
        # refusal delivered again is not stored twice.
        fingerprint = hashlib.blake2b(
            orjson.dumps(["beyond_retention", node, env, first, last, len(its), samples]),
            digest_size=16,
        ).digest()
        rows.append(
            (
                "beyond_retention",
                node,
                env,
                "",
                "",
                first,
                batch.source_id,
                batch.run_id,
                detail,
                now,
                fingerprint,
            )
        )
    return rows


class RetentionPart(StoreBase):
    """The horizon of an apply, and compaction."""

    _run_starts: dict[int, int]
    # The cut's alignment (tests compact small examples in minutes).
    compact_chunk_ns: int = CHUNK_NS

    # --- the horizon ------------------------------------------------------------------

    def _cut(self) -> int:
        """How far compaction has gone, read inside the apply's transaction under the
        retention lock (shared): a compaction raising the cut waits for it."""
        self.db.lock_retention(exclusive=False)
        return int(self.db.execute("SELECT cut_ns FROM retention_state WHERE id = 1")[0][0])

    def _run_start(self, run_id: int) -> int:
        """The start of a run (its clock for the horizon); now for a run without a row."""
        starts = self.__dict__.setdefault("_run_starts", {})
        start = starts.get(run_id)
        if start is None:
            rows = self.db.execute("SELECT started_at_ns FROM runs WHERE run_id = ?", (run_id,))
            start = starts[run_id] = int(rows[0][0]) if rows else now_ns()
        return int(start)

    def _horizon(self, batch: Batch) -> int:
        cut = self._cut()
        if batch.retention_ns is None:
            return cut
        return max(cut, self._run_start(batch.run_id) - batch.retention_ns)

    def _refuse_beyond_retention(
        self, batch: Batch, report: ApplyReport, now: int
    ) -> tuple[list[Item], list[Row]]:
        """The items at or after the horizon, and the event rows of those refused."""
        horizon = self._horizon(batch)
        items = batch.items
        if not any(it.collected_at_ns < horizon for it in items):
            return items, []
        kept = [it for it in items if it.collected_at_ns >= horizon]
        refused = [it for it in items if it.collected_at_ns < horizon]
        samples = sum(len(it.samples) for it in refused)
        report.beyond_retention += samples
        if samples:
            reasons = report.rejection_reasons
            reasons[BEYOND_RETENTION_REASON] = reasons.get(BEYOND_RETENTION_REASON, 0) + samples
        return kept, beyond_retention_events(refused, horizon, batch, now)

    # --- compaction ----------------------------------------------------------------------

    def compact(
        self,
        *,
        now_ns: int,
        retention_ns: int,
        budget_s: float | None = None,
        dry_run: bool = False,
        daily: bool = False,
    ) -> CompactReport:
        began = time.monotonic()
        target = chunk_floor(now_ns - retention_ns, self.compact_chunk_ns)
        if dry_run:
            return self._compact_dry(target, began)
        with self._guard("compact observations"), self.db.transaction():
            self.db.lock_retention(exclusive=True)
            cut, started, cycle_target, nxt = self._state()
            unfinished = nxt is not None and cycle_target is not None
            if daily:
                due = started is None or now_ns - started >= CYCLE_NS
                start = not unfinished and due and target > cut
                if not start and not unfinished:
                    return CompactReport(False, False, cut, cut, cut, True)
            else:
                start = target > cut
                if not start and not unfinished:
                    return CompactReport(True, False, cut, cut, cut, True)
            cut_before = cut
            if start:
                self.db.execute(
                    "UPDATE retention_state SET cut_ns = ?, cycle_started_at_ns = ?,"
                    " cycle_target_ns = ?, cycle_next = ? WHERE id = 1",
                    (target, now_ns, target, -(2**63)),
                )
                cut, cycle_target = target, target
        assert cycle_target is not None
        report = CompactReport(True, False, cut_before, cut, cycle_target, False)
        while True:
            with self._guard("compact observations"), self.db.transaction():
                done = self._compact_step(report)
            if done:
                report.complete = True
                break
            if budget_s is not None and time.monotonic() - began >= budget_s:
                break
        report.seconds = time.monotonic() - began
        return report

    def _state(self) -> tuple[int, int | None, int | None, int | None]:
        row = self.db.execute(_STATE_SQL)[0]
        return (
            int(row[0]),
            None if row[1] is None else int(row[1]),
            None if row[2] is None else int(row[2]),
            None if row[3] is None else int(row[3]),
        )

    def _compact_step(self, report: CompactReport) -> bool:
        """One transaction: the next month partition wholly before the cut (PostgreSQL),
        else the next series of the cycle; True once the cycle is done."""
        # Exclusive for the whole step: an apply splitting a run (write/idle.py) rewrites
        # the end of a run that starts before the cut, so neither the anchors this step
        # trims nor the rows a partition's emptying copies aside are frozen under applies.
        self.db.lock_retention(exclusive=True)
        _, _, target, nxt = self._state()
        if nxt is None or target is None:
            return True  # another process finished this cycle meanwhile
        if nxt == -(2**63) and self.db.partitioned and self._compact_partition(report, target):
            return False
        ids = [
            int(r[0])
            for r in self.db.execute(
                "SELECT series_id FROM series WHERE series_id > ? ORDER BY series_id LIMIT ?",
                (nxt, COMPACT_SERIES_PER_STEP),
            )
        ]
        if not ids:
            report.item_digests_removed += self.db.execute_count(
                "DELETE FROM item_digests WHERE collected_at_ns < ?", (target,)
            )
            self.db.execute("DELETE" + _OLD_ITEMS, (target, target))
            self.db.execute("UPDATE retention_state SET cycle_next = NULL WHERE id = 1")
            return True
        lo, hi = ids[0], ids[-1]
        report.series_kept += int(self.db.execute(_ANCHORED_SERIES, (lo, hi, target))[0][0])
        report.observations_removed += self.db.execute_count(
            "DELETE" + _OLD_OBSERVATIONS, (lo, hi, target, target)
        )
        self.db.execute(_TRIM_ANCHORS, (*[target] * 4, lo, hi, target))
        self.db.execute("UPDATE retention_state SET cycle_next = ? WHERE id = 1", (hi,))
        return False

    def _compact_partition(self, report: CompactReport, target: int) -> bool:
        """Empty the first month partition of observations wholly before ``target`` that
        holds a removable row, in one cheap operation: its kept rows (those REMOVABLE does
        not match: each series' anchor) copied aside, the partition truncated (no dead
        rows, no vacuum debt, no WAL per removed row), the kept rows put back. False when
        no partition needs it (what remains are the series steps, for the month the cut
        falls in and anchors an earlier cycle kept).

        The caller holds the retention lock (exclusive): every apply takes it (shared)
        before it reads an observation, so no apply is in flight, TRUNCATE (ACCESS
        EXCLUSIVE on the partition) waits for none and none reads the partition from a
        snapshot older than the truncation (TRUNCATE is not MVCC-safe for those). Rows
        before the cut are not frozen under applies: a late item time after the cut splits
        a run that starts before it, rewriting that row's end (write/idle.py), so the kept
        rows are read under the lock too."""
        for name, _, hi in self.db.month_partitions("observations"):
            if hi is None or hi > target:
                break  # in time order: the rest reach the cut
            part = f'"{name}"'
            needed = self.db.execute(
                f"SELECT EXISTS (SELECT 1 FROM {part} AS o WHERE {REMOVABLE})", (target, target)
            )[0][0]
            if not needed:
                continue
            self.db.execute(
                f"CREATE TEMPORARY TABLE billing_compact_kept (LIKE {part}) ON COMMIT DROP"
            )
            self.db.execute(
                f"INSERT INTO billing_compact_kept {kept_rows(part)}", kept_params(target)
            )
            before = int(self.db.execute(f"SELECT count(*) FROM {part}")[0][0])
            self.db.execute(f"TRUNCATE {part}")
            kept = self.db.execute_count(f"INSERT INTO {part} SELECT * FROM billing_compact_kept")
            report.observations_removed += before - kept
            return True
        return False

    def _compact_dry(self, target: int, began: float) -> CompactReport:
        """What compacting to ``max(cut, target)`` would remove, counted in a transaction
        that is rolled back (nothing changes, the cut included)."""
        with self._guard("count what compaction would remove"), self.db.rolled_back():
            cut = self._state()[0]
            goal = max(cut, target)
            bounds = (-(2**63), 2**63 - 1, goal)
            params: list[Any] = [*bounds, goal]
            removed = int(self.db.execute("SELECT count(*)" + _OLD_OBSERVATIONS, params)[0][0])
            kept = int(self.db.execute(_ANCHORED_SERIES, bounds)[0][0])
            digests = int(
                self.db.execute(
                    "SELECT count(*) FROM item_digests WHERE collected_at_ns < ?", (goal,)
                )[0][0]
            )
        return CompactReport(
            True,
            True,
            cut,
            goal,
            goal,
            removed == 0 and digests == 0,
            observations_removed=removed,
            item_digests_removed=digests,
            series_kept=kept,
            seconds=time.monotonic() - began,
        )

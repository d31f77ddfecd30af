"""The write model: what one page changes, applied in one transaction (DESIGN §4, §5, §6).

A reader finds the whole algorithm here, in the order it runs (:meth:`WriteModel._apply`):

1. **retention** (``retention.py``): items older than the horizon are refused
   (``beyond_retention``); compaction lives there too.
2. **grouping** (``grouping.py``): items already applied whole are recognised by their
   digest and skipped; the rest is grouped per series, column-wise.
3. **observations** (``observations.py``, ``idle.py``): the touched series and their
   heads; the page's item times (a late one splits the runs that span it); exact
   re-deliveries dropped; the stored windows of late series read in bulk as points of
   their runs; each series metered through
   :func:`billing_cli.core.metering.diff_series`; new observations become rows only
   where a run of equal totals starts.
4. **buckets** (``buckets.py``): new bucket values, read only where one can exist.
5. **rating** (``rating.py``): changed buckets re-rated and posted to the append-only
   ledger in their accounting periods (quota tails included).
6. one bulk write per table, the integrity events and the source's checkpoint — all in
   the page's transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from billing_cli._time import now_ns
from billing_cli.core.metering import diff_series, minute_of
from billing_cli.core.types import Observation
from billing_cli.store.base import ApplyReport, Batch
from billing_cli.store.dialect import _LEDGER_COLS, Row
from billing_cli.store.integrity import (
    EVENT_SQL,
    REJECTION_EVENT_SQL,
    fingerprinted,
    rejection_events,
)
from billing_cli.store.plumbing import gc_paused
from billing_cli.store.write.buckets import BucketsPart, Change
from billing_cli.store.write.grouping import GroupingPart, RawKey, group_by_series
from billing_cli.store.write.idle import IdlePart, NodeKey
from billing_cli.store.write.observations import ObservationsPart
from billing_cli.store.write.rating import RatingPart
from billing_cli.store.write.retention import RetentionPart

if TYPE_CHECKING:
    from billing_cli.store.dry_run import _DryPage


class WriteModel(RetentionPart, GroupingPart, ObservationsPart, IdlePart, BucketsPart, RatingPart):
    """``apply``: one batch, one transaction."""

    def apply(self, batch: Batch) -> ApplyReport:
        with self._guard("apply a batch"), gc_paused():
            # Before the page's transaction: a month's partitions are created (if missing)
            # and committed on their own, so the page never holds its table locks while
            # waiting for DDL (nor the DDL for it).
            self._ensure_partitions(batch)
            with self.db.transaction():
                return self._apply(batch)

    def _ensure_partitions(self, batch: Batch) -> None:
        if not self.db.partitioned:
            return
        floor = None
        if batch.retention_ns is not None:
            # Items older than the policy's horizon are refused: they get no partitions.
            floor = self._run_start(batch.run_id) - batch.retention_ns
        self.db.ensure_partitions(
            it.collected_at_ns for it in batch.items if floor is None or it.collected_at_ns >= floor
        )

    def _apply(self, batch: Batch, capture: _DryPage | None = None) -> ApplyReport:
        now = now_ns()
        run_id, source_id = batch.run_id, batch.source_id
        report = ApplyReport(items=len(batch.items), rejected=len(batch.rejections))
        for r in batch.rejections:
            report.rejection_reasons[r.reason] = report.rejection_reasons.get(r.reason, 0) + 1
        items, beyond = self._refuse_beyond_retention(batch, report, now)
        items, skipped, remember = self._skip_applied_items(items)
        report.duplicates += skipped
        events: list[Row] = []  # conflicts and anomalies found while metering

        per_key, emails = group_by_series(items)
        report.samples = skipped + sum(len(it.samples) for it in items)

        if per_key:
            times: dict[NodeKey, set[int]] = {}
            for it in items:
                if it.samples:
                    times.setdefault((it.node_id, it.env), set()).add(it.collected_at_ns)
            self._apply_observations(batch, per_key, emails, report, events, now, capture, times)
        if remember:
            # An item with a conflicting sample is not stored whole: never remembered.
            # (An event row is kind, node_id, env, uuid, inbound_tag, collected_at, ...)
            for e in events:
                if e[0] == "conflict":
                    remember.pop((e[5], e[1], e[2]), None)
            self.db.executemany(
                "INSERT INTO item_digests (collected_at_ns, node_id, env, digest)"
                " VALUES (?,?,?,?) ON CONFLICT (collected_at_ns, node_id, env)"
                " DO UPDATE SET digest = excluded.digest",
                [(*k, d) for k, d in remember.items()],
            )

        if events:
            # A conflict is loud once: the item that carries it comes back with every
            # overlap, and is counted in each run's report, but stored a single time.
            conflicts = [fingerprinted(e) for e in events if e[0] == "conflict"]
            others = [e for e in events if e[0] != "conflict"]
            if others:
                self.db.executemany(EVENT_SQL, others)
            if conflicts:
                self.db.executemany(REJECTION_EVENT_SQL, conflicts)
        if batch.rejections:
            self.db.executemany(
                REJECTION_EVENT_SQL,
                rejection_events(batch.rejections, source_id, run_id, now),
            )
        if beyond:
            self.db.executemany(REJECTION_EVENT_SQL, beyond)
        if batch.checkpoint is not None:
            cp = batch.checkpoint
            self.db.execute(
                "INSERT INTO source_checkpoints (source_id, node_id, env, last_cursor,"
                " last_successful_until_ns, last_attempted_at_ns, newest_collected_at_ns,"
                " consecutive_failures)"
                " VALUES (?,?,?,?,?,?,?,0) ON CONFLICT (source_id) DO UPDATE SET"
                " node_id = excluded.node_id, env = excluded.env,"
                " last_cursor = excluded.last_cursor,"
                " last_successful_until_ns = CASE"
                "  WHEN excluded.last_successful_until_ns IS NULL"
                "   THEN source_checkpoints.last_successful_until_ns"
                "  WHEN source_checkpoints.last_successful_until_ns IS NULL"
                "   OR excluded.last_successful_until_ns"
                "    > source_checkpoints.last_successful_until_ns"
                "   THEN excluded.last_successful_until_ns"
                "  ELSE source_checkpoints.last_successful_until_ns END,"
                " newest_collected_at_ns = CASE"
                "  WHEN source_checkpoints.newest_collected_at_ns IS NULL"
                "   OR excluded.newest_collected_at_ns"
                "    > source_checkpoints.newest_collected_at_ns"
                "   THEN excluded.newest_collected_at_ns"
                "  ELSE source_checkpoints.newest_collected_at_ns END,"
                " last_attempted_at_ns = excluded.last_attempted_at_ns",
                (
                    cp.source_id,
                    cp.node_id,
                    cp.env,
                    cp.last_cursor,
                    cp.last_successful_until_ns,
                    cp.attempted_at_ns,
                    cp.newest_collected_at_ns,
                ),
            )
        return report

    def _apply_observations(
        self,
        batch: Batch,
        per_key: dict[RawKey, list[Observation]],
        emails: dict[RawKey, str],
        report: ApplyReport,
        events: list[Row],
        now: int,
        capture: _DryPage | None = None,
        times: dict[NodeKey, set[int]] | None = None,
    ) -> None:
        run_id, source_id = batch.run_id, batch.source_id
        if times is None:
            times = {}
            for k, obs in per_key.items():
                times.setdefault((k[0], k[1]), set()).update(o.collected_at_ns for o in obs)
        self.db.lock_nodes(sorted(times))
        series = self._load_series(per_key, emails)
        heads: dict[tuple[NodeKey, int], None] = {}
        for s in series.values():
            if s.head is not None:
                heads[((s.key[0], s.key[1]), s.head.collected_at_ns)] = None
        # Item times first: a late item time splits the runs that span it before
        # anything reads them (idle.py).
        ctx = self._item_times(times, heads)
        self._split_runs(ctx)

        # 2. Late series (an observation at or before the head) need their stored window,
        # unless every such observation is an exact re-delivery (the overlap of the
        # previous pull: the common case), which is dropped here as a duplicate.
        dropped, late = self._drop_redelivered(per_key, series, ctx)
        report.duplicates += dropped
        windows: dict[int, list[Observation]] = {}
        if late:
            by_sid = {s.series_id: (k, s) for k, s in series.items() if k in per_key}
            late_heads: dict[int, Observation] = {}
            late_nodes: dict[int, NodeKey] = {}
            late_times: dict[int, list[int]] = {}
            for sid, _, _ in late:
                k, s = by_sid[sid]
                assert s.head is not None
                late_heads[sid] = s.head
                late_nodes[sid] = (k[0], k[1])
                late_times[sid] = [o.collected_at_ns for o in per_key[k]]
            windows = self._stored_points(late, late_heads, late_nodes, late_times, ctx)

        # 3. Meter each series; new observations become rows only where a run starts.
        obs_rows: list[Row] = []
        close_rows: list[Row] = []
        head_rows: list[Row] = []
        changes: list[Change] = []
        maybe_existing: list[Row] = []
        succ_all = ctx.succ_all
        for raw, obs in per_key.items():
            sid, _, head, key = series[raw]
            window = windows.get(sid) if windows else None
            if window is None:
                window = [head] if head is not None else []
            d = diff_series(window, obs)
            report.duplicates += d.duplicates
            if d.inserted:
                node = (raw[0], raw[1])
                head_t = None if head is None else head.collected_at_ns
                tail = head
                open_new = -1  # this series' open row among obs_rows, if it is new
                late_row = -1  # its latest late row in this page
                late_tail: Observation | None = None
                for o in d.inserted:
                    t = o[0]
                    if head_t is not None and t < head_t:
                        # Late: never inside a stored run (those were split); a run of
                        # its own, or the extension of the previous late one (a backfill
                        # of idle minutes costs one row, like in-order ones).
                        if (
                            late_tail is not None
                            and o[1:] == late_tail[1:]
                            and succ_all(node, late_tail[0]) == t
                        ):
                            obs_rows[late_row] = (*obs_rows[late_row][:7], t)
                        else:
                            late_row = len(obs_rows)
                            obs_rows.append((sid, t, o[1], o[2], o[3], run_id, source_id, t))
                        late_tail = o
                        continue
                    if tail is not None and o[1:] == tail[1:] and succ_all(node, tail[0]) == t:
                        tail = o  # idle: the open run extends to t, no row
                        continue
                    if tail is not None:
                        if open_new < 0:
                            close_rows.append((tail[0], sid))
                        else:
                            obs_rows[open_new] = (*obs_rows[open_new][:7], tail[0])
                    open_new = len(obs_rows)
                    obs_rows.append((sid, t, o[1], o[2], o[3], run_id, source_id, None))
                    tail = o
            report.new_observations += len(d.inserted)
            if capture is not None and d.inserted:
                capture.observations[raw] = d.inserted
                capture.emails[raw] = emails[raw]
            if d.new_head is not None:
                h = d.new_head
                head_rows.append(
                    (h.collected_at_ns, h.uplink_total, h.downlink_total, h.counter_epoch, sid)
                )
            head_minute = None if head is None else minute_of(head.collected_at_ns)
            for m, (du, dd) in d.bucket_deltas.items():
                changes.append((sid, key, m, du, dd))
                # A bucket can only exist at or before the head's minute.
                if head_minute is not None and m <= head_minute:
                    maybe_existing.append((sid, m))
            for c in d.conflicts:
                report.conflicts += 1
                events.append(
                    ("conflict", *key, c.refused.collected_at_ns, source_id, run_id, c.detail, now)
                )
            for a in d.anomalies:
                report.anomalies += 1
                events.append(
                    ("anomaly", *key, a.cur.collected_at_ns, source_id, run_id, a.detail, now)
                )

        # 4. New bucket values.
        buckets = self._new_buckets(changes, self._load_buckets(maybe_existing))

        # 5. Re-rate and post (quota state read before this batch's sums are added).
        postings, rerated = self._rate(batch.pricing, buckets, report)
        self._add_uuid_usage(batch.pricing, buckets)
        ledger_rows = self._ledger_rows(postings, batch.pricing, run_id, now)

        # 6. One bulk write per table (a series' open run is ended before the rows
        # after it are inserted: it is found as the series' latest row).
        self._record_items(ctx)
        if close_rows:
            self.db.close_runs(close_rows)
        if obs_rows:
            self.db.insert_observations(obs_rows)
        if head_rows:
            self.db.update_heads(head_rows)
        self._write_buckets([*buckets, *rerated])
        if ledger_rows:
            self.db.bulk_insert("ledger_postings", _LEDGER_COLS, ledger_rows)
        self._report_buckets(batch, buckets, report)

"""Buckets: the per-minute usage of each series, and the per-uuid period sums beside them.

A bucket that can already exist is read by exact key (late series, or the minute of a
series' head); every change of a page becomes one bulk insert, update or delete per
table. Each bucket carries its current rating so re-rating compares against it without
summing the ledger; ``uuid_period_usage`` keeps the per-uuid monthly sums an included
quota is rated from.
"""

from __future__ import annotations

from dataclasses import dataclass

from billing_cli._errors import StoreError
from billing_cli.core import rating
from billing_cli.core.types import SeriesKey
from billing_cli.pricing import Pricing
from billing_cli.store.base import ApplyReport, Batch, BucketChange
from billing_cli.store.dialect import _BUCKET_COLS, KeyCol, Row
from billing_cli.store.plumbing import StoreBase

# A bucket delta of a page: (series_id, key, minute start, d_uplink, d_downlink).
Change = tuple[int, SeriesKey, int, int, int]


@dataclass(slots=True)
class Bucket:
    """One bucket being changed in this batch (bytes and derived rating state)."""

    series_id: int
    key: SeriesKey
    start: int
    uplink: int
    downlink: int
    rated: int
    amount: int
    revision: int
    existed: bool
    old_uplink: int  # also what its postings add up to (every change of bytes is posted)
    old_downlink: int
    rating_dirty: bool = False  # rating state changed, bytes did not (quota re-rating)
    included: int = 0  # included quota used by its current rating


class BucketsPart(StoreBase):
    """Bucket reads and writes, and ``uuid_period_usage``."""

    def _load_buckets(self, wanted: list[Row]) -> dict[tuple[int, int], Row]:
        if not wanted:
            return {}
        sql = (
            "SELECT b.series_id, b.bucket_start_ns, b.uplink_bytes, b.downlink_bytes,"
            " b.rated_bytes, b.amount_nano, b.revision, b.included_bytes FROM k JOIN buckets b"
            " ON b.series_id = k.sid AND b.bucket_start_ns = k.m"
        )
        cols: list[KeyCol] = [("sid", "bigint"), ("m", "bigint")]
        return {(int(r[0]), int(r[1])): r for r in self._keyset_query(sql, "k", cols, wanted)}

    def _new_buckets(
        self, changes: list[Change], existing: dict[tuple[int, int], Row]
    ) -> list[Bucket]:
        """The new value of every bucket a page changes (``existing``: the stored ones)."""
        buckets: list[Bucket] = []
        for sid, key, m, du, dd in changes:
            row = existing.get((sid, m))
            if row is None:
                b = Bucket(sid, key, m, du, dd, 0, 0, 0, False, 0, 0)
            else:
                up, down = int(row[2]), int(row[3])
                b = Bucket(
                    sid,
                    key,
                    m,
                    up + du,
                    down + dd,
                    int(row[4]),
                    int(row[5]),
                    int(row[6]),
                    True,
                    up,
                    down,
                    included=int(row[7]),
                )
            if b.uplink < 0 or b.downlink < 0:
                # Impossible by construction; refuse rather than store a negative bucket.
                raise StoreError(
                    f"internal metering error: bucket {key} at {m} would become negative"
                )
            buckets.append(b)
        return buckets

    def _write_buckets(self, buckets: list[Bucket]) -> None:
        """One bulk insert, update and delete for the changed (and re-rated) buckets."""
        inserts: list[Row] = []
        updates: list[Row] = []
        deletes: list[Row] = []
        for b in buckets:
            if not b.existed:
                inserts.append(
                    (
                        b.series_id,
                        b.start,
                        b.uplink,
                        b.downlink,
                        b.rated,
                        b.amount,
                        b.revision,
                        b.included,
                    )
                )
            elif b.uplink == 0 and b.downlink == 0 and b.revision == 0:
                deletes.append((b.series_id, b.start))
            else:
                # A posted bucket that drops to zero bytes stays as a row (its revision
                # numbers the next posting); readers only see non-zero buckets.
                updates.append(
                    (
                        b.uplink,
                        b.downlink,
                        b.rated,
                        b.amount,
                        b.revision,
                        b.included,
                        b.series_id,
                        b.start,
                    )
                )
        if inserts:
            self.db.bulk_insert("buckets", _BUCKET_COLS, inserts)
        if updates:
            self.db.update_buckets(updates)
        if deletes:
            self.db.executemany(
                "DELETE FROM buckets WHERE series_id = ? AND bucket_start_ns = ?", deletes
            )

    @staticmethod
    def _report_buckets(batch: Batch, buckets: list[Bucket], report: ApplyReport) -> None:
        """Count the buckets whose bytes changed (and list them when the batch asks)."""
        changed = [b for b in buckets if (b.uplink, b.downlink) != (b.old_uplink, b.old_downlink)]
        report.buckets_changed += len(changed)
        report.bytes += sum(b.uplink - b.old_uplink + b.downlink - b.old_downlink for b in changed)
        if batch.collect_bucket_changes:
            report.bucket_changes.extend(
                BucketChange(b.key, b.start, b.old_uplink, b.old_downlink, b.uplink, b.downlink)
                for b in changed
            )

    def _add_uuid_usage(self, pricing: Pricing, buckets: list[Bucket]) -> None:
        """Keep ``uuid_period_usage`` equal to the sums of the buckets (all uuids, so a
        quota introduced later finds correct sums)."""
        periods: dict[int, int] = {}
        acc: dict[tuple[str, int], list[int]] = {}
        for b in buckets:
            start = b.start
            ps = periods.get(start)
            if ps is None:
                ps = periods[start] = rating.period_start_ns(start, pricing)
            k = (b.key.uuid, ps)
            slot = acc.get(k)
            if slot is None:
                acc[k] = [b.uplink - b.old_uplink, b.downlink - b.old_downlink, start]
            else:
                slot[0] += b.uplink - b.old_uplink
                slot[1] += b.downlink - b.old_downlink
                if start > slot[2]:
                    slot[2] = start
        if acc:
            self.db.add_uuid_usage(
                [(u, ps, du, dd, last) for (u, ps), (du, dd, last) in acc.items()]
            )

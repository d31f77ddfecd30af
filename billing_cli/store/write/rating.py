"""Rating and postings: changed buckets to money, appended to the ledger (DESIGN §5, §5a).

Every changed bucket is re-rated under the batch's pricing; the difference from its
current rating is posted (a charge first, adjustments after), in its accounting period
— the bucket's month, or the first open period after it when that month is closed.
Under an included quota a change can move the rating of every later bucket of the same
uuid and period, so their stored tail is read once and re-rated with the page. The
rating itself is the pure core's (:mod:`billing_cli.core.rating`, ``ledger``, ``periods``).
"""

from __future__ import annotations

from collections.abc import Sequence

from billing_cli._time import NS_PER_SECOND
from billing_cli.core import ledger, periods, rating
from billing_cli.core.types import SeriesKey
from billing_cli.pricing import Pricing
from billing_cli.store.base import ApplyReport
from billing_cli.store.dialect import KeyCol, Row
from billing_cli.store.plumbing import StoreBase
from billing_cli.store.write.buckets import Bucket

_CLOSED_SET_SQL = "SELECT period_start_ns FROM closed_periods"


def _period_end_ns(period_start: int, pricing: Pricing) -> int:
    # 32 days after a month start is always inside the next month.
    return rating.period_start_ns(period_start + 32 * 86400 * NS_PER_SECOND, pricing)


class RatingPart(StoreBase):
    """Re-rating, postings, accounting periods of postings, quota tails."""

    def _closed_period_set(self) -> frozenset[int]:
        """The closed periods, read inside a writing transaction: on PostgreSQL under a
        share lock that a close takes exclusively, so no posting can land in a period
        that a concurrent close is sealing (SQLite's writers are serialised anyway)."""
        self.db.lock_periods(exclusive=False)
        return frozenset(int(r[0]) for r in self.db.execute(_CLOSED_SET_SQL))

    def _ledger_rows(
        self,
        postings: list[tuple[Bucket, ledger.Posting]],
        pricing: Pricing,
        run_id: int,
        now: int,
    ) -> list[Row]:
        """Rows for ``ledger_postings``, each in its accounting period: the bucket's month,
        or — when that period is closed — the first open one after it
        (:func:`billing_cli.core.periods.accounting_period`)."""
        if not postings:
            return []
        closed = self._closed_period_set()
        target: dict[int, int] = {}  # bucket start -> accounting period
        rows: list[Row] = []
        currency, version = pricing.currency, pricing.rule_version
        for b, p in postings:
            period = target.get(b.start)
            if period is None:
                period = target[b.start] = periods.accounting_period(
                    periods.period_of(b.start), closed
                )
            rows.append(
                (
                    b.series_id,
                    b.start,
                    p.revision,
                    p.entry_type,
                    p.rated_bytes,
                    p.amount_nano,
                    currency,
                    version,
                    run_id,
                    now,
                    period,
                    p.uplink_bytes,
                    p.downlink_bytes,
                    p.included_bytes,
                )
            )
        return rows

    def _rate(
        self, pricing: Pricing, buckets: list[Bucket], report: ApplyReport
    ) -> tuple[list[tuple[Bucket, ledger.Posting]], list[Bucket]]:
        """Re-rate changed buckets (and, under an included quota, the later buckets of the
        same uuid and period); update each bucket's rating state. Returns the postings and
        the unchanged-bytes buckets whose rating moved (their state must be written)."""
        rater = rating.rater_for(pricing)
        out: list[tuple[Bucket, ledger.Posting]] = []
        quota_groups: dict[tuple[str, int], list[Bucket]] = {}
        has_quota = pricing.has_included_quota
        # Without an included quota every bucket rates on its own (the hot path): the
        # amount is Rater.amount_nano inlined — the bucket's charged bytes times one
        # cached exact fraction, rounded once, half-even (tests/test_rating_fast.py).
        new_posting = ledger.Posting
        factor = rater.factor
        charge, free = pricing.charge, rater.free
        append = out.append
        postings = adjustments = adjustment_amount = charged = 0
        for b in buckets:
            if has_quota and pricing.included_for(b.key.uuid) > 0:
                ps = rating.period_start_ns(b.start, pricing)
                quota_groups.setdefault((b.key.uuid, ps), []).append(b)
                continue
            if charge == "total":
                cb = b.uplink + b.downlink
            else:
                cb = b.uplink if charge == "uplink" else b.downlink
            if cb == 0 or free:
                amount = 0
            else:
                num, den = factor(b.key, b.start)
                amount, rem = divmod(cb * num, den)
                twice = rem + rem
                if twice > den or (twice == den and amount & 1):
                    amount += 1
            # ledger.next_posting inlined: the differences of the bucket's totals (bytes,
            # rated bytes, included quota used -- none here --, amount).
            up, down = b.uplink, b.downlink
            if b.revision == 0:
                if not (up or down):
                    continue  # nothing to post (cb and amount are 0 too)
                p = new_posting("charge", 0, cb, amount, up, down, 0)
            else:
                d_up, d_down = up - b.old_uplink, down - b.old_downlink
                d_rated, d_amount, d_included = cb - b.rated, amount - b.amount, -b.included
                if not (d_up or d_down or d_rated or d_amount or d_included):
                    continue
                p = new_posting(
                    "adjustment", b.revision, d_rated, d_amount, d_up, d_down, d_included
                )
            append((b, p))
            b.rated, b.amount, b.included = cb, amount, 0
            b.revision += 1
            b.rating_dirty = True
            postings += 1
            charged += p.amount_nano
            if p.entry_type == "adjustment":
                adjustments += 1
                adjustment_amount += p.amount_nano
        report.postings += postings
        report.adjustments += adjustments
        report.adjustment_amount_nano += adjustment_amount
        report.charged_amount_nano += charged
        rerated: list[Bucket] = []
        states = self._load_quota_state(list(quota_groups))
        for (uuid, ps), group in quota_groups.items():
            in_batch = {id(b) for b in group}
            state = states.get((uuid, ps))
            for b, new in self._rate_quota_tail(pricing, uuid, ps, group, state):
                self._post(b, new, out, report)
                if b.rating_dirty and id(b) not in in_batch:
                    rerated.append(b)
        return out, rerated

    @staticmethod
    def _post(
        b: Bucket,
        new: rating.Rating,
        out: list[tuple[Bucket, ledger.Posting]],
        report: ApplyReport,
    ) -> None:
        posted = (
            ledger.BucketTotals(b.old_uplink, b.old_downlink, b.rated, b.included, b.amount)
            if b.revision
            else ledger.ZERO_TOTALS
        )
        p = ledger.next_posting(posted, b.revision, ledger.totals(b.uplink, b.downlink, new))
        if p is None:
            return
        out.append((b, p))
        b.rated, b.amount, b.included = new.rated_bytes, new.amount_nano, new.included_bytes
        b.revision += 1
        b.rating_dirty = True
        report.postings += 1
        report.charged_amount_nano += p.amount_nano
        if p.entry_type == "adjustment":
            report.adjustments += 1
            report.adjustment_amount_nano += p.amount_nano

    def _load_quota_state(self, groups: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Row]:
        if not groups:
            return {}
        sql = (
            "SELECT u.uuid, u.period_start_ns, u.uplink_bytes, u.downlink_bytes,"
            " u.last_bucket_start_ns FROM k JOIN uuid_period_usage u"
            " ON u.uuid = k.uuid AND u.period_start_ns = k.ps"
        )
        cols: list[KeyCol] = [("uuid", "text"), ("ps", "bigint")]
        return {(r[0], int(r[1])): r for r in self._keyset_query(sql, "k", cols, list(groups))}

    def _rate_quota_tail(
        self,
        pricing: Pricing,
        uuid: str,
        period_start: int,
        changed: list[Bucket],
        state: Row | None,
    ) -> list[tuple[Bucket, rating.Rating]]:
        """Ratings for one uuid's buckets in one period from the earliest changed bucket on.

        The quota is consumed in canonical order (bucket start, then series key), so a
        change can move the rating of every later bucket of the uuid in the period. The
        stored tail is read once and merged with the changed buckets of this batch; the
        charged bytes before the tail come from one SUM query.
        """
        first = min(changed, key=lambda b: (b.start, b.key))
        if state is None or int(state[4]) < first.start:
            # Appended after every stored bucket of the uuid in the period (the normal
            # in-order page): consumption so far is the stored sums, there is no tail.
            consumed = (
                0 if state is None else rating.charged_bytes(pricing, int(state[2]), int(state[3]))
            )
            appended = sorted(changed, key=lambda b: (b.start, b.key))
            ratings = rating.rate_sequence(
                pricing,
                uuid,
                [rating.BucketForRating(b.key, b.start, b.uplink, b.downlink) for b in appended],
                consumed,
            )
            return list(zip(appended, ratings, strict=True))
        end = _period_end_ns(period_start, pricing)
        sums = self.db.execute(
            "SELECT COALESCE(SUM(b.uplink_bytes), 0), COALESCE(SUM(b.downlink_bytes), 0)"
            " FROM buckets b JOIN series s ON s.series_id = b.series_id"
            " WHERE s.uuid = ? AND b.bucket_start_ns >= ? AND b.bucket_start_ns < ?",
            (uuid, period_start, first.start),
        )
        # charged_bytes is linear in (uplink, downlink), so it applies to the sums.
        consumed = rating.charged_bytes(pricing, int(sums[0][0]), int(sums[0][1]))
        tail_rows = self.db.execute(
            "SELECT b.series_id, s.node_id, s.env, s.uuid, s.inbound_tag, b.bucket_start_ns,"
            " b.uplink_bytes, b.downlink_bytes, b.rated_bytes, b.amount_nano, b.revision,"
            " b.included_bytes"
            " FROM buckets b JOIN series s ON s.series_id = b.series_id"
            " WHERE s.uuid = ? AND b.bucket_start_ns >= ? AND b.bucket_start_ns < ?",
            (uuid, first.start, end),
        )
        by_id: dict[tuple[int, int], Bucket] = {(b.series_id, b.start): b for b in changed}
        seq: list[Bucket] = list(changed)
        first_pos = (first.start, first.key)
        for r in tail_rows:
            sid, start = int(r[0]), int(r[5])
            if (sid, start) in by_id:
                continue
            key = SeriesKey(r[1], r[2], r[3], r[4])
            up, down = int(r[6]), int(r[7])
            if (start, key) < first_pos:
                # Same minute as the first change but canonically before it: consumed.
                consumed += rating.charged_bytes(pricing, up, down)
                continue
            b = Bucket(
                sid,
                key,
                start,
                up,
                down,
                int(r[8]),
                int(r[9]),
                int(r[10]),
                True,
                up,
                down,
                included=int(r[11]),
            )
            by_id[(sid, start)] = b
            seq.append(b)
        seq.sort(key=lambda b: (b.start, b.key))
        ratings = rating.rate_sequence(
            pricing,
            uuid,
            [rating.BucketForRating(b.key, b.start, b.uplink, b.downlink) for b in seq],
            consumed,
        )
        return list(zip(seq, ratings, strict=True))

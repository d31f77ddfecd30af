"""Rating: a minute bucket's bytes -> money, under the registry's ``[pricing]`` (DESIGN §5).

Pure: no I/O, no clock. Rating of a billing period is a function of that period's buckets
only, so a store can re-rate exactly the periods a late item touched.

Rules (the README's pricing reference restates them):

- *charged bytes* of a bucket: ``uplink + downlink`` (``charge = "total"``), ``uplink``
  or ``downlink``.
- *included quota*: ``pricing.included_for(uuid)`` bytes per uuid per billing period
  (calendar month, UTC) are free. They are consumed by charged bytes in canonical order:
  bucket start, then series key ``(node_id, env, uuid, inbound_tag)``. A bucket may cross
  the quota boundary: only its bytes beyond the remaining quota are billable.
- ``rated_bytes`` is the bucket's charged bytes *before* quota, so ledger byte totals equal
  charged traffic; the amount covers only the billable bytes after quota.
- amount = billable / unit_bytes × price_per_unit × multiplier(env) × multiplier(node_id)
  × multiplier(inbound_tag) × peak multiplier. A missing multiplier is 1.
- peak windows: a window applies when the *local* wall-clock time of the bucket start, in
  the window's IANA zone, lies in ``[start, end)``; ``end < start`` wraps past midnight;
  ``start == end`` is an empty window. Across DST the local time is what counts (a window
  "18:00-23:00 Europe/Berlin" follows Berlin's clocks). When several windows match, their
  multipliers are **multiplied** (each window is an independent surcharge).
- rounding: computed as an exact rational number (integers only, no intermediate rounding)
  and rounded **once per bucket**, half-even, to 10^-9 currency units (``amount_nano``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple
from zoneinfo import ZoneInfo

from billing_cli._time import NS_PER_SECOND
from billing_cli.core.money import NANO_PER_UNIT, round_half_even
from billing_cli.core.periods import period_of
from billing_cli.core.types import SeriesKey
from billing_cli.pricing import Pricing

# An exact non-negative rational as (numerator, denominator), denominator > 0.
_Ratio = tuple[int, int]
_ONE: _Ratio = (1, 1)


class BucketForRating(NamedTuple):
    """One minute bucket of one series, as rating needs it."""

    key: SeriesKey
    bucket_start_ns: int
    uplink: int
    downlink: int


class Rating(NamedTuple):
    """A bucket's current rating: charged bytes (before quota), amount in nano-units, and
    how many of the charged bytes the included quota covered."""

    rated_bytes: int
    amount_nano: int
    included_bytes: int = 0


ZERO_RATING = Rating(0, 0, 0)


def period_start_ns(bucket_start_ns: int, pricing: Pricing) -> int:
    """Start of the billing period containing ``bucket_start_ns``: the calendar month, UTC."""
    if pricing.period != "month":  # pragma: no cover - the model only admits "month"
        raise ValueError(f"unsupported billing period {pricing.period!r}")
    return period_of(bucket_start_ns)


def charged_bytes(pricing: Pricing, uplink: int, downlink: int) -> int:
    """The bytes the price applies to, per ``pricing.charge``."""
    charge = pricing.charge
    if charge == "total":
        return uplink + downlink
    if charge == "uplink":
        return uplink
    return downlink


def _ratio(d: Decimal) -> _Ratio:
    return d.as_integer_ratio()


def _mul(a: _Ratio, b: _Ratio) -> _Ratio:
    return a[0] * b[0], a[1] * b[1]


def _in_window(minute_of_day: int, start: int, end: int) -> bool:
    if start < end:
        return start <= minute_of_day < end
    if start > end:  # wraps past midnight, e.g. 22:00-06:00
        return minute_of_day >= start or minute_of_day < end
    return False  # start == end: empty window


class Rater:
    """Pre-computed pricing factors with small caches; build one per ``Pricing``.

    Rating runs on the ingest hot path, so the per-series multiplier and the per-minute
    peak multiplier are computed once and reused. Results are identical to the plain
    formula; the caches only avoid repeated work.
    """

    _MAX_CACHE = 200_000  # entries; cleared when exceeded so memory stays bounded

    def __init__(self, pricing: Pricing) -> None:
        self.pricing = pricing
        # price / unit_bytes * 10^9: the bucket's nano-amount before multipliers, per byte.
        pnum, pden = _ratio(pricing.price_per_unit)
        self._base: _Ratio = (pnum * NANO_PER_UNIT, pden * pricing.unit_bytes)
        self.free = pnum == 0  # a zero price: every amount is 0
        m = pricing.multipliers
        self._env = {k: _ratio(v) for k, v in m.env.items()}
        self._node = {k: _ratio(v) for k, v in m.node_id.items()}
        self._tag = {k: _ratio(v) for k, v in m.inbound_tag.items()}
        self._windows = [
            (ZoneInfo(w.timezone), *w.minutes(), _ratio(w.multiplier)) for w in pricing.peak
        ]
        self._series_cache: dict[tuple[str, str, str], _Ratio] = {}
        self._peak_cache: dict[int, _Ratio] = {}
        self._factor_cache: dict[tuple[_Ratio, _Ratio], _Ratio] = {}

    def series_factor(self, key: SeriesKey) -> _Ratio:
        """Product of the env, node_id and inbound_tag multipliers (missing = 1)."""
        ck = (key.env, key.node_id, key.inbound_tag)
        f = self._series_cache.get(ck)
        if f is None:
            f = _mul(
                _mul(self._env.get(key.env, _ONE), self._node.get(key.node_id, _ONE)),
                self._tag.get(key.inbound_tag, _ONE),
            )
            if len(self._series_cache) >= self._MAX_CACHE:
                self._series_cache.clear()
            self._series_cache[ck] = f
        return f

    def peak_factor(self, bucket_start_ns: int) -> _Ratio:
        """Product of the multipliers of every peak window containing the bucket start."""
        if not self._windows:
            return _ONE
        f = self._peak_cache.get(bucket_start_ns)
        if f is None:
            f = _ONE
            seconds = bucket_start_ns // NS_PER_SECOND
            for zone, start, end, mult in self._windows:
                local = datetime.fromtimestamp(seconds, tz=zone)
                if _in_window(local.hour * 60 + local.minute, start, end):
                    f = _mul(f, mult)
            if len(self._peak_cache) >= self._MAX_CACHE:
                self._peak_cache.clear()
            self._peak_cache[bucket_start_ns] = f
        return f

    def factor(self, key: SeriesKey, bucket_start_ns: int) -> _Ratio:
        """The bucket's nano-amount per billable byte as one exact fraction ``(num, den)``:
        price / unit_bytes × 10^9 × every multiplier. ``amount_nano`` of ``n`` billable
        bytes is ``round_half_even(n * num, den)`` — the same integers as
        :meth:`amount_nano` multiplies, grouped once per (series factor, peak factor)."""
        sf = self.series_factor(key)
        pf = self.peak_factor(bucket_start_ns) if self._windows else _ONE
        ck = (sf, pf)
        f = self._factor_cache.get(ck)
        if f is None:
            f = (self._base[0] * sf[0] * pf[0], self._base[1] * sf[1] * pf[1])
            if len(self._factor_cache) >= self._MAX_CACHE:
                self._factor_cache.clear()
            self._factor_cache[ck] = f
        return f

    def amount_nano(self, key: SeriesKey, bucket_start_ns: int, billable_bytes: int) -> int:
        """Nano-amount of ``billable_bytes`` in this bucket, rounded once, half-even."""
        if billable_bytes == 0 or self.free:
            return 0
        sn, sd = self.series_factor(key)
        pn, pd = self.peak_factor(bucket_start_ns)
        num = billable_bytes * self._base[0] * sn * pn
        den = self._base[1] * sd * pd
        return round_half_even(num, den)

    def rate_bucket(
        self, bucket: BucketForRating, free_bytes_available: int = 0
    ) -> tuple[Rating, int]:
        """Rate one bucket with ``free_bytes_available`` quota left; return the rest of it."""
        charged = charged_bytes(self.pricing, bucket.uplink, bucket.downlink)
        used = min(max(free_bytes_available, 0), charged)
        billable = charged - used
        amount = self.amount_nano(bucket.key, bucket.bucket_start_ns, billable)
        return Rating(charged, amount, used), max(free_bytes_available, 0) - used

    def rate_sequence(
        self, uuid: str, buckets: Sequence[BucketForRating], consumed_before: int
    ) -> list[Rating]:
        """See :func:`rate_sequence`."""
        free = max(self.pricing.included_for(uuid) - consumed_before, 0)
        order = _canonical_order(buckets)
        out: list[Rating] = [ZERO_RATING] * len(buckets)
        for i in order:
            out[i], free = self.rate_bucket(buckets[i], free)
        return out


def _canonical_order(buckets: Sequence[BucketForRating]) -> list[int]:
    """Indices of ``buckets`` in canonical order (bucket start, then series key)."""
    idx = range(len(buckets))
    keys = [(b.bucket_start_ns, b.key) for b in buckets]
    if all(keys[i] <= keys[i + 1] for i in range(len(keys) - 1)):
        return list(idx)
    return sorted(idx, key=keys.__getitem__)


# One Rater per Pricing object, reused across calls (pricing models are immutable). The
# strong reference kept next to the Rater prevents id() reuse while the entry lives.
_RATERS: dict[int, Rater] = {}


def rater_for(pricing: Pricing) -> Rater:
    r = _RATERS.get(id(pricing))
    if r is None or r.pricing is not pricing:
        if len(_RATERS) >= 8:
            _RATERS.clear()
        r = Rater(pricing)
        _RATERS[id(pricing)] = r
    return r


def rate_bucket(
    pricing: Pricing, bucket: BucketForRating, free_bytes_available: int = 0
) -> tuple[Rating, int]:
    """Rate one bucket given the quota still free; returns ``(rating, quota left after it)``."""
    return rater_for(pricing).rate_bucket(bucket, free_bytes_available)


def rate_sequence(
    pricing: Pricing, uuid: str, buckets: Sequence[BucketForRating], consumed_before: int
) -> list[Rating]:
    """Rate all buckets of one ``uuid`` in one billing period.

    ``consumed_before`` is the charged bytes of this uuid's buckets in the same period that
    precede ``buckets[0]`` canonically and are not part of ``buckets`` (0 when the whole
    period is passed). Buckets are processed in canonical order (bucket start, then series
    key) — if given in another order they are sorted internally — and the returned list is
    aligned with the input: ``result[i]`` rates ``buckets[i]``.
    """
    return rater_for(pricing).rate_sequence(uuid, buckets, consumed_before)

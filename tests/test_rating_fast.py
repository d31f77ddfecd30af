"""The store's inlined rating (one cached fraction per bucket) equals the reference rating.

``SqlStore._rate`` computes a bucket's amount as ``round_half_even(charged * num, den)``
with ``(num, den) = Rater.factor(...)`` instead of calling ``Rater.rate_bucket`` per
bucket. The oracle here is an independent :class:`fractions.Fraction` evaluation of the
documented formula and ``rate_bucket`` itself (the unchanged reference implementation),
both for the pure factor and end to end through a real SQLite store.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from billing_cli._time import NS_PER_MINUTE, parse_rfc3339_ns
from billing_cli.core.money import NANO_PER_UNIT, round_half_even
from billing_cli.core.rating import BucketForRating, Rater, rate_bucket
from billing_cli.core.types import Item, Sample, SeriesKey
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import Batch, RowFilter

T0 = parse_rfc3339_ns("2026-03-28T20:00:00Z")  # spans a DST change in Europe/Berlin below
NODES, ENVS, TAGS = ["n1", "n2"], ["prod", "dev"], ["vless", "trojan"]

prices = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False).map(str)
mults = st.decimals(min_value=0, max_value=10, places=4, allow_nan=False).map(str)


@st.composite
def pricings(draw: st.DrawFn, units: tuple[str, ...] = ("B", "KB", "GB", "KiB", "GiB")) -> Pricing:
    doc: dict[str, Any] = {
        "price_per_unit": draw(prices),
        "unit": draw(st.sampled_from(units)),
        "charge": draw(st.sampled_from(["total", "uplink", "downlink"])),
        "multipliers": {
            "env": draw(st.dictionaries(st.sampled_from(ENVS), mults, max_size=2)),
            "node_id": draw(st.dictionaries(st.sampled_from(NODES), mults, max_size=2)),
            "inbound_tag": draw(st.dictionaries(st.sampled_from(TAGS), mults, max_size=2)),
        },
        "peak": draw(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "timezone": st.sampled_from(["UTC", "Europe/Berlin", "Asia/Kolkata"]),
                        "start": st.sampled_from(["00:00", "01:30", "21:00", "23:59"]),
                        "end": st.sampled_from(["00:00", "03:00", "22:15", "06:00"]),
                        "multiplier": mults,
                    }
                ),
                max_size=2,
            )
        ),
    }
    return Pricing.model_validate(doc)


keys = st.builds(
    SeriesKey, st.sampled_from(NODES), st.sampled_from(ENVS), st.just("u1"), st.sampled_from(TAGS)
)
starts = st.integers(0, 6 * 24 * 60).map(lambda m: T0 + m * NS_PER_MINUTE)


def _oracle(p: Pricing, key: SeriesKey, start: int, billable: int) -> int:
    """The documented formula, evaluated with Fraction (no shared code with Rater)."""
    r = Rater(p)
    f = Fraction(p.price_per_unit) / p.unit_bytes * NANO_PER_UNIT
    m = p.multipliers
    for table, name in (
        (m.env, key.env),
        (m.node_id, key.node_id),
        (m.inbound_tag, key.inbound_tag),
    ):
        f *= Fraction(table.get(name, Decimal(1)))
    pn, pd = r.peak_factor(start)
    f *= Fraction(pn, pd)
    exact = f * billable
    return round_half_even(exact.numerator, exact.denominator)


@given(pricings(), keys, starts, st.integers(0, 2**62))
def test_factor_matches_reference_and_fraction(
    p: Pricing, key: SeriesKey, start: int, billable: int
) -> None:
    r = Rater(p)
    num, den = r.factor(key, start)
    fast = 0 if billable == 0 or r.free else round_half_even(billable * num, den)
    assert fast == r.amount_nano(key, start, billable)
    assert fast == _oracle(p, key, start, billable)


# Amounts must fit 64 bits in the store: per-GB/GiB prices, deltas up to 10^11 bytes.
@given(
    pricings(units=("GB", "GiB")),
    st.lists(
        st.tuples(keys, st.integers(1, 5), st.integers(0, 10**11), st.integers(0, 10**11)),
        min_size=1,
        max_size=8,
    ),
)
def test_store_amounts_equal_rate_bucket(
    p: Pricing, steps: list[tuple[SeriesKey, int, int, int]]
) -> None:
    """Every bucket a real store rates carries ``rate_bucket``'s amount."""
    store = open_store(":memory:")
    try:
        run = store.start_run("ingest", ["t"])
        totals: dict[SeriesKey, tuple[int, int]] = {}
        t = T0
        items: list[Item] = []
        for key, gap, du, dd in steps:
            t += gap * NS_PER_MINUTE
            up, down = totals.get(key, (0, 0))
            if key in totals:
                up, down = up + du, down + dd
            totals[key] = (up, down)
            sample = Sample(key.uuid, "", key.inbound_tag, up, down)
            items.append(Item(t, key.node_id, key.env, None, [sample]))
        store.apply(Batch(items, run, p, "t"))
        ledger = {
            (r.node_id, r.env, r.inbound_tag, r.bucket_start_ns): r
            for r in store.iter_ledger(RowFilter())
        }
        usage = list(store.iter_usage(RowFilter()))
        for u in usage:
            key = SeriesKey(u.node_id, u.env, u.uuid, u.inbound_tag)
            want = rate_bucket(
                p, BucketForRating(key, u.bucket_start_ns, u.uplink_bytes, u.downlink_bytes)
            )[0]
            got = ledger.get((u.node_id, u.env, u.inbound_tag, u.bucket_start_ns))
            # Every bucket with traffic is posted (with its bytes), even when it rates
            # (0, 0) (charge = "uplink" and downlink traffic only): statements add it up.
            assert got is not None
            assert (got.rated_bytes, got.amount_nano) == (want.rated_bytes, want.amount_nano)
            assert (got.uplink_bytes, got.downlink_bytes) == (u.uplink_bytes, u.downlink_bytes)
        assert len(ledger) == len(usage)
    finally:
        store.close()

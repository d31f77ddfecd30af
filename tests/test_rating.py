"""Rating: units, charge modes, multipliers, peak windows, quota order, rounding (DESIGN §5)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_cli._time import NS_PER_MINUTE, parse_rfc3339_ns
from billing_cli.core.money import (
    decimal_to_nano,
    format_amount,
    nano_to_decimal,
    round_half_even,
)
from billing_cli.core.rating import (
    BucketForRating,
    Rating,
    charged_bytes,
    period_start_ns,
    rate_bucket,
    rate_sequence,
)
from billing_cli.core.types import SeriesKey
from billing_cli.pricing import Pricing

K = SeriesKey("node-a", "prod", "u1", "vless")
T0 = parse_rfc3339_ns("2026-03-10T12:00:00Z")


def pricing(**kw: Any) -> Pricing:
    base: dict[str, Any] = {"price_per_unit": "1", "unit": "GB"}
    base.update(kw)
    return Pricing.model_validate(base)


def bucket(up: int, down: int, *, at: int = T0, key: SeriesKey = K) -> BucketForRating:
    return BucketForRating(key, at, up, down)


def one(p: Pricing, b: BucketForRating, consumed_before: int = 0) -> Rating:
    return rate_sequence(p, b.key.uuid, [b], consumed_before)[0]


# --- billing period ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "start"),
    [
        ("2026-03-10T12:00:00Z", "2026-03-01T00:00:00Z"),
        ("2026-03-01T00:00:00Z", "2026-03-01T00:00:00Z"),
        ("2026-02-28T23:59:00Z", "2026-02-01T00:00:00Z"),
        ("2024-02-29T23:59:00Z", "2024-02-01T00:00:00Z"),
        ("2026-12-31T23:59:00Z", "2026-12-01T00:00:00Z"),
        ("2027-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ],
)
def test_period_start_is_calendar_month_utc(at: str, start: str) -> None:
    assert period_start_ns(parse_rfc3339_ns(at), pricing()) == parse_rfc3339_ns(start)


# --- units and charge modes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "unit_bytes"),
    [
        ("B", 1),
        ("KB", 1000),
        ("MB", 1000**2),
        ("GB", 1000**3),
        ("TB", 1000**4),
        ("KiB", 1024),
        ("MiB", 1024**2),
        ("GiB", 1024**3),
        ("TiB", 1024**4),
    ],
)
def test_one_unit_costs_the_unit_price(unit: str, unit_bytes: int) -> None:
    p = pricing(unit=unit, price_per_unit="0.25")
    assert one(p, bucket(unit_bytes, 0)) == Rating(unit_bytes, 250_000_000)
    # Half a unit costs half the price; 1000^k and 1024^k units are distinct.
    assert one(p, bucket(unit_bytes * 3, unit_bytes)).amount_nano == 10**9
    assert one(p, bucket(unit_bytes // 2, 0)).amount_nano == (125_000_000 if unit_bytes > 1 else 0)


def test_gb_and_gib_differ() -> None:
    gib = 1024**3
    assert one(pricing(unit="GB"), bucket(gib, 0)).amount_nano == 1_073_741_824
    assert one(pricing(unit="GiB"), bucket(gib, 0)).amount_nano == 1_000_000_000


@pytest.mark.parametrize(
    ("charge", "expected"), [("total", 1_500), ("uplink", 1_000), ("downlink", 500)]
)
def test_charge_modes(charge: str, expected: int) -> None:
    p = pricing(charge=charge, unit="B", price_per_unit="0.000000001")
    assert charged_bytes(p, 1_000, 500) == expected
    # rated_bytes follow the charge mode; 1 nano per byte makes the amount equal too.
    assert one(p, bucket(1_000, 500)) == Rating(expected, expected)


def test_zero_price_rates_bytes_but_no_money() -> None:
    assert one(Pricing(), bucket(10**12, 10**12)) == Rating(2 * 10**12, 0)


# --- multipliers -------------------------------------------------------------------------


def test_multipliers_multiply_and_missing_is_one() -> None:
    p = pricing(
        unit="B",
        price_per_unit="1",
        multipliers={
            "env": {"prod": "2"},
            "node_id": {"node-a": "1.5"},
            "inbound_tag": {"vless": "0.1"},
        },
    )
    assert one(p, bucket(10, 0)).amount_nano == 3 * 10**9  # 10 * 2 * 1.5 * 0.1
    other = SeriesKey("node-b", "staging", "u1", "trojan")
    assert one(p, bucket(10, 0, key=other)).amount_nano == 10 * 10**9
    only_env = SeriesKey("node-b", "prod", "u1", "trojan")
    assert one(p, bucket(10, 0, key=only_env)).amount_nano == 20 * 10**9


def test_zero_multiplier_makes_bucket_free_but_keeps_bytes() -> None:
    p = pricing(multipliers={"inbound_tag": {"vless": "0"}})
    assert one(p, bucket(5 * 10**9, 0)) == Rating(5 * 10**9, 0)


# --- peak windows ------------------------------------------------------------------------


def at(text: str) -> int:
    return parse_rfc3339_ns(text)


PEAK_BERLIN = {"timezone": "Europe/Berlin", "start": "18:00", "end": "22:00", "multiplier": "3"}


@pytest.mark.parametrize(
    ("utc", "peak"),
    [
        # Winter (CET, UTC+1): 18:00 local = 17:00Z.
        ("2026-01-15T16:59:00Z", False),
        ("2026-01-15T17:00:00Z", True),
        ("2026-01-15T20:59:00Z", True),
        ("2026-01-15T21:00:00Z", False),  # end is exclusive
        # Summer (CEST, UTC+2): 18:00 local = 16:00Z — the window follows local clocks.
        ("2026-07-15T15:59:00Z", False),
        ("2026-07-15T16:00:00Z", True),
        ("2026-07-15T19:59:00Z", True),
        ("2026-07-15T20:00:00Z", False),
        # DST switch days (2026-03-29 spring forward, 2026-10-25 fall back).
        ("2026-03-29T16:00:00Z", True),
        ("2026-03-29T15:59:00Z", False),
        ("2026-10-25T17:00:00Z", True),
        ("2026-10-25T16:59:00Z", False),
    ],
)
def test_peak_window_uses_local_time_across_dst(utc: str, peak: bool) -> None:
    p = pricing(unit="B", price_per_unit="1", peak=[PEAK_BERLIN])
    assert one(p, bucket(1, 0, at=at(utc))).amount_nano == (3 if peak else 1) * 10**9


@pytest.mark.parametrize(
    ("utc", "peak"),
    [
        ("2026-05-01T21:59:00Z", False),
        ("2026-05-01T22:00:00Z", True),
        ("2026-05-01T23:59:00Z", True),
        ("2026-05-02T00:00:00Z", True),
        ("2026-05-02T05:59:00Z", True),
        ("2026-05-02T06:00:00Z", False),
        ("2026-05-02T12:00:00Z", False),
    ],
)
def test_peak_window_wraps_past_midnight(utc: str, peak: bool) -> None:
    window = {"timezone": "UTC", "start": "22:00", "end": "06:00", "multiplier": "0.5"}
    p = pricing(unit="B", price_per_unit="2", peak=[window])
    assert one(p, bucket(1, 0, at=at(utc))).amount_nano == (1 if peak else 2) * 10**9


def test_peak_window_in_a_zone_with_a_half_hour_offset() -> None:
    # Asia/Kolkata is UTC+05:30: 09:00 local is 03:30Z.
    window = {"timezone": "Asia/Kolkata", "start": "09:00", "end": "10:00", "multiplier": "2"}
    p = pricing(unit="B", price_per_unit="1", peak=[window])
    assert one(p, bucket(1, 0, at=at("2026-05-01T03:29:00Z"))).amount_nano == 10**9
    assert one(p, bucket(1, 0, at=at("2026-05-01T03:30:00Z"))).amount_nano == 2 * 10**9


def test_whole_day_window_and_empty_window() -> None:
    whole = {"timezone": "UTC", "start": "00:00", "end": "24:00", "multiplier": "2"}
    empty = {"timezone": "UTC", "start": "10:00", "end": "10:00", "multiplier": "7"}
    p = pricing(unit="B", price_per_unit="1", peak=[whole, empty])
    for t in ("2026-05-01T00:00:00Z", "2026-05-01T10:00:00Z", "2026-05-01T23:59:00Z"):
        assert one(p, bucket(1, 0, at=at(t))).amount_nano == 2 * 10**9


def test_overlapping_windows_multiply() -> None:
    evening = {"timezone": "UTC", "start": "18:00", "end": "23:00", "multiplier": "2"}
    late = {"timezone": "UTC", "start": "21:00", "end": "02:00", "multiplier": "1.5"}
    p = pricing(
        unit="B", price_per_unit="1", peak=[evening, late], multipliers={"env": {"prod": "2"}}
    )
    assert one(p, bucket(1, 0, at=at("2026-05-01T19:00:00Z"))).amount_nano == 4 * 10**9
    assert one(p, bucket(1, 0, at=at("2026-05-01T22:00:00Z"))).amount_nano == 6 * 10**9
    assert one(p, bucket(1, 0, at=at("2026-05-02T01:00:00Z"))).amount_nano == 3 * 10**9
    assert one(p, bucket(1, 0, at=at("2026-05-02T03:00:00Z"))).amount_nano == 2 * 10**9


# --- included quota ----------------------------------------------------------------------


def test_quota_consumed_in_time_then_series_key_order_and_crosses_inside_bucket() -> None:
    p = pricing(unit="B", price_per_unit="0.000000001", included_bytes={"u1": 250})
    k_a = SeriesKey("node-a", "prod", "u1", "a-tag")
    k_b = SeriesKey("node-a", "prod", "u1", "b-tag")
    t1 = T0 + NS_PER_MINUTE
    # Given out of order on purpose: rating sorts by (bucket_start, series key).
    buckets = [
        bucket(100, 0, at=t1, key=k_a),  # third: 0 free left -> all billable
        bucket(100, 0, at=T0, key=k_b),  # second: 150 free left -> 100 free
        bucket(100, 0, at=T0, key=k_a),  # first: 100 free
        bucket(100, 0, at=t1, key=k_b),  # fourth: fully billable
    ]
    # with 250 included: a@T0 100 free, b@T0 100 free, a@t1 50 free + 50 billable, b@t1 billable
    assert rate_sequence(p, "u1", buckets, 0) == [
        Rating(100, 50, 50),
        Rating(100, 0, 100),
        Rating(100, 0, 100),
        Rating(100, 100, 0),
    ]


def test_quota_uses_consumed_before_and_per_uuid_default() -> None:
    p = pricing(
        unit="B",
        price_per_unit="0.000000001",
        included_bytes_default=1000,
        included_bytes={"vip": 5000},
    )
    assert rate_sequence(p, "u1", [bucket(600, 0)], 500) == [Rating(600, 100, 500)]
    assert rate_sequence(p, "u1", [bucket(600, 0)], 2000) == [Rating(600, 600, 0)]
    vip = SeriesKey("node-a", "prod", "vip", "vless")
    assert rate_sequence(p, "vip", [bucket(600, 0, key=vip)], 4800) == [Rating(600, 400, 200)]


def test_quota_is_consumed_by_charged_bytes_only() -> None:
    p = pricing(unit="B", price_per_unit="1", charge="downlink", included_bytes={"u1": 10})
    # 1000 uplink bytes are not charged, so they do not eat the quota.
    assert rate_sequence(
        p, "u1", [bucket(1000, 4), bucket(1000, 10, at=T0 + NS_PER_MINUTE)], 0
    ) == [
        Rating(4, 0, 4),
        Rating(10, 4 * 10**9, 6),
    ]


def test_rate_bucket_returns_remaining_quota() -> None:
    p = pricing(unit="B", price_per_unit="1")
    assert rate_bucket(p, bucket(30, 0), 100) == (Rating(30, 0, 30), 70)
    assert rate_bucket(p, bucket(130, 0), 100) == (Rating(130, 30 * 10**9, 100), 0)
    assert rate_bucket(p, bucket(5, 0)) == (Rating(5, 5 * 10**9, 0), 0)


# --- rounding ----------------------------------------------------------------------------


def test_round_half_even_integer_helper() -> None:
    assert [round_half_even(n, 2) for n in (1, 3, 5, 7, -1, -3)] == [0, 2, 2, 4, 0, -2]
    assert round_half_even(5, 3) == 2
    assert round_half_even(4, 3) == 1
    assert round_half_even(-5, 3) == -2
    assert round_half_even(7, -2) == -4


@pytest.mark.parametrize(
    ("nbytes", "nano"),
    [
        (1, 0),  # 0.5 nano -> 0 (even)
        (3, 2),  # 1.5 -> 2
        (5, 2),  # 2.5 -> 2
        (7, 4),  # 3.5 -> 4
        (9, 4),  # 4.5 -> 4
        (11, 6),  # 5.5 -> 6
    ],
)
def test_amount_rounds_half_even_at_nano_boundary(nbytes: int, nano: int) -> None:
    # 0.0000000005 per byte: every odd byte count is exactly half a nano-unit.
    p = pricing(unit="B", price_per_unit="0.0000000005")
    assert one(p, bucket(nbytes, 0)).amount_nano == nano


def test_rounding_happens_once_per_bucket_not_per_factor() -> None:
    # 1 byte at 1/3 nano per byte, × 3: exact product is 1 nano. Rounding the intermediate
    # 0.333 nano first would give 0.
    p = pricing(
        unit="B",
        price_per_unit="0.000000000333333333333333333333",
        multipliers={"env": {"prod": "3"}},
    )
    assert one(p, bucket(1, 0)).amount_nano == 1  # 0.999999999999999999999 -> 1
    p2 = pricing(unit="KiB", price_per_unit="0.000000001", multipliers={"env": {"prod": "1024"}})
    assert one(p2, bucket(1, 0)).amount_nano == 1  # 1/1024 * 1e-6 * 1024 = 1e-9 exactly


def test_huge_counters_are_exact() -> None:
    p = pricing(
        unit="TiB", price_per_unit="123456.789012345678", multipliers={"env": {"prod": "1.0000001"}}
    )
    up = 2**63 - 1
    amount = one(p, bucket(up, 0)).amount_nano
    exact = Fraction(up, 1024**4) * Fraction("123456.789012345678") * Fraction("1.0000001") * 10**9
    assert amount == round(exact)  # Fraction.__round__ is half-even and exact


# --- money helpers -----------------------------------------------------------------------


def test_money_helpers() -> None:
    assert format_amount(123_456_789) == "0.123456789"
    assert format_amount(2_000_000_000) == "2.000000000"
    assert format_amount(-5) == "-0.000000005"
    assert format_amount(0) == "0.000000000"
    assert nano_to_decimal(1_500_000_001) == Decimal("1.500000001")
    assert decimal_to_nano(Decimal("0.0000000005")) == 0
    assert decimal_to_nano(Decimal("0.0000000015")) == 2
    assert decimal_to_nano(Decimal("-0.0000000025")) == -2
    assert decimal_to_nano("12.3456789014") == 12_345_678_901


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_money_roundtrip(n: int) -> None:
    assert decimal_to_nano(nano_to_decimal(n)) == n
    assert Decimal(format_amount(n)) == nano_to_decimal(n)
    assert decimal_to_nano(format_amount(n)) == n


# --- properties --------------------------------------------------------------------------

prices = st.decimals(min_value=0, max_value=1000, places=12, allow_nan=False, allow_infinity=False)
mults = st.decimals(min_value=0, max_value=10, places=4, allow_nan=False, allow_infinity=False)
units = st.sampled_from(["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
byte_counts = st.integers(min_value=0, max_value=2**63 - 1)


@given(price=prices, mult=mults, unit=units, up=byte_counts, down=byte_counts)
def test_amount_equals_exact_rational_rounded_half_even(
    price: Decimal, mult: Decimal, unit: str, up: int, down: int
) -> None:
    p = pricing(
        unit=unit, price_per_unit=str(price), multipliers={"node_id": {"node-a": str(mult)}}
    )
    r = one(p, bucket(up, down))
    exact = Fraction(up + down, p.unit_bytes) * Fraction(price) * Fraction(mult) * 10**9
    assert r == Rating(up + down, round(exact))
    assert isinstance(r.amount_nano, int)
    # Cross-check with a Decimal computation at a wide local context (no intermediate rounding).
    with localcontext() as ctx:
        ctx.prec = 120
        d = Decimal(up + down) / Decimal(p.unit_bytes) * price * mult
        assert decimal_to_nano(d) == r.amount_nano


bucket_lists = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=20),  # minute
        st.sampled_from(["a", "b", "c"]),  # inbound tag
        st.integers(min_value=0, max_value=10**6),
        st.integers(min_value=0, max_value=10**6),
    ),
    max_size=30,
    unique_by=lambda t: (t[0], t[1]),
)


def _buckets(spec: list[tuple[int, str, int, int]]) -> list[BucketForRating]:
    return [
        BucketForRating(SeriesKey("n", "e", "u1", tag), T0 + m * NS_PER_MINUTE, up, down)
        for m, tag, up, down in spec
    ]


@given(
    spec=bucket_lists,
    included=st.integers(min_value=0, max_value=5 * 10**6),
    before=st.integers(min_value=0, max_value=10**6),
    perm=st.randoms(use_true_random=False),
)
def test_quota_rating_properties(
    spec: list[tuple[int, str, int, int]], included: int, before: int, perm: Any
) -> None:
    p = pricing(unit="B", price_per_unit="0.000000001", included_bytes={"u1": included})
    bs = _buckets(spec)
    ratings = rate_sequence(p, "u1", bs, before)
    # rated bytes are the charged bytes, untouched by quota
    assert [r.rated_bytes for r in ratings] == [b.uplink + b.downlink for b in bs]
    # at 1 nano/byte the total amount is exactly what exceeds the remaining quota
    total = sum(b.uplink + b.downlink for b in bs)
    assert sum(r.amount_nano for r in ratings) == max(0, total - max(0, included - before))
    # monotone: in canonical order, once a bucket pays, all later charged bytes pay fully
    order = sorted(range(len(bs)), key=lambda i: (bs[i].bucket_start_ns, bs[i].key))
    paying = False
    for i in order:
        r = ratings[i]
        assert 0 <= r.amount_nano <= r.rated_bytes
        if paying:
            assert r.amount_nano == r.rated_bytes
        if r.amount_nano > 0:
            paying = True
    # order of the input does not matter: result stays aligned with each bucket
    shuffled = list(range(len(bs)))
    perm.shuffle(shuffled)
    again = rate_sequence(p, "u1", [bs[i] for i in shuffled], before)
    assert again == [ratings[i] for i in shuffled]
    # more quota never costs more
    more = rate_sequence(p, "u1", bs, max(0, before - 1000))
    assert sum(r.amount_nano for r in more) <= sum(r.amount_nano for r in ratings)


@given(spec=bucket_lists, split=st.integers(min_value=0, max_value=30))
def test_rate_sequence_splits_with_consumed_before(
    spec: list[tuple[int, str, int, int]], split: int
) -> None:
    """Rating a period in two parts, carrying the consumed bytes, equals rating it whole."""
    p = pricing(unit="B", price_per_unit="0.3", included_bytes={"u1": 2 * 10**6})
    bs = sorted(_buckets(spec), key=lambda b: (b.bucket_start_ns, b.key))
    whole = rate_sequence(p, "u1", bs, 0)
    head, tail = bs[:split], bs[split:]
    consumed = sum(b.uplink + b.downlink for b in head)
    assert rate_sequence(p, "u1", head, 0) + rate_sequence(p, "u1", tail, consumed) == whole


def test_rating_never_uses_float(monkeypatch: pytest.MonkeyPatch) -> None:
    """Amounts are ints computed from exact ratios: no float appears in any step."""
    import billing_cli.core.rating as rating_mod

    seen: list[object] = []
    orig = round_half_even

    def spy(num: int, den: int) -> int:
        seen.extend([num, den])
        return orig(num, den)

    monkeypatch.setattr(rating_mod, "round_half_even", spy)
    p = pricing(
        unit="GiB",
        price_per_unit="0.07",
        multipliers={"env": {"prod": "1.1"}},
        peak=[{"timezone": "Asia/Tokyo", "start": "00:00", "end": "24:00", "multiplier": "1.3"}],
    )
    r = one(p, bucket(3 * 1024**3, 12345))
    assert seen
    assert all(type(x) is int for x in seen)
    assert type(r.amount_nano) is int
    assert type(r.rated_bytes) is int


def test_period_start_on_timestamps_with_datetime() -> None:
    ns = int(datetime(2026, 6, 30, 23, 59, tzinfo=UTC).timestamp()) * 10**9
    assert (
        period_start_ns(ns, pricing()) == int(datetime(2026, 6, 1, tzinfo=UTC).timestamp()) * 10**9
    )


def test_peak_window_on_repeated_and_skipped_local_hours() -> None:
    """Fall back repeats 02:00-03:00 Berlin (both occurrences are peak); spring forward skips it."""
    window = {"timezone": "Europe/Berlin", "start": "02:00", "end": "03:00", "multiplier": "5"}
    p = pricing(unit="B", price_per_unit="1", peak=[window])

    def amount(utc: str) -> int:
        return one(p, bucket(1, 0, at=at(utc))).amount_nano

    # 2026-10-25: 02:00-03:00 CEST = 00:00-01:00Z, then 02:00-03:00 CET = 01:00-02:00Z
    assert amount("2026-10-24T23:59:00Z") == 10**9
    assert amount("2026-10-25T00:00:00Z") == 5 * 10**9
    assert amount("2026-10-25T00:59:00Z") == 5 * 10**9
    assert amount("2026-10-25T01:00:00Z") == 5 * 10**9
    assert amount("2026-10-25T01:59:00Z") == 5 * 10**9
    assert amount("2026-10-25T02:00:00Z") == 10**9
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST at 01:00Z; no minute is local 02:xx
    assert [amount(f"2026-03-29T{h:02d}:{m:02d}:00Z") for h in range(3) for m in (0, 30, 59)] == [
        10**9
    ] * 9

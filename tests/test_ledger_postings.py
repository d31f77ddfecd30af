"""Ledger postings: charge then differences, nothing when nothing changes (DESIGN §5).

A posting carries the differences of everything a statement prints for its bucket:
uplink and downlink bytes, rated bytes, included bytes used and the amount. So the sum
of a bucket's postings is its current state, and a statement is a pure read of them.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_cli.core.ledger import ZERO_TOTALS, BucketTotals, Posting, next_posting, totals
from billing_cli.core.rating import Rating


def T(up: int, down: int, rated: int, included: int, amount: int) -> BucketTotals:
    return BucketTotals(up, down, rated, included, amount)


def test_first_posting_is_a_full_charge_at_revision_zero() -> None:
    assert next_posting(ZERO_TOTALS, 0, T(600, 400, 1000, 0, 55)) == Posting(
        "charge", 0, 1000, 55, 600, 400, 0
    )


def test_zero_state_on_a_never_posted_bucket_posts_nothing() -> None:
    assert next_posting(ZERO_TOTALS, 0, ZERO_TOTALS) is None


def test_bytes_without_money_still_post_a_charge() -> None:
    # Quota-covered traffic: the ledger's rated_bytes must still equal charged traffic.
    assert next_posting(ZERO_TOTALS, 0, T(500, 0, 500, 500, 0)) == Posting(
        "charge", 0, 500, 0, 500, 0, 500
    )
    # Traffic that is not charged at all (charge = "uplink", downlink only) is still
    # posted with its bytes, so statements add up the traffic of their period.
    assert next_posting(ZERO_TOTALS, 0, T(0, 70, 0, 0, 0)) == Posting("charge", 0, 0, 0, 0, 70, 0)


def test_unchanged_state_posts_nothing() -> None:
    s = T(600, 400, 1000, 0, 55)
    assert next_posting(s, 1, s) is None
    assert next_posting(s, 4, s) is None


def test_later_changes_post_differences_as_adjustments() -> None:
    assert next_posting(T(600, 400, 1000, 0, 55), 1, T(900, 600, 1500, 0, 80)) == Posting(
        "adjustment", 1, 500, 25, 300, 200, 0
    )
    # downwards (e.g. a late item moved bytes to another bucket, or quota moved)
    assert next_posting(T(1500, 0, 1500, 0, 80), 2, T(1500, 0, 1500, 1500, 0)) == Posting(
        "adjustment", 2, 0, -80, 0, 0, 1500
    )
    # back to zero after a charge: an adjustment cancelling it, not silence
    assert next_posting(T(1500, 0, 1500, 0, 80), 2, ZERO_TOTALS) == Posting(
        "adjustment", 2, -1500, -80, -1500, 0, 0
    )
    # only the bytes moved (uplink-charged bucket gains downlink): still an adjustment
    assert next_posting(T(10, 0, 10, 0, 5), 1, T(10, 3, 10, 0, 5)) == Posting(
        "adjustment", 1, 0, 0, 0, 3, 0
    )


def test_totals_of_a_bucket() -> None:
    assert totals(7, 3, Rating(10, 99, 4)) == T(7, 3, 10, 4, 99)


def test_inconsistent_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        next_posting(T(10, 0, 10, 0, 0), 0, T(10, 0, 10, 0, 0))
    with pytest.raises(ValueError):
        next_posting(ZERO_TOTALS, -1, T(10, 0, 10, 0, 0))


states = st.builds(
    BucketTotals,
    st.integers(min_value=0, max_value=2**63),
    st.integers(min_value=0, max_value=2**63),
    st.integers(min_value=0, max_value=2**64),
    st.integers(min_value=0, max_value=2**64),
    st.integers(min_value=0, max_value=10**20),
)


def _sum(postings: list[Posting]) -> BucketTotals:
    return BucketTotals(
        sum(p.uplink_bytes for p in postings),
        sum(p.downlink_bytes for p in postings),
        sum(p.rated_bytes for p in postings),
        sum(p.included_bytes for p in postings),
        sum(p.amount_nano for p in postings),
    )


@given(st.lists(states, max_size=20))
def test_postings_of_any_sequence_sum_to_the_last_state(seq: list[BucketTotals]) -> None:
    postings: list[Posting] = []
    for s in seq:
        p = next_posting(_sum(postings), len(postings), s)
        if p is not None:
            postings.append(p)
        # invariant after every step: the postings sum to the current state
        if postings:
            assert _sum(postings) == s
        else:
            assert s == ZERO_TOTALS
    # revisions are 0..n-1, first a charge, then adjustments, never an empty adjustment
    assert [p.revision for p in postings] == list(range(len(postings)))
    expected_types = ["charge"] + ["adjustment"] * (len(postings) - 1) if postings else []
    assert [p.entry_type for p in postings] == expected_types
    for p in postings[1:]:
        assert _sum([p]) != ZERO_TOTALS
    for p in postings:
        assert type(p.amount_nano) is int


@given(states)
def test_replaying_the_same_state_is_idempotent(s: BucketTotals) -> None:
    first = next_posting(ZERO_TOTALS, 0, s)
    if first is None:
        assert s == ZERO_TOTALS
        return
    assert next_posting(_sum([first]), 1, s) is None

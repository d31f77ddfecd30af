"""Ledger postings: charge then differences, nothing when nothing changes (DESIGN §5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_cli.core.ledger import Posting, next_posting
from billing_cli.core.rating import Rating


def test_first_posting_is_a_full_charge_at_revision_zero() -> None:
    assert next_posting(0, 0, 0, Rating(1000, 55)) == Posting("charge", 0, 1000, 55)


def test_zero_rating_on_a_never_posted_bucket_posts_nothing() -> None:
    assert next_posting(0, 0, 0, Rating(0, 0)) is None


def test_bytes_without_money_still_post_a_charge() -> None:
    # Quota-covered traffic: the ledger's rated_bytes must still equal charged traffic.
    assert next_posting(0, 0, 0, Rating(500, 0)) == Posting("charge", 0, 500, 0)


def test_unchanged_rerating_posts_nothing() -> None:
    assert next_posting(1000, 55, 1, Rating(1000, 55)) is None
    assert next_posting(1000, 55, 4, Rating(1000, 55)) is None


def test_later_changes_post_differences_as_adjustments() -> None:
    assert next_posting(1000, 55, 1, Rating(1500, 80)) == Posting("adjustment", 1, 500, 25)
    # downwards (e.g. a late item moved bytes to another bucket, or quota moved)
    assert next_posting(1500, 80, 2, Rating(1500, 0)) == Posting("adjustment", 2, 0, -80)
    # back to zero after a charge: an adjustment cancelling it, not silence
    assert next_posting(1500, 80, 2, Rating(0, 0)) == Posting("adjustment", 2, -1500, -80)


def test_inconsistent_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        next_posting(10, 0, 0, Rating(10, 0))
    with pytest.raises(ValueError):
        next_posting(0, 0, -1, Rating(10, 0))


ratings = st.builds(
    Rating,
    st.integers(min_value=0, max_value=2**64),
    st.integers(min_value=0, max_value=10**20),
)


@given(st.lists(ratings, max_size=20))
def test_postings_of_any_rerating_sequence_sum_to_the_last_rating(seq: list[Rating]) -> None:
    postings: list[Posting] = []
    for r in seq:
        p = next_posting(
            sum(x.rated_bytes for x in postings),
            sum(x.amount_nano for x in postings),
            len(postings),
            r,
        )
        if p is not None:
            postings.append(p)
        # invariant after every step: the postings sum to the current rating
        if postings:
            assert sum(x.rated_bytes for x in postings) == r.rated_bytes
            assert sum(x.amount_nano for x in postings) == r.amount_nano
        else:
            assert r == Rating(0, 0)
    # revisions are 0..n-1, first a charge, then adjustments, never an empty adjustment
    assert [p.revision for p in postings] == list(range(len(postings)))
    expected_types = ["charge"] + ["adjustment"] * (len(postings) - 1) if postings else []
    assert [p.entry_type for p in postings] == expected_types
    for p in postings[1:]:
        assert (p.rated_bytes, p.amount_nano) != (0, 0)
    for p in postings:
        assert type(p.amount_nano) is int


@given(ratings)
def test_replaying_the_same_rating_is_idempotent(r: Rating) -> None:
    first = next_posting(0, 0, 0, r)
    if first is None:
        assert r == Rating(0, 0)
        return
    assert next_posting(first.rated_bytes, first.amount_nano, 1, r) is None

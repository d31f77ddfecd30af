"""Ledger postings: how a bucket's changes become append-only ledger rows (DESIGN §5, §5a).

Pure. A bucket's *totals* are everything a statement prints for it: uplink and downlink
bytes, rated bytes, included bytes used and the amount. For every bucket the sum of its
postings equals its current totals. The first posting is a ``charge`` (revision 0) with
the full values; every later change appends an ``adjustment`` carrying only the
differences (which may be negative). Rows are never updated or deleted, and a change
that changes nothing appends nothing.

Carrying the bytes (not only the money) is what makes a statement a pure read of the
ledger: late data changes a bucket, but never the postings already made, so the
statement of a closed period prints the same today and in a year.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from billing_cli.core.rating import Rating

EntryType = Literal["charge", "adjustment"]


class BucketTotals(NamedTuple):
    """A bucket's state as the ledger adds it up (current, or the sum of its postings)."""

    uplink_bytes: int
    downlink_bytes: int
    rated_bytes: int
    included_bytes: int
    amount_nano: int


ZERO_TOTALS = BucketTotals(0, 0, 0, 0, 0)


class Posting(NamedTuple):
    """One row to append to ``billing_ledger`` for a bucket: differences of its totals."""

    entry_type: EntryType
    revision: int
    rated_bytes: int
    amount_nano: int
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    included_bytes: int = 0


def totals(uplink: int, downlink: int, rating: Rating) -> BucketTotals:
    """A bucket's totals from its bytes and its rating."""
    return BucketTotals(
        uplink, downlink, rating.rated_bytes, rating.included_bytes, rating.amount_nano
    )


def first_charge(new: BucketTotals) -> Posting | None:
    """:func:`next_posting` for a bucket never posted (revision 0), without its checks."""
    if new == ZERO_TOTALS:
        return None
    up, down, rated, included, amount = new
    return Posting("charge", 0, rated, amount, up, down, included)


def next_posting(posted: BucketTotals, revision: int, new: BucketTotals) -> Posting | None:
    """The posting that moves a bucket from its posted sums to ``new``, or ``None``.

    ``posted`` is the sum of the bucket's postings so far and ``revision`` their count
    (0: never posted; the next revision number). A never-posted bucket whose totals are
    all zero posts nothing.
    """
    if revision < 0:
        raise ValueError(f"revision must be >= 0, got {revision}")
    if revision == 0:
        if posted != ZERO_TOTALS:
            raise ValueError("a bucket without postings must have zero posted sums")
        return first_charge(new)
    if new == posted:
        return None
    d_up, d_down, d_rated, d_included, d_amount = (n - p for n, p in zip(new, posted, strict=True))
    return Posting("adjustment", revision, d_rated, d_amount, d_up, d_down, d_included)

"""Ledger postings: how a bucket's rating changes become append-only ledger rows (DESIGN §5).

Pure. For every bucket the sum of its postings equals its current rating. The first
posting is a ``charge`` (revision 0) with the full values; every later change appends an
``adjustment`` carrying only the difference (which may be negative). Rows are never
updated or deleted, and a re-rating that changes nothing appends nothing.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from billing_cli.core.rating import Rating

EntryType = Literal["charge", "adjustment"]


class Posting(NamedTuple):
    """One row to append to ``billing_ledger`` for a bucket."""

    entry_type: EntryType
    revision: int
    rated_bytes: int
    amount_nano: int


def first_charge(new: Rating) -> Posting | None:
    """:func:`next_posting` for a bucket never posted (revision 0), without its checks."""
    if new.rated_bytes == 0 and new.amount_nano == 0:
        return None
    return Posting("charge", 0, new.rated_bytes, new.amount_nano)


def next_posting(
    current_rated_bytes: int, current_amount_nano: int, current_revision: int, new: Rating
) -> Posting | None:
    """The posting that moves a bucket from its posted sums to ``new``, or ``None``.

    ``current_rated_bytes``/``current_amount_nano`` are the sums of the bucket's postings so
    far and ``current_revision`` their count (0: never posted; the next revision number).
    A never-posted bucket that rates ``(0, 0)`` posts nothing.
    """
    if current_revision < 0:
        raise ValueError(f"current_revision must be >= 0, got {current_revision}")
    if current_revision == 0:
        if current_rated_bytes or current_amount_nano:
            raise ValueError("a bucket without postings must have zero posted sums")
        return first_charge(new)
    d_bytes = new.rated_bytes - current_rated_bytes
    d_amount = new.amount_nano - current_amount_nano
    if d_bytes == 0 and d_amount == 0:
        return None
    return Posting("adjustment", current_revision, d_bytes, d_amount)

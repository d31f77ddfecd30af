"""Counters to per-minute usage (DESIGN §4): the pure heart of metering, no I/O.

A series is a sequence of cumulative observations ordered by ``collected_at``. Usage is
the delta between consecutive observations, attributed to the UTC minute of the later
one. Because every store keeps what it has already bucketed, applying new observations
is incremental: :func:`diff_series` compares the deltas of the stored window around the
new observations with the deltas once they are merged in, and returns only the
per-minute *changes*. That is what makes replays, overlaps, re-ordering and late items
converge to the same buckets as one clean delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

from billing_cli._time import NS_PER_MINUTE
from billing_cli.core.types import Observation


class Delta(NamedTuple):
    """Usage between two consecutive observations of one series."""

    uplink: int
    downlink: int
    restart: bool  # the counter started again from zero: usage is the later total
    anomaly: bool  # a drop within one counter epoch: bills nothing, recorded


def delta(prev: Observation, cur: Observation) -> Delta:
    """Usage from ``prev`` to ``cur`` (``cur`` is the later observation).

    Restart: both carry an epoch and the epochs differ, or either lacks an epoch and a
    direction dropped. A drop with the same epoch on both is an anomaly (usage 0).
    """
    dropped = cur.uplink_total < prev.uplink_total or cur.downlink_total < prev.downlink_total
    if prev.counter_epoch is not None and cur.counter_epoch is not None:
        if prev.counter_epoch != cur.counter_epoch:
            return Delta(cur.uplink_total, cur.downlink_total, True, False)
        if dropped:
            return Delta(0, 0, False, True)
    elif dropped:
        return Delta(cur.uplink_total, cur.downlink_total, True, False)
    return Delta(
        cur.uplink_total - prev.uplink_total,
        cur.downlink_total - prev.downlink_total,
        False,
        False,
    )


class Anomaly(NamedTuple):
    """A drop inside one counter epoch between ``prev`` and ``cur``."""

    prev: Observation
    cur: Observation

    @property
    def detail(self) -> str:
        return (
            f"counter dropped within epoch {self.cur.counter_epoch!r}: "
            f"uplink {self.prev.uplink_total}->{self.cur.uplink_total}, "
            f"downlink {self.prev.downlink_total}->{self.cur.downlink_total} "
            f"(previous observation at {self.prev.collected_at_ns} ns); interval bills nothing"
        )


class Conflict(NamedTuple):
    """The same ``collected_at`` delivered again with other totals or epoch."""

    kept: Observation
    refused: Observation

    @property
    def detail(self) -> str:
        k, r = self.kept, self.refused
        return (
            f"conflicting re-delivery: kept uplink={k.uplink_total} downlink={k.downlink_total} "
            f"epoch={k.counter_epoch!r}; refused uplink={r.uplink_total} "
            f"downlink={r.downlink_total} epoch={r.counter_epoch!r}"
        )


class SeriesDiff(NamedTuple):
    """What applying new observations to one series changes."""

    bucket_deltas: dict[int, tuple[int, int]]  # minute start ns -> (d_uplink, d_downlink), != 0
    inserted: list[Observation]  # genuinely new observations (to store), sorted
    duplicates: int  # already known with identical values (stored or earlier in the batch)
    conflicts: list[Conflict]
    anomalies: list[Anomaly]  # only anomalous intervals that did not exist before
    new_head: Observation | None  # the latest observation when it moved, else None


_tuple_new = tuple.__new__


def _time_of(o: Observation) -> int:
    return o.collected_at_ns


def minute_of(ns: int) -> int:
    return ns - ns % NS_PER_MINUTE


def _same(a: Observation, b: Observation) -> bool:
    return (
        a.uplink_total == b.uplink_total
        and a.downlink_total == b.downlink_total
        and a.counter_epoch == b.counter_epoch
    )


def series_usage(observations: Sequence[Observation]) -> dict[int, tuple[int, int]]:
    """Buckets of one complete, sorted, de-duplicated series (the clean reference).

    The first observation is the baseline; zero-usage minutes are left out.
    """
    out: dict[int, list[int]] = {}
    for prev, cur in pairwise(observations):
        d = delta(prev, cur)
        if d.uplink or d.downlink:
            acc = out.setdefault(minute_of(cur.collected_at_ns), [0, 0])
            acc[0] += d.uplink
            acc[1] += d.downlink
    return {m: (u, d) for m, (u, d) in out.items() if u or d}


def _pair_deltas(
    obs: Sequence[Observation], acc: dict[int, list[int]], sign: int
) -> list[tuple[int, Anomaly]]:
    """Add ``sign`` times the deltas of consecutive pairs to ``acc``; return anomalies."""
    anomalies: list[tuple[int, Anomaly]] = []
    for prev, cur in pairwise(obs):
        d = delta(prev, cur)
        if d.anomaly:
            anomalies.append((prev.collected_at_ns, Anomaly(prev, cur)))
        elif d.uplink or d.downlink:
            slot = acc.setdefault(minute_of(cur.collected_at_ns), [0, 0])
            slot[0] += sign * d.uplink
            slot[1] += sign * d.downlink
    return anomalies


def _append_only(
    stored_window: Sequence[Observation], new_obs: Sequence[Observation]
) -> SeriesDiff | None:
    """The diff when every new observation is later than the previous one (else None)."""
    prev = stored_window[0] if stored_window else None
    last_t = prev.collected_at_ns if prev is not None else -1
    for o in new_obs:
        if o.collected_at_ns <= last_t:
            return None
        last_t = o.collected_at_ns
    acc: dict[int, tuple[int, int]] = {}
    anomalies: list[Anomaly] = []
    for cur in new_obs:
        if prev is not None:
            _, pu, pd, pe = prev
            t, cu, cd, ce = cur
            # Inline of delta() for its common case (no drop, no epoch change); anything
            # else goes through delta() itself.
            if cu >= pu and cd >= pd and (pe == ce or pe is None or ce is None):
                du, dd = cu - pu, cd - pd
            else:
                d = delta(prev, cur)
                if d.anomaly:
                    anomalies.append(Anomaly(prev, cur))
                du, dd = d.uplink, d.downlink
            if du or dd:
                m = t - t % NS_PER_MINUTE
                slot = acc.get(m)
                acc[m] = (du, dd) if slot is None else (slot[0] + du, slot[1] + dd)
        prev = cur
    # Built without the NamedTuple constructor: this runs once per series per page.
    inserted = new_obs if isinstance(new_obs, list) else list(new_obs)
    return _tuple_new(SeriesDiff, (acc, inserted, 0, [], anomalies, new_obs[-1]))


def diff_series(stored_window: Sequence[Observation], new_obs: Sequence[Observation]) -> SeriesDiff:
    """Bucket changes from merging ``new_obs`` into a series.

    ``stored_window`` holds the stored observations from the predecessor of the earliest
    new observation through the successor of the latest one, sorted by time (for an
    in-order page that is just the head, or nothing for a new series). ``new_obs`` is in
    delivery order and may contain duplicates or conflicts; the first value seen for a
    ``collected_at`` (stored before delivered) is kept.

    Pairs of observations outside the window are untouched by the merge, so the change
    per minute is Σ deltas(window ∪ new) − Σ deltas(window).
    """
    # Fast path, an in-order page: the window is at most the head and the new
    # observations are strictly increasing after it. No stored pair changes, so the
    # change is just the deltas along head, n0, n1, ...
    if len(stored_window) <= 1:
        in_order = _append_only(stored_window, new_obs)
        if in_order is not None:
            return in_order

    known: dict[int, Observation] = {o.collected_at_ns: o for o in stored_window}
    accepted: dict[int, Observation] = {}
    duplicates = 0
    conflicts: list[Conflict] = []
    for o in new_obs:
        t = o.collected_at_ns
        first = known.get(t) or accepted.get(t)
        if first is None:
            accepted[t] = o
        elif _same(first, o):
            duplicates += 1
        else:
            conflicts.append(Conflict(first, o))
    if not accepted:
        return SeriesDiff({}, [], duplicates, conflicts, [], None)

    inserted = sorted(accepted.values(), key=_time_of)
    merged = sorted([*stored_window, *inserted], key=_time_of)
    acc: dict[int, list[int]] = {}
    old_anomalies = _pair_deltas(stored_window, acc, -1)
    new_anomalies = _pair_deltas(merged, acc, 1)
    # Only intervals that did not exist before are new anomalies (replays record nothing).
    old_keys = {(a.prev.collected_at_ns, a.cur.collected_at_ns) for _, a in old_anomalies}
    anomalies = [
        a
        for _, a in new_anomalies
        if (a.prev.collected_at_ns, a.cur.collected_at_ns) not in old_keys
    ]
    last = stored_window[-1] if stored_window else None
    new_head = (
        merged[-1] if last is None or merged[-1].collected_at_ns > last.collected_at_ns else None
    )
    return SeriesDiff(
        {m: (u, d) for m, (u, d) in acc.items() if u or d},
        inserted,
        duplicates,
        conflicts,
        anomalies,
        new_head,
    )

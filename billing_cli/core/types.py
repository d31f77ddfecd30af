"""Value types shared by the pure core, the stores and the collector.

Hot-path types are ``NamedTuple``s: they are built once per sample, so they must be cheap.
Timestamps are integer UTC epoch nanoseconds (see ``billing_cli._time``); bytes are ints.
"""

from __future__ import annotations

from typing import NamedTuple


class SeriesKey(NamedTuple):
    """Identity of one counter series. Billing facts are keyed by it."""

    node_id: str
    env: str
    uuid: str
    inbound_tag: str


class Sample(NamedTuple):
    """One user's cumulative counters inside one exporter item."""

    uuid: str
    email: str
    inbound_tag: str
    uplink_total: int
    downlink_total: int


class Rejection(NamedTuple):
    """A sample (or item) refused by validation, with the reason recorded as an integrity event."""

    collected_at_ns: int | None
    node_id: str
    env: str
    uuid: str
    inbound_tag: str
    reason: str


class Item(NamedTuple):
    """One exporter snapshot: every valid sample collected at one instant on one node."""

    collected_at_ns: int
    node_id: str
    env: str
    counter_epoch: str | None
    samples: list[Sample]


class Observation(NamedTuple):
    """One sample at one ``collected_at`` for one series (the unit metering works on)."""

    collected_at_ns: int
    uplink_total: int
    downlink_total: int
    counter_epoch: str | None

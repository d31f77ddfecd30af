"""Grouping a page: items to per-series observations, and items already applied whole.

Everything here touches every sample of a page, so it runs column-wise in C (``zip``,
``map``): a series key is a plain tuple, an observation is built without a Python-level
constructor call. An item's digest recognises the overlap every pull re-delivers
without reading its observations back.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict, deque
from collections.abc import Iterator
from functools import partial
from itertools import repeat
from operator import itemgetter
from typing import NamedTuple

import orjson

from billing_cli._time import NS_PER_SECOND
from billing_cli.core.types import Item, Observation, SeriesKey
from billing_cli.store.dialect import KeyCol, Row
from billing_cli.store.plumbing import StoreBase

# Items this close to the newest item of their node in a batch get their digest stored:
# the part the next pull's overlap (default 2 minutes) re-delivers. Older items are not
# remembered; re-delivered, they take the exact per-observation path (same result).
REMEMBER_ITEMS_NS = 10 * 60 * NS_PER_SECOND

ItemKey = tuple[int, str, str]  # (collected_at_ns, node_id, env)


def item_digest(item: Item) -> bytes | None:
    """A collision-resistant digest of an item's content: epoch and every sample, in order.

    Equal digests mean equal content; an item re-sent in another sample order just misses
    the shortcut. Column-wise (``zip``) so serialising needs no Python call per sample.
    None for content no store can hold (a counter beyond 64 bits): the apply refuses it.
    """
    try:
        body = orjson.dumps([item.counter_epoch, *zip(*item.samples, strict=True)])
    except TypeError:
        return None
    return hashlib.blake2b(body, digest_size=16).digest()


class Series(NamedTuple):
    series_id: int
    email: str
    head: Observation | None
    key: SeriesKey


# A series key as a plain tuple: equal (and hashing equal) to the SeriesKey NamedTuple,
# but built without a Python-level constructor call on the per-sample path.
RawKey = tuple[str, str, str, str]
_tuple_new = tuple.__new__
new_observation = partial(_tuple_new, Observation)  # Observation from a 4-tuple, in C


def consume(iterator: Iterator[object]) -> None:
    """Run an iterator for its side effects at C speed (the itertools 'consume' recipe)."""
    deque(iterator, maxlen=0)


SERIES_COLS = (
    "s.series_id, s.node_id, s.env, s.uuid, s.inbound_tag, s.email,"
    " s.head_collected_at_ns, s.head_uplink, s.head_downlink, s.head_epoch"
)


def group_by_series(
    items: list[Item],
) -> tuple[dict[RawKey, list[Observation]], dict[RawKey, str]]:
    """The page's observations per series key, in delivery order (the first value seen
    for a time wins), and each series' email from its latest sample in the page.

    Column by column with zip/map, so the per-sample work runs in C: this touches every
    sample of the page.
    """
    grouped: defaultdict[RawKey, list[Observation]] = defaultdict(list)
    item_emails: list[tuple[int, list[RawKey], tuple[str, ...]]] = []
    for item in items:
        if not item.samples:
            continue
        uuids, mails, tags, ups, downs = zip(*item.samples, strict=True)
        keys = list(zip(repeat(item.node_id), repeat(item.env), uuids, tags, strict=False))
        obs = map(
            new_observation,
            zip(repeat(item.collected_at_ns), ups, downs, repeat(item.counter_epoch)),
        )
        consume(map(list.append, map(grouped.__getitem__, keys), obs))
        item_emails.append((item.collected_at_ns, keys, mails))
    emails: dict[RawKey, str] = {}
    item_emails.sort(key=itemgetter(0))  # stable: equal times keep delivery order
    for _, keys, mails in item_emails:
        emails.update(zip(keys, mails, strict=True))
    return dict(grouped), emails


def series_of(r: Row) -> Series:
    """A ``SERIES_COLS`` row as a ``_Series`` (both drivers return Python ints), built
    without the NamedTuple constructors: this runs once per series per page."""
    key = _tuple_new(SeriesKey, r[1:5])
    head = None if r[6] is None else _tuple_new(Observation, r[6:10])
    return _tuple_new(Series, (r[0], r[5], head, key))


class GroupingPart(StoreBase):
    """Items already applied whole (``item_digests``)."""

    # How far before the newest item of its node an item still gets its digest stored;
    # None: never (the tests compare both ways).
    remember_items_ns: int | None = REMEMBER_ITEMS_NS

    def _skip_applied_items(
        self, items: list[Item]
    ) -> tuple[list[Item], int, dict[ItemKey, bytes]]:
        """Drop items already applied whole with identical content.

        An ``item_digests`` row is written only in the transaction that stored every
        observation of that exact content, and observations are never changed or removed,
        so an item whose digest matches is all duplicates: applying it again would change
        nothing and count each sample as a duplicate — which is what the caller reports.
        That is the overlap every pull re-delivers, recognised without reading it back.

        Returns the items to apply, the samples skipped, and the digests to remember once
        the kept items are applied (recent items only, see :attr:`remember_items_ns`).
        """
        horizon = self.remember_items_ns
        newest: dict[tuple[str, str], int] = {}
        for it in items:
            k = (it.node_id, it.env)
            if k not in newest or it.collected_at_ns > newest[k]:
                newest[k] = it.collected_at_ns
        keys = list(dict.fromkeys((it.collected_at_ns, it.node_id, it.env) for it in items))
        sql = (
            "SELECT d.collected_at_ns, d.node_id, d.env, d.digest FROM k JOIN item_digests d"
            " ON d.collected_at_ns = k.t AND d.node_id = k.node_id AND d.env = k.env"
        )
        cols: list[KeyCol] = [("t", "bigint"), ("node_id", "text"), ("env", "text")]
        stored = {
            (int(r[0]), r[1], r[2]): bytes(r[3]) for r in self._keyset_query(sql, "k", cols, keys)
        }
        kept: list[Item] = []
        skipped = 0
        remember: dict[ItemKey, bytes] = {}
        for it in items:
            key = (it.collected_at_ns, it.node_id, it.env)
            known = stored.get(key)
            recent = (
                horizon is not None and it.collected_at_ns >= newest[(it.node_id, it.env)] - horizon
            )
            if known is None and not recent:
                kept.append(it)
                continue
            digest = item_digest(it)
            if digest is not None and digest == known:
                skipped += len(it.samples)
                continue
            kept.append(it)
            if recent and digest is not None:
                remember[key] = digest
        return kept, skipped, remember

"""Observations: the series a page touches, their heads, and the stored windows of late ones.

Hot path per page: one read of the series rows (heads) of every touched series; exact
re-deliveries of stored observations (the previous pull's overlap) dropped by one
exact-key read of the runs holding them (``idle.py``); one read of the stored windows of
the genuinely late series only. Never a query per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

from billing_cli.core.types import Observation
from billing_cli.store.dialect import KeyCol, Row
from billing_cli.store.plumbing import StoreBase
from billing_cli.store.write.grouping import SERIES_COLS, RawKey, Series, series_of
from billing_cli.store.write.idle import ItemTimes, holds_point

_SCAN_MIN = 256  # keys of one (node_id, env) in a page before the series range scan pays


def late_row(series_id: int, obs: list[Observation]) -> Row:
    ts = [o.collected_at_ns for o in obs]
    return (series_id, min(ts), max(ts))


class ObservationsPart(StoreBase):
    """Series, heads and late windows."""

    def _load_series(
        self, per_key: dict[RawKey, list[Observation]], emails: dict[RawKey, str]
    ) -> dict[RawKey, Series]:
        cols: list[KeyCol] = [
            ("node_id", "text"),
            ("env", "text"),
            ("uuid", "text"),
            ("inbound_tag", "text"),
        ]
        sql = (
            f"SELECT {SERIES_COLS} FROM k JOIN series s ON s.node_id = k.node_id"
            " AND s.env = k.env AND s.uuid = k.uuid AND s.inbound_tag = k.inbound_tag"
            f" ORDER BY s.series_id{self.db.lock_series}"
        )

        def load(keys: Sequence[RawKey]) -> dict[RawKey, Series]:
            found: dict[RawKey, Series] = {}
            for r in self._keyset_query(sql, "k", cols, keys):
                row = series_of(r)
                found[row.key] = row
            return found

        series: dict[RawKey, Series] = {}
        rest: list[RawKey] = list(per_key)
        if self.db.scan_series and len(per_key) >= _SCAN_MIN:
            groups: dict[tuple[str, str], int] = {}
            for k in per_key:
                g = (k[0], k[1])
                groups[g] = groups.get(g, 0) + 1
            scanned: set[tuple[str, str]] = set()
            for (node, env), n in groups.items():
                if n < _SCAN_MIN:
                    continue
                # Bounded waste: a node with more than twice the series the page names
                # falls back to the key-set join.
                rows = self.db.execute(
                    f"SELECT {SERIES_COLS} FROM series s WHERE s.node_id = ? AND s.env = ? LIMIT ?",
                    (node, env, 2 * n + 1),
                )
                if len(rows) > 2 * n:
                    continue
                scanned.add((node, env))
                for r in rows:
                    if r[1:5] in per_key:
                        row = series_of(r)
                        series[row.key] = row
            if scanned:
                rest = [k for k in per_key if (k[0], k[1]) not in scanned]
        if rest:
            series.update(load(rest))
        missing = [k for k in per_key if k not in series]
        if missing:
            self.db.executemany(
                "INSERT INTO series (node_id, env, uuid, inbound_tag, email) VALUES (?,?,?,?,?)"
                " ON CONFLICT (node_id, env, uuid, inbound_tag) DO NOTHING",
                [(*k, emails[k]) for k in missing],
            )
            series.update(load(missing))
        # A series keeps the email of its latest observation (by collected_at): only a
        # page that moves the head past the stored one renames, so re-deliveries and late
        # items never bring an old email back, whatever the delivery order.
        renamed = [
            (emails[k], s.series_id)
            for k, s in series.items()
            if emails[k]
            and emails[k] != s.email
            and (s.head is None or max(o[0] for o in per_key[k]) > s.head.collected_at_ns)
        ]
        if renamed:
            self.db.executemany("UPDATE series SET email = ? WHERE series_id = ?", renamed)
        return series

    def _drop_redelivered(
        self,
        per_key: dict[RawKey, list[Observation]],
        series: dict[RawKey, Series],
        ctx: ItemTimes,
    ) -> tuple[int, list[Row]]:
        """Remove exact re-deliveries of stored observations from ``per_key``; return how
        many were removed and the late series left: ``(series_id, min t, max t)`` of each
        series that still has an observation at or before its head.

        Per series, the observations at or before the head are checked against the stored
        rows with the same ``collected_at`` (the head itself needs no query; the others
        come from one exact-key read). Only when *all* of them are identical to stored
        rows are they removed: then the merged series is the stored one plus the
        observations after the head, so metering the rest against the head alone gives
        exactly what the full window diff would (the duplicates count the same, too).
        Any missing or different stored row leaves the series untouched (full window
        diff: a genuine late item or a conflict). A series left with nothing is dropped.
        """
        candidates: list[tuple[RawKey, Observation, int]] = []  # (key, head, n at/before)
        wanted: list[Row] = []
        late: list[Row] = []
        for key, obs in per_key.items():
            sid, _, head, _ = series[key]
            if head is None:
                continue
            head_t = head.collected_at_ns
            early = [o for o in obs if o.collected_at_ns <= head_t]
            if not early:
                continue
            ok = True
            before_head: list[Row] = []
            for o in early:
                if o.collected_at_ns == head_t:
                    if o != head:
                        ok = False
                        break
                else:
                    before_head.append((sid, o.collected_at_ns))
            if ok:
                candidates.append((key, head, len(early)))
                wanted.extend(before_head)
            else:
                late.append(late_row(sid, obs))
        if not candidates:
            return 0, late
        stored: dict[tuple[int, int], Observation] = {}
        if wanted:
            # The run starting at or before each time, and whether it holds a point there.
            sql = (
                "SELECT k.sid, k.t, o.collected_at_ns, o.until_ns, o.uplink_total,"
                " o.downlink_total, o.counter_epoch FROM k JOIN observations o"
                " ON o.series_id = k.sid AND o.collected_at_ns = (SELECT max(p.collected_at_ns)"
                " FROM observations p WHERE p.series_id = k.sid AND p.collected_at_ns <= k.t)"
            )
            cols: list[KeyCol] = [("sid", "bigint"), ("t", "bigint")]
            heads = {s.series_id: s for s in series.values()}
            for r in self._keyset_query(sql, "k", cols, list(dict.fromkeys(wanted))):
                sid, t, start = int(r[0]), int(r[1]), int(r[2])
                srow = heads[sid]
                assert srow.head is not None
                end = srow.head.collected_at_ns if r[3] is None else int(r[3])
                if holds_point(start, end, t, (srow.key[0], srow.key[1]), ctx):
                    stored[(sid, t)] = Observation(t, int(r[4]), int(r[5]), r[6])
        dropped = 0
        for key, head, n_early in candidates:
            head_t = head.collected_at_ns
            sid = series[key].series_id
            obs = per_key[key]
            rest: list[Observation] = []
            for o in obs:
                t = o.collected_at_ns
                if t > head_t:
                    rest.append(o)
                elif t < head_t and stored.get((sid, t)) != o:
                    break  # not an exact re-delivery: keep the series for the full diff
            else:
                dropped += n_early
                if rest:
                    per_key[key] = rest
                else:
                    del per_key[key]
                continue
            late.append(late_row(sid, obs))
        return dropped, late

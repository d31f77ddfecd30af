"""Runs of equal totals: an idle sample costs no row (DESIGN §4, §6; issue 12 point 2).

**The representation.** An ``observations`` row is the start of a *run*: the series was
present, with these totals and epoch, in every item of its ``(node_id, env)`` whose
``collected_at`` lies in ``[start, end]``; ``end`` is ``until_ns``, or the series head for
the series' latest row (``until_ns`` NULL: the *open* run). ``node_items`` records the time
of every applied item of a node. The observations a store that keeps every sample would
hold for a series are exactly its *points*: each run's start and end, and every recorded
item time strictly inside it. So an idle in-order sample (equal totals, no item of the
node between the head and it) only moves the head, which ``update_heads`` writes anyway.

**Keeping the runs true.** Three rules, each applied in bulk per page:

* extension: a new sample extends the open run only when it equals the head and no item
  of its node lies strictly between the head's time and its own (else the series was
  absent from that item: a new row, same totals);
* a new item time that falls strictly inside runs (a late item) splits every such run of
  its node, present in the item or not, around it (:meth:`IdlePart._split_runs`): the runs
  then claim exactly the points they claimed before, and the series present in the item
  get their observation there like any late observation;
* a late observation (inside the stored history, never inside a run after the split) is
  a run of its own.

**Metering** sees the points: a late series' stored window is built from its runs as
explicit observations — for every new time its point there (a re-delivery is a duplicate,
other totals a conflict) and the points just before and after it (so a late sample splits
the same delta into the same minutes). That subset gives
:func:`~billing_cli.core.metering.diff_series` the same result as all the points between:
a new observation's neighbours are the same in both, the pair it breaks is consecutive in
both, and every other pair of the subset is in both the stored and the merged window, so
it cancels (anomalies included: they are new only when their pair is). A long run is
never expanded, whatever the window's span.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import NamedTuple

from billing_cli.core.types import Observation
from billing_cli.store.dialect import KeyCol, Row
from billing_cli.store.plumbing import StoreBase

NodeKey = tuple[str, str]  # (node_id, env)
_ITEM_COLS: list[KeyCol] = [("node_id", "text"), ("env", "text"), ("t", "bigint")]
# (series_id, start, until or None, uplink, downlink, epoch, run_id, source_id)
RUN_COLS = (
    "o.series_id, o.collected_at_ns, o.until_ns, o.uplink_total, o.downlink_total,"
    " o.counter_epoch, o.run_id, o.source_id"
)


class Run(NamedTuple):
    start: int
    end: int  # inclusive; the head's time for the open run
    value: Observation  # at ``start``
    open: bool


class ItemTimes:
    """The item times of the nodes a page touches: stored ones around the times asked
    for (one bulk read), and the page's own."""

    def __init__(self, page: dict[NodeKey, set[int]]) -> None:
        self.page = {k: sorted(v) for k, v in page.items()}
        self.has: set[tuple[str, str, int]] = set()
        self.pred: dict[tuple[str, str, int], int | None] = {}
        self.succ: dict[tuple[str, str, int], int | None] = {}
        self.new: dict[NodeKey, list[int]] = {}

    def stored(self, node: NodeKey, t: int) -> bool:
        return (*node, t) in self.has

    def pred_stored(self, node: NodeKey, t: int) -> int | None:
        return self.pred[(*node, t)]

    def succ_stored(self, node: NodeKey, t: int) -> int | None:
        return self.succ[(*node, t)]

    def succ_all(self, node: NodeKey, t: int) -> int | None:
        """The first item time after ``t``, stored or in the page (``t`` was asked for)."""
        best = self.succ[(*node, t)]
        times = self.page.get(node, [])
        i = bisect_right(times, t)
        if i < len(times) and (best is None or times[i] < best):
            best = times[i]
        return best


def holds_point(start: int, end: int, t: int, node: NodeKey, ctx: ItemTimes) -> bool:
    """Whether the run ``[start, end]`` of a series of ``node`` stands for an observation
    at ``t``: its start, its end, or a stored item time strictly inside it."""
    return start <= t <= end and (t in (start, end) or ctx.stored(node, t))


def _runs_of(rows: Iterable[Row], head_t: int | None) -> list[Run]:
    """Rows of one series (``RUN_COLS`` order from column 1, sorted by start) as runs."""
    out: list[Run] = []
    for r in rows:
        until = r[2]
        is_open = until is None
        end = head_t if is_open else until
        assert end is not None
        out.append(
            Run(int(r[1]), int(end), Observation(int(r[1]), int(r[3]), int(r[4]), r[5]), is_open)
        )
    return out


class IdlePart(StoreBase):
    """Item times, splits of runs by late items, and the stored windows as points."""

    def _item_times(
        self, page: dict[NodeKey, set[int]], heads: Iterable[tuple[NodeKey, int]]
    ) -> ItemTimes:
        """One bulk read: for each page time and each head time asked for, whether it is a
        stored item time and the stored item times just before and after it."""
        ctx = ItemTimes(page)
        keys: dict[tuple[str, str, int], None] = {}
        for node, times in ctx.page.items():
            for t in times:
                keys[(*node, t)] = None
        for node, t in heads:
            keys[(*node, t)] = None
        if not keys:
            return ctx
        sql = (
            "SELECT k.node_id, k.env, k.t,"
            " (SELECT count(*) FROM node_items i WHERE i.node_id = k.node_id AND i.env = k.env"
            "  AND i.collected_at_ns = k.t),"
            " (SELECT max(i.collected_at_ns) FROM node_items i WHERE i.node_id = k.node_id"
            "  AND i.env = k.env AND i.collected_at_ns < k.t),"
            " (SELECT min(i.collected_at_ns) FROM node_items i WHERE i.node_id = k.node_id"
            "  AND i.env = k.env AND i.collected_at_ns > k.t)"
            " FROM k"
        )
        for r in self._keyset_query(sql, "k", _ITEM_COLS, list(keys)):
            key = (r[0], r[1], int(r[2]))
            if int(r[3]):
                ctx.has.add(key)
            ctx.pred[key] = None if r[4] is None else int(r[4])
            ctx.succ[key] = None if r[5] is None else int(r[5])
        for node, times in ctx.page.items():
            new = [t for t in times if (*node, t) not in ctx.has]
            if new:
                ctx.new[node] = new
        return ctx

    def _record_items(self, ctx: ItemTimes) -> None:
        rows = [(*node, t) for node, times in ctx.new.items() for t in times]
        if rows:
            self.db.executemany(
                "INSERT INTO node_items (node_id, env, collected_at_ns) VALUES (?,?,?)"
                " ON CONFLICT (node_id, env, collected_at_ns) DO NOTHING",
                rows,
            )

    def _split_runs(self, ctx: ItemTimes) -> None:
        """Split every run of a node that strictly contains one of the page's new item
        times around it, so no run claims the series present in an item it is not
        known to be in (one bulk read per node, only when a new time is late)."""
        deletes: list[Row] = []
        inserts: list[Row] = []
        for node, new in ctx.new.items():
            late = [t for t in new if ctx.succ_stored(node, t) is not None]
            if not late:
                continue
            lo, hi = late[0], late[-1]
            base = (
                f"SELECT {RUN_COLS}, s.head_collected_at_ns FROM series s"
                " JOIN observations o ON o.series_id = s.series_id"
            )
            rows = self.db.execute(
                base + " AND o.collected_at_ns = (SELECT max(p.collected_at_ns) FROM"
                " observations p WHERE p.series_id = s.series_id AND p.collected_at_ns < ?)"
                " WHERE s.node_id = ? AND s.env = ?"
                " UNION ALL " + base + " AND o.collected_at_ns >= ? AND o.collected_at_ns < ?"
                " WHERE s.node_id = ? AND s.env = ?",
                (lo, *node, lo, hi, *node),
            )
            for r in rows:
                start = int(r[1])
                is_open = r[2] is None
                end = int(r[8]) if is_open else int(r[2])
                i, j = bisect_right(late, start), bisect_left(late, end)
                inside = late[i:j]
                if not inside:
                    continue
                deletes.append((r[0], start))
                piece_start = start
                for t in inside:
                    pred, succ = ctx.pred_stored(node, t), ctx.succ_stored(node, t)
                    # The run's start is its point whatever compaction pruned before it.
                    if piece_start == start:
                        pred = start if pred is None else max(start, pred)
                    if pred is not None and pred >= piece_start:
                        inserts.append((r[0], piece_start, *r[3:8], pred))
                    assert succ is not None  # the run's end is a later stored item
                    piece_start = succ
                inserts.append((r[0], piece_start, *r[3:8], None if is_open else end))
        if deletes:
            self.db.executemany(
                "DELETE FROM observations WHERE series_id = ? AND collected_at_ns = ?", deletes
            )
            self.db.insert_observations(inserts)

    def _stored_points(
        self,
        late: list[Row],
        heads: dict[int, Observation],
        nodes: dict[int, NodeKey],
        new_times: dict[int, list[int]],
        ctx: ItemTimes,
    ) -> dict[int, list[Observation]]:
        """The stored window of each late series ``(series_id, min t, max t)`` as points,
        from its runs (one query for all of them)."""
        if not late:
            return {}
        sql = (
            f"SELECT {RUN_COLS} FROM w JOIN observations o ON o.series_id = w.sid"
            " AND o.collected_at_ns >= COALESCE((SELECT max(p.collected_at_ns) FROM observations p"
            "   WHERE p.series_id = w.sid AND p.collected_at_ns < w.lo), w.lo)"
            " AND o.collected_at_ns <= COALESCE((SELECT min(p.collected_at_ns) FROM observations p"
            "   WHERE p.series_id = w.sid AND p.collected_at_ns > w.hi), w.hi)"
            " ORDER BY o.series_id, o.collected_at_ns"
        )
        cols: list[KeyCol] = [("sid", "bigint"), ("lo", "bigint"), ("hi", "bigint")]
        by_series: dict[int, list[Row]] = {}
        for r in self._keyset_query(sql, "w", cols, late):
            by_series.setdefault(int(r[0]), []).append(r)
        out: dict[int, list[Observation]] = {}
        for sid, rows in by_series.items():
            head = heads[sid]
            runs = _runs_of(rows, head.collected_at_ns)
            out[sid] = window_points(runs, nodes[sid], sorted(set(new_times[sid])), ctx)
        return out


def _at(run: Run, t: int) -> Observation:
    return Observation(t, run.value.uplink_total, run.value.downlink_total, run.value.counter_epoch)


def window_points(
    runs: list[Run], node: NodeKey, times: list[int], ctx: ItemTimes
) -> list[Observation]:
    """The points of ``runs`` that metering new observations at ``times`` needs: each
    time's point and its neighbours (see the module docstring)."""
    starts = [r.start for r in runs]
    pts: dict[int, Observation] = {}

    def containing(t: int) -> int:
        return bisect_right(starts, t) - 1  # the run starting at or before t, or -1

    def add(run: Run, t: int) -> None:
        pts[t] = _at(run, t)

    for t in times:
        k = containing(t)
        run = runs[k] if k >= 0 else None
        # the point at t
        if run is not None and holds_point(run.start, run.end, t, node, ctx):
            add(run, t)
        # the point before t
        if run is not None:
            if run.start < t:
                if t <= run.end:
                    p = ctx.pred_stored(node, t)
                    add(run, run.start if p is None else max(run.start, p))
                else:
                    add(run, run.end)
            elif k >= 1:
                add(runs[k - 1], runs[k - 1].end)
        # the point after t
        if run is not None and t < run.end:
            s = ctx.succ_stored(node, t)
            add(run, run.end if s is None else min(run.end, s))
        elif k + 1 < len(runs):
            add(runs[k + 1], runs[k + 1].start)
    return [pts[t] for t in sorted(pts)]

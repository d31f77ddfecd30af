"""Integrity events: conflicts, anomalies, rejections and identity mismatches.

Events found while a page is applied are written in the page's transaction by the write
model (``write/``), with the rows built here for rejections; this part records events found
outside an apply and lists, counts and acknowledges them. Events are never deleted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

import orjson

from billing_cli._time import now_ns
from billing_cli.core.types import Rejection
from billing_cli.store.base import IntegrityEvent, IntegrityKind
from billing_cli.store.dialect import Row
from billing_cli.store.plumbing import StoreBase

EVENT_SQL = (
    "INSERT INTO integrity_events (kind, node_id, env, uuid, inbound_tag, collected_at_ns,"
    " source_id, run_id, detail, created_at_ns) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
# Rejection and conflict events carry a fingerprint: the same finding delivered again (the
# overlap of every pull re-sends a bad or conflicting item every minute) is stored once.
REJECTION_EVENT_SQL = (
    "INSERT INTO integrity_events (kind, node_id, env, uuid, inbound_tag, collected_at_ns,"
    " source_id, run_id, detail, created_at_ns, fingerprint) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (fingerprint) DO NOTHING"
)
# At most this many rejection events per item (one per distinct reason); the rest of an
# item's reasons are summed up in one more.
MAX_REJECTION_EVENTS_PER_ITEM = 20


def fingerprinted(row: Row) -> Row:
    """An event row (``EVENT_SQL`` columns) with its fingerprint appended: a digest of
    what it says (kind, series, ``collected_at``, detail), not of when or by which run, so
    the same finding delivered again is stored once (``REJECTION_EVENT_SQL``)."""
    kind, node, env, uuid, tag, at = row[:6]
    detail = row[8]
    digest = hashlib.blake2b(
        orjson.dumps([kind, node, env, uuid, tag, at, detail]), digest_size=16
    ).digest()
    return (*row, digest)


def rejection_events(
    rejections: list[Rejection], source_id: str | None, run_id: int, now: int
) -> list[Row]:
    """Integrity-event rows for a batch's rejections: one per item and reason, with the
    number of samples it covers (not one per sample: 1,000 samples of an item with a bad
    ``collected_at`` are one event), at most :data:`MAX_REJECTION_EVENTS_PER_ITEM` per
    item. Each row ends with its fingerprint (what it says, not when or by which run)."""
    groups: dict[tuple[int | None, str, str, str], list[Rejection]] = {}
    for r in rejections:
        groups.setdefault((r.collected_at_ns, r.node_id, r.env, r.reason), []).append(r)
    per_item: dict[tuple[int | None, str, str], int] = {}
    overflow: dict[tuple[int | None, str, str], list[int]] = {}  # item -> [reasons, samples]
    rows: list[Row] = []

    def row(at: int | None, node: str, env: str, uuid: str, tag: str, detail: str) -> None:
        rows.append(
            fingerprinted(("rejected", node, env, uuid, tag, at, source_id, run_id, detail, now))
        )

    for (at, node, env, reason), members in groups.items():
        item = (at, node, env)
        n = per_item.get(item, 0)
        per_item[item] = n + 1
        if n >= MAX_REJECTION_EVENTS_PER_ITEM:
            slot = overflow.setdefault(item, [0, 0])
            slot[0] += 1
            slot[1] += len(members)
            continue
        if len(members) == 1:
            only = members[0]
            row(at, node, env, only.uuid, only.inbound_tag, reason)
        else:
            tags = {m.inbound_tag for m in members}
            row(at, node, env, "", tags.pop() if len(tags) == 1 else "",
                f"{reason} ({len(members)} samples)")  # fmt: skip
    for (at, node, env), (reasons, samples) in overflow.items():
        row(at, node, env, "", "", f"{samples} more rejected samples of this item, "
            f"{reasons} other reasons")  # fmt: skip
    return rows


class IntegrityPart(StoreBase):
    """Events recorded, listed, counted and acknowledged outside an apply."""

    def integrity_event_counts(self) -> dict[str, int]:
        with self._guard("read integrity events"):
            rows = self.db.execute(
                "SELECT COALESCE(source_id, ''), count(*) FROM integrity_events"
                " WHERE acknowledged_at_ns IS NULL GROUP BY COALESCE(source_id, '')"
            )
        return {r[0]: int(r[1]) for r in rows}

    def record_integrity_event(
        self,
        kind: IntegrityKind,
        *,
        node_id: str,
        env: str,
        uuid: str = "",
        inbound_tag: str = "",
        collected_at_ns: int | None = None,
        source_id: str | None = None,
        run_id: int | None = None,
        detail: str,
    ) -> None:
        row = (kind, node_id, env, uuid, inbound_tag, collected_at_ns, source_id, run_id)
        with self._guard("record an integrity event"), self._tx():
            self.db.execute(EVENT_SQL, (*row, detail, now_ns()))

    @staticmethod
    def _source_cond(
        source_id: str | Sequence[str] | None, conds: list[str], params: list[Any]
    ) -> None:
        if source_id is None:
            return
        ids = [source_id] if isinstance(source_id, str) else list(dict.fromkeys(source_id))
        conds.append(f"source_id IN ({','.join('?' * len(ids))})" if ids else "1 = 0")
        params.extend(ids)

    def record_identity_mismatch(
        self,
        *,
        source_id: str,
        node_id: str,
        env: str,
        collected_at_ns: int | None,
        run_id: int | None,
        detail: str,
    ) -> bool:
        with self._guard("record an integrity event"), self.db.transaction():
            last = self.db.execute(
                "SELECT node_id, env, created_at_ns FROM integrity_events WHERE source_id = ?"
                " AND kind = 'identity_mismatch' ORDER BY id DESC LIMIT 1",
                (source_id,),
            )
            if last and (last[0][0], last[0][1]) == (node_id, env):
                ok = self.db.execute(
                    "SELECT last_succeeded_at_ns FROM source_checkpoints WHERE source_id = ?",
                    (source_id,),
                )
                succeeded = ok[0][0] if ok else None
                if succeeded is None or int(succeeded) < int(last[0][2]):
                    return False  # the same claim, still going on: recorded already
            row = ("identity_mismatch", node_id, env, "", "", collected_at_ns, source_id, run_id)
            self.db.execute(EVENT_SQL, (*row, detail, now_ns()))
            return True

    def iter_integrity_events(
        self,
        source_id: str | Sequence[str] | None = None,
        kind: IntegrityKind | None = None,
        open_only: bool = True,
        since_ns: int | None = None,
    ) -> Iterator[IntegrityEvent]:
        conds: list[str] = []
        params: list[Any] = []
        self._source_cond(source_id, conds, params)
        if kind is not None:
            conds.append("kind = ?")
            params.append(kind)
        if open_only:
            conds.append("acknowledged_at_ns IS NULL")
        if since_ns is not None:
            conds.append("created_at_ns >= ?")
            params.append(since_ns)
        sql = (
            "SELECT id, kind, node_id, env, uuid, inbound_tag, collected_at_ns, source_id,"
            " run_id, detail, created_at_ns, acknowledged_at_ns FROM integrity_events"
            f" WHERE {' AND '.join(conds) or '1 = 1'} ORDER BY id"
        )
        # Events are few; read them at once so no cursor outlives the lock.
        with self._guard("read integrity events"):
            rows = self.db.execute(sql, params)
        for r in rows:
            yield IntegrityEvent(
                id=int(r[0]),
                kind=cast(IntegrityKind, r[1]),
                node_id=r[2],
                env=r[3],
                uuid=r[4],
                inbound_tag=r[5],
                collected_at_ns=None if r[6] is None else int(r[6]),
                source_id=r[7],
                run_id=None if r[8] is None else int(r[8]),
                detail=r[9],
                created_at_ns=int(r[10]),
                acknowledged_at_ns=None if r[11] is None else int(r[11]),
            )

    def unknown_integrity_event_ids(self, ids: Sequence[int]) -> list[int]:
        """The ids among ``ids`` that no event has (events are never deleted)."""
        known: set[int] = set()
        unique = sorted(set(ids))
        with self._guard("read integrity events"):
            for i in range(0, len(unique), 10_000):
                part = unique[i : i + 10_000]
                marks = ",".join("?" * len(part))
                rows = self.db.execute(
                    f"SELECT id FROM integrity_events WHERE id IN ({marks})", part
                )
                known.update(int(r[0]) for r in rows)
        return [i for i in unique if i not in known]

    def acknowledge_integrity_events(
        self,
        ids: list[int] | None,
        *,
        source_id: str | Sequence[str] | None = None,
        at_ns: int,
    ) -> int:
        conds = ["acknowledged_at_ns IS NULL"]
        params: list[Any] = [at_ns]
        self._source_cond(source_id, conds, params)
        sql = f"UPDATE integrity_events SET acknowledged_at_ns = ? WHERE {' AND '.join(conds)}"
        # Only rows still open are touched, so acknowledging twice keeps the first time.
        n = 0
        with self._guard("acknowledge integrity events"), self._tx():
            if ids is None:
                return len(self.db.execute(sql + " RETURNING id", params))
            unique = sorted(set(ids))
            step = 10_000  # under SQLite's host parameter limit
            for i in range(0, len(unique), step):
                part = unique[i : i + step]
                marks = ",".join("?" * len(part))
                n += len(self.db.execute(f"{sql} AND id IN ({marks}) RETURNING id", params + part))
        return n

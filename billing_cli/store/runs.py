"""Runs and checkpoints: what each run did, and how far each source has been collected.

A run row is written when a command starts (with the process that runs it, so a killed
run shows as abandoned) and finished with its outcome and per-source counts. A source's
checkpoint moves inside the transaction of the page it covers (``write/``); here are the
reads and the bookkeeping written in their own transactions (failures, successes).
"""

from __future__ import annotations

import json
import os
from typing import cast

from billing_cli import _process
from billing_cli._time import now_ns
from billing_cli.store.base import Checkpoint, RunKind, RunOutcome, RunRecord, SourceRunResult
from billing_cli.store.dialect import Row
from billing_cli.store.plumbing import StoreBase


class RunsPart(StoreBase):
    """``runs``, ``run_sources`` and ``source_checkpoints``."""

    def start_run(self, kind: RunKind, sources: list[str], actor: str | None = None) -> int:
        # The process is recorded so that a run killed before it could finish is seen as
        # abandoned (its process is gone) rather than as running forever.
        with self._guard("start a run"), self._tx():
            rows = self.db.execute(
                "INSERT INTO runs (kind, sources, started_at_ns, actor, pid, host)"
                " VALUES (?,?,?,?,?,?) RETURNING run_id",
                (kind, json.dumps(sources), now_ns(), actor, os.getpid(), _process.this_host()),
            )
            return int(rows[0][0])

    def finish_run(self, run_id: int, outcome: str, per_source: dict[str, SourceRunResult]) -> None:
        with self._guard("finish a run"), self._tx():
            self.db.execute(
                "UPDATE runs SET finished_at_ns = ?, outcome = ? WHERE run_id = ?",
                (now_ns(), outcome, run_id),
            )
            self.db.executemany(
                "INSERT INTO run_sources (run_id, source_id, kind, started_at_ns, finished_at_ns,"
                " outcome, counts, error, top_rejection) VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (run_id, source_id) DO UPDATE SET kind = excluded.kind,"
                " started_at_ns = excluded.started_at_ns, finished_at_ns = excluded.finished_at_ns,"
                " outcome = excluded.outcome, counts = excluded.counts, error = excluded.error,"
                " top_rejection = excluded.top_rejection",
                [
                    (
                        run_id,
                        sid,
                        r.kind,
                        r.started_at_ns,
                        r.finished_at_ns,
                        r.outcome,
                        json.dumps(r.counts, sort_keys=True),
                        r.error,
                        r.top_rejection,
                    )
                    for sid, r in per_source.items()
                ],
            )

    def last_source_results(self) -> dict[str, SourceRunResult]:
        with self._guard("read run results"):
            rows = self.db.execute(
                "SELECT r.run_id, r.source_id, r.kind, r.started_at_ns, r.finished_at_ns,"
                " r.outcome, r.counts, r.error, r.top_rejection FROM run_sources r WHERE r.run_id ="
                " (SELECT max(r2.run_id) FROM run_sources r2 WHERE r2.source_id = r.source_id)"
            )
        return {
            row[1]: SourceRunResult(
                run_id=int(row[0]),
                source_id=row[1],
                kind=cast(RunKind, row[2]),
                started_at_ns=int(row[3]),
                finished_at_ns=int(row[4]),
                outcome=cast(RunOutcome, row[5]),
                counts={str(k): int(v) for k, v in json.loads(row[6]).items()},
                error=row[7],
                top_rejection=row[8],
            )
            for row in rows
        }

    def unfinished_runs(self) -> list[RunRecord]:
        with self._guard("read runs"):
            rows = self.db.execute(
                "SELECT run_id, kind, sources, started_at_ns, pid, host FROM runs"
                " WHERE outcome IS NULL ORDER BY run_id"
            )
        out: list[RunRecord] = []
        for r in rows:
            pid = None if r[4] is None else int(r[4])
            started = int(r[3])
            out.append(
                RunRecord(
                    run_id=int(r[0]),
                    kind=cast(RunKind, r[1]),
                    sources=[str(x) for x in json.loads(r[2])],
                    started_at_ns=started,
                    pid=pid,
                    host=r[5],
                    process_gone=_process.process_gone(pid, r[5], started),
                )
            )
        return out

    def abandoned_runs(self) -> list[RunRecord]:
        return [r for r in self.unfinished_runs() if r.process_gone]

    # --- checkpoints ----------------------------------------------------------------------

    _CP_COLS = (
        "source_id, node_id, env, last_successful_until_ns, last_cursor, last_attempted_at_ns,"
        " last_succeeded_at_ns, last_error, consecutive_failures, newest_collected_at_ns,"
        " first_succeeded_at_ns"
    )

    @staticmethod
    def _checkpoint(row: Row) -> Checkpoint:
        return Checkpoint(
            source_id=row[0],
            node_id=row[1],
            env=row[2],
            last_successful_until_ns=None if row[3] is None else int(row[3]),
            last_cursor=row[4],
            last_attempted_at_ns=None if row[5] is None else int(row[5]),
            last_succeeded_at_ns=None if row[6] is None else int(row[6]),
            last_error=row[7],
            consecutive_failures=int(row[8]),
            newest_collected_at_ns=None if row[9] is None else int(row[9]),
            first_succeeded_at_ns=None if row[10] is None else int(row[10]),
        )

    def get_checkpoint(self, source_id: str) -> Checkpoint | None:
        with self._guard("read a checkpoint"):
            rows = self.db.execute(
                f"SELECT {self._CP_COLS} FROM source_checkpoints WHERE source_id = ?",
                (source_id,),
            )
        return self._checkpoint(rows[0]) if rows else None

    def list_checkpoints(self) -> list[Checkpoint]:
        with self._guard("read checkpoints"):
            rows = self.db.execute(
                f"SELECT {self._CP_COLS} FROM source_checkpoints"
                f" ORDER BY source_id{self.db.order_collate}"
            )
        return [self._checkpoint(r) for r in rows]

    def record_failure(
        self, source_id: str, node_id: str, env: str, attempted_at_ns: int, error: str
    ) -> None:
        with self._guard("record a failure"), self._tx():
            self.db.execute(
                "INSERT INTO source_checkpoints (source_id, node_id, env, last_attempted_at_ns,"
                " last_error, consecutive_failures) VALUES (?,?,?,?,?,1)"
                " ON CONFLICT (source_id) DO UPDATE SET node_id = excluded.node_id,"
                " env = excluded.env, last_attempted_at_ns = excluded.last_attempted_at_ns,"
                " last_error = excluded.last_error,"
                " consecutive_failures = source_checkpoints.consecutive_failures + 1",
                (source_id, node_id, env, attempted_at_ns, error),
            )

    def record_success(self, source_id: str, node_id: str, env: str, at_ns: int) -> None:
        with self._guard("record a success"), self._tx():
            self.db.execute(
                "INSERT INTO source_checkpoints (source_id, node_id, env, last_succeeded_at_ns,"
                " first_succeeded_at_ns, consecutive_failures) VALUES (?,?,?,?,?,0)"
                " ON CONFLICT (source_id) DO UPDATE SET node_id = excluded.node_id,"
                " env = excluded.env, last_succeeded_at_ns = excluded.last_succeeded_at_ns,"
                " first_succeeded_at_ns = COALESCE(source_checkpoints.first_succeeded_at_ns,"
                " excluded.first_succeeded_at_ns),"
                " last_error = NULL, consecutive_failures = 0",
                (source_id, node_id, env, at_ns, at_ns),
            )

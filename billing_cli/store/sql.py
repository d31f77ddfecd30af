"""``SqlStore``: the :class:`~billing_cli.store.base.Store` of both back ends, from its parts.

The parts, each a module of its own over the shared plumbing (``plumbing.py``):

* the write model — ``write/`` (grouping, observations, buckets, rating and postings);
* reads — ``reads.py``; runs and checkpoints — ``runs.py``; integrity events —
  ``integrity.py``; accounting periods — ``_periods.py``; dry runs — ``dry_run.py``;
* underneath, the SQLite and PostgreSQL dialects (``dialect.py``, ``sqlite.py``,
  ``postgres.py``), which only know *how* to talk to their database.

Here: opening (the schema check or migration) and the composition.
"""

from __future__ import annotations

from collections.abc import Iterator

from billing_cli._errors import StoreError
from billing_cli._time import now_ns
from billing_cli.core.statement import Statement
from billing_cli.pricing import Pricing
from billing_cli.store import _periods
from billing_cli.store.base import (
    PeriodClose,
    PeriodTotals,
    RerateReport,
    RowFilter,
)
from billing_cli.store.dialect import Dialect
from billing_cli.store.dry_run import DryRunPart
from billing_cli.store.integrity import IntegrityPart
from billing_cli.store.reads import ReadsPart
from billing_cli.store.runs import RunsPart
from billing_cli.store.schema import PARTITIONED_VERSION, SCHEMA_VERSION, migrations


class SqlStore(DryRunPart, ReadsPart, RunsPart, IntegrityPart):
    """The :class:`~billing_cli.store.base.Store` implementation for both back ends."""

    def __init__(
        self, db: Dialect, url_for_display: str, *, read_only: bool = False, migrate: bool = True
    ) -> None:
        self._init_base(db, url_for_display, read_only=read_only)
        try:
            if read_only or not migrate:
                # Readers never create, migrate or lock anything (DESIGN §8); nor does a
                # dry run, which writes only inside transactions it rolls back.
                with self._guard("read the schema version"):
                    self._check_schema()
            else:
                with self._guard("migrate the schema"):
                    self._migrate()
            # Either way the schema is now at this billing's version.
            db.partitioned = db.name == "postgres" and SCHEMA_VERSION >= PARTITIONED_VERSION
        except BaseException:
            # A refused open (schema too new, locked) must not leak its connection.
            db.close()
            raise

    # --- schema ---------------------------------------------------------------------------

    def _too_new(self, current: int) -> StoreError:
        return StoreError(
            f"database {self.url_for_display} has schema version {current}, newer than "
            f"this billing supports ({SCHEMA_VERSION}); upgrade billing"
        )

    def _check_schema(self) -> None:
        """A read-only open: the schema must be there, at this billing's version.

        Readers never migrate (they never write); an older version is migrated by the next
        collect or ingest, and until then a read says so instead of reading columns that
        are not there yet.
        """
        current = 0
        if self.db.has_table("schema_version"):
            rows = self.db.execute("SELECT max(version) FROM schema_version")
            current = int(rows[0][0] or 0)
        if current == 0:
            raise StoreError(
                f"no billing data in {self.url_for_display}: it has no billing tables "
                "(run `billing collect` or `billing ingest FILE` against it first, or check --db)"
            )
        if current > SCHEMA_VERSION:
            raise self._too_new(current)
        if current < SCHEMA_VERSION:
            raise StoreError(
                f"database {self.url_for_display} has schema version {current}, older than "
                f"this billing ({SCHEMA_VERSION}): the next `billing collect` or `billing "
                "ingest` migrates it (read commands never write)"
            )

    def _migrate(self) -> None:
        # Looked at first without a write transaction: every collect opens the store, and
        # one that queued for the write lock (behind a long writer) only to find the schema
        # current would fail as "could not migrate the schema: database is locked".
        if self.db.has_table("schema_version"):
            rows = self.db.execute("SELECT max(version) FROM schema_version")
            current = int(rows[0][0] or 0)
            if current == SCHEMA_VERSION:
                return
            if current > SCHEMA_VERSION:
                raise self._too_new(current)
        with self.db.transaction():
            self.db.migration_lock()
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = self.db.execute("SELECT max(version) FROM schema_version")
            current = int(rows[0][0] or 0)
            if current > SCHEMA_VERSION:
                raise self._too_new(current)
            for version, statements in migrations(self.db.name):
                if version <= current:
                    continue
                for stmt in statements:
                    self.db.execute(stmt)
                self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    # --- accounting periods ---------------------------------------------------------------

    def closed_periods(self) -> list[PeriodClose]:
        return _periods.closed_periods(self)

    def close_period(
        self, period_start_ns: int, *, actor: str, now_ns: int
    ) -> tuple[PeriodClose, bool]:
        return _periods.close_period(self, period_start_ns, actor=actor, now_ns=now_ns)

    def period_totals(self) -> list[PeriodTotals]:
        return _periods.period_totals(self)

    def statement(self, period_start_ns: int, flt: RowFilter) -> Statement:
        return _periods.statement(self, period_start_ns, flt)

    def check_rerate(self, period_start_ns: int, pricing: Pricing) -> None:
        _periods.check_rerate(self, period_start_ns, pricing)

    def iter_rerate(
        self, period_start_ns: int, pricing: Pricing, run_id: int, *, dry_run: bool
    ) -> Iterator[RerateReport]:
        return _periods.iter_rerate(
            self, period_start_ns, pricing, run_id, dry_run=dry_run, now_ns=now_ns()
        )

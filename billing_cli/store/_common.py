"""``SqlStore``: the :class:`~billing_cli.store.base.Store` of both back ends, from its parts.

The parts, each a module of its own over the shared plumbing (``plumbing.py``):

* the write model — ``write/`` (grouping, observations, buckets, rating and postings);
* reads — ``reads.py``; runs and checkpoints — ``runs.py``; integrity events —
  ``integrity.py``; accounting periods — ``_periods.py``; dry runs — ``dry_run.py``;
* underneath, the SQLite and PostgreSQL dialects (``dialect.py``, ``sqlite.py``,
  ``postgres.py``), which only know *how* to talk to their database.

Here: opening (the schema check or migration) and the dry-run driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from billing_cli._errors import StoreError
from billing_cli._time import now_ns
from billing_cli.core.statement import Statement
from billing_cli.pricing import Pricing
from billing_cli.store import _periods
from billing_cli.store.base import (
    ApplyReport,
    Batch,
    PeriodClose,
    PeriodTotals,
    RerateReport,
    RowFilter,
)
from billing_cli.store.dialect import Dialect, KeyCol, Row
from billing_cli.store.dry_run import _DryPage, _DryRun
from billing_cli.store.integrity import MAX_REJECTION_EVENTS_PER_ITEM, IntegrityPart
from billing_cli.store.plumbing import gc_paused
from billing_cli.store.reads import ReadsPart
from billing_cli.store.runs import RunsPart
from billing_cli.store.schema import SCHEMA_VERSION, migrations
from billing_cli.store.write import WriteModel
from billing_cli.store.write.grouping import REMEMBER_ITEMS_NS
from billing_cli.store.write.observations import _SCAN_MIN

__all__ = [
    "DRY_RUN_MAX_NEW",
    "MAX_REJECTION_EVENTS_PER_ITEM",
    "REMEMBER_ITEMS_NS",
    "_SCAN_MIN",
    "Dialect",
    "KeyCol",
    "Row",
    "SqlStore",
]

# A dry run re-applies its earlier pages' new observations before every page (see
# SqlStore.dry_run); past this many it stops rather than hold the lock for ever longer.
DRY_RUN_MAX_NEW = 1_000_000


class SqlStore(WriteModel, ReadsPart, RunsPart, IntegrityPart):
    """The :class:`~billing_cli.store.base.Store` implementation for both back ends."""

    def __init__(self, db: Dialect, url_for_display: str, *, read_only: bool = False) -> None:
        self._init_base(db, url_for_display, read_only=read_only)
        try:
            if read_only:
                # Readers never create, migrate or lock anything (DESIGN §8).
                with self._guard("read the schema version"):
                    self._check_schema()
            else:
                with self._guard("migrate the schema"):
                    self._migrate()
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

    # --- dry runs (see dry_run.py) ---------------------------------------------------------

    @contextmanager
    def _dry_run(self) -> Iterator[None]:
        if self._dry is not None:
            raise RuntimeError("dry runs do not nest")
        self._dry = _DryRun()
        try:
            yield
        finally:
            self._dry = None

    def dry_run(self) -> AbstractContextManager[None]:
        return self._dry_run()

    def apply(self, batch: Batch) -> ApplyReport:
        if self._dry is not None:
            return self._apply_dry(batch, self._dry)
        return super().apply(batch)

    def _apply_dry(self, batch: Batch, dry: _DryRun) -> ApplyReport:
        page = _DryPage(batch.pricing)
        with self._guard("apply a batch"), gc_paused(), self.db.rolled_back():
            for earlier in dry.pages:
                per_key = {k: list(v) for k, v in earlier.observations.items()}
                replay = Batch(items=[], run_id=0, pricing=earlier.pricing)
                self._apply_observations(
                    replay, per_key, dict(earlier.emails), ApplyReport(), [], now_ns()
                )
            report = self._apply(batch, capture=page)
        if page.observations:
            dry.new_observations += sum(len(v) for v in page.observations.values())
            if dry.new_observations > DRY_RUN_MAX_NEW:
                raise StoreError(
                    f"dry run stopped: more than {DRY_RUN_MAX_NEW:,} new observations (this "
                    "range was mostly never collected, and a dry run re-applies them for every "
                    "page); reconcile without --dry-run, or a shorter range"
                )
            dry.pages.append(page)
        return report

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

"""What every part of the store stands on: the connection, one lock, one error mapping.

:class:`StoreBase` holds the :class:`~billing_cli.store.dialect.Dialect`, the lock that
makes one operation run at a time (the collector may share a store between threads), the
guard that turns any database error into a one-line ``StoreError``, bulk key-set reads
and the write transaction (rolled back inside a dry run). The parts of the store — the
write model (``write/``), reads, runs and checkpoints, integrity events, periods, dry
runs — are mixins over it, composed into ``SqlStore``.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

from billing_cli._errors import StoreError
from billing_cli._interrupt import protected
from billing_cli.store.dialect import Dialect, KeyCol, Row

if TYPE_CHECKING:
    from billing_cli.store.dry_run import _DryRun


class StoreBase:
    """The connection and plumbing shared by every part of the store."""

    db: Dialect
    url_for_display: str
    read_only: bool
    _lock: threading.RLock
    _dry: _DryRun | None

    def _init_base(self, db: Dialect, url_for_display: str, *, read_only: bool) -> None:
        self.db = db
        self.url_for_display = url_for_display
        self.read_only = read_only
        # The collector may share one store between threads; one operation at a time.
        self._lock = threading.RLock()
        self._dry = None

    @contextmanager
    def _guard(self, what: str, *, lock: bool = True) -> Iterator[None]:
        # Readers that stream rows (iter_usage/iter_ledger) do not hold the lock while
        # suspended: a consumer may stop iterating at any point. Every other operation
        # ends (commits or rolls back) before a stop signal takes effect (_interrupt).
        with self._lock if lock else nullcontext(), protected() if lock else nullcontext():
            try:
                yield
            except self.db.errors as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise StoreError(
                    f"database {self.url_for_display}: could not {what}: {first}"
                ) from None
            except OverflowError:
                # SQLite's driver refuses ints outside 64 bits before the database sees them.
                raise StoreError(
                    f"database {self.url_for_display}: could not {what}: a value is outside"
                    " the 64-bit integer range (bytes < 2^63, amounts < 2^63 nano-units)"
                ) from None

    def _keyset_query(
        self, sql: str, name: str, cols: Sequence[KeyCol], rows: Sequence[Row]
    ) -> list[Row]:
        """Run ``WITH <keyset> <sql>`` over ``rows`` in chunks; concatenate the results."""
        out: list[Row] = []
        step = self.db.keyset_chunk
        for i in range(0, len(rows), step):
            frag, params = self.db.keyset(name, cols, rows[i : i + step])
            out.extend(self.db.execute(f"WITH {frag} {sql}", params))
        return out

    def _tx(self) -> AbstractContextManager[None]:
        """A write transaction; inside a dry run one that is rolled back at exit."""
        return self.db.rolled_back() if self._dry is not None else self.db.transaction()

    def close(self) -> None:
        self.db.close()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while a page is applied.

    A page allocates tens of thousands of small tuples and no reference cycles; without
    this, generation-0 collections keep re-scanning them (about a tenth of apply time).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

"""The store interface: SQLite and PostgreSQL implement it identically (DESIGN §6).

The collector, ``ingest``, ``reconcile`` and the read commands only ever talk to this
interface; a write always goes through :meth:`Store.apply`, which applies one batch of
items (observations, buckets, ledger postings, integrity events, checkpoint) in a single
transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from billing_cli.core.statement import Statement
from billing_cli.core.types import Item, Rejection, SeriesKey
from billing_cli.pricing import Pricing

RunKind = Literal["collect", "reconcile", "ingest", "demo", "period_close", "rerate"]
# How a source ended in a run: "interrupted" when the run was stopped (Ctrl-C, SIGTERM)
# before the source finished; "abandoned" is only ever shown, for a run whose process is
# gone without recording an outcome (killed).
RunOutcome = Literal["ok", "failed", "skipped", "interrupted", "abandoned"]
IntegrityKind = Literal["conflict", "anomaly", "rejected", "identity_mismatch", "beyond_retention"]
INTEGRITY_KINDS: tuple[IntegrityKind, ...] = (
    "conflict",
    "anomaly",
    "rejected",
    "identity_mismatch",
    "beyond_retention",
)
# The retention horizon of DESIGN §6 when the registry does not set one ([defaults]).
DEFAULT_RETENTION_NS = 35 * 86400 * 1_000_000_000


@dataclass(frozen=True)
class Checkpoint:
    """Per-source fetch progress (table ``source_checkpoints``)."""

    source_id: str
    node_id: str
    env: str
    last_successful_until_ns: int | None
    last_cursor: str | None
    last_attempted_at_ns: int | None
    last_succeeded_at_ns: int | None
    last_error: str | None
    consecutive_failures: int
    newest_collected_at_ns: int | None = None  # the newest item received (data freshness)
    first_succeeded_at_ns: int | None = None  # freshness reference until data arrives


@dataclass(frozen=True)
class CheckpointAdvance:
    """Checkpoint movement committed in the same transaction as the page it covers.

    ``last_successful_until_ns`` is ``None`` for a page in the middle of a chunk (only the
    cursor moves); it is set on the chunk's last page. A store never moves
    ``last_successful_until`` backwards (``max`` of old and new), nor
    ``newest_collected_at`` (the newest item the page delivered, None for none): the
    source's data freshness, which health measures lag from.
    """

    source_id: str
    node_id: str
    env: str
    last_cursor: str | None
    last_successful_until_ns: int | None
    attempted_at_ns: int
    newest_collected_at_ns: int | None = None


@dataclass
class BucketChange:
    """One bucket whose bytes changed in a batch (for reports; reconcile lists them)."""

    key: SeriesKey
    bucket_start_ns: int
    old_uplink: int
    old_downlink: int
    new_uplink: int
    new_downlink: int


@dataclass
class ApplyReport:
    """What one or more applied batches did. Adding two reports sums them."""

    items: int = 0
    samples: int = 0
    new_observations: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: int = 0
    beyond_retention: int = 0  # samples refused: older than the retention horizon
    anomalies: int = 0
    buckets_changed: int = 0
    bytes: int = 0  # net bytes (uplink + downlink) added to usage buckets
    postings: int = 0  # charge + adjustment rows appended to billing_ledger
    adjustments: int = 0  # of which adjustments
    adjustment_amount_nano: int = 0  # sum of adjustment amounts (10^-9 currency units)
    charged_amount_nano: int = 0  # sum of all posted amounts
    bucket_changes: list[BucketChange] = field(default_factory=list)
    rejection_reasons: dict[str, int] = field(default_factory=dict)  # reason -> samples

    @property
    def top_rejection(self) -> str | None:
        """The most frequent rejection reason (ties: the first seen), or None."""
        if not self.rejection_reasons:
            return None
        return max(self.rejection_reasons.items(), key=lambda kv: kv[1])[0]

    def __iadd__(self, other: ApplyReport) -> ApplyReport:
        for name in (
            "items",
            "samples",
            "new_observations",
            "duplicates",
            "conflicts",
            "rejected",
            "beyond_retention",
            "anomalies",
            "buckets_changed",
            "bytes",
            "postings",
            "adjustments",
            "adjustment_amount_nano",
            "charged_amount_nano",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bucket_changes.extend(other.bucket_changes)
        for reason, n in other.rejection_reasons.items():
            self.rejection_reasons[reason] = self.rejection_reasons.get(reason, 0) + n
        return self


@dataclass(frozen=True)
class Batch:
    """One unit of work for :meth:`Store.apply` (typically one exporter page)."""

    items: list[Item]
    run_id: int
    pricing: Pricing
    source_id: str | None = None
    rejections: list[Rejection] = field(default_factory=list)
    checkpoint: CheckpointAdvance | None = None
    collect_bucket_changes: bool = False  # reconcile wants the detailed list
    # Items older than ``max(cut, run start - retention)`` are refused (beyond_retention);
    # None: only those before the cut (compacted data), whatever their age. Every command
    # passes the registry's ``[defaults] retention``.
    retention_ns: int | None = None


@dataclass
class CompactReport:
    """What one compaction did (or, for a dry run, would do)."""

    ran: bool  # False: collect's daily cycle had nothing to do yet
    dry_run: bool
    cut_before_ns: int  # the horizon of compacted data before (0: never compacted)
    cut_ns: int  # ... and after; data older than it is refused
    target_ns: int  # the cut this cycle compacts to
    complete: bool  # every observation before target_ns is compacted
    observations_removed: int = 0
    item_digests_removed: int = 0
    series_kept: int = 0  # series whose last observation before the cut is kept (anchor)
    seconds: float = 0.0


@dataclass(frozen=True)
class RowFilter:
    """Filters of ``billing usage`` / ``billing ledger``; ``None`` means no filter."""

    node_id: str | None = None
    env: str | None = None
    uuid: str | None = None
    since_ns: int | None = None  # inclusive, on bucket_start
    until_ns: int | None = None  # exclusive, on bucket_start
    series_filters: tuple[tuple[str, str], ...] = ()  # (node_id, env) pairs for --source
    uuids: tuple[str, ...] = ()  # any of these accounts (besides ``uuid``)
    # ledger only: the accounting period (its start) and the posting time (created_at)
    period_start_ns: int | None = None
    posted_since_ns: int | None = None  # inclusive
    posted_until_ns: int | None = None  # exclusive


@dataclass(frozen=True)
class UsageRow:
    node_id: str
    env: str
    uuid: str
    inbound_tag: str
    bucket_start_ns: int
    uplink_bytes: int
    downlink_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.uplink_bytes + self.downlink_bytes


@dataclass(frozen=True)
class LedgerRow:
    entry_id: int
    node_id: str
    env: str
    uuid: str
    inbound_tag: str
    bucket_start_ns: int
    revision: int
    entry_type: Literal["charge", "adjustment"]
    rated_bytes: int
    amount_nano: int
    currency: str
    pricing_rule_version: str
    run_id: int
    created_at_ns: int
    period_start_ns: int  # the accounting period (normally the bucket's month)
    uplink_bytes: int
    downlink_bytes: int
    included_bytes: int


@dataclass(frozen=True)
class PeriodClose:
    """A closed accounting period: when, by which run (kind ``period_close``), by whom."""

    period_start_ns: int
    closed_at_ns: int
    run_id: int
    actor: str


@dataclass(frozen=True)
class PeriodTotals:
    """What one accounting period holds in one currency (``billing period list``)."""

    period_start_ns: int
    closed: PeriodClose | None
    currency: str  # "" for a closed period without postings
    postings: int
    total_bytes: int
    rated_bytes: int
    amount_nano: int


@dataclass
class RerateReport:
    """What re-rating (part of) a period posted, or would post (dry run)."""

    pages: int = 0
    buckets: int = 0  # buckets examined
    postings: int = 0
    # per uuid: [postings, rated_bytes, included_bytes, amount_nano] differences posted
    accounts: dict[str, list[int]] = field(default_factory=dict)

    def __iadd__(self, other: RerateReport) -> RerateReport:
        self.pages += other.pages
        self.buckets += other.buckets
        self.postings += other.postings
        for uuid, (n, rated, included, amount) in other.accounts.items():
            acc = self.accounts.setdefault(uuid, [0, 0, 0, 0])
            acc[0] += n
            acc[1] += rated
            acc[2] += included
            acc[3] += amount
        return self


@dataclass(frozen=True)
class SourceRunResult:
    """One source's outcome in one run (kept for ``billing status``)."""

    run_id: int
    source_id: str
    kind: RunKind
    started_at_ns: int
    finished_at_ns: int
    outcome: RunOutcome
    counts: dict[str, int]
    error: str | None
    top_rejection: str | None = None  # the most frequent rejection reason of the run


@dataclass(frozen=True)
class RunRecord:
    """A row of ``runs`` that has no outcome: still running, or abandoned by a killed
    process. ``process_gone``: True when its process is known to be gone (this host
    checked), False while it runs, None when unknown (another host, or no pid recorded)."""

    run_id: int
    kind: RunKind
    sources: list[str]
    started_at_ns: int
    pid: int | None
    host: str | None
    process_gone: bool | None


@dataclass(frozen=True)
class IntegrityEvent:
    """One row of ``integrity_events``; ``acknowledged_at_ns`` is ``None`` while open."""

    id: int
    kind: IntegrityKind
    node_id: str
    env: str
    uuid: str
    inbound_tag: str
    collected_at_ns: int | None
    source_id: str | None
    run_id: int | None
    detail: str
    created_at_ns: int
    acknowledged_at_ns: int | None


class Store(Protocol):
    """Both back ends implement exactly this. Everything is UTC epoch nanoseconds."""

    url_for_display: str  # never contains a password

    def close(self) -> None: ...

    # runs ---------------------------------------------------------------------------
    def start_run(self, kind: RunKind, sources: list[str], actor: str | None = None) -> int:
        """Own transaction: a new ``runs`` row; ``actor`` records who (operator runs)."""
        ...

    def finish_run(
        self, run_id: int, outcome: str, per_source: dict[str, SourceRunResult]
    ) -> None: ...

    def last_source_results(self) -> dict[str, SourceRunResult]: ...

    def unfinished_runs(self) -> list[RunRecord]:
        """Runs without an outcome, oldest first, each with whether its process is gone."""
        ...

    def abandoned_runs(self) -> list[RunRecord]:
        """The unfinished runs whose process is known to be gone (killed): for status."""
        ...

    # writes -------------------------------------------------------------------------
    def apply(self, batch: Batch) -> ApplyReport: ...

    def dry_run(self) -> AbstractContextManager[None]:
        """Inside this block every ``apply`` runs in one transaction rolled back at exit."""
        ...

    # retention (DESIGN §6) ------------------------------------------------------------
    def compact(
        self,
        *,
        now_ns: int,
        retention_ns: int,
        budget_s: float | None = None,
        dry_run: bool = False,
        daily: bool = False,
    ) -> CompactReport:
        """Compact observations older than the horizon ``now - retention`` (hour-aligned),
        keeping each series' last observation before it, and prune item digests with them.
        Bounded by ``budget_s`` (each step its own transaction; the next call continues).
        ``daily``: start a new cycle only if the last one started a day ago or more
        (collect's own compaction); otherwise only continue an unfinished one."""
        ...

    # checkpoints --------------------------------------------------------------------
    def get_checkpoint(self, source_id: str) -> Checkpoint | None: ...

    def list_checkpoints(self) -> list[Checkpoint]: ...

    def record_failure(
        self, source_id: str, node_id: str, env: str, attempted_at_ns: int, error: str
    ) -> None:
        """Own transaction: last_attempted_at, last_error, consecutive_failures + 1."""
        ...

    def record_success(self, source_id: str, node_id: str, env: str, at_ns: int) -> None:
        """Own transaction: last_succeeded_at, last_error cleared, consecutive_failures 0."""
        ...

    # reads --------------------------------------------------------------------------
    def iter_usage(self, flt: RowFilter) -> Iterator[UsageRow]: ...

    def iter_ledger(self, flt: RowFilter) -> Iterator[LedgerRow]: ...

    def integrity_event_counts(self) -> dict[str, int]:
        """Open integrity events per source_id (events without a source under '')."""
        ...

    # accounting periods (DESIGN §5a) ---------------------------------------------------
    def closed_periods(self) -> list[PeriodClose]:
        """Every closed period, oldest first."""
        ...

    def close_period(
        self, period_start_ns: int, *, actor: str, now_ns: int
    ) -> tuple[PeriodClose, bool]:
        """Own transaction: close a period that has ended (``PeriodError`` otherwise),
        recording a ``period_close`` run and a snapshot of its accounts' emails. Returns
        the close and whether this call made it (False: it was closed already)."""
        ...

    def period_totals(self) -> list[PeriodTotals]:
        """Every period with postings or a close, per currency, oldest first."""
        ...

    def statement(self, period_start_ns: int, flt: RowFilter) -> Statement:
        """The statement of a period: a pure read of the postings accounted in it."""
        ...

    def check_rerate(self, period_start_ns: int, pricing: Pricing) -> None:
        """``PeriodError`` when the period is closed or is posted in another currency."""
        ...

    def iter_rerate(
        self, period_start_ns: int, pricing: Pricing, run_id: int, *, dry_run: bool
    ) -> Iterator[RerateReport]:
        """Re-rate the buckets of an open period under ``pricing`` in bounded pages, one
        transaction each (rolled back when ``dry_run``), posting only the differences;
        yields each page's report once it is committed (or rolled back)."""
        ...

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
        """Own transaction: one event found outside ``apply`` (e.g. an identity mismatch)."""
        ...

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
        """Own transaction: an ``identity_mismatch`` event, once per distinct claim. Not
        recorded (False) when the source's latest such event claims the same node_id/env
        and the source has not succeeded since: a mis-identified source retried every
        minute is one event, not 1,440 a day."""
        ...

    def iter_integrity_events(
        self,
        source_id: str | Sequence[str] | None = None,
        kind: IntegrityKind | None = None,
        open_only: bool = True,
        since_ns: int | None = None,
    ) -> Iterator[IntegrityEvent]:
        """Events in id order; ``source_id`` one id or several; ``since_ns`` is inclusive on
        ``created_at_ns``."""
        ...

    def unknown_integrity_event_ids(self, ids: Sequence[int]) -> list[int]:
        """The given ids no event has, sorted (``integrity ack`` refuses them)."""
        ...

    def acknowledge_integrity_events(
        self,
        ids: list[int] | None,
        *,
        source_id: str | Sequence[str] | None = None,
        at_ns: int,
    ) -> int:
        """Own transaction: set ``acknowledged_at_ns`` on open events; return how many.

        ``ids`` None: every open event of ``source_id``, or every open event when that is
        None too. Given ids are still narrowed by ``source_id`` when both are passed.
        """
        ...

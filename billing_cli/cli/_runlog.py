"""One log record per source per run, for journald and log shippers.

With ``--log-format json`` these records *are* the per-source report under cron: one JSON
object per line (``ok`` at INFO, ``skipped`` at WARNING, ``failed`` at ERROR), so
``billing --log-format json -q collect`` leaves exactly one JSON line per failed source in
the journal. With text logs they are INFO records (seen with ``-v``) next to the usual
human summary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from billing_cli.cli._context import AppContext
from billing_cli.collect.collector import SourceOutcome
from billing_cli.store.base import RunKind

log = logging.getLogger("billing_cli.run")

_LEVEL = {"ok": logging.INFO, "skipped": logging.WARNING, "failed": logging.ERROR}


def log_outcomes(
    app: AppContext, kind: RunKind, run_id: int | None, outcomes: Sequence[SourceOutcome]
) -> bool:
    """Log every source's outcome; True when the structured log replaces the text lines."""
    structured = app.log_format == "json"
    for o in outcomes:
        level = _LEVEL.get(o.status, logging.INFO) if structured else logging.INFO
        detail = o.error or o.note or f"{o.report.samples} samples"
        log.log(
            level,
            f"{kind} source '{o.source_id}': {o.status}: {detail}",
            extra={
                "fields": {
                    "event": f"{kind}.source",
                    "run_id": run_id,
                    "source_id": o.source_id,
                    "node_id": o.node_id,
                    "env": o.env,
                    "status": o.status,
                    **o.counts(),
                    "error": o.error,
                    "note": o.note,
                }
            },
        )
    return structured

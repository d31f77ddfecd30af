"""``billing compact``: remove observations older than the retention horizon (DESIGN §6).

The same compaction ``billing collect`` runs once a day by itself, here at once and to
the end (or, with ``--dry-run``, only counted).
"""

from __future__ import annotations

from typing import Annotated

import orjson
import typer

from billing_cli._time import now_ns
from billing_cli.cli._context import get_context
from billing_cli.cli._retention import compaction_json, compaction_line, retention_ns
from billing_cli.cli._tables import result_table
from billing_cli.registry.model import DEFAULT_RETENTION

HELP = """\
Remove observations older than the retention horizon, keeping what later deltas need.

The horizon is [defaults] retention (default 35d; without a registry file, 35d with a
warning) before now, at a whole hour. Per
series its last observation before the horizon is kept (the next delta starts from it);
item digests are pruned with the observations. Buckets and the ledger are never
compacted. From then on data older than the horizon is refused (beyond_retention).

billing collect runs the same compaction by itself, at most once a day and about a
second per run until it is done, so cron deployments need nothing extra. Run it by hand
to compact at once, or with --dry-run to see what would go. It works in steps, each its
own transaction: an interrupted compaction leaves the store consistent and running it
again continues; collectors keep working meanwhile.

Exit codes: 0 done; 2 bad flag or registry; 4 database failure.

Examples:

\b
  billing compact --dry-run                  # what would be removed; nothing is written
  billing compact
  billing compact --json | jq .observations_removed
"""


def compact_command(
    ctx: typer.Context,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Count what would be removed; change nothing."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable result.")] = False,
) -> None:
    app = get_context(ctx)
    registry = None
    if app.registry_explicit or app.registry_path.exists():
        registry = app.load_registry()
    elif not app.quiet:
        # Like ingest: a database fed only by `billing ingest` may have no registry.
        app.err.print(
            f"warning: no registry at {app.registry_path}: using the default retention "
            f"{DEFAULT_RETENTION}; pass --registry to use its [defaults] retention",
            markup=False,
            highlight=False,
        )
    from billing_cli.store import open_store

    store = open_store(app.db_url)
    try:
        report = store.compact(
            now_ns=now_ns(), retention_ns=retention_ns(registry), dry_run=dry_run
        )
    finally:
        store.close()
    if json_out:
        typer.echo(orjson.dumps(compaction_json(report)).decode())
        return
    if app.quiet:
        return
    table = result_table("compact (dry run)" if dry_run else "compact")
    table.add_column("", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_row("observations removed", f"{report.observations_removed:,}")
    table.add_row("item digests removed", f"{report.item_digests_removed:,}")
    table.add_row("series kept at the cut", f"{report.series_kept:,}")
    app.out.print(table)
    app.out.print(compaction_line(report), markup=False, highlight=False)

"""``billing rerate``: apply the current ``[pricing]`` to an open period (DESIGN §5a).

Posts only the differences (adjustments carrying the new rule_version); nothing when the
pricing is unchanged. Works in pages of whole accounts, one transaction each, so it
never holds the write lock (SQLite) or the accounts' series (PostgreSQL) longer than a
page: collectors keep running. ``--dry-run`` runs the same pages, each rolled back.
"""

from __future__ import annotations

from typing import Annotated

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from billing_cli._errors import ConfigError, UsageError
from billing_cli.cli._context import AppContext, get_context
from billing_cli.cli._flags import period_flag
from billing_cli.cli._period import open_store_for_writing
from billing_cli.core.money import format_amount
from billing_cli.core.periods import format_period
from billing_cli.pricing import Pricing
from billing_cli.store.base import RerateReport

HELP = """\
Re-rate the buckets of an open accounting period (YYYY-MM) under the registry's current
[pricing], and post only the differences: adjustments carrying the new rule_version,
accounted in that period. With unchanged pricing nothing is posted, so running it twice
is safe. A closed period is refused (it is final), and so is a [pricing] whose currency
differs from the period's postings, or a registry that sets no price at all (it would
rate everything at zero).

The period is processed in pages of whole accounts (about 20,000 buckets), each in its
own transaction: collectors are never blocked for longer than a page. --dry-run prints
what would be posted and writes nothing: every page runs the same code in a transaction
that is rolled back (the report is exact per account; see the README).

--json gives one object: period, dry_run, run_id (null for a dry run), rule_version,
currency, pages, buckets, postings, rated_bytes, included_bytes, amount (the sums of the
differences) and accounts (per uuid: uuid, postings, rated_bytes, included_bytes,
amount).

Exit status: 0, 2 for a bad or closed period, a currency change or a registry without
a price, 4 when the database is missing or cannot be written.

Examples:

\b
  billing rerate --period 2026-12 --dry-run
  billing rerate --period 2026-12
  billing rerate --period 2026-12 --dry-run --json | jq .amount
"""


def rerate_command(
    ctx: typer.Context,
    period: Annotated[
        str | None,
        typer.Option("--period", metavar="YYYY-MM", help="The open period, e.g. 2026-12."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be posted; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    app = get_context(ctx)
    if period is None:
        raise UsageError("--period is required: the open month to re-rate, e.g. --period 2026-12")
    period_ns = period_flag("--period", period)
    assert period_ns is not None
    registry = app.load_registry()
    reason = registry.unpriced_reason()
    if reason is not None:
        # A re-rate is asked for to apply a price: without one it would zero the period.
        raise ConfigError(f"{registry.path}: {reason}; refusing to re-rate {period} at zero")
    pricing = registry.pricing
    total = RerateReport()
    run_id = 0
    with open_store_for_writing(app, migrate=not dry_run) as store:
        store.check_rerate(period_ns, pricing)
        if not dry_run:
            run_id = store.start_run("rerate", [], actor=None)
        outcome = "failed"
        try:
            for page in store.iter_rerate(period_ns, pricing, run_id, dry_run=dry_run):
                total += page
            outcome = "ok"
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: committed pages stay, like collect's
            outcome = "interrupted"
            raise
        finally:
            if not dry_run:
                store.finish_run(run_id, outcome, {})
    _report(app, as_json, format_period(period_ns), dry_run, run_id, pricing, total)


def _report(
    app: AppContext,
    as_json: bool,
    period: str,
    dry_run: bool,
    run_id: int,
    pricing: Pricing,
    total: RerateReport,
) -> None:
    accounts = sorted(total.accounts.items())
    sums = [sum(v[i] for _, v in accounts) for i in range(1, 4)]
    if as_json:
        doc = {
            "period": period,
            "dry_run": dry_run,
            "run_id": None if dry_run else run_id,
            "rule_version": pricing.rule_version,
            "currency": pricing.currency,
            "pages": total.pages,
            "buckets": total.buckets,
            "postings": total.postings,
            "rated_bytes": sums[0],
            "included_bytes": sums[1],
            "amount": format_amount(sums[2]),
            "accounts": [
                {
                    "uuid": uuid,
                    "postings": n,
                    "rated_bytes": rated,
                    "included_bytes": included,
                    "amount": format_amount(amount),
                }
                for uuid, (n, rated, included, amount) in accounts
            ],
        }
        typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return
    if app.quiet:
        return
    if accounts:
        table = Table(
            title=f"rerate {period} under {escape(pricing.rule_version)}"
            + (" (dry run: nothing written)" if dry_run else ""),
            title_justify="left",
        )
        for col in ("uuid", "postings", "rated_bytes", "included_bytes", "amount"):
            table.add_column(col, justify="left" if col == "uuid" else "right")
        for uuid, (n, rated, included, amount) in accounts:
            table.add_row(escape(uuid), str(n), str(rated), str(included), format_amount(amount))
        app.out.print(table)
    verb = "would post" if dry_run else "posted"
    line = (
        f"rerate {period}: {total.buckets} buckets in {total.pages} pages; {verb}"
        f" {total.postings} adjustment{'' if total.postings == 1 else 's'},"
        f" amount {format_amount(sums[2])} {pricing.currency}"
        f" (rule_version {pricing.rule_version})"
    )
    line += " - dry run, nothing written" if dry_run else f" - run {run_id}"
    app.out.print(line, markup=False, highlight=False)

"""``billing demo``: the whole product on a fresh machine in seconds (see billing_cli.demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from billing_cli.cli._context import get_context

HELP = """\
Run billing end to end against a simulated HTTPS fleet, in a folder of its own.

Makes two private CAs, a client certificate and a token in the demo folder, starts two
simulated exporters on loopback (node-a: mTLS; node-b: bearer token, its own pinned CA,
reached by IP with server_name) and registers a third, disabled one. Then it runs the
real commands against a SQLite database there: collect, a counter restart, more
collects, a late item that only reconcile can repair, and the status, usage and ledger
tables. The servers always stop at the end (also on failure or Ctrl-C).

Re-running deletes and recreates only the demo's own files; a non-empty folder that
was not made by `billing demo` is refused (exit 2).

Examples:

\b
  billing demo
  billing demo --dir /tmp/billing-demo
  billing demo --keep-running      # leave the exporters up; Ctrl-C stops them
  billing --registry billing-demo/sources.toml --db billing-demo/billing.db status
"""


def demo_command(
    ctx: typer.Context,
    folder: Annotated[
        Path,
        typer.Option(
            "--dir",
            help="Demo folder (created; a previous demo's files in it are replaced).",
            file_okay=False,
        ),
    ] = Path("billing-demo"),
    keep_running: Annotated[
        bool,
        typer.Option(
            "--keep-running",
            help="After the demo, keep the simulated exporters serving until Ctrl-C.",
        ),
    ] = False,
) -> None:
    """Run billing end to end against a simulated HTTPS fleet (see --help)."""
    from billing_cli.demo import keep_serving, run_demo

    app = get_context(ctx)

    def say(line: str) -> None:
        if not app.quiet:
            app.out.print(line, highlight=False, markup=False)

    # Sub-commands inherit the output settings of this one.
    global_args = ["--log-format", app.log_format]
    if app.quiet:
        global_args.append("-q")
    elif app.verbosity > 0:
        global_args.append("-" + "v" * app.verbosity)
    run_demo(
        folder,
        say=say,
        global_args=global_args,
        quiet=app.quiet,
        keep_running=keep_serving(say) if keep_running else None,
    )

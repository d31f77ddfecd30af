"""The ``billing`` command: global options, sub-commands, and the one place where failures
become exit codes and one-line messages."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import click
import typer

from billing_cli import __version__
from billing_cli._errors import BillingError, ExitCode, Interrupted, UsageError, one_line
from billing_cli.cli import commands
from billing_cli.cli._context import DEFAULT_REGISTRY, AppContext, make_console, resolve_db_url
from billing_cli.cli._logging import setup_logging
from billing_cli.cli._signals import stop_on_signals

log = logging.getLogger("billing_cli")

HELP = """\
Exact, replay-safe traffic billing from many xray-exporter instances over HTTPS.

Pulls cumulative counters from every source in the registry, turns them into per-minute
usage buckets and an append-only rated ledger, in SQLite (default) or PostgreSQL.

Examples:

\b
  billing demo                    # a simulated HTTPS fleet, end to end
  billing sources list
  billing collect                 # what cron runs every minute
  billing status --max-lag 10m    # for monitoring: exit 1 when unhealthy
  billing --db postgresql://billing@db/billing usage --totals

Global options (--registry, --db, --log-format, -v, -q) may be given anywhere on the line.
"""

app = commands.new_app(
    HELP,
    name="billing",
    # Typer's --install-completion / --show-completion (bash, zsh, fish, PowerShell).
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
COMPLETE_VAR = "_BILLING_COMPLETE"  # set by the installed completion script


def _version(value: bool) -> None:
    if value:
        typer.echo(f"billing {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    registry: Annotated[
        Path | None,
        typer.Option(
            "--registry",
            envvar="BILLING_REGISTRY",
            help="Source registry TOML file. [default: ./sources.toml]",
            show_default=False,
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="SQLite path or postgresql:// URL. "
            "[env: BILLING_DATABASE_URL, then DATABASE_URL; default: ./billing.db]",
            show_default=False,
        ),
    ] = None,
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            click_type=click.Choice(["text", "json"]),
            help="Log lines as text or one JSON object per line.",
        ),
    ] = "text",
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, show_default=False, help="More log output (-vv: debug)."
        ),
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    if db is not None and not db.strip():
        # An empty --db (an unset shell variable) must not silently mean ./billing.db.
        raise UsageError(
            "--db is empty: give a SQLite file path or a postgresql:// URL, or leave --db out "
            "(then BILLING_DATABASE_URL, DATABASE_URL or ./billing.db is used)"
        )
    db_url = resolve_db_url(db)
    _check_db_path(db_url)
    verbosity = -1 if quiet else min(verbose, 2)
    # One stderr console for the progress bars and the log lines (rich keeps the bar below).
    err = make_console(stderr=True)
    setup_logging(log_format, verbosity, err)
    ctx.obj = AppContext(
        registry_path=registry or Path(DEFAULT_REGISTRY),
        registry_explicit=registry is not None,
        db_url=db_url,
        log_format=log_format,
        verbosity=verbosity,
        err=err,
    )


# What a file system takes (Linux: NAME_MAX, PATH_MAX); beyond, the OS refuses the name.
_MAX_NAME_BYTES = 255
_MAX_PATH_BYTES = 4095


def _check_db_path(db_url: str) -> None:
    """A SQLite path no file system can hold is a flag error, not an OSError later."""
    from billing_cli._errors import StoreError
    from billing_cli.store import parse_database_url

    try:
        target = parse_database_url(db_url)
    except StoreError:
        return  # said with its own message when the store is opened
    path = target.sqlite_path
    if target.backend != "sqlite" or path == ":memory:":
        return
    raw = os.fsencode(path)
    if len(raw) > _MAX_PATH_BYTES or any(len(part) > _MAX_NAME_BYTES for part in raw.split(b"/")):
        raise UsageError(
            f"--db: the path {path[:60]!r}... is too long for a file system "
            f"({len(raw)} bytes; at most {_MAX_PATH_BYTES}, {_MAX_NAME_BYTES} a name)"
        )


def full_app() -> typer.Typer:
    """The application with every sub-command registered (help, docs, tests)."""
    commands.register(app)
    return app


def _command_name(args: Sequence[str]) -> str | None:
    """The sub-command named on a hoisted line (global options come first), if any."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _GLOBAL_WITH_VALUE:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return arg
    return None


# Global options accepted after the sub-command too (``billing sources list --registry x``):
# they are moved in front of the sub-command before click parses the line.
_GLOBAL_WITH_VALUE = ("--registry", "--db", "--log-format")
_GLOBAL_FLAGS = ("--verbose", "--quiet", "-q", "-v", "-vv")


def hoist_global_options(args: Sequence[str]) -> list[str]:
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        name = arg.split("=", 1)[0]
        if name in _GLOBAL_WITH_VALUE:
            if "=" in arg:
                front.append(arg)
            else:
                front.extend(args[i : i + 2])
                i += 1
        elif arg in _GLOBAL_FLAGS:
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def main(argv: Sequence[str] | None = None) -> None:
    if os.environ.get(COMPLETE_VAR):
        complete()  # the shell asks for completions: answer and exit
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    code = run(args)
    sys.exit(code)


def complete() -> None:
    """Answer a completion request of the script ``--install-completion`` installed. (Our
    ``run`` does not go through click's ``main()``, where typer would do this.)"""
    commands.register(app)
    command = typer.main.get_command(app)
    command._main_shell_completion({}, "billing", COMPLETE_VAR)
    sys.exit(0)  # not reached: the completion exits itself


def run(args: Sequence[str]) -> int:
    """Run the CLI and return the exit code; the single place failures become messages."""
    name = _command_name(args)
    # `billing`, `billing --help` or a typo list every command; otherwise only the named
    # one is imported.
    commands.register(app, [name] if name in commands.COMMANDS else None)
    command = typer.main.get_command(app)
    try:
        # Invoked directly rather than through click's ``main()``: that one turns a closed
        # stdout (``billing usage --json | head``) into ``sys.exit(1)`` before we see it.
        # SIGTERM (systemd's stop) is handled like Ctrl-C: see _signals.
        with stop_on_signals(), command.make_context("billing", list(args)) as ctx:
            result = command.invoke(ctx)
    except BillingError as exc:
        _print_error(exc.message)
        return int(exc.exit_code)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        _print_error("aborted")
        return 130
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `billing sources`: the group's help is the answer
        return int(ExitCode.CONFIG)
    except click.ClickException as exc:
        _print_error(click_error_line(exc))
        return int(ExitCode.CONFIG)
    except Interrupted as exc:
        _print_error(f"interrupted by {exc.signal_name}")
        return exc.exit_code
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130
    except BrokenPipeError:
        # `billing usage | head`: the reader went away; that is not our failure. Point
        # stdout at /dev/null so the interpreter's final flush cannot fail either.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (AttributeError, OSError, ValueError):
            pass  # stdout is not a real file (in-process tests)
        return 0
    except Exception as exc:
        # A bug, not an expected failure: say so in one line, details at -vv.
        log.debug("internal error", exc_info=True)
        _print_error(
            f"internal error: {type(exc).__name__}: {one_line(str(exc), 200)} (this is a bug;"
            " run with -vv for details)"
        )
        return 70
    return int(result) if isinstance(result, int) else 0


def click_error_line(exc: click.ClickException) -> str:
    """A usage error as one line, like every other error: what is wrong and where to look
    (click's own rendering is four lines starting ``Usage:`` and ``Error:``)."""
    text = one_line(exc.format_message())
    if text[:1].isupper() and text[1:2].islower():
        text = text[0].lower() + text[1:]
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        text += f" (see `{ctx.command_path} --help`)"
    return text


def _print_error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)

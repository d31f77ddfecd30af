"""``billing sources``: list, show, add, remove, enable and disable registry entries.

Editing goes through ``billing_cli.registry.edit`` (comment-preserving, validated, atomic);
reading through the same loader every other command uses. Output shows references
(``env:NAME``, ``file:/path``), never resolved secrets.
"""

from __future__ import annotations

import contextlib
import os
from typing import Annotated, Any

import click
import orjson
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from billing_cli._errors import ConfigError, UsageError
from billing_cli.cli._context import AppContext, get_context
from billing_cli.cli._flags import WideOption
from billing_cli.cli._tables import result_table
from billing_cli.cli.commands import new_app
from billing_cli.registry import edit
from billing_cli.registry.model import Registry, SourceConfig

HELP = """\
Manage the source registry (sources.toml): one entry per xray-exporter endpoint.

Edits keep your comments and the layout of untouched entries, are validated before
anything is written, and replace the file atomically.

Examples:

  billing sources list

\b
  billing sources add jp-1 --node-id tokyo-1 --env prod \\
      --base-url https://jp-1.example.net:9550 \\
      --client-cert-ref file:/etc/billing/client.pem \\
      --client-key-ref systemd:client-key --ca-bundle-ref file:/etc/billing/ca.pem

  billing sources disable jp-1

  billing --registry /etc/billing/sources.toml sources show jp-1 --json
"""

app = new_app(HELP)

# Stable JSON field order for `list --json` and `show --json`.
JSON_FIELDS = (
    "source_id",
    "node_id",
    "env",
    "base_url",
    "enabled",
    "auth_mode",
    "api",
    "credential_ref",
    "client_cert_ref",
    "client_key_ref",
    "ca_bundle_ref",
    "server_name",
    "collect_interval",
    "request_timeout",
    "allow_insecure_http",
    "max_response_bytes",
    "stale_after",
    "max_refused_share",
    "legacy",
)


_INHERITED = (
    "ca_bundle_ref",
    "collect_interval",
    "request_timeout",
    "max_response_bytes",
    "stale_after",
    "max_refused_share",
)


def source_json(registry: Registry, src: SourceConfig) -> dict[str, Any]:
    """One source with resolved defaults; refs are shown as written (they hold no secret)."""
    return {
        "source_id": src.source_id,
        "node_id": src.node_id,
        "env": src.env,
        "base_url": src.base_url,
        "enabled": src.enabled,
        "auth_mode": src.auth_mode,
        "api": src.api,
        "credential_ref": src.credential_ref,
        "client_cert_ref": src.client_cert_ref,
        "client_key_ref": src.client_key_ref,
        "ca_bundle_ref": src.effective_ca_bundle_ref,
        "server_name": src.server_name,
        "collect_interval": src.effective_collect_interval,
        "request_timeout": src.effective_request_timeout,
        "allow_insecure_http": src.allow_insecure_http,
        "max_response_bytes": src.effective_max_response_bytes,
        "stale_after": src.effective_stale_after,
        "max_refused_share": src.effective_max_refused_share,
        "legacy": registry.legacy,
    }


def _print_json(payload: Any) -> None:
    # Plain stdout, not rich: no markup, emoji or wrapping may touch the JSON text.
    click.echo(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())


def _say(app_ctx: AppContext, message: str) -> None:
    if not app_ctx.quiet:
        app_ctx.out.print(message, markup=False, highlight=False, emoji=False)


JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable result.")]


def _done(
    app_ctx: AppContext,
    as_json: bool,
    message: str,
    *,
    action: str,
    source_id: str,
    changed: bool,
    registry: Registry | None,
    source: dict[str, Any] | None = None,
    fields: list[str] | None = None,
) -> None:
    """The result of an edit: one line for people, one object for scripts (``--json``):
    ``action, changed, registry, source_id, source`` (the entry as it is now; as it was for
    ``removed``) and, for ``set``, ``fields`` (what changed)."""
    if not as_json:
        _say(app_ctx, message)
        return
    if source is None and registry is not None and source_id in registry.ids:
        source = source_json(registry, registry.get(source_id))
    doc: dict[str, Any] = {
        "action": action,
        "changed": changed,
        "registry": str(app_ctx.registry_path),
        "source_id": source_id,
        "source": source,
    }
    if fields is not None:
        doc["fields"] = fields
    _print_json(doc)


# --- list / show -------------------------------------------------------------------------


LIST_HELP = """\
List the sources of the registry (table, or --json for scripts).

With no sources.toml and EXPORTER_BASE_URL set, the one implicit legacy source is
listed and marked as legacy.

Examples:

  billing sources list

  billing sources list --json | jq -r '.sources[] | select(.enabled) | .source_id'

  billing --registry /etc/billing/sources.toml sources list
"""


@app.command("list", help=LIST_HELP)
def list_sources(
    ctx: typer.Context,
    wide: WideOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    app_ctx = get_context(ctx)
    registry = app_ctx.load_registry()
    if as_json:
        _print_json(
            {
                "registry": str(registry.path),
                "legacy": registry.legacy,
                "sources": [source_json(registry, s) for s in registry.sources],
            },
        )
        return
    if not registry.sources:
        _say(app_ctx, f"no sources in {registry.path}; add one with `billing sources add`")
        return
    title = Text(
        f"legacy single source from EXPORTER_BASE_URL ({registry.path} does not exist)"
        if registry.legacy
        else str(registry.path)
    )
    out = app_ctx.out
    if not out.is_terminal:
        # Piped output (grep, less, a cron mail) has no width to respect: keep rows whole.
        out = Console(file=out.file, width=max(out.width, 200), color_system=None)
    # The title on a line of its own: a table title wraps to the table's width.
    out.print(title)
    out.print(sources_table(registry, wide=wide))


def sources_table(registry: Registry, *, wide: bool = False) -> Table:
    """At 80 columns: id, node/env, auth, on, url (the url wraps in its cell, nothing else
    does); --wide: every column, each in its own."""
    table = result_table()
    if wide:
        cols = ["id", "node", "env", "url", "auth", "api", "enabled", "interval", "timeout"]
        cols += ["server_name", "ca_bundle_ref"]
    else:
        cols = ["id", "node/env", "auth", "on", "url"]
    for col in cols:
        table.add_column(col, overflow="fold", no_wrap=col != "url", min_width=None)
    for s in registry.sources:
        values = {
            "id": s.source_id,
            "node": s.node_id,
            "env": s.env,
            "node/env": f"{s.node_id}/{s.env}",
            "url": s.base_url,
            "auth": s.auth_mode,
            "api": s.api,
            "enabled": "yes" if s.enabled else "no",
            "on": "yes" if s.enabled else "no",
            "interval": s.effective_collect_interval,
            "timeout": s.effective_request_timeout,
            "server_name": s.server_name or "-",
            "ca_bundle_ref": s.effective_ca_bundle_ref or "-",
        }
        # Text(), not str: registry values are data, never rich markup or emoji codes.
        table.add_row(*(Text(values[c]) for c in cols))
    return table


SHOW_HELP = """\
Show every field of one source, with [defaults] filled in.

Credential fields show the reference (env:NAME, file:/path, systemd:NAME), never the
secret it points at.

Examples:

  billing sources show jp-1

  billing sources show jp-1 --json | jq .ca_bundle_ref
"""


@app.command("show", help=SHOW_HELP)
def show_source(
    ctx: typer.Context,
    source_id: Annotated[str, typer.Argument(metavar="SOURCE_ID", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    app_ctx = get_context(ctx)
    registry = app_ctx.load_registry()
    src = registry.get(source_id)
    data = source_json(registry, src)
    if as_json:
        _print_json(data)
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key in JSON_FIELDS:
        value = data[key]
        shown = "-" if value is None else str(value).lower() if isinstance(value, bool) else value
        if key in _INHERITED and value is not None and getattr(src, key) is None:
            shown = f"{shown} (from [defaults])"
        table.add_row(key, Text(str(shown)))
    app_ctx.out.print(table)


# --- add ---------------------------------------------------------------------------------

ADD_HELP = """\
Add a source to the registry (the file is created when missing).

--auth-mode defaults to what the refs imply: client cert + key -> mtls, a
credential_ref -> bearer, both -> mtls+bearer. Refs are references, never secrets:
env:NAME, file:/abs/path, systemd:NAME (and "system" for --ca-bundle-ref: the OS trust
store). Nothing is written if the result would not validate.

Examples:

\b
  billing sources add jp-1 --node-id tokyo-1 --env prod \\
      --base-url https://jp-1.example.net:9550 \\
      --client-cert-ref file:/etc/billing/client.pem \\
      --client-key-ref systemd:client-key

\b
  billing sources add de-1 --node-id frankfurt-1 --env prod \\
      --base-url https://203.0.113.20:9550 --credential-ref env:BILLING_TOKEN_DE1 \\
      --ca-bundle-ref file:/etc/billing/de-1-ca.pem --server-name de-1.example.net

\b
  billing sources add dev --node-id laptop --env dev \\
      --base-url http://127.0.0.1:9550 --auth-mode none --allow-insecure-http
"""

_RefOpt = typer.Option(show_default=False)


@app.command("add", help=ADD_HELP)
def add_source(
    ctx: typer.Context,
    source_id: Annotated[str, typer.Argument(metavar="SOURCE_ID", show_default=False)],
    node_id: Annotated[
        str, typer.Option("--node-id", help="node_id the exporter reports.", show_default=False)
    ],
    env: Annotated[
        str, typer.Option("--env", help="env the exporter reports.", show_default=False)
    ],
    base_url: Annotated[
        str,
        typer.Option("--base-url", help="https:// URL of the exporter.", show_default=False),
    ],
    auth_mode: Annotated[
        str | None,
        typer.Option(
            "--auth-mode",
            click_type=click.Choice(["mtls", "bearer", "mtls+bearer", "none"]),
            help="Default: implied by the refs given.",
            show_default=False,
        ),
    ] = None,
    credential_ref: Annotated[
        str | None,
        typer.Option("--credential-ref", help="Bearer token reference.", show_default=False),
    ] = None,
    client_cert_ref: Annotated[
        str | None,
        typer.Option(
            "--client-cert-ref", help="mTLS client certificate (PEM) ref.", show_default=False
        ),
    ] = None,
    client_key_ref: Annotated[
        str | None,
        typer.Option("--client-key-ref", help="mTLS client key (PEM) ref.", show_default=False),
    ] = None,
    ca_bundle_ref: Annotated[
        str | None,
        typer.Option(
            "--ca-bundle-ref",
            help='CA bundle ref, or "system". Default: [defaults] ca_bundle_ref.',
            show_default=False,
        ),
    ] = None,
    server_name: Annotated[
        str | None,
        typer.Option(
            "--server-name", help="TLS server name when the URL uses an IP.", show_default=False
        ),
    ] = None,
    collect_interval: Annotated[
        str | None,
        typer.Option(
            "--collect-interval", help="e.g. 1m. Default: [defaults].", show_default=False
        ),
    ] = None,
    request_timeout: Annotated[
        str | None,
        typer.Option(
            "--request-timeout", help="e.g. 10s. Default: [defaults].", show_default=False
        ),
    ] = None,
    api: Annotated[
        str,
        typer.Option(
            "--api",
            click_type=click.Choice(["window", "latest"]),
            help="Exporter API: window (paged) or latest (legacy).",
        ),
    ] = "window",
    disabled: Annotated[
        bool, typer.Option("--disabled", help="Add it switched off (enabled = false).")
    ] = False,
    allow_insecure_http: Annotated[
        bool,
        typer.Option(
            "--allow-insecure-http",
            help="Permit http:// to a loopback host (development only).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    app_ctx = get_context(ctx)
    if auth_mode is None:
        auth_mode = _implied_auth_mode(
            credential_ref, client_cert_ref, client_key_ref, insecure=allow_insecure_http
        )
    fields: dict[str, Any] = {
        "source_id": source_id,
        "node_id": node_id,
        "env": env,
        "base_url": base_url,
        "enabled": False if disabled else None,  # omitted when true: the default
        "auth_mode": auth_mode,
        "credential_ref": credential_ref,
        "client_cert_ref": client_cert_ref,
        "client_key_ref": client_key_ref,
        "ca_bundle_ref": ca_bundle_ref,
        "server_name": server_name,
        "collect_interval": collect_interval,
        "request_timeout": request_timeout,
        "api": None if api == "window" else api,  # omitted when the default
        "allow_insecure_http": True if allow_insecure_http else None,
    }
    created = not app_ctx.registry_path.exists()
    registry = edit.add_source(app_ctx.registry_path, fields)
    state = "disabled" if disabled else "enabled"
    _done(
        app_ctx,
        as_json,
        f"added source '{source_id}' ({state}) to {app_ctx.registry_path}",
        action="added",
        source_id=source_id,
        changed=True,
        registry=registry,
    )
    if created and os.environ.get("EXPORTER_BASE_URL") and not app_ctx.quiet:
        app_ctx.err.print(
            f"note: {app_ctx.registry_path} now exists, so EXPORTER_BASE_URL (legacy mode) "
            "is no longer used; add that exporter as a source too if you still need it",
            markup=False,
            highlight=False,
        )


def _implied_auth_mode(
    credential_ref: str | None,
    client_cert_ref: str | None,
    client_key_ref: str | None,
    *,
    insecure: bool,
) -> str:
    mtls = client_cert_ref is not None or client_key_ref is not None
    if mtls and credential_ref is not None:
        return "mtls+bearer"
    if mtls:
        return "mtls"
    if credential_ref is not None:
        return "bearer"
    if insecure:
        return "none"
    raise UsageError(
        "no credentials given: pass --client-cert-ref and --client-key-ref (mTLS) and/or "
        "--credential-ref (bearer), or --auth-mode"
    )


# --- remove / enable / disable ----------------------------------------------------------

REMOVE_HELP = """\
Remove a source from the registry. Its data in the database is kept.

The comment lines directly above the entry are removed with it; every other comment
and entry stays byte for byte.

Examples:

  billing sources remove jp-1

  billing --registry /etc/billing/sources.toml sources remove old-node
"""


@app.command("remove", help=REMOVE_HELP)
def remove_source(
    ctx: typer.Context,
    source_id: Annotated[str, typer.Argument(metavar="SOURCE_ID", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    app_ctx = get_context(ctx)
    _refuse_legacy(app_ctx, "remove")
    removed: dict[str, Any] | None = None
    if as_json:
        # The entry as it was, for the record (the edit below reports any problem itself).
        with contextlib.suppress(ConfigError):
            before = app_ctx.load_registry()
            removed = source_json(before, before.get(source_id))
    registry = edit.remove_source(app_ctx.registry_path, source_id)
    _done(
        app_ctx,
        as_json,
        f"removed source '{source_id}' from {app_ctx.registry_path}",
        action="removed",
        source_id=source_id,
        changed=True,
        registry=registry,
        source=removed,
    )


ENABLE_HELP = """\
Enable a source: `billing collect` collects it again.

Examples:

  billing sources enable jp-1

  billing sources list --json | jq -r '.sources[] | select(.enabled | not) | .source_id'
"""

DISABLE_HELP = """\
Disable a source: it stays in the registry (and its data in the database), but
`billing collect` skips it.

Examples:

  billing sources disable jp-1

  billing sources disable jp-1 && billing status
"""


@app.command("enable", help=ENABLE_HELP)
def enable_source(
    ctx: typer.Context,
    source_id: Annotated[str, typer.Argument(metavar="SOURCE_ID", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    _set_enabled(ctx, source_id, True, as_json)


@app.command("disable", help=DISABLE_HELP)
def disable_source(
    ctx: typer.Context,
    source_id: Annotated[str, typer.Argument(metavar="SOURCE_ID", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    _set_enabled(ctx, source_id, False, as_json)


def _set_enabled(ctx: typer.Context, source_id: str, enabled: bool, as_json: bool) -> None:
    app_ctx = get_context(ctx)
    _refuse_legacy(app_ctx, "enable" if enabled else "disable")
    registry, changed = edit.set_enabled(app_ctx.registry_path, source_id, enabled)
    word = "enabled" if enabled else "disabled"
    _done(
        app_ctx,
        as_json,
        f"{word} source '{source_id}' in {app_ctx.registry_path}"
        if changed
        else f"source '{source_id}' is already {word}; nothing changed",
        action=word,
        source_id=source_id,
        changed=changed,
        registry=registry,
    )


def _refuse_legacy(app_ctx: AppContext, verb: str) -> None:
    """The implicit legacy source lives in the environment, not in a file to edit."""
    if app_ctx.registry_path.exists() or app_ctx.registry_explicit:
        return
    if os.environ.get("EXPORTER_BASE_URL"):
        raise ConfigError(
            f"cannot {verb} a source: {app_ctx.registry_path} does not exist and the legacy "
            "source comes from EXPORTER_BASE_URL; create the registry with "
            "`billing sources add ...` to manage sources"
        )


# --- set -----------------------------------------------------------------------------------

SET_HELP = """\
Change fields of one source in place: give the fields to set as flags (the names of
`sources add`), and --unset FIELD to remove an optional one (it then falls back to
[defaults]).

Each changed key keeps its place and its inline comment; a new key goes after the
entry's last one; every other byte of the file stays as it was. The result is validated
like every other edit before anything is written (a change that leaves the source
inconsistent, e.g. a credential_ref on an mtls source, is refused: give --auth-mode in the
same command), and the file is replaced atomically. Setting a field to the value it
already has changes nothing. enabled has its own commands (sources enable|disable).

Examples:

  billing sources set jp-1 --request-timeout 20s

\b
  billing sources set de-1 --auth-mode mtls+bearer \\
      --client-cert-ref file:/etc/billing/client.pem --client-key-ref systemd:client-key

  billing sources set de-1 --unset server_name --json
"""


@app.command("set", help=SET_HELP)
def set_source(
    ctx: typer.Context,
    source_id: Annotated[str, typer.Argument(metavar="SOURCE_ID", show_default=False)],
    node_id: Annotated[
        str | None, typer.Option("--node-id", help="node_id the exporter reports.")
    ] = None,
    env: Annotated[str | None, typer.Option("--env", help="env the exporter reports.")] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="https:// URL of the exporter.")
    ] = None,
    auth_mode: Annotated[
        str | None,
        typer.Option(
            "--auth-mode",
            click_type=click.Choice(["mtls", "bearer", "mtls+bearer", "none"]),
            help="Authentication mode.",
        ),
    ] = None,
    credential_ref: Annotated[
        str | None, typer.Option("--credential-ref", help="Bearer token reference.")
    ] = None,
    client_cert_ref: Annotated[
        str | None, typer.Option("--client-cert-ref", help="mTLS client certificate ref.")
    ] = None,
    client_key_ref: Annotated[
        str | None, typer.Option("--client-key-ref", help="mTLS client key ref.")
    ] = None,
    ca_bundle_ref: Annotated[
        str | None, typer.Option("--ca-bundle-ref", help='CA bundle ref, or "system".')
    ] = None,
    server_name: Annotated[
        str | None, typer.Option("--server-name", help="TLS server name.")
    ] = None,
    collect_interval: Annotated[
        str | None, typer.Option("--collect-interval", help="e.g. 1m.")
    ] = None,
    request_timeout: Annotated[
        str | None, typer.Option("--request-timeout", help="e.g. 10s.")
    ] = None,
    api: Annotated[
        str | None,
        typer.Option("--api", click_type=click.Choice(["window", "latest"]), help="Exporter API."),
    ] = None,
    max_response_bytes: Annotated[
        int | None,
        typer.Option("--max-response-bytes", min=1, help="Cap on one response body."),
    ] = None,
    allow_insecure_http: Annotated[
        bool | None,
        typer.Option(
            "--allow-insecure-http/--no-allow-insecure-http",
            help="Permit http:// to a loopback host (development only), or not.",
            show_default=False,
        ),
    ] = None,
    unset: Annotated[
        list[str] | None,
        typer.Option("--unset", metavar="FIELD", help="Remove this optional field. Repeatable."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    app_ctx = get_context(ctx)
    _refuse_legacy(app_ctx, "set fields of")
    given = {
        "node_id": node_id,
        "env": env,
        "base_url": base_url,
        "auth_mode": auth_mode,
        "credential_ref": credential_ref,
        "client_cert_ref": client_cert_ref,
        "client_key_ref": client_key_ref,
        "ca_bundle_ref": ca_bundle_ref,
        "server_name": server_name,
        "collect_interval": collect_interval,
        "request_timeout": request_timeout,
        "api": api,
        "max_response_bytes": max_response_bytes,
        "allow_insecure_http": allow_insecure_http,
    }
    values = {k: v for k, v in given.items() if v is not None}
    removed = [u.strip().replace("-", "_") for u in unset or ()]
    if not values and not removed:
        raise UsageError(
            f"sources set {source_id}: nothing to change; give a field flag such as "
            "--request-timeout 20s, or --unset FIELD (see `billing sources set --help`)"
        )
    registry, changed = edit.set_fields(app_ctx.registry_path, source_id, values, removed)
    _done(
        app_ctx,
        as_json,
        f"set {', '.join(changed)} of source '{source_id}' in {app_ctx.registry_path}"
        if changed
        else f"source '{source_id}' already has these values; nothing changed",
        action="set",
        source_id=source_id,
        changed=bool(changed),
        registry=registry,
        fields=changed,
    )

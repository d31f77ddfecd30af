"""Read ``sources.toml`` into a validated ``Registry``; every failure is ONE line.

The line names the file, the table or source, and the field, e.g.
``sources.toml: source 'jp-1': base_url must be https:// (got http://10.0.0.5:9550)``.
Values of ``*_ref`` fields are never echoed: a mistyped ref may be a pasted secret.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from billing_cli._errors import RegistryError
from billing_cli.pricing import Pricing
from billing_cli.registry.model import Defaults, Registry, SourceConfig, did_you_mean

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("billing_cli.registry")

TOP_LEVEL = ("sources", "defaults", "pricing")
LEGACY_SOURCE_ID = "legacy"
LEGACY_NODE_ID = "legacy"
LEGACY_ENV = "default"

# Custom validator messages are written to follow the field name ("node_id must not be
# empty"); pydantic's own messages read better after a colon ("enabled: Input should...").
_SENTENCE_VERBS = ("must ", "is ", "are ", "contains ", "cannot ", "needs ", "has ")
_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)$|\s*\(at end of document\)$")


def load_registry(path: Path, *, explicit: bool) -> Registry:
    """Load and validate the registry at ``path``.

    A missing file is an error, except when it was not named explicitly and the legacy
    ``EXPORTER_BASE_URL`` is set: then one implicit source ``legacy`` is returned.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not explicit and os.environ.get("EXPORTER_BASE_URL"):
            return legacy_registry(path)
        raise RegistryError(
            f"{path}: no such file (create one with `billing sources add ...` "
            "or copy sources.example.toml)"
        ) from None
    except UnicodeDecodeError:
        raise RegistryError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_registry_text(text, path)


def parse_registry_text(text: str, path: Path) -> Registry:
    """Validate registry TOML text as if it were the file at ``path`` (used by editing too)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path}: {_toml_error(str(exc))}") from None
    return registry_from_data(data, path)


def registry_from_data(data: dict[str, Any], path: Path, *, legacy: bool = False) -> Registry:
    for key in data:
        if key not in TOP_LEVEL:
            raise RegistryError(
                f"{path}: unknown top-level key '{key}'{did_you_mean(key, TOP_LEVEL)}; "
                "expected [[sources]], [defaults] and [pricing]"
            )
    defaults = _validate(Defaults, data.get("defaults", {}), path, "[defaults]")
    pricing = _validate(Pricing, data.get("pricing", {}), path, "[pricing]")
    raw_sources = data.get("sources", [])
    if not isinstance(raw_sources, list):
        raise RegistryError(f"{path}: 'sources' must be an array of tables: write [[sources]]")
    sources: list[SourceConfig] = []
    for i, raw in enumerate(raw_sources, start=1):
        if not isinstance(raw, dict):
            raise RegistryError(f"{path}: sources entry {i} must be a table: write [[sources]]")
        sid = raw.get("source_id")
        label = f"source '{sid}':" if isinstance(sid, str) and sid else f"[[sources]] entry {i}:"
        sources.append(_validate(SourceConfig, raw, path, label))
    raw_pricing = data.get("pricing")
    try:
        registry = Registry(
            path=path,
            sources=sources,
            defaults=defaults,
            pricing=pricing,
            pricing_keys=None if raw_pricing is None else tuple(raw_pricing),
            legacy=legacy,
        )
    except ValidationError as exc:
        raise RegistryError(f"{path}: {_describe(exc.errors(), fields=())}") from None
    _warn_shared_identities(registry)
    return registry


def _warn_shared_identities(registry: Registry) -> None:
    """Two sources with one node_id/env are allowed (two endpoints of one exporter), but
    their data is one node's series, so a typo here would silently merge two nodes."""
    for node_id, env, ids in registry.shared_identities():
        names = ", ".join(f"'{i}'" for i in ids)
        log.warning(
            "%s: sources %s have the same node_id '%s' and env '%s': billing treats their "
            "data as one node's (fine for two endpoints of one exporter; otherwise fix one "
            "of them)",
            registry.path,
            names,
            node_id,
            env,
        )


def _validate(model: type[M], raw: Any, path: Path, label: str) -> M:
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: {label} must be a table")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        fields = tuple(model.model_fields)
        raise RegistryError(f"{path}: {label} {_describe(exc.errors(), fields=fields)}") from None


def _describe(errors: list[ErrorDetails], *, fields: tuple[str, ...]) -> str:
    """The first error as one sentence; the count of further ones in brackets."""
    first = _one(errors[0], fields)
    if len(errors) > 1:
        first += f" (+{len(errors) - 1} more {'error' if len(errors) == 2 else 'errors'})"
    return first


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _one(err: ErrorDetails, fields: tuple[str, ...]) -> str:
    etype = err["type"]
    loc = tuple(err["loc"])
    name = _loc(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if etype == "extra_forbidden":
        leaf = str(loc[-1])
        known = fields if len(loc) == 1 else ()
        return f"unknown field '{leaf}'{did_you_mean(leaf, known)}"
    if etype == "missing":
        return f"missing required field '{name}'"
    if not name:
        return msg
    field = str(loc[0])
    if etype == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        got = err.get("input")
        shown = f" (got {got!r})" if isinstance(got, str) and not field.endswith("_ref") else ""
        return f"{name} must be one of {expected}{shown}"
    if etype in ("bool_type", "bool_parsing"):
        return f"{name} must be true or false (without quotes)"
    if etype in ("int_type", "int_parsing"):
        return f"{name} must be an integer (without quotes)"
    if etype in ("string_type",):
        return f"{name} must be a string (in quotes)"
    if msg.startswith(_SENTENCE_VERBS):
        return f"{name} {msg}"
    return f"{name}: {msg}"


def _toml_error(message: str) -> str:
    m = _TOML_POS.search(message)
    if m is None:
        return f"invalid TOML: {message}"
    core = message[: m.start()]
    if m.group(1):
        return f"line {m.group(1)}: invalid TOML: {core} (column {m.group(2)})"
    return f"invalid TOML: {core} (at end of file)"


# --- legacy single-source mode ---------------------------------------------------------


def legacy_registry(path: Path) -> Registry:
    """The implicit registry of the pre-registry deployment: one ``EXPORTER_BASE_URL``.

    node_id/env come from ``EXPORTER_NODE_ID``/``EXPORTER_ENV`` (defaults ``legacy`` and
    ``default``); ``EXPORTER_TOKEN_REF`` (a ref, never a token) selects bearer auth;
    ``EXPORTER_CA_BUNDLE_REF`` defaults to the OS trust store for https. Plain http is
    accepted on a loopback host only, as the compatibility mode it replaces did.
    """
    url = os.environ.get("EXPORTER_BASE_URL", "").strip()
    token_ref = os.environ.get("EXPORTER_TOKEN_REF", "").strip() or None
    raw: dict[str, Any] = {
        "source_id": LEGACY_SOURCE_ID,
        "node_id": os.environ.get("EXPORTER_NODE_ID", "").strip() or LEGACY_NODE_ID,
        "env": os.environ.get("EXPORTER_ENV", "").strip() or LEGACY_ENV,
        "base_url": url,
        "api": "latest",
        "auth_mode": "bearer" if token_ref else "none",
    }
    if token_ref:
        raw["credential_ref"] = token_ref
    if url.startswith("http://"):
        raw["allow_insecure_http"] = True
    else:
        raw["ca_bundle_ref"] = os.environ.get("EXPORTER_CA_BUNDLE_REF", "").strip() or "system"
    label = f"{path} is missing, so EXPORTER_BASE_URL is used (legacy mode):"
    try:
        source = SourceConfig.model_validate(raw)
    except ValidationError as exc:
        msg = _describe(exc.errors(), fields=tuple(SourceConfig.model_fields))
        for env_name, field in (
            ("EXPORTER_BASE_URL", "base_url"),
            ("EXPORTER_TOKEN_REF", "credential_ref"),
            ("EXPORTER_CA_BUNDLE_REF", "ca_bundle_ref"),
        ):
            msg = msg.replace(field, env_name)
        if 'auth_mode = "none"' in msg:
            msg = (
                "an https:// EXPORTER_BASE_URL needs EXPORTER_TOKEN_REF (e.g. env:EXPORTER_TOKEN)"
                " or a sources.toml with mTLS"
            )
        raise RegistryError(f"{label} {msg}") from None
    return Registry(path=path, sources=[source], legacy=True)

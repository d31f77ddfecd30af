"""The validated source registry: ``[[sources]]``, ``[defaults]`` and ``[pricing]``.

Field rules that concern one value live on the field; rules that relate several fields of
one source live on ``SourceConfig``; rules that need the defaults or other sources live on
``Registry``. Messages start with the field they are about so that the loader can prefix
them with file and source and print one line. Secrets never appear here, only references.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    model_validator,
)

from billing_cli._errors import ConfigError
from billing_cli._time import TimeFormatError, parse_duration_seconds
from billing_cli.pricing import Pricing
from billing_cli.registry.credentials import CredentialRef, RefSyntaxError

AuthMode = Literal["mtls", "bearer", "mtls+bearer", "none"]
Api = Literal["window", "latest"]

SOURCE_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# The one name accepted as loopback. Not "localhost." (a fully qualified DNS name: the
# resolver may ask DNS, and a bearer token over plain http could leave the host), nor any
# other name: only literal loopback addresses and this.
LOOPBACK_NAMES = frozenset({"localhost"})


# --- single values -------------------------------------------------------------------


def _duration(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError('write durations as strings like "30s", "2m", "1h"')
    try:
        parse_duration_seconds(value)
    except TimeFormatError as exc:
        raise ValueError(str(exc)) from None
    return value.strip()


def _ref(value: Any, *, allow_system: bool = False) -> str:
    try:
        return str(CredentialRef.parse(value, field="value", allow_system=allow_system))
    except RefSyntaxError as exc:
        # The field name is added by the loader from the error location.
        raise ValueError(str(exc).removeprefix("value").lstrip(": ")) from None


def _secret_ref(value: Any) -> str:
    return _ref(value)


def _ca_ref(value: Any) -> str:
    return _ref(value, allow_system=True)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _source_id(value: str) -> str:
    if not SOURCE_ID_RE.fullmatch(value):
        raise ValueError(f"must match [A-Za-z0-9._-]+ (got {value!r})")
    return value


def _server_name(value: str) -> str:
    name = value.removesuffix(".")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(
            f"must be a DNS name, not an IP address (got {value!r}); "
            "an IP in base_url needs a certificate with that IP, or a server_name DNS name"
        )
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(lbl) for lbl in name.split(".")):
        raise ValueError(f"must be a valid DNS name, e.g. node1.example.net (got {value!r})")
    return name.lower()


Duration = Annotated[str, BeforeValidator(_duration)]

DEFAULT_RETENTION = "35d"  # Stripe's window for late meter events (DESIGN §6)
MIN_RETENTION_S = 86400.0
SecretRef = Annotated[str, BeforeValidator(_secret_ref)]
CaRef = Annotated[str, BeforeValidator(_ca_ref)]
NonEmpty = Annotated[str, AfterValidator(_not_blank)]


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        name = host.removesuffix(".")
        return len(name) <= 253 and all(_DNS_LABEL.fullmatch(lbl) for lbl in name.split("."))
    return True


def is_loopback_host(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a close match, else empty: typo protection."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


# --- [defaults] ------------------------------------------------------------------------

MIB = 1024 * 1024
# Health (DESIGN §8): with no stale_after set, a source whose newest snapshot is older than
# this many collect intervals (and at least MIN_STALE_AFTER_S) is stale.
STALE_AFTER_INTERVALS = 5
MIN_STALE_AFTER_S = 300.0
RefusedShare = Annotated[float, Field(ge=0, le=1)]


class Defaults(BaseModel):
    """``[defaults]``: values every source inherits unless it sets its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    collect_interval: Duration = "1m"
    request_timeout: Duration = "10s"
    overlap: Duration = "2m"
    initial_lookback: Duration = "1h"
    chunk: Duration = "1h"
    ca_bundle_ref: CaRef | None = None
    max_response_bytes: StrictInt = Field(default=64 * MIB, gt=0)
    retry_attempts: StrictInt = Field(default=3, ge=1, le=20)
    page_limit: StrictInt = Field(default=1000, ge=1, le=100_000)
    stale_after: Duration | None = None
    max_refused_share: RefusedShare = 0.1
    # How late data may arrive (DESIGN §6): observations older than this are compacted
    # away and data older than it is refused (``beyond_retention``).
    retention: Duration = DEFAULT_RETENTION

    @model_validator(mode="after")
    def _timeout_below_interval(self) -> Defaults:
        if self.request_timeout_s >= self.collect_interval_s:
            raise ValueError(
                f"request_timeout ({self.request_timeout}) must be shorter than "
                f"collect_interval ({self.collect_interval})"
            )
        if self.retention_s < MIN_RETENTION_S:
            raise ValueError(
                f"retention ({self.retention}) must be at least 1d: a shorter horizon would"
                " refuse what a delayed pull or a reconcile of yesterday still delivers"
            )
        return self

    @property
    def retention_s(self) -> float:
        return parse_duration_seconds(self.retention)

    @property
    def collect_interval_s(self) -> float:
        return parse_duration_seconds(self.collect_interval)

    @property
    def request_timeout_s(self) -> float:
        return parse_duration_seconds(self.request_timeout)

    @property
    def overlap_s(self) -> float:
        return parse_duration_seconds(self.overlap)

    @property
    def initial_lookback_s(self) -> float:
        return parse_duration_seconds(self.initial_lookback)

    @property
    def chunk_s(self) -> float:
        return parse_duration_seconds(self.chunk)


# --- [[sources]] -----------------------------------------------------------------------


class SourceConfig(BaseModel):
    """One exporter endpoint. Optional fields fall back to ``[defaults]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_id: Annotated[str, AfterValidator(_source_id)]
    node_id: NonEmpty
    env: NonEmpty
    base_url: str
    enabled: StrictBool = True
    auth_mode: AuthMode
    credential_ref: SecretRef | None = None
    client_cert_ref: SecretRef | None = None
    client_key_ref: SecretRef | None = None
    ca_bundle_ref: CaRef | None = None
    server_name: Annotated[str, AfterValidator(_server_name)] | None = None
    collect_interval: Duration | None = None
    request_timeout: Duration | None = None
    api: Api = "window"
    allow_insecure_http: StrictBool = False
    max_response_bytes: StrictInt | None = Field(default=None, gt=0)
    stale_after: Duration | None = None
    max_refused_share: RefusedShare | None = None

    # Set by ``Registry`` so that resolved values need no extra argument.
    _defaults: Defaults = PrivateAttr(default_factory=Defaults)

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        self._check_url()
        self._check_auth()
        return self

    def _check_url(self) -> None:
        url = self.base_url
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            # The URL may carry credentials; do not echo it.
            raise ValueError("base_url is not a valid URL") from None
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise ValueError(
                "base_url must not contain credentials (user:password@); "
                "use auth_mode and credential_ref (value not shown)"
            )
        if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
            raise ValueError(
                "base_url must not contain a query string or fragment (value not shown)"
            )
        if parts.scheme not in ("https", "http") or not host:
            if parts.scheme in ("https", "http"):
                raise ValueError(f"base_url has no host (got {url})")
            raise ValueError(f"base_url must be https:// (got {url})")
        if not _valid_host(host):
            raise ValueError(f"base_url has an invalid host name (got {url})")
        if parts.scheme == "http":
            loopback = is_loopback_host(host)
            if not loopback:
                hint = (
                    "; allow_insecure_http only permits loopback hosts "
                    "(127.0.0.0/8, ::1, localhost)"
                    if self.allow_insecure_http
                    else ""
                )
                raise ValueError(f"base_url must be https:// (got {url}){hint}")
            if not self.allow_insecure_http:
                raise ValueError(
                    f"base_url must be https:// (got {url}); plain http on a loopback host "
                    "needs allow_insecure_http = true (development only)"
                )
            for name in ("ca_bundle_ref", "server_name"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is set but base_url is http:// (no TLS): remove it")

    @property
    def is_insecure_loopback(self) -> bool:
        return urlsplit(self.base_url).scheme == "http"  # urlsplit lower-cases the scheme

    def _check_auth(self) -> None:
        mode = self.auth_mode
        needs = {
            "mtls": ("client_cert_ref", "client_key_ref"),
            "bearer": ("credential_ref",),
            "mtls+bearer": ("client_cert_ref", "client_key_ref", "credential_ref"),
            "none": (),
        }[mode]
        missing = [f for f in needs if getattr(self, f) is None]
        if missing:
            raise ValueError(
                f'auth_mode = "{mode}" needs {" and ".join(needs)} (missing: {", ".join(missing)})'
            )
        unused = [
            f
            for f in ("credential_ref", "client_cert_ref", "client_key_ref")
            if f not in needs and getattr(self, f) is not None
        ]
        if unused:
            verb, pron = ("is", "it") if len(unused) == 1 else ("are", "them")
            raise ValueError(
                f'{", ".join(unused)} {verb} set but auth_mode = "{mode}" does not use '
                f"{pron}: remove {pron} or change auth_mode"
            )
        if mode == "none" and not self.is_insecure_loopback:
            raise ValueError(
                'auth_mode = "none" is only allowed for an http:// loopback base_url with '
                "allow_insecure_http = true (development); use mtls or bearer"
            )
        if "mtls" in mode and self.is_insecure_loopback:
            raise ValueError(
                f'auth_mode = "{mode}" needs https:// (client certificates are part of TLS)'
            )

    # --- resolved values for consumers ------------------------------------------------

    @property
    def defaults(self) -> Defaults:
        return self._defaults

    @property
    def effective_collect_interval(self) -> str:
        return self.collect_interval or self._defaults.collect_interval

    @property
    def effective_request_timeout(self) -> str:
        return self.request_timeout or self._defaults.request_timeout

    @property
    def collect_interval_s(self) -> float:
        return parse_duration_seconds(self.effective_collect_interval)

    @property
    def request_timeout_s(self) -> float:
        return parse_duration_seconds(self.effective_request_timeout)

    @property
    def effective_ca_bundle_ref(self) -> str | None:
        """The source's CA ref, else the default one; ``None`` only for http loopback."""
        if self.is_insecure_loopback:
            return None
        return self.ca_bundle_ref or self._defaults.ca_bundle_ref

    @property
    def effective_max_response_bytes(self) -> int:
        return self.max_response_bytes or self._defaults.max_response_bytes

    @property
    def stale_after_s(self) -> float:
        """How old the newest snapshot received may get before the source is stale: its
        own ``stale_after``, else ``[defaults]``, else max(5 x collect_interval, 5m)."""
        explicit = self.stale_after or self._defaults.stale_after
        if explicit is not None:
            return parse_duration_seconds(explicit)
        return max(STALE_AFTER_INTERVALS * self.collect_interval_s, MIN_STALE_AFTER_S)

    @property
    def effective_stale_after(self) -> str:
        """``stale_after_s`` as the registry would write it (for display)."""
        explicit = self.stale_after or self._defaults.stale_after
        return explicit if explicit is not None else f"{self.stale_after_s:g}s"

    @property
    def effective_max_refused_share(self) -> float:
        if self.max_refused_share is not None:
            return self.max_refused_share
        return self._defaults.max_refused_share

    @property
    def url(self) -> str:
        """``base_url`` without a trailing slash, ready for ``url + "/v1/..."``."""
        return self.base_url.rstrip("/")


# --- the whole file --------------------------------------------------------------------


class Registry(BaseModel):
    """The loaded registry. ``legacy`` marks the implicit ``EXPORTER_BASE_URL`` source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    sources: list[SourceConfig] = Field(default_factory=list)
    defaults: Defaults = Field(default_factory=Defaults)
    pricing: Pricing = Field(default_factory=Pricing)
    # The keys the [pricing] table set, None without a [pricing] table: a price that was
    # never written rates everything at zero, and must never do so silently.
    pricing_keys: tuple[str, ...] | None = None
    legacy: bool = False

    @model_validator(mode="after")
    def _cross_checks(self) -> Registry:
        seen: dict[str, int] = {}
        for i, src in enumerate(self.sources, start=1):
            if src.source_id in seen:
                raise ValueError(
                    f"source '{src.source_id}': source_id must be unique "
                    f"(entries {seen[src.source_id]} and {i} both use it)"
                )
            seen[src.source_id] = i
            src._defaults = self.defaults
            if src.effective_ca_bundle_ref is None and not src.is_insecure_loopback:
                raise ValueError(
                    f"source '{src.source_id}': no CA configured: set ca_bundle_ref = "
                    '"file:/path/ca.pem" on the source or in [defaults], or ca_bundle_ref = '
                    '"system" to use the OS trust store explicitly'
                )
            if src.request_timeout_s >= src.collect_interval_s:
                raise ValueError(
                    f"source '{src.source_id}': request_timeout ({src.effective_request_timeout})"
                    f" must be shorter than collect_interval ({src.effective_collect_interval})"
                )
        return self

    def unpriced_reason(self) -> str | None:
        """Why everything rates at zero without anyone having said so, or None."""
        if self.pricing_keys is None:
            return (
                "no [pricing] table: everything rates at zero "
                "(add [pricing] with price_per_unit to rate)"
            )
        if "price_per_unit" not in self.pricing_keys:
            return (
                "[pricing] sets no price_per_unit: everything rates at zero "
                '(set price_per_unit, "0" to make it free on purpose)'
            )
        return None

    @property
    def ids(self) -> list[str]:
        return [s.source_id for s in self.sources]

    def shared_identities(self) -> list[tuple[str, str, list[str]]]:
        """``(node_id, env, source_ids)`` for every identity more than one source claims."""
        by_identity: dict[tuple[str, str], list[str]] = {}
        for s in self.sources:
            by_identity.setdefault((s.node_id, s.env), []).append(s.source_id)
        return [(n, e, ids) for (n, e), ids in by_identity.items() if len(ids) > 1]

    def enabled_sources(self) -> list[SourceConfig]:
        return [s for s in self.sources if s.enabled]

    def get(self, source_id: str) -> SourceConfig:
        for src in self.sources:
            if src.source_id == source_id:
                return src
        known = ", ".join(self.ids) or "none"
        raise ConfigError(
            f"{self.path}: no source '{source_id}'{did_you_mean(source_id, self.ids)}; "
            f"known sources: {known} (see `billing sources list`)"
        )

"""HTTPS transport to one exporter: TLS, auth, retries, size cap, one-line errors.

One ``SourceClient`` per source holds one ``httpx.Client`` (connection reuse within a
source, never across sources: credentials are per source). It returns raw response bodies;
parsing the wire format is ``billing_cli.wire``'s job.

Security rules kept here:
- certificate verification is always on (see ``_tls``); ``server_name`` replaces the URL
  host for SNI *and* hostname verification (httpx's ``sni_hostname`` extension is what
  ``ssl`` uses as ``server_hostname``, so OpenSSL checks the certificate against it);
- redirects are never followed;
- ``request_timeout`` bounds the whole request (connect, TLS, headers, body) and the
  source's time budget bounds it too (``_deadline``); :meth:`SourceClient.abort` ends a
  request in flight from another thread (an interrupted run);
- the body is capped while streaming, through every Content-Encoding layer (``_decode``),
  so an oversize or bomb answer never sits in memory whole;
- no message or log line contains the token, key material or a full URL with its query:
  every message is built through the source's :class:`~billing_cli.collect.redact.Redactor`.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx
import tenacity

from billing_cli._errors import (
    AuthError,
    CertificateExpiredError,
    ClientCertificateRejectedError,
    ConfigError,
    CredentialError,
    HostnameMismatchError,
    HTTPStatusError,
    ProtocolError,
    RedirectRefusedError,
    ResponseTooLargeError,
    SourceError,
    TLSError,
    TransportError,
    UnknownCAError,
    one_line,
)
from billing_cli._time import format_rfc3339_ns
from billing_cli.collect import _decode
from billing_cli.collect._deadline import DeadlineBackend, DeadlineTransport
from billing_cli.collect._tls import (
    ClientCertificate,
    PemSource,
    TLSContextError,
    TLSFailure,
    build_ssl_context,
    classify_tls_error,
    tls_reason,
)
from billing_cli.collect.redact import Redactor
from billing_cli.registry import credentials
from billing_cli.registry.model import Defaults, SourceConfig

log = logging.getLogger("billing_cli.collect.transport")

# A TransportConfig built by hand (tests, tools) gets the registry's own [defaults].
_REGISTRY_DEFAULTS = Defaults()
DEFAULT_MAX_RESPONSE_BYTES = _REGISTRY_DEFAULTS.max_response_bytes
DEFAULT_RETRY_ATTEMPTS = _REGISTRY_DEFAULTS.retry_attempts
DEFAULT_TIMEOUT_S = float(_REGISTRY_DEFAULTS.request_timeout_s)
WINDOW_PATH = "/v1/snapshots/window"
LATEST_PATH = "/v1/snapshots/latest"
# A bearer token must be visible ASCII (RFC 6750 b64token is narrower; be lenient but safe).
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
# An HTTP delta-seconds or Content-Length: ASCII digits only (str.isdigit() takes '²').
_SECONDS = re.compile(r"[0-9]{1,18}")
# Backoff between attempts: exponential with full jitter, 0.5 s base, 10 s ceiling.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 10.0
# How much of an error response is read and quoted (the deployed exporter's errors are
# one text/plain line, nginx's a small HTML page whose <title> says it all).
ERROR_BODY_BYTES = 2048
ERROR_BODY_CHARS = 160
_HTML_TITLE = re.compile(r"<title>\s*(.*?)\s*</title>", re.I | re.S)


@dataclass(frozen=True)
class TransportConfig:
    source_id: str
    base_url: str
    auth_mode: str
    bearer_token: str | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    server_name: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS
    budget_s: float = 300.0
    # The client key PEM(s), only so that the source's redaction step knows them.
    client_key_pems: tuple[bytes, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        scheme = urlsplit(self.base_url).scheme
        if scheme == "https" and self.ssl_context is None:
            raise ConfigError(f"source '{self.source_id}': https base_url needs a TLS context")
        if scheme not in ("https", "http"):
            raise ConfigError(f"source '{self.source_id}': base_url must be https://")
        if self.retry_attempts < 1 or self.timeout_s <= 0 or self.budget_s <= 0:
            raise ConfigError(
                f"source '{self.source_id}': retry_attempts, timeout and budget must be positive"
            )


def default_budget_s(timeout_s: float, retry_attempts: int) -> float:
    """Room for every attempt of a few requests plus backoff; the collector may pass its own."""
    return max(120.0, timeout_s * retry_attempts * 4)


def build_transport_config(
    source: SourceConfig, *, budget_s: float | None = None
) -> TransportConfig:
    """Resolve a source's refs into a ready ``TransportConfig``.

    Timeout, CA bundle, size cap and retry attempts are the source's resolved values
    (its own setting, else the registry's ``[defaults]``). Raises ``CredentialError`` (a
    ref cannot be resolved, or its material is not valid PEM) or ``ConfigError``.
    Messages name the ref, never its value.
    """
    sid = source.source_id
    base_url = source.url
    auth = source.auth_mode
    timeout_s = source.request_timeout_s
    attempts = source.defaults.retry_attempts

    token: str | None = None
    if "bearer" in auth:
        if not source.credential_ref:
            raise ConfigError(f"source '{sid}': auth_mode {auth} needs credential_ref")
        token = credentials.resolve_secret(
            source.credential_ref, source_id=sid, field="credential_ref"
        )
        if not _HEADER_SAFE.fullmatch(token):
            raise CredentialError(
                f"source '{sid}': credential_ref {source.credential_ref}: the token has "
                f"characters not allowed in an HTTP header (value not shown)"
            )

    ctx: ssl.SSLContext | None = None
    key_pems: tuple[bytes, ...] = ()
    if urlsplit(base_url).scheme == "https":
        client: ClientCertificate | None = None
        if "mtls" in auth:
            if not source.client_cert_ref or not source.client_key_ref:
                raise ConfigError(
                    f"source '{sid}': auth_mode {auth} needs client_cert_ref and client_key_ref"
                )
            client = ClientCertificate(
                cert=_pem_source(source.client_cert_ref, sid, "client_cert_ref"),
                key=_pem_source(source.client_key_ref, sid, "client_key_ref"),
            )
            key = client.key
            key_pems = (key.read_bytes() if isinstance(key, Path) else key,)
        ca_ref = source.effective_ca_bundle_ref
        if not ca_ref:
            # The OS trust store is an explicit opt-in, never a silent fallback.
            raise ConfigError(
                f"source '{sid}': https needs ca_bundle_ref (file:/path/to/ca.pem, or "
                f'"system" for the OS trust store) on the source or in [defaults]'
            )
        ca_pem = (
            None
            if ca_ref.strip() == "system"
            else credentials.resolve_bytes(ca_ref, source_id=sid, field="ca_bundle_ref")
        )
        try:
            ctx = build_ssl_context(ca_pem=ca_pem, client=client)
        except TLSContextError as exc:
            fields = "ca_bundle_ref" if "CA bundle" in str(exc) else "client_cert_ref/key_ref"
            raise CredentialError(f"source '{sid}': {fields}: {exc}") from None

    return TransportConfig(
        source_id=sid,
        base_url=base_url,
        auth_mode=auth,
        bearer_token=token,
        ssl_context=ctx,
        server_name=source.server_name or None,
        timeout_s=timeout_s,
        max_response_bytes=source.effective_max_response_bytes,
        retry_attempts=attempts,
        budget_s=budget_s if budget_s is not None else default_budget_s(timeout_s, attempts),
        client_key_pems=key_pems,
    )


def _pem_source(ref: str, source_id: str, field_name: str) -> PemSource:
    # Files are handed to OpenSSL by path; env: material must go through a private temp file.
    path = credentials.file_path(ref, source_id=source_id, field=field_name)
    if path is not None:
        return Path(path)
    return credentials.resolve_bytes(ref, source_id=source_id, field=field_name)


# --- retry plumbing ----------------------------------------------------------------------


class _Retryable(Exception):
    """Wraps a ``SourceError`` that deserves another attempt (connect, timeout, 5xx, 429)."""

    def __init__(self, error: SourceError, retry_after_s: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


class SourceClient:
    """HTTPS client for one source. Use as a context manager; not thread-safe."""

    def __init__(
        self,
        config: TransportConfig,
        *,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config
        self.redactor = Redactor.of(config.bearer_token, config.client_key_pems)
        self._backend = DeadlineBackend()
        # Backoff sleeps end early when the request is aborted (the run is stopping).
        self._sleep = sleep or self._backend.sleep
        self._clock = clock
        self._deadline = clock() + config.budget_s
        self._host = urlsplit(config.base_url).hostname or "?"
        headers = {
            "Accept": "application/json",
            "Accept-Encoding": _decode.ACCEPT_ENCODING,
            "User-Agent": "billing-collector",
        }
        if config.bearer_token is not None:
            headers["Authorization"] = f"Bearer {config.bearer_token}"
        if config.server_name:
            # Virtual-hosting proxies route by Host; the exporter's name is server_name.
            port = urlsplit(config.base_url).port
            headers["Host"] = f"{config.server_name}:{port}" if port else config.server_name
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        self._client = httpx.Client(
            verify=config.ssl_context if config.ssl_context is not None else True,
            headers=headers,
            follow_redirects=False,
            timeout=httpx.Timeout(config.timeout_s),
            limits=limits,
            transport=transport
            or DeadlineTransport(self._backend, ssl_context=config.ssl_context, limits=limits),
            trust_env=False,  # no proxy or netrc credentials from the environment
        )
        self.requests_made = 0
        # httpx logs every URL at INFO (seen at -vv), query and cursor included: the
        # cursor is the exporter's text and may carry the token back.
        self._log_filter = _RedactingFilter(self.redactor)
        for name in _HTTP_LOGGERS:
            logging.getLogger(name).addFilter(self._log_filter)

    # -- context manager --
    def __enter__(self) -> SourceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()
        for name in _HTTP_LOGGERS:
            logging.getLogger(name).removeFilter(self._log_filter)

    def remaining_s(self) -> float:
        return self._deadline - self._clock()

    def abort(self) -> None:
        """End the request in flight (and refuse new ones) now; safe from any thread."""
        self._backend.abort()

    # -- public API --
    def get_window(self, since_ns: int, until_ns: int, limit: int, cursor: str | None) -> bytes:
        params: dict[str, str] = {
            "since": format_rfc3339_ns(since_ns),
            "until": format_rfc3339_ns(until_ns),
            "limit": str(limit),
        }
        if cursor is not None:
            params["cursor"] = cursor  # opaque: sent back byte for byte
        return self._get(WINDOW_PATH, params)

    def get_latest(self) -> bytes:
        return self._get(LATEST_PATH, {})

    # -- internals --
    def _err(self, cls: type[SourceError], message: str) -> SourceError:
        return cls(self.config.source_id, self.redactor.text(message))

    def _get(self, path: str, params: dict[str, str]) -> bytes:
        url = self.config.base_url + path
        attempts = self.config.retry_attempts

        planned: dict[int, float] = {}  # attempt number -> delay before the next attempt
        budget_hit: list[str] = []

        def delay_for(state: tenacity.RetryCallState) -> float:
            # Memoised: tenacity versions differ in whether stop or wait runs first.
            n = state.attempt_number
            if n not in planned:
                exc = state.outcome.exception() if state.outcome else None
                retry_after = exc.retry_after_s if isinstance(exc, _Retryable) else None
                if retry_after is not None:
                    planned[n] = retry_after
                else:
                    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (n - 1))
                    planned[n] = random.uniform(0, ceiling)  # noqa: S311 - jitter, not crypto
            return planned[n]

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= attempts or self._backend.aborted:
                return True
            delay, remaining = delay_for(state), self.remaining_s()
            if remaining <= 0:
                budget_hit.append("used up")
                return True
            if delay >= remaining:
                # Sleeping would end past the budget (e.g. a long Retry-After): give up now
                # rather than burn what is left of the source's time.
                when = f"{delay:.0f}s" if math.isfinite(delay) else "an endless wait"
                budget_hit.append(f"next retry in {when} is past it")
                return True
            return False

        def wait(state: tenacity.RetryCallState) -> float:
            return max(0.0, min(delay_for(state), self.remaining_s()))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait_s = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "%s; retrying in %.1fs (attempt %d of %d)",
                exc,
                wait_s,
                state.attempt_number + 1,
                attempts,
            )

        retrying = tenacity.Retrying(
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(self._attempt, url, params)
        except _Retryable as exc:
            err = exc.error
            if budget_hit:
                budget = f"time budget of {self.config.budget_s:g}s: {budget_hit[-1]}"
                raise _reworded(err, f"{_strip_source(err)} ({budget})") from None
            raise _reworded(err, _strip_source(err) + f" after {attempts} attempts") from None

    def _attempt(self, url: str, params: dict[str, str]) -> bytes:
        if self._backend.aborted:
            raise self._err(TransportError, f"request to {self._host} stopped: the run is ending")
        remaining = self.remaining_s()
        if remaining <= 0:
            raise self._err(TransportError, f"time budget of {self.config.budget_s:g}s used up")
        timeout_s = min(self.config.timeout_s, remaining)
        limit = (
            f"{timeout_s:g}s"
            if timeout_s >= self.config.timeout_s
            else f"{timeout_s:.3g}s, what was left of the time budget of {self.config.budget_s:g}s"
        )
        extensions: dict[str, Any] = {}
        if self.config.server_name:
            extensions["sni_hostname"] = self.config.server_name
        try:
            request = self._client.build_request(
                "GET", url, params=params, extensions=extensions, timeout=httpx.Timeout(timeout_s)
            )
        except (httpx.InvalidURL, ValueError):
            # Only reachable through an exporter's cursor (the rest is ours): never exit 70.
            raise self._err(
                ProtocolError, f"the request to {self._host} could not be built (bad cursor?)"
            ) from None
        started = self._clock()
        self.requests_made += 1
        # One deadline for connect, TLS, headers and body together (see _deadline).
        self._backend.deadline = time.monotonic() + timeout_s
        try:
            return self._send(request, started, timeout_s, limit)
        finally:
            self._backend.deadline = None

    def _send(self, request: httpx.Request, started: float, timeout_s: float, limit: str) -> bytes:
        try:
            response = self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise _Retryable(
                self._err(TransportError, f"request to {self._host} timed out after {limit}")
            ) from None
        except (httpx.TransportError, ssl.SSLError, OSError) as exc:
            self._raise_network(exc)
        except httpx.HTTPError as exc:
            # Anything else httpx may raise (e.g. a malformed request) must still be one line.
            raise self._err(
                TransportError, f"request to {self._host} failed ({type(exc).__name__})"
            ) from None
        try:
            return self._read(response, started, timeout_s)
        except httpx.TimeoutException:
            raise _Retryable(
                self._err(TransportError, f"response from {self._host} timed out after {limit}")
            ) from None
        except (httpx.TransportError, ssl.SSLError, OSError) as exc:
            self._raise_network(exc, reading=True)
        except httpx.DecodingError:
            raise self._err(
                ProtocolError,
                f"the response from {self._host} could not be decoded (bad Content-Encoding)",
            ) from None
        except httpx.HTTPError as exc:
            what = type(exc).__name__
            raise self._err(
                TransportError, f"reading the response from {self._host} failed ({what})"
            ) from None
        finally:
            response.close()

    def _raise_network(self, exc: BaseException, *, reading: bool = False) -> NoReturn:
        kind = classify_tls_error(exc)
        host = self._host
        name = self.config.server_name
        if kind is TLSFailure.UNKNOWN_CA:
            raise self._err(
                UnknownCAError,
                f"TLS: the certificate of {host} is not signed by a trusted CA; check "
                f"ca_bundle_ref points at the CA that issued the exporter's certificate",
            ) from None
        if kind is TLSFailure.HOSTNAME_MISMATCH:
            expected = name or host
            hint = (
                "fix server_name to a name in the exporter certificate"
                if name
                else "set server_name to the name in the exporter certificate"
            )
            raise self._err(
                HostnameMismatchError,
                f"TLS: the certificate of {host} is not valid for '{expected}'; {hint}",
            ) from None
        if kind is TLSFailure.EXPIRED:
            raise self._err(
                CertificateExpiredError,
                f"TLS: the certificate of {host} is expired or not yet valid; renew the "
                f"exporter certificate (and check this host's clock)",
            ) from None
        if kind is TLSFailure.CLIENT_CERT_REJECTED:
            hint = _client_cert_hint(self.config.auth_mode)
            raise self._err(
                ClientCertificateRejectedError,
                f"TLS: {host} refused the client certificate ({tls_reason(exc)}); {hint}",
            ) from None
        if kind is TLSFailure.OTHER:
            reason = tls_reason(exc)
            raise self._err(TLSError, f"TLS handshake with {host} failed ({reason})") from None
        # Plain network failure: worth retrying.
        detail = _short_reason(exc)
        what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        where = (
            f"connection to {host} broke while reading the response"
            if reading
            else f"cannot reach {host}"
        )
        raise _Retryable(self._err(TransportError, f"{where} ({what})")) from None

    def _read(self, response: httpx.Response, started: float, timeout_s: float) -> bytes:
        status = response.status_code
        if 300 <= status < 400:
            location = response.headers.get("location", "")
            target = urlsplit(location).hostname or ("a relative path" if location else "nowhere")
            raise self._err(
                RedirectRefusedError,
                f"exporter answered HTTP {status} redirecting to {target}; redirects are not "
                f"followed: point base_url at the final address",
            )
        if status in (401, 403):
            raise self._err(
                AuthError,
                f"exporter {self._host} answered HTTP {status} "
                f"({'unauthorized' if status == 401 else 'forbidden'}); check credential_ref "
                f"and the exporter's token/client certificate for this source",
            )
        if status != 200:
            excerpt = self._error_body(response, started, timeout_s)
            said = f" ({excerpt})" if excerpt else ""
            if status == 400 and "ssl certificate" in excerpt.lower():
                # nginx (the TLS terminator in front of the deployed exporter) checks the
                # client certificate after the handshake and answers 400 when it is missing
                # or not trusted: the same failure as a TLS alert from a direct mTLS peer.
                raise self._err(
                    ClientCertificateRejectedError,
                    f"TLS terminator of {self._host} refused the client certificate{said}; "
                    + _client_cert_hint(self.config.auth_mode),
                )
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                raise _Retryable(
                    self._status_error(
                        status, f"exporter {self._host} answered HTTP {status}{said}", excerpt
                    ),
                    retry_after,
                )
            hint = (
                "; check base_url (the exporter serves /v1/snapshots/ below it)"
                if status == 404
                else ""
            )
            raise self._status_error(
                status,
                f"exporter {self._host} answered HTTP {status} for {response.url.path}{said}{hint}",
                excerpt,
            )
        content_type = response.headers.get("content-type", "").lower()
        if content_type.startswith("text/html"):
            # The deployed exporter answers every unknown path, and /v1/snapshots/* while
            # its snapshots are switched off, with its HTML index page and HTTP 200.
            raise self._err(
                ProtocolError,
                f"exporter {self._host} answered an HTML page for {response.url.path}, not "
                "JSON: its snapshot API is off (the exporter needs EXPORTER_NODE_ID, "
                "ACCOUNTS_BASE_URL and INTERNAL_SERVICE_TOKEN) or base_url points elsewhere",
            )
        cap = self.config.max_response_bytes
        length = response.headers.get("content-length")
        if length is not None and _SECONDS.fullmatch(length) and int(length) > cap:
            raise self._err(ResponseTooLargeError, _too_large(cap, f"Content-Length {length}"))
        body = bytearray()
        try:
            for chunk in self._decoded(response, cap, started, timeout_s):
                body += chunk
                if len(body) > cap:
                    raise self._err(ResponseTooLargeError, _too_large(cap, "streamed body"))
        except _decode.TooLargeError as exc:
            what = "decompressed body" + (
                f", encoding layer {exc.layer} of {exc.layers}" if exc.layers > 1 else ""
            )
            raise self._err(ResponseTooLargeError, _too_large(cap, what)) from None
        return bytes(body)

    def _decoded(
        self, response: httpx.Response, cap: int, started: float, timeout_s: float
    ) -> Iterator[bytes]:
        """The body, with its Content-Encoding undone under the size cap (``_decode``):
        httpx's own decoding inflates each network chunk whole, bombs included."""
        try:
            codings = _decode.parse_encodings(response.headers.get_list("content-encoding"))
        except _decode.DecodeError as exc:
            raise self._err(ProtocolError, f"the response from {self._host}: {exc}") from None

        def clock_check() -> None:
            if self._clock() - started > timeout_s:
                raise httpx.ReadTimeout("total request time exceeded")

        raw = response.iter_raw()
        if not codings:
            for chunk in raw:
                yield chunk
                clock_check()
            return
        try:
            yield from _decode.decoded(raw, codings, cap, clock_check)
        except _decode.DecodeError as exc:
            raise self._err(
                ProtocolError, f"the response from {self._host} could not be decoded ({exc})"
            ) from None

    def _status_error(self, status: int, message: str, body: str) -> HTTPStatusError:
        r = self.redactor
        return HTTPStatusError(
            self.config.source_id, r.text(message), status=status, body=r.text(body)
        )

    def _error_body(self, response: httpx.Response, started: float, timeout_s: float) -> str:
        """The start of an error response as one printable line, the source's token
        removed (an exporter may echo a header back). Reads at most ``ERROR_BODY_BYTES``."""
        raw = bytearray()
        try:
            for chunk in self._decoded(response, ERROR_BODY_BYTES, started, timeout_s):
                raw += chunk
                if len(raw) >= ERROR_BODY_BYTES:
                    break
        except (_decode.TooLargeError, SourceError, httpx.HTTPError, OSError):
            pass  # what was read so far is enough to quote; the status is the error
        text = bytes(raw[:ERROR_BODY_BYTES]).decode("utf-8", "replace")
        title = _HTML_TITLE.search(text)
        if title:
            text = title.group(1)
        text = self.redactor.text(text)
        text = "".join(c if c.isprintable() else " " for c in text)
        return one_line(text, ERROR_BODY_CHARS)


_HTTP_LOGGERS = ("httpx", "httpcore")


class _RedactingFilter(logging.Filter):
    """Passes httpx's and httpcore's log records through one source's redaction step."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if self._redactor:
            text = record.getMessage()
            clean = self._redactor.text(text)
            if clean != text:
                record.msg, record.args = clean, None
        return True


def _client_cert_hint(auth_mode: str) -> str:
    if "mtls" in auth_mode:
        return "check client_cert_ref/client_key_ref are issued by the CA the exporter trusts"
    return (
        'the exporter requires mTLS: set auth_mode = "mtls" (or "mtls+bearer") with '
        "client_cert_ref and client_key_ref"
    )


def _reworded(err: SourceError, message: str) -> SourceError:
    """``err`` with another message, keeping its class and attributes (HTTP status...)."""
    new = type(err).__new__(type(err))
    new.__dict__.update(err.__dict__)
    new.args = (one_line(f"source '{err.source_id}': {message}"),)
    return new


def _too_large(cap: int, what: str) -> str:
    return (
        f"response exceeds max_response_bytes {cap} ({what}); lower the page limit or raise "
        f"max_response_bytes"
    )


def _strip_source(err: SourceError) -> str:
    prefix = f"source '{err.source_id}': "
    text = str(err)
    return text[len(prefix) :] if text.startswith(prefix) else text


def _short_reason(exc: BaseException) -> str:
    """First line of the underlying OS/network error, without URLs (which may carry queries)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "://" in text or "?" in text:
        return ""
    return text[:120]


__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "SourceClient",
    "TransportConfig",
    "build_transport_config",
    "parse_retry_after",
]

"""TLS contexts for exporter pulls, and the classification of TLS failures.

Verification is always on: every context comes from ``ssl.create_default_context()``
(``CERT_REQUIRED`` and hostname checking) and nothing here can turn that off. The CA is
either a pinned PEM bundle or, only when the registry says ``ca_bundle_ref = "system"``,
the OS trust store.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

# A PEM source is either a file we may load directly, or PEM bytes held in memory
# (from an ``env:`` ref) that OpenSSL can only load from a file.
PemSource = Path | bytes


@dataclass(frozen=True)
class ClientCertificate:
    cert: PemSource
    key: PemSource


class TLSContextError(ValueError):
    """The CA bundle or client certificate material could not be loaded (no secrets in text)."""


def build_ssl_context(
    *, ca_pem: bytes | None, client: ClientCertificate | None = None
) -> ssl.SSLContext:
    """A verifying client context: pinned CA from ``ca_pem``, else the OS trust store.

    ``ca_pem=None`` means the OS trust store; callers pass it only for ``system``.
    """
    if ca_pem is not None:
        try:
            ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise TLSContextError(f"CA bundle is not valid PEM ({type(exc).__name__})") from None
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client is not None:
        _load_client_cert(ctx, client)
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, client: ClientCertificate) -> None:
    with _as_file(client.cert) as cert_path, _as_file(client.key) as key_path:
        try:
            ctx.load_cert_chain(certfile=str(cert_path), keyfile=str(key_path))
        except (ssl.SSLError, OSError) as exc:
            # The OpenSSL reason (e.g. KEY_VALUES_MISMATCH) is safe; it never quotes material.
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise TLSContextError(
                f"client certificate/key could not be loaded ({reason})"
            ) from None


@contextlib.contextmanager
def _as_file(source: PemSource) -> Iterator[Path]:
    """Yield a path for ``source``; in-memory PEM goes to a private temp file, removed at once."""
    if isinstance(source, Path):
        yield source
        return
    # mkstemp creates the file 0600 and opens it O_EXCL, so no other user can read or swap it.
    fd, name = tempfile.mkstemp(prefix="billing-pem-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(source)
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


class TLSFailure(Enum):
    UNKNOWN_CA = "unknown_ca"
    HOSTNAME_MISMATCH = "hostname_mismatch"
    EXPIRED = "expired"
    CLIENT_CERT_REJECTED = "client_cert_rejected"
    OTHER = "other"


# OpenSSL X509_V_ERR_* codes (stable across OpenSSL 1.1 and 3.x).
_EXPIRED_CODES = {9, 10}  # not yet valid, has expired
_HOSTNAME_CODES = {62, 64}  # hostname mismatch, IP address mismatch
_UNKNOWN_CA_CODES = {2, 18, 19, 20, 21, 27, 28}

# Alerts the *server* sends when it does not accept our client certificate. Under TLS 1.3
# they arrive after our side considers the handshake done, i.e. on the first read.
_CLIENT_CERT_ALERTS = (
    "certificate required",
    "certificate_required",
    "bad certificate",
    "bad_certificate",
    "alert unknown ca",
    "unknown_ca",
    "certificate unknown",
    "certificate_unknown",
    "handshake failure",
    "handshake_failure",
)


def iter_causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def classify_tls_error(exc: BaseException) -> TLSFailure | None:
    """Which TLS failure ``exc`` (an httpx/httpcore/ssl error chain) stands for, if any."""
    is_tls = False
    texts: list[str] = []
    for e in iter_causes(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            code = e.verify_code
            if code in _EXPIRED_CODES:
                return TLSFailure.EXPIRED
            if code in _HOSTNAME_CODES:
                return TLSFailure.HOSTNAME_MISMATCH
            if code in _UNKNOWN_CA_CODES:
                return TLSFailure.UNKNOWN_CA
            is_tls = True
        elif isinstance(e, ssl.SSLError):
            is_tls = True
        texts.append(str(e).lower())
    text = " ".join(texts)
    if "certificate verify failed" in text:
        if "expired" in text or "not yet valid" in text:
            return TLSFailure.EXPIRED
        if "mismatch" in text or "not valid for" in text:
            return TLSFailure.HOSTNAME_MISMATCH
        return TLSFailure.UNKNOWN_CA
    if any(alert in text for alert in _CLIENT_CERT_ALERTS):
        return TLSFailure.CLIENT_CERT_REJECTED
    if is_tls or "[ssl" in text or "ssl:" in text:
        return TLSFailure.OTHER
    return None


def tls_reason(exc: BaseException) -> str:
    """A short, secret-free reason (the OpenSSL reason code) for a TLS error."""
    for e in iter_causes(exc):
        if isinstance(e, ssl.SSLError):
            if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
                return str(e.verify_message)
            if e.reason:
                return str(e.reason)
    return type(exc).__name__

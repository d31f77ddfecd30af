"""One precise exception hierarchy; the CLI maps it to exit codes and one-line messages.

Every expected failure is a ``BillingError`` whose ``str()`` is a single line that
names the file, source, field or flag involved and, where possible, what to do next.
Messages never contain secret values (tokens, key material): only references to them.
"""

from __future__ import annotations

import signal
from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes. Documented in the README; cron and monitoring rely on them."""

    OK = 0
    FAILED = 1  # at least one source failed, or a source is unhealthy (status)
    CONFIG = 2  # bad registry, bad flag, bad credential reference
    INPUT = 3  # ingest input could not be read or parsed at all; nothing written
    STORE = 4  # database unreachable, schema too new, or another store failure
    LOCKED = 75  # every selected source was skipped: other runs hold their locks (EX_TEMPFAIL)


def one_line(text: str, max_chars: int | None = None) -> str:
    """``text`` with every run of whitespace (newlines included) as one space, optionally
    cut to ``max_chars`` with an ellipsis. Shared by every error and error display."""
    line = " ".join(text.split())
    if max_chars is None or len(line) <= max_chars:
        return line
    return line[: max_chars - 1] + "…"


class BillingError(Exception):
    """Base of every expected failure."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str) -> None:
        # Keep messages to one line whatever the caller passed.
        super().__init__(one_line(message))

    @property
    def message(self) -> str:
        return str(self)


# --- configuration -----------------------------------------------------------------


class ConfigError(BillingError):
    """Bad registry, flag, environment or credential reference (exit 2)."""

    exit_code = ExitCode.CONFIG


class RegistryError(ConfigError):
    """The registry file is missing, unreadable or invalid."""


class CredentialError(ConfigError):
    """A ``*_ref`` cannot be resolved. The message names the ref, never the value."""


class UsageError(ConfigError):
    """A command-line flag or argument is invalid."""


class PeriodError(ConfigError):
    """An accounting period cannot be used that way: not ended yet (close), or closed
    (re-rate). A closed period is final."""


# --- input and store -----------------------------------------------------------------


class InputError(BillingError):
    """Ingest input cannot be read or parsed at all (exit 3); nothing was written."""

    exit_code = ExitCode.INPUT


class StoreError(BillingError):
    """The database cannot be opened, migrated or written (exit 4)."""

    exit_code = ExitCode.STORE


class IdentityMismatchError(BillingError):
    """Items carry a node_id/env that does not match the source they came from."""


# --- per-source collection failures --------------------------------------------------
# These fail one source; the collector records them and goes on with the others.


class SourceError(BillingError):
    """A source could not be collected. ``source_id`` is always part of the message."""

    def __init__(self, source_id: str, message: str) -> None:
        self.source_id = source_id
        super().__init__(f"source '{source_id}': {message}")


class TransportError(SourceError):
    """Network-level failure (connect, timeout, reset) after retries."""


class TLSError(TransportError):
    """TLS handshake failed. Subclasses say why."""


class UnknownCAError(TLSError):
    """The server certificate does not chain to the configured CA bundle."""


class HostnameMismatchError(TLSError):
    """The server certificate does not match the expected name."""


class CertificateExpiredError(TLSError):
    """The server certificate is expired (or not yet valid)."""


class ClientCertificateRejectedError(TLSError):
    """The server refused our client certificate (mTLS)."""


class AuthError(SourceError):
    """The exporter answered 401 or 403."""


class HTTPStatusError(SourceError):
    """The exporter answered an unexpected HTTP status (after retries for 5xx/429).

    ``status`` is the HTTP status and ``body`` the start of the response body as one
    printable line (credentials of the source removed), e.g. ``no snapshot available``:
    the deployed exporter answers its errors in ``text/plain``.
    """

    def __init__(self, source_id: str, message: str, *, status: int = 0, body: str = "") -> None:
        self.status = status
        self.body = body
        super().__init__(source_id, message)


class RedirectRefusedError(SourceError):
    """The exporter answered with a redirect; redirects are never followed."""


class ResponseTooLargeError(SourceError):
    """The response body exceeded the configured size cap."""


class ProtocolError(SourceError):
    """The response breaks the wire contract (bad JSON, cursor loop, empty has_more page)."""


class SourceIdentityError(SourceError):
    """A page or item names another node_id/env than the source is registered for.

    ``node_id``/``env``/``collected_at_ns`` are what the offending page or item claimed
    (empty/None when unknown), kept for the ``identity_mismatch`` integrity event.
    """

    def __init__(
        self,
        source_id: str,
        message: str,
        *,
        node_id: str = "",
        env: str = "",
        collected_at_ns: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.env = env
        self.collected_at_ns = collected_at_ns
        super().__init__(source_id, message)


class LockedError(BillingError):
    """Another run holds this source's lock; the source is skipped, not failed."""

    exit_code = ExitCode.LOCKED


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal: SIGINT (Ctrl-C) or SIGTERM (``systemctl stop``).

    A ``KeyboardInterrupt``, so that everything that already cleans up after Ctrl-C does
    so for SIGTERM too (transactions roll back, psycopg cancels the query in flight, the
    pull loop aborts its requests). The exit status is ``128 + signal number``: 130 for
    SIGINT, 143 for SIGTERM, as shells and systemd expect.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(self.signal_name)

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

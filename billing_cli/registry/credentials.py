"""Credential references (``env:NAME``, ``file:/abs/path``, ``systemd:NAME``, ``system``).

The registry holds references to secrets, never the secrets themselves. This module
parses a reference (refusing anything that looks like an inline secret without ever
echoing it) and resolves it at the moment of use. Every error names the source, the
field and the reference; none ever contains the resolved value.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from billing_cli._errors import CredentialError

log = logging.getLogger("billing_cli.registry")

RefKind = Literal["env", "file", "systemd", "system"]

# Fields whose referenced material is secret (group/world-readable files get a warning).
# CA bundles and client certificates are public material.
SECRET_FIELDS = frozenset({"credential_ref", "client_key_ref"})

# Length caps: a 40-character "name" is more likely a pasted token than a variable name,
# and it would be echoed in "environment variable X is not set".
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# systemd credential names: no slashes, no leading dot (they are file names in a directory).
_SYSTEMD_NAME = re.compile(r"[A-Za-z0-9_@][A-Za-z0-9_.@:-]{0,127}")
_PREFIXES = ("env:", "file:", "systemd:")
REF_SYNTAX = "env:NAME, file:/abs/path or systemd:NAME"

# Paths already warned about in this process: a collect loop must not repeat the warning
# for every request.
_warned_paths: set[str] = set()


class RefSyntaxError(ValueError):
    """A ``*_ref`` value is not a valid reference. The message never contains the value."""


@dataclass(frozen=True)
class CredentialRef:
    """A parsed reference. ``target`` is the env var name, absolute path or systemd name."""

    kind: RefKind
    target: str

    def __str__(self) -> str:
        return "system" if self.kind == "system" else f"{self.kind}:{self.target}"

    @classmethod
    def parse(cls, text: str, *, field: str = "ref", allow_system: bool = False) -> CredentialRef:
        """Parse ``text``; raise ``RefSyntaxError`` with a message that never echoes it."""
        if not isinstance(text, str):
            raise RefSyntaxError(f"{field} must be a string reference ({REF_SYNTAX})")
        value = text.strip()
        if value == "system":
            if not allow_system:
                raise RefSyntaxError(
                    f'{field} cannot be "system" (only ca_bundle_ref may use the OS trust '
                    f"store); use {REF_SYNTAX}"
                )
            return cls("system", "")
        if "-----BEGIN" in value or "\n" in value:
            raise RefSyntaxError(
                f"{field} contains inline PEM/secret material (value not shown); store it in a "
                f"file and reference it as file:/abs/path or systemd:NAME"
            )
        if value.startswith("env:"):
            name = value[4:]
            if not _ENV_NAME.fullmatch(name):
                raise RefSyntaxError(
                    f"{field}: env: must be followed by an environment variable name "
                    f"(letters, digits, _; at most 64), e.g. env:EXPORTER_TOKEN (value not shown)"
                )
            return cls("env", name)
        if value.startswith("file:"):
            path = value[5:]
            if not path.startswith("/"):
                raise RefSyntaxError(
                    f"{field}: file: needs an absolute path, e.g. file:/etc/billing/token "
                    f"(value not shown)"
                )
            return cls("file", path)
        if value.startswith("systemd:"):
            name = value[8:]
            if not _SYSTEMD_NAME.fullmatch(name):
                raise RefSyntaxError(
                    f"{field}: systemd: must be followed by a credential name as given to "
                    f"LoadCredential=, e.g. systemd:exporter-token (value not shown)"
                )
            return cls("systemd", name)
        # No recognised prefix: this is either a typo or an inline secret pasted into the
        # registry. Either way the value must not be repeated back (it may be a token).
        extra = ' or "system"' if allow_system else ""
        raise RefSyntaxError(
            f"{field} is not a reference (expected {REF_SYNTAX}{extra}); inline secrets are "
            f"not allowed (value not shown)"
        )


def _as_ref(ref: str | CredentialRef, *, source_id: str, field: str) -> CredentialRef:
    if isinstance(ref, CredentialRef):
        return ref
    try:
        return CredentialRef.parse(ref, field=field, allow_system=field == "ca_bundle_ref")
    except RefSyntaxError as exc:
        raise CredentialError(f"source '{source_id}': {exc}") from None


def _where(ref: CredentialRef, source_id: str, field: str) -> str:
    return f"source '{source_id}': {field} {ref}"


def file_path(ref: str | CredentialRef, *, source_id: str, field: str) -> Path | None:
    """The on-disk path of a ``file:``/``systemd:`` reference, checked to exist.

    ``None`` for ``env:`` and ``system`` (no file). TLS code uses this to hand cert chains
    and keys to ``ssl`` directly.
    """
    parsed = _as_ref(ref, source_id=source_id, field=field)
    if parsed.kind == "file":
        path = Path(parsed.target)
    elif parsed.kind == "systemd":
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise CredentialError(
                f"{_where(parsed, source_id, field)}: $CREDENTIALS_DIRECTORY is not set (run "
                f"under systemd with LoadCredential={parsed.target}:/path, or use file:/path)"
            )
        path = Path(creds) / parsed.target
    else:
        return None
    if not path.is_file():
        what = "no such file" if not path.exists() else "not a regular file"
        raise CredentialError(f"{_where(parsed, source_id, field)}: {what}: {path}")
    if field in SECRET_FIELDS:
        _warn_if_shared(path, source_id=source_id, field=field)
    return path


def resolve_bytes(ref: str | CredentialRef, *, source_id: str, field: str) -> bytes:
    """The referenced material as bytes (PEM certificates and keys), unmodified."""
    parsed = _as_ref(ref, source_id=source_id, field=field)
    if parsed.kind == "system":
        raise CredentialError(
            f"{_where(parsed, source_id, field)}: the OS trust store has no single file to read"
        )
    if parsed.kind == "env":
        value = os.environ.get(parsed.target)
        if value is None:
            raise CredentialError(
                f"{_where(parsed, source_id, field)}: environment variable {parsed.target} "
                f"is not set"
            )
        data = value.encode()
    else:
        path = file_path(parsed, source_id=source_id, field=field)
        assert path is not None  # file: and systemd: always have a path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CredentialError(
                f"{_where(parsed, source_id, field)}: cannot read {path}: {exc.strerror}"
            ) from None
    if not data.strip():
        raise CredentialError(f"{_where(parsed, source_id, field)}: is empty")
    return data


def resolve_secret(ref: str | CredentialRef, *, source_id: str, field: str) -> str:
    """The referenced secret as text; a file's single trailing newline is stripped."""
    parsed = _as_ref(ref, source_id=source_id, field=field)
    data = resolve_bytes(parsed, source_id=source_id, field=field)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise CredentialError(
            f"{_where(parsed, source_id, field)}: is not UTF-8 text (value not shown)"
        ) from None
    if parsed.kind != "env":
        # `echo token > file` and editors add a newline that is not part of the secret.
        text = text.removesuffix("\n").removesuffix("\r")
    if any(c in text for c in "\r\n"):
        raise CredentialError(
            f"{_where(parsed, source_id, field)}: contains a line break inside the secret "
            f"(value not shown)"
        )
    return text


def _warn_if_shared(path: Path, *, source_id: str, field: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:  # pragma: no cover - reported by the read that follows
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and str(path) not in _warned_paths:
        _warned_paths.add(str(path))
        log.warning(
            "source '%s': %s file %s is readable by group/others (mode %o); run: chmod 600 %s",
            source_id,
            field,
            path,
            stat.S_IMODE(mode),
            path,
        )

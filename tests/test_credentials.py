"""Credential references: each kind resolves; every failure names the ref, never the value."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from billing_cli._errors import CredentialError
from billing_cli.registry import credentials
from billing_cli.registry.credentials import (
    CredentialRef,
    RefSyntaxError,
    file_path,
    resolve_bytes,
    resolve_secret,
)

SECRET = "tok-9f8e7d6c5b4a"
KW = {"source_id": "jp-1", "field": "credential_ref"}


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    credentials._warned_paths.clear()
    yield
    credentials._warned_paths.clear()


def secret_file(
    tmp_path: Path, content: str | bytes, name: str = "token", mode: int = 0o600
) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    path.chmod(mode)
    return path


def test_parse_kinds() -> None:
    assert CredentialRef.parse("env:TOKEN") == CredentialRef("env", "TOKEN")
    assert CredentialRef.parse("file:/etc/x") == CredentialRef("file", "/etc/x")
    assert CredentialRef.parse("systemd:exporter-token") == CredentialRef(
        "systemd", "exporter-token"
    )
    assert CredentialRef.parse("system", allow_system=True) == CredentialRef("system", "")
    assert str(CredentialRef.parse(" env:TOKEN ")) == "env:TOKEN"
    with pytest.raises(RefSyntaxError):
        CredentialRef.parse("system")


def test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JP1_TOKEN", SECRET)
    assert resolve_secret("env:JP1_TOKEN", **KW) == SECRET
    assert resolve_bytes("env:JP1_TOKEN", **KW) == SECRET.encode()
    assert file_path("env:JP1_TOKEN", **KW) is None


def test_env_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JP1_TOKEN", raising=False)
    with pytest.raises(CredentialError) as info:
        resolve_secret("env:JP1_TOKEN", **KW)
    assert str(info.value) == (
        "source 'jp-1': credential_ref env:JP1_TOKEN: environment variable JP1_TOKEN is not set"
    )


def test_env_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JP1_TOKEN", "")
    with pytest.raises(CredentialError, match=r"credential_ref env:JP1_TOKEN: is empty$"):
        resolve_secret("env:JP1_TOKEN", **KW)


@pytest.mark.parametrize("content", [SECRET + "\n", SECRET + "\r\n", SECRET])
def test_file_trailing_newline_stripped(tmp_path: Path, content: str) -> None:
    path = secret_file(tmp_path, content)
    assert resolve_secret(f"file:{path}", **KW) == SECRET
    assert file_path(f"file:{path}", **KW) == path


def test_file_inner_newline_refused_without_value(tmp_path: Path) -> None:
    path = secret_file(tmp_path, f"{SECRET}\nsecond-line\n")
    with pytest.raises(CredentialError) as info:
        resolve_secret(f"file:{path}", **KW)
    assert "contains a line break" in str(info.value)
    assert SECRET not in str(info.value)


def test_file_bytes_unmodified(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    path = secret_file(tmp_path, pem, "ca.pem", 0o644)
    assert resolve_bytes(f"file:{path}", source_id="jp-1", field="ca_bundle_ref") == pem


def test_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(CredentialError) as info:
        resolve_secret(f"file:{path}", **KW)
    assert str(info.value) == f"source 'jp-1': credential_ref file:{path}: no such file: {path}"


def test_file_is_directory(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="not a regular file"):
        resolve_secret(f"file:{tmp_path}", **KW)


def test_unreadable_file_names_path_not_value(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = secret_file(tmp_path, SECRET, mode=0o000)
    with pytest.raises(CredentialError, match="cannot read"):
        resolve_secret(f"file:{path}", **KW)


def test_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file(tmp_path, SECRET + "\n", "exporter-token")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_secret("systemd:exporter-token", **KW) == SECRET
    assert file_path("systemd:exporter-token", **KW) == tmp_path / "exporter-token"


def test_systemd_without_credentials_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(CredentialError) as info:
        resolve_secret("systemd:exporter-token", **KW)
    assert str(info.value) == (
        "source 'jp-1': credential_ref systemd:exporter-token: $CREDENTIALS_DIRECTORY is not "
        "set (run under systemd with LoadCredential=exporter-token:/path, or use file:/path)"
    )


def test_systemd_missing_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(CredentialError, match=r"systemd:other: no such file: .*/other$"):
        resolve_secret("systemd:other", **KW)


def test_system_has_no_file() -> None:
    assert file_path("system", source_id="jp-1", field="ca_bundle_ref") is None
    with pytest.raises(CredentialError, match="OS trust store has no single file"):
        resolve_bytes("system", source_id="jp-1", field="ca_bundle_ref")


def test_bad_ref_string_never_echoed() -> None:
    with pytest.raises(CredentialError) as info:
        resolve_secret(SECRET, **KW)
    assert SECRET not in str(info.value)
    assert str(info.value).startswith("source 'jp-1': credential_ref is not a reference")


def test_group_readable_secret_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = secret_file(tmp_path, SECRET, mode=0o640)
    with caplog.at_level(logging.WARNING, logger="billing_cli.registry"):
        resolve_secret(f"file:{path}", **KW)
        resolve_secret(f"file:{path}", **KW)
    warnings = [r for r in caplog.records if r.name == "billing_cli.registry"]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert str(path) in text
    assert "chmod 600" in text
    assert "640" in text
    assert SECRET not in caplog.text


def test_private_secret_and_public_cert_do_not_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = secret_file(tmp_path, SECRET, mode=0o600)
    cert = secret_file(tmp_path, "-----BEGIN CERTIFICATE-----\n", "cert.pem", 0o644)
    with caplog.at_level(logging.WARNING, logger="billing_cli.registry"):
        resolve_secret(f"file:{key}", **KW)
        resolve_bytes(f"file:{cert}", source_id="jp-1", field="client_cert_ref")
    assert not [r for r in caplog.records if r.name == "billing_cli.registry"]


def test_world_readable_key_warns_via_file_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = secret_file(tmp_path, "-----BEGIN PRIVATE KEY-----\n", "client.key", 0o644)
    with caplog.at_level(logging.WARNING, logger="billing_cli.registry"):
        assert file_path(f"file:{key}", source_id="jp-1", field="client_key_ref") == key
    assert "client_key_ref file" in caplog.text
    assert "BEGIN PRIVATE KEY" not in caplog.text


def test_errors_never_contain_file_content(tmp_path: Path) -> None:
    path = secret_file(tmp_path, b"\xff\xfe" + SECRET.encode())
    with pytest.raises(CredentialError) as info:
        resolve_secret(f"file:{path}", **KW)
    assert "not UTF-8" in str(info.value)
    assert SECRET not in str(info.value)

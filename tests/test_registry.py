"""Registry validation: every rule, with the bad input and the exact one-line message."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from billing_cli._errors import ConfigError, RegistryError
from billing_cli.registry.load import load_registry, parse_registry_text

ROOT = Path(__file__).resolve().parent.parent
P = Path("sources.toml")

GOOD_SOURCE = {
    "source_id": '"jp-1"',
    "node_id": '"tokyo-1"',
    "env": '"prod"',
    "base_url": '"https://jp-1.example.net:9550"',
    "auth_mode": '"bearer"',
    "credential_ref": '"env:JP1_TOKEN"',
}


def toml(
    *, drop: tuple[str, ...] = (), defaults: str = 'ca_bundle_ref = "system"', **fields: str
) -> str:
    """A one-source registry: GOOD_SOURCE with ``fields`` (TOML literals) changed."""
    src = {k: v for k, v in {**GOOD_SOURCE, **fields}.items() if k not in drop}
    body = "\n".join(f"{k} = {v}" for k, v in src.items())
    return f"[defaults]\n{defaults}\n\n[[sources]]\n{body}\n"


def error_of(text: str) -> str:
    with pytest.raises(RegistryError) as info:
        parse_registry_text(text, P)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_good_registry_resolves_defaults() -> None:
    reg = parse_registry_text(toml(request_timeout='"5s"'), P)
    src = reg.get("jp-1")
    assert (src.collect_interval_s, src.request_timeout_s) == (60, 5)
    assert src.effective_ca_bundle_ref == "system"
    assert src.effective_max_response_bytes == 64 * 1024 * 1024
    assert src.api == "window"
    assert src.enabled
    d = reg.defaults
    assert (d.overlap_s, d.initial_lookback_s, d.chunk_s) == (120, 3600, 3600)
    assert (d.retry_attempts, d.page_limit) == (3, 1000)
    assert reg.enabled_sources() == [src]
    assert reg.pricing.price_per_unit == Decimal(0)
    assert reg.legacy is False


def test_source_values_override_defaults() -> None:
    text = toml(
        collect_interval='"5m"',
        request_timeout='"30s"',
        ca_bundle_ref='"file:/etc/ca.pem"',
        max_response_bytes="1024",
        defaults='ca_bundle_ref = "system"\ncollect_interval = "2m"',
    )
    src = parse_registry_text(text, P).get("jp-1")
    assert (src.collect_interval_s, src.request_timeout_s) == (300, 30)
    assert src.effective_ca_bundle_ref == "file:/etc/ca.pem"
    assert src.effective_max_response_bytes == 1024


def test_example_registry_loads() -> None:
    reg = load_registry(ROOT / "sources.example.toml", explicit=True)
    assert reg.ids == ["jp-1", "de-1", "us-stage"]
    assert [s.source_id for s in reg.enabled_sources()] == ["jp-1", "de-1"]
    auth = {s.source_id: s.auth_mode for s in reg.sources}
    assert auth == {"jp-1": "mtls", "de-1": "bearer", "us-stage": "mtls+bearer"}
    assert reg.get("de-1").server_name == "de-1.exporters.example.net"
    assert reg.pricing.price_per_unit == Decimal("0.05")
    assert reg.pricing.peak
    assert reg.pricing.multipliers.env["staging"] == Decimal(0)


def test_get_unknown_source_names_known_ids() -> None:
    reg = parse_registry_text(toml(), P)
    with pytest.raises(ConfigError) as info:
        reg.get("jp-2")
    assert str(info.value) == (
        "sources.toml: no source 'jp-2' (did you mean 'jp-1'?); known sources: jp-1 "
        "(see `billing sources list`)"
    )


R = "sources.toml: source 'jp-1': "

CASES: list[tuple[str, str, str]] = [
    # (test id, registry text, exact message)
    (
        "https-only",
        toml(base_url='"http://10.0.0.5:9550"'),
        R + "base_url must be https:// (got http://10.0.0.5:9550)",
    ),
    (
        "http-loopback-needs-opt-in",
        toml(base_url='"http://127.0.0.1:9550"'),
        R + "base_url must be https:// (got http://127.0.0.1:9550); plain http on a loopback "
        "host needs allow_insecure_http = true (development only)",
    ),
    (
        "http-opt-in-only-loopback",
        toml(base_url='"http://10.0.0.5:9550"', allow_insecure_http="true"),
        R + "base_url must be https:// (got http://10.0.0.5:9550); allow_insecure_http only "
        "permits loopback hosts (127.0.0.0/8, ::1, localhost)",
    ),
    (
        "other-scheme",
        toml(base_url='"ftp://x.example.net"'),
        R + "base_url must be https:// (got ftp://x.example.net)",
    ),
    (
        "url-credentials-not-echoed",
        toml(base_url='"https://admin:hunter2@x.example.net"'),
        R + "base_url must not contain credentials (user:password@); use auth_mode and "
        "credential_ref (value not shown)",
    ),
    (
        "url-query-not-echoed",
        toml(base_url='"https://x.example.net/?token=hunter2"'),
        R + "base_url must not contain a query string or fragment (value not shown)",
    ),
    (
        "url-fragment",
        toml(base_url='"https://x.example.net/#frag"'),
        R + "base_url must not contain a query string or fragment (value not shown)",
    ),
    (
        "url-no-host",
        toml(base_url='"https:///path"'),
        R + "base_url has no host (got https:///path)",
    ),
    (
        "url-bad-host",
        toml(base_url='"https://bad host.example.net"'),
        R + "base_url has an invalid host name (got https://bad host.example.net)",
    ),
    (
        "url-bad-port",
        toml(base_url='"https://x.example.net:99999"'),
        R + "base_url is not a valid URL",
    ),
    (
        "unknown-field-did-you-mean",
        toml(colect_interval='"1m"'),
        R + "unknown field 'colect_interval' (did you mean 'collect_interval'?)",
    ),
    ("unknown-field", toml(zzz="1"), R + "unknown field 'zzz'"),
    (
        "unknown-defaults-field",
        toml(defaults='ca_bundle_ref = "system"\noverlapp = "1m"'),
        "sources.toml: [defaults] unknown field 'overlapp' (did you mean 'overlap'?)",
    ),
    (
        "unknown-top-level",
        toml() + '\n[pricng]\ncurrency = "USD"\n',
        "sources.toml: unknown top-level key 'pricng' (did you mean 'pricing'?); expected "
        "[[sources]], [defaults] and [pricing]",
    ),
    ("missing-node-id", toml(drop=("node_id",)), R + "missing required field 'node_id'"),
    ("empty-node-id", toml(node_id='""'), R + "node_id must not be empty"),
    ("blank-env", toml(env='"  "'), R + "env must not be empty"),
    (
        "missing-source-id",
        toml(drop=("source_id",)),
        "sources.toml: [[sources]] entry 1: missing required field 'source_id'",
    ),
    (
        "source-id-syntax",
        toml(source_id='"jp 1"'),
        "sources.toml: source 'jp 1': source_id must match [A-Za-z0-9._-]+ (got 'jp 1')",
    ),
    (
        "duplicate-source-id",
        toml() + '\n[[sources]]\nsource_id = "jp-1"\nnode_id = "b"\nenv = "prod"\n'
        'base_url = "https://b.example.net"\nauth_mode = "bearer"\ncredential_ref = "env:B"\n',
        R + "source_id must be unique (entries 1 and 2 both use it)",
    ),
    (
        "auth-mode-literal",
        toml(auth_mode='"tls"'),
        R + "auth_mode must be one of 'mtls', 'bearer', 'mtls+bearer' or 'none' (got 'tls')",
    ),
    ("auth-mode-missing", toml(drop=("auth_mode",)), R + "missing required field 'auth_mode'"),
    (
        "bearer-needs-credential",
        toml(drop=("credential_ref",)),
        R + 'auth_mode = "bearer" needs credential_ref (missing: credential_ref)',
    ),
    (
        "mtls-needs-cert-and-key",
        toml(auth_mode='"mtls"', drop=("credential_ref",), client_cert_ref='"file:/c.pem"'),
        R + 'auth_mode = "mtls" needs client_cert_ref and client_key_ref (missing: client_key_ref)',
    ),
    (
        "mtls-bearer-needs-all",
        toml(auth_mode='"mtls+bearer"'),
        R + 'auth_mode = "mtls+bearer" needs client_cert_ref and client_key_ref and '
        "credential_ref (missing: client_cert_ref, client_key_ref)",
    ),
    (
        "unused-ref-mtls",
        toml(auth_mode='"mtls"', client_cert_ref='"file:/c.pem"', client_key_ref='"file:/k.pem"'),
        R + 'credential_ref is set but auth_mode = "mtls" does not use it: remove it or '
        "change auth_mode",
    ),
    (
        "unused-refs-bearer",
        toml(client_cert_ref='"file:/c.pem"', client_key_ref='"file:/k.pem"'),
        R + 'client_cert_ref, client_key_ref are set but auth_mode = "bearer" does not use '
        "them: remove them or change auth_mode",
    ),
    (
        "none-needs-insecure-loopback",
        toml(auth_mode='"none"', drop=("credential_ref",)),
        R + 'auth_mode = "none" is only allowed for an http:// loopback base_url with '
        "allow_insecure_http = true (development); use mtls or bearer",
    ),
    (
        "mtls-over-http",
        toml(
            auth_mode='"mtls"',
            drop=("credential_ref",),
            client_cert_ref='"file:/c.pem"',
            client_key_ref='"file:/k.pem"',
            base_url='"http://127.0.0.1:9550"',
            allow_insecure_http="true",
        ),
        R + 'auth_mode = "mtls" needs https:// (client certificates are part of TLS)',
    ),
    (
        "ca-on-http",
        toml(
            base_url='"http://localhost:9550"',
            allow_insecure_http="true",
            ca_bundle_ref='"system"',
        ),
        R + "ca_bundle_ref is set but base_url is http:// (no TLS): remove it",
    ),
    (
        "no-ca-at-all",
        toml(defaults=""),
        R + 'no CA configured: set ca_bundle_ref = "file:/path/ca.pem" on the source or in '
        '[defaults], or ca_bundle_ref = "system" to use the OS trust store explicitly',
    ),
    (
        "inline-token-not-echoed",
        toml(credential_ref='"ghp_aZ3xQ9sEcReT0kEn1234567890abcdef"'),
        R + "credential_ref is not a reference (expected env:NAME, file:/abs/path or "
        "systemd:NAME); inline secrets are not allowed (value not shown)",
    ),
    (
        "inline-pem-not-echoed",
        toml(
            auth_mode='"mtls"',
            drop=("credential_ref",),
            client_cert_ref='"file:/c.pem"',
            client_key_ref='"""-----BEGIN PRIVATE KEY-----\nMIIEvSECRETKEYDATA\n'
            '-----END PRIVATE KEY-----"""',
        ),
        R + "client_key_ref contains inline PEM/secret material (value not shown); store it "
        "in a file and reference it as file:/abs/path or systemd:NAME",
    ),
    (
        "system-only-for-ca",
        toml(credential_ref='"system"'),
        R + 'credential_ref cannot be "system" (only ca_bundle_ref may use the OS trust '
        "store); use env:NAME, file:/abs/path or systemd:NAME",
    ),
    (
        "file-ref-relative",
        toml(credential_ref='"file:token.txt"'),
        R + "credential_ref: file: needs an absolute path, e.g. file:/etc/billing/token "
        "(value not shown)",
    ),
    (
        "env-ref-bad-name",
        toml(credential_ref='"env:MY-TOKEN"'),
        R + "credential_ref: env: must be followed by an environment variable name "
        "(letters, digits, _; at most 64), e.g. env:EXPORTER_TOKEN (value not shown)",
    ),
    (
        "systemd-ref-bad-name",
        toml(credential_ref='"systemd:../etc/passwd"'),
        R + "credential_ref: systemd: must be followed by a credential name as given to "
        "LoadCredential=, e.g. systemd:exporter-token (value not shown)",
    ),
    (
        "ca-ref-bad",
        toml(ca_bundle_ref='"/etc/ca.pem"'),
        R + "ca_bundle_ref is not a reference (expected env:NAME, file:/abs/path or "
        'systemd:NAME or "system"); inline secrets are not allowed (value not shown)',
    ),
    (
        "ref-wrong-type",
        toml(credential_ref="42"),
        R + "credential_ref must be a string reference (env:NAME, file:/abs/path or systemd:NAME)",
    ),
    (
        "server-name-invalid",
        toml(server_name='"bad_name.example"'),
        R + "server_name must be a valid DNS name, e.g. node1.example.net (got 'bad_name.example')",
    ),
    (
        "server-name-ip",
        toml(server_name='"10.0.0.5"'),
        R + "server_name must be a DNS name, not an IP address (got '10.0.0.5'); an IP in "
        "base_url needs a certificate with that IP, or a server_name DNS name",
    ),
    (
        "duration-syntax",
        toml(collect_interval='"1 minute"'),
        R + "collect_interval: not a duration: '1 minute' (expected e.g. 30s, 2m, 1h)",
    ),
    (
        "duration-not-string",
        toml(collect_interval="60"),
        R + 'collect_interval: write durations as strings like "30s", "2m", "1h"',
    ),
    (
        "duration-positive",
        toml(request_timeout='"0s"'),
        R + "request_timeout: duration must be positive: '0s'",
    ),
    (
        "timeout-below-interval",
        toml(collect_interval='"30s"', request_timeout='"30s"'),
        R + "request_timeout (30s) must be shorter than collect_interval (30s)",
    ),
    (
        "timeout-below-default-interval",
        toml(request_timeout='"2m"'),
        R + "request_timeout (2m) must be shorter than collect_interval (1m)",
    ),
    (
        "defaults-timeout-below-interval",
        toml(defaults='ca_bundle_ref = "system"\nrequest_timeout = "5m"'),
        "sources.toml: [defaults] request_timeout (5m) must be shorter than collect_interval (1m)",
    ),
    (
        "defaults-positive-int",
        toml(defaults='ca_bundle_ref = "system"\npage_limit = 0'),
        "sources.toml: [defaults] page_limit: Input should be greater than or equal to 1",
    ),
    (
        "enabled-bool",
        toml(enabled='"yes"'),
        R + "enabled must be true or false (without quotes)",
    ),
    (
        "api-literal",
        toml(api='"lates"'),
        R + "api must be one of 'window' or 'latest' (got 'lates')",
    ),
    (
        "pricing-float",
        toml() + "\n[pricing]\nprice_per_unit = 0.05\n",
        'sources.toml: [pricing] price_per_unit: write decimals as strings, e.g. "0.05" '
        "(floats are inexact)",
    ),
    (
        "pricing-nested",
        toml() + '\n[[pricing.peak]]\ntimezone = "Mars/Olympus"\nstart = "19:00"\n'
        'end = "23:00"\nmultiplier = "2"\n',
        "sources.toml: [pricing] peak[0].timezone: unknown time zone 'Mars/Olympus' "
        "(use an IANA name, e.g. Asia/Tokyo)",
    ),
    (
        "sources-not-array",
        '[sources]\nsource_id = "x"\n',
        "sources.toml: 'sources' must be an array of tables: write [[sources]]",
    ),
    (
        "two-errors-counted",
        toml(node_id='""', env='""'),
        R + "node_id must not be empty (+1 more error)",
    ),
    (
        "invalid-toml-line",
        toml() + "oops\n",
        "sources.toml: line 11: invalid TOML: Expected '=' after a key in a key/value pair "
        "(column 5)",
    ),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule(text: str, message: str) -> None:
    assert error_of(text) == message


@pytest.mark.parametrize(
    "secret",
    [
        "ghp_aZ3xQ9sEcReT0kEn1234567890abcdef",
        "env:not a name hunter2",
        "file:relative/hunter2",
        "env:ghp_hunter2aZ3xQ9sEcReT0kEn1234567890abcdefABCDEF1234567890abcdef",
    ],
)
def test_ref_errors_never_echo_the_value(secret: str) -> None:
    msg = error_of(toml(credential_ref=f'"{secret}"'))
    assert secret not in msg
    assert "hunter2" not in msg
    assert "aZ3xQ9" not in msg


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9550",
        "http://127.8.9.10",
        "http://[::1]:9550",
        "http://localhost",
        "HTTP://LOCALHOST:1",
    ],
)
def test_insecure_loopback_is_allowed_with_opt_in(url: str) -> None:
    text = toml(base_url=f'"{url}"', allow_insecure_http="true", defaults="")
    src = parse_registry_text(text, P).get("jp-1")
    assert src.is_insecure_loopback
    assert src.effective_ca_bundle_ref is None


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost.:9550",  # the DNS name "localhost.": resolved, may leave the host
        "http://LOCALHOST.",
        "http://localhost.localdomain:9550",
        "http://127.0.0.1.:9550",
        "http://localhost.evil.example:9550",
    ],
)
def test_only_literal_loopback_hosts_count_as_loopback(url: str) -> None:
    """A bearer token over plain http must not leave the host: a name that is resolved
    through DNS is not loopback, whatever it looks like."""
    text = toml(base_url=f'"{url}"', allow_insecure_http="true", defaults="")
    msg = error_of(text)
    assert "allow_insecure_http only permits loopback hosts" in msg


def test_auth_none_on_insecure_loopback() -> None:
    text = toml(
        base_url='"http://127.0.0.1:1"',
        allow_insecure_http="true",
        auth_mode='"none"',
        drop=("credential_ref",),
    )
    assert parse_registry_text(text, P).get("jp-1").auth_mode == "none"


def test_server_name_normalised() -> None:
    src = parse_registry_text(toml(server_name='"Node1.Example.NET."'), P).get("jp-1")
    assert src.server_name == "node1.example.net"


def test_url_trailing_slash() -> None:
    src = parse_registry_text(toml(base_url='"https://x.example.net/xray/"'), P).get("jp-1")
    assert src.url == "https://x.example.net/xray"


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXPORTER_BASE_URL", raising=False)
    with pytest.raises(RegistryError) as info:
        load_registry(tmp_path / "sources.toml", explicit=False)
    assert str(info.value) == (
        f"{tmp_path / 'sources.toml'}: no such file (create one with `billing sources add ...` "
        "or copy sources.example.toml)"
    )


def test_explicit_missing_file_ignores_legacy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXPORTER_BASE_URL", "http://127.0.0.1:9550")
    with pytest.raises(RegistryError, match="no such file"):
        load_registry(tmp_path / "sources.toml", explicit=True)


class TestLegacy:
    @pytest.fixture(autouse=True)
    def _env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for var in (
            "EXPORTER_NODE_ID",
            "EXPORTER_ENV",
            "EXPORTER_TOKEN_REF",
            "EXPORTER_CA_BUNDLE_REF",
        ):
            monkeypatch.delenv(var, raising=False)

    def test_defaults(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("EXPORTER_BASE_URL", "http://127.0.0.1:9550")
        reg = load_registry(tmp_path / "sources.toml", explicit=False)
        assert reg.legacy
        (src,) = reg.sources
        assert (src.source_id, src.node_id, src.env, src.api) == (
            "legacy",
            "legacy",
            "default",
            "latest",
        )
        assert (src.auth_mode, src.allow_insecure_http) == ("none", True)

    def test_env_and_token_ref(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("EXPORTER_BASE_URL", "https://exporter.example.net")
        monkeypatch.setenv("EXPORTER_NODE_ID", "node-a")
        monkeypatch.setenv("EXPORTER_ENV", "prod")
        monkeypatch.setenv("EXPORTER_TOKEN_REF", "env:EXPORTER_TOKEN")
        src = load_registry(tmp_path / "sources.toml", explicit=False).get("legacy")
        assert (src.node_id, src.env, src.auth_mode) == ("node-a", "prod", "bearer")
        assert (src.credential_ref, src.effective_ca_bundle_ref) == ("env:EXPORTER_TOKEN", "system")

    def test_remote_http_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("EXPORTER_BASE_URL", "http://10.0.0.5:9550")
        with pytest.raises(RegistryError) as info:
            load_registry(tmp_path / "sources.toml", explicit=False)
        assert str(info.value) == (
            f"{tmp_path / 'sources.toml'} is missing, so EXPORTER_BASE_URL is used (legacy "
            "mode): EXPORTER_BASE_URL must be https:// (got http://10.0.0.5:9550); "
            "allow_insecure_http only permits loopback hosts (127.0.0.0/8, ::1, localhost)"
        )

    def test_https_needs_token(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("EXPORTER_BASE_URL", "https://exporter.example.net")
        with pytest.raises(RegistryError, match="needs EXPORTER_TOKEN_REF"):
            load_registry(tmp_path / "sources.toml", explicit=False)

    def test_inline_token_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("EXPORTER_BASE_URL", "https://exporter.example.net")
        monkeypatch.setenv("EXPORTER_TOKEN_REF", "s3cr3t-t0ken-value")
        with pytest.raises(RegistryError) as info:
            load_registry(tmp_path / "sources.toml", explicit=False)
        assert "EXPORTER_TOKEN_REF is not a reference" in str(info.value)
        assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://[2001:db8::1]:9550",
        "https://203.0.113.20",
        "https://node-1.example.net./xray/",
        "HTTPS://Node1.Example.net",
    ],
)
def test_valid_https_urls(url: str) -> None:
    assert parse_registry_text(toml(base_url=f'"{url}"'), P).get("jp-1").base_url == url

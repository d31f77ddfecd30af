"""Transport protocol edges with respx: retries, Retry-After, no-retry 4xx, auth, redirects,
size cap (declared and streamed), timeouts, the time budget, and secrets kept out of errors."""

from __future__ import annotations

import email.utils
import glob
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
import trustme

from billing_cli._errors import (
    AuthError,
    ConfigError,
    CredentialError,
    HTTPStatusError,
    ProtocolError,
    RedirectRefusedError,
    ResponseTooLargeError,
    TransportError,
)
from billing_cli.collect.transport import (
    SourceClient,
    TransportConfig,
    build_transport_config,
    parse_retry_after,
)
from billing_cli.registry.model import SourceConfig

TOKEN = "tok-3f9c2e7d-very-secret"
BASE = "https://exporter.example:9550"
WINDOW = f"{BASE}/v1/snapshots/window"
LATEST = f"{BASE}/v1/snapshots/latest"


class FakeClock:
    """Monotonic clock that only moves when the client sleeps (or a test says so)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_config(**kw: Any) -> TransportConfig:
    base: dict[str, Any] = {
        "source_id": "jp-1",
        "base_url": BASE,
        "auth_mode": "bearer",
        "bearer_token": TOKEN,
        "ssl_context": ssl.create_default_context(),
        "timeout_s": 5.0,
        "budget_s": 120.0,
    }
    base.update(kw)
    return TransportConfig(**base)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(clock: FakeClock) -> Iterator[SourceClient]:
    with SourceClient(make_config(), sleep=clock.sleep, clock=clock) as c:
        yield c


@pytest.fixture(autouse=True)
def _no_token_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    assert TOKEN not in caplog.text
    assert "redirect-secret" not in caplog.text


def assert_clean(exc: BaseException) -> None:
    text = str(exc)
    assert TOKEN not in text
    assert "\n" not in text
    assert text.startswith("source 'jp-1': ")


# --- success and request shape -----------------------------------------------------------


@respx.mock
def test_window_request_carries_bearer_bounds_and_verbatim_cursor(client: SourceClient) -> None:
    route = respx.get(WINDOW).mock(return_value=httpx.Response(200, content=b'{"ok":true}'))
    cursor = "2026-11-24T10:00:00.123456789Z"
    body = client.get_window(1_000_000_000, 61_000_000_001, 500, cursor)
    assert body == b'{"ok":true}'
    req = route.calls.last.request
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.url.params["cursor"] == cursor
    assert req.url.params["since"] == "1970-01-01T00:00:01Z"
    assert req.url.params["until"] == "1970-01-01T00:01:01.000000001Z"
    assert req.url.params["limit"] == "500"


@respx.mock
def test_server_name_sets_sni_extension_and_host(clock: FakeClock) -> None:
    route = respx.get("https://10.0.0.5:9550/v1/snapshots/latest").mock(
        return_value=httpx.Response(200, content=b"{}")
    )
    cfg = make_config(base_url="https://10.0.0.5:9550", server_name="jp-1.exporter.internal")
    with SourceClient(cfg, sleep=clock.sleep, clock=clock) as c:
        c.get_latest()
    req = route.calls.last.request
    assert req.extensions["sni_hostname"] == "jp-1.exporter.internal"
    assert req.headers["host"] == "jp-1.exporter.internal:9550"


@respx.mock
def test_connection_reused_within_a_source(client: SourceClient) -> None:
    respx.get(LATEST).mock(return_value=httpx.Response(200, content=b"{}"))
    client.get_latest()
    client.get_latest()
    assert client.requests_made == 2  # one client, one pool: not a new client per request


def test_config_repr_hides_token_and_context() -> None:
    text = repr(make_config())
    assert TOKEN not in text
    assert "ssl_context" not in text


# --- retries -------------------------------------------------------------------------------


@respx.mock
def test_5xx_retried_then_success(client: SourceClient, clock: FakeClock) -> None:
    route = respx.get(LATEST).mock(
        side_effect=[httpx.Response(503), httpx.Response(502), httpx.Response(200, content=b"ok")]
    )
    assert client.get_latest() == b"ok"
    assert route.call_count == 3
    assert len(clock.sleeps) == 2
    assert all(0 <= s <= 10 for s in clock.sleeps)


@respx.mock
def test_5xx_gives_up_after_attempts(client: SourceClient) -> None:
    route = respx.get(LATEST).mock(return_value=httpx.Response(500))
    with pytest.raises(HTTPStatusError) as ei:
        client.get_latest()
    assert route.call_count == 3
    assert "HTTP 500" in str(ei.value)
    assert "after 3 attempts" in str(ei.value)
    assert_clean(ei.value)


@respx.mock
def test_429_retry_after_seconds_honoured(client: SourceClient, clock: FakeClock) -> None:
    respx.get(LATEST).mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}),
            httpx.Response(200, content=b"ok"),
        ]
    )
    assert client.get_latest() == b"ok"
    assert clock.sleeps == [7.0]


@respx.mock
def test_429_retry_after_http_date_honoured(client: SourceClient, clock: FakeClock) -> None:
    import time

    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    respx.get(LATEST).mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": when}),
            httpx.Response(200, content=b"ok"),
        ]
    )
    assert client.get_latest() == b"ok"
    assert len(clock.sleeps) == 1
    assert 17 <= clock.sleeps[0] <= 20


@respx.mock
def test_retry_after_beyond_budget_gives_up_now(clock: FakeClock) -> None:
    route = respx.get(LATEST).mock(
        return_value=httpx.Response(429, headers={"Retry-After": "3600"})
    )
    with (
        SourceClient(make_config(budget_s=30), sleep=clock.sleep, clock=clock) as c,
        pytest.raises(HTTPStatusError) as ei,
    ):
        c.get_latest()
    assert clock.sleeps == []  # gave up at once instead of sleeping into the deadline
    assert route.call_count == 1
    assert "time budget of 30s: next retry in 3600s is past it" in str(ei.value)
    assert_clean(ei.value)


@pytest.mark.parametrize("status", [400, 404, 409, 422])
@respx.mock
def test_other_4xx_not_retried(client: SourceClient, clock: FakeClock, status: int) -> None:
    route = respx.get(LATEST).mock(return_value=httpx.Response(status))
    with pytest.raises(HTTPStatusError) as ei:
        client.get_latest()
    assert route.call_count == 1
    assert clock.sleeps == []
    assert f"HTTP {status}" in str(ei.value)
    assert_clean(ei.value)


@pytest.mark.parametrize("status", [401, 403])
@respx.mock
def test_401_403_are_auth_errors(client: SourceClient, status: int) -> None:
    route = respx.get(LATEST).mock(return_value=httpx.Response(status))
    with pytest.raises(AuthError) as ei:
        client.get_latest()
    assert route.call_count == 1
    assert f"HTTP {status}" in str(ei.value)
    assert "credential_ref" in str(ei.value)
    assert_clean(ei.value)


@respx.mock
def test_timeouts_and_connect_errors_retried(client: SourceClient, clock: FakeClock) -> None:
    route = respx.get(LATEST).mock(
        side_effect=[
            httpx.ConnectTimeout("connect timed out"),
            httpx.ConnectError("connection refused"),
            httpx.Response(200, content=b"ok"),
        ]
    )
    assert client.get_latest() == b"ok"
    assert route.call_count == 3
    assert len(clock.sleeps) == 2


@respx.mock
def test_read_timeout_exhausts_attempts(client: SourceClient) -> None:
    respx.get(LATEST).mock(side_effect=httpx.ReadTimeout("read timed out"))
    with pytest.raises(TransportError) as ei:
        client.get_latest()
    assert "timed out" in str(ei.value)
    assert "after 3 attempts" in str(ei.value)
    assert_clean(ei.value)


@respx.mock
def test_budget_stops_retries_before_attempts_run_out(clock: FakeClock) -> None:
    def slow_failure(request: httpx.Request) -> httpx.Response:
        clock.now += 4.0  # each attempt takes 4 s of the budget
        return httpx.Response(503)

    route = respx.get(LATEST).mock(side_effect=slow_failure)
    cfg = make_config(retry_attempts=10, budget_s=10)
    with (
        SourceClient(cfg, sleep=clock.sleep, clock=clock) as c,
        pytest.raises(HTTPStatusError) as ei,
    ):
        c.get_latest()
    assert route.call_count <= 3
    assert clock.now <= 10 + 4.0  # at most one attempt started just before the deadline
    assert "time budget" in str(ei.value)


@respx.mock
def test_budget_is_shared_across_requests(clock: FakeClock) -> None:
    respx.get(LATEST).mock(return_value=httpx.Response(200, content=b"ok"))
    with SourceClient(make_config(budget_s=10), sleep=clock.sleep, clock=clock) as c:
        assert c.get_latest() == b"ok"
        clock.now = 11.0
        with pytest.raises(TransportError) as ei:
            c.get_latest()
    assert "time budget" in str(ei.value)


# --- redirects and size cap ---------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@respx.mock
def test_redirect_refused_without_leaking_query(client: SourceClient, status: int) -> None:
    route = respx.get(LATEST).mock(
        return_value=httpx.Response(
            status, headers={"Location": "https://evil.example/steal?token=redirect-secret"}
        )
    )
    other = respx.get(url__startswith="https://evil.example").mock(return_value=httpx.Response(200))
    with pytest.raises(RedirectRefusedError) as ei:
        client.get_latest()
    assert route.call_count == 1
    assert other.call_count == 0
    assert "evil.example" in str(ei.value)
    assert "redirect-secret" not in str(ei.value)
    assert "steal" not in str(ei.value)
    assert_clean(ei.value)


@respx.mock
def test_declared_content_length_over_cap_refused(clock: FakeClock) -> None:
    respx.get(LATEST).mock(
        return_value=httpx.Response(200, headers={"Content-Length": "5000"}, content=b"x" * 5000)
    )
    cfg = make_config(max_response_bytes=1000)
    with (
        SourceClient(cfg, sleep=clock.sleep, clock=clock) as c,
        pytest.raises(ResponseTooLargeError) as ei,
    ):
        c.get_latest()
    assert "Content-Length 5000" in str(ei.value)
    assert "max_response_bytes 1000" in str(ei.value)
    assert_clean(ei.value)


@respx.mock
def test_streamed_body_over_cap_aborted_early(clock: FakeClock) -> None:
    produced: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(10_000):  # 4 MB if read to the end
            produced.append(i)
            yield b"y" * 400

    respx.get(LATEST).mock(return_value=httpx.Response(200, content=chunks()))
    cfg = make_config(max_response_bytes=1000)
    with (
        SourceClient(cfg, sleep=clock.sleep, clock=clock) as c,
        pytest.raises(ResponseTooLargeError) as ei,
    ):
        c.get_latest()
    assert "streamed body" in str(ei.value)
    assert len(produced) <= 4  # stopped at the third chunk, not after reading everything


@respx.mock
def test_body_at_cap_accepted(clock: FakeClock) -> None:
    respx.get(LATEST).mock(return_value=httpx.Response(200, content=b"z" * 1000))
    with SourceClient(make_config(max_response_bytes=1000), sleep=clock.sleep, clock=clock) as c:
        assert len(c.get_latest()) == 1000


# --- Retry-After parsing ------------------------------------------------------------------


def test_parse_retry_after() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("²") is None  # a Unicode digit str.isdigit() accepts
    assert parse_retry_after("9" * 5000) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


# --- building the config from a source ----------------------------------------------------


def _source(**kw: Any) -> SourceConfig:
    # A standalone registry entry: its [defaults] are the built-in ones (no CA bundle).
    base: dict[str, Any] = {
        "source_id": "jp-1",
        "node_id": "jp-1",
        "env": "prod",
        "base_url": "https://127.0.0.1:9550/",
        "auth_mode": "bearer",
        "credential_ref": "env:SIM_TOKEN",
        "request_timeout": "7s",
    }
    base.update(kw)
    return SourceConfig(**base)


def test_build_config_resolves_refs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("client.example")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    monkeypatch.setenv("SIM_TOKEN", TOKEN)
    # env: PEM material must go through a private temp file that is deleted right away.
    monkeypatch.setenv("SIM_CERT", leaf.cert_chain_pems[0].bytes().decode())
    monkeypatch.setenv("SIM_KEY", leaf.private_key_pem.bytes().decode())
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "billing-pem-*")))
    cfg = build_transport_config(
        _source(
            auth_mode="mtls+bearer",
            client_cert_ref="env:SIM_CERT",
            client_key_ref="env:SIM_KEY",
            ca_bundle_ref=f"file:{ca_file}",
            server_name="exporter.example",
        )
    )
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "billing-pem-*")))
    assert after == before
    assert cfg.bearer_token == TOKEN
    assert cfg.base_url == "https://127.0.0.1:9550"
    assert cfg.timeout_s == 7.0
    assert cfg.server_name == "exporter.example"
    assert cfg.ssl_context is not None
    assert cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert cfg.ssl_context.check_hostname is True
    # Pinned: only our CA is trusted, not the OS store.
    assert len(cfg.ssl_context.get_ca_certs()) == 1
    assert TOKEN not in repr(cfg)


def test_build_config_system_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_TOKEN", TOKEN)
    cfg = build_transport_config(_source(ca_bundle_ref="system"))
    assert cfg.ssl_context is not None
    assert cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED


def test_build_config_missing_env_names_ref_not_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIM_TOKEN", raising=False)
    with pytest.raises(CredentialError) as ei:
        build_transport_config(_source())
    assert "env:SIM_TOKEN" in str(ei.value)
    assert "jp-1" in str(ei.value)


def test_build_config_bad_ca_pem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_TOKEN", TOKEN)
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(CredentialError) as ei:
        build_transport_config(_source(ca_bundle_ref=f"file:{bad}"))
    assert "ca_bundle_ref" in str(ei.value)
    assert "not a certificate" not in str(ei.value)


def test_build_config_mismatched_key_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    a, b = ca.issue_cert("a.example"), ca.issue_cert("b.example")
    cert = tmp_path / "c.pem"
    key = tmp_path / "k.pem"
    cert.write_bytes(a.cert_chain_pems[0].bytes())
    key.write_bytes(b.private_key_pem.bytes())
    key.chmod(0o600)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    with pytest.raises(CredentialError) as ei:
        build_transport_config(
            _source(
                auth_mode="mtls",
                credential_ref=None,
                client_cert_ref=f"file:{cert}",
                client_key_ref=f"file:{key}",
                ca_bundle_ref=f"file:{ca_file}",
            )
        )
    assert "client certificate/key could not be loaded" in str(ei.value)
    assert "PRIVATE KEY" not in str(ei.value)


def test_build_config_without_ca_ref_refuses_silent_system_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIM_TOKEN", TOKEN)
    with pytest.raises(ConfigError) as ei:
        build_transport_config(_source(ca_bundle_ref=None))
    assert "ca_bundle_ref" in str(ei.value)
    assert '"system"' in str(ei.value)


def test_build_config_from_real_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from billing_cli.registry.load import parse_registry_text

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    monkeypatch.setenv("SIM_TOKEN", TOKEN)
    text = f"""
[defaults]
request_timeout = "4s"
ca_bundle_ref = "file:{ca_file}"
max_response_bytes = 5000000
retry_attempts = 5

[[sources]]
source_id = "jp-1"
node_id = "jp-1"
env = "prod"
base_url = "https://10.0.0.5:9550/"
auth_mode = "bearer"
credential_ref = "env:SIM_TOKEN"
server_name = "jp-1.exporter.internal"
"""
    registry = parse_registry_text(text, tmp_path / "sources.toml")
    cfg = build_transport_config(registry.sources[0])
    assert cfg.timeout_s == 4.0
    assert cfg.max_response_bytes == 5_000_000
    assert cfg.retry_attempts == 5
    assert cfg.server_name == "jp-1.exporter.internal"
    assert cfg.base_url == "https://10.0.0.5:9550"
    assert cfg.bearer_token == TOKEN
    assert cfg.ssl_context is not None
    assert len(cfg.ssl_context.get_ca_certs()) == 1


@respx.mock
def test_bad_content_encoding_is_one_line_protocol_error(client: SourceClient) -> None:
    respx.get(LATEST).mock(
        return_value=httpx.Response(
            200, headers={"Content-Encoding": "gzip"}, content=iter([b"definitely not gzip"])
        )
    )
    with pytest.raises(ProtocolError) as ei:
        client.get_latest()
    assert "could not be decoded" in str(ei.value)
    assert_clean(ei.value)


@pytest.mark.parametrize("bad", ["tok en", "tok\u00e9n"])
def test_token_not_header_safe_refused_without_echo(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("SIM_TOKEN", bad)
    with pytest.raises(CredentialError) as ei:
        build_transport_config(_source(ca_bundle_ref="system"))
    assert "env:SIM_TOKEN" in str(ei.value)
    assert bad not in str(ei.value)

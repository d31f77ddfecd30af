"""The transport against the simulator over real TLS on loopback (trustme certificates).

Each failure must surface as its own error class with a one-line message naming the
source, and no secret (token, private key) may appear in any message or log line.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

import pytest
import trustme
from simfleet import SimFleet, sim_fleet

from billing_cli._errors import (
    AuthError,
    CertificateExpiredError,
    ClientCertificateRejectedError,
    HostnameMismatchError,
    RedirectRefusedError,
    ResponseTooLargeError,
    SourceError,
    TransportError,
    UnknownCAError,
)
from billing_cli._time import NS_PER_MINUTE
from billing_cli.collect.transport import SourceClient, TransportConfig
from billing_cli.wire import parse_latest, parse_window_page

__all__ = ["sim_fleet"]

NODE = "node-01"
SimFactory = Callable[..., SimFleet]


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, s: float) -> None:
        self.calls.append(s)  # never really sleep: retries are the subject, not waiting


@pytest.fixture(autouse=True)
def _capture_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # so the secret checks see debug lines too


def collect_all(cfg: TransportConfig, fleet_sim: SimFleet) -> list[int]:
    """Pull the node's whole history page by page; return the collected_at values seen."""
    last = fleet_sim.fleet.node(cfg.source_id).last_collected_at
    assert last is not None
    seen: list[int] = []
    with SourceClient(cfg, sleep=Sleeps()) as client:
        cursor = None
        while True:
            raw = client.get_window(last - 3600 * 10**9, last, 3, cursor)
            page = parse_window_page(raw)
            assert page.node_id == cfg.source_id
            seen.extend(it.collected_at_ns for it in page.items)
            if not page.has_more:
                break
            cursor = page.next_cursor
    return seen


def fail(cfg: TransportConfig) -> SourceError:
    with SourceClient(cfg, sleep=Sleeps()) as client, pytest.raises(SourceError) as ei:
        client.get_latest()
    return ei.value


def assert_no_secrets(sim: SimFleet, *texts: str) -> None:
    for text in texts:
        for secret in sim.secrets():
            assert secret not in text


# --- success paths -------------------------------------------------------------------------


def test_mtls_ok(sim_fleet: SimFactory, caplog: pytest.LogCaptureFixture) -> None:
    sim = sim_fleet(mtls=True, minutes=10)
    seen = collect_all(sim.transport_config(NODE), sim)
    assert seen == sim.fleet.node(NODE).collected_ats()
    assert len(seen) == 10
    assert_no_secrets(sim, caplog.text)


def test_bearer_with_pinned_ca_ok(sim_fleet: SimFactory, caplog: pytest.LogCaptureFixture) -> None:
    sim = sim_fleet(mtls=False, bearer=True, minutes=7)
    seen = collect_all(sim.transport_config(NODE), sim)
    assert len(seen) == 7
    assert_no_secrets(sim, caplog.text)


def test_mtls_plus_bearer_latest(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True, bearer=True, series=5)
    with SourceClient(sim.transport_config(NODE)) as client:
        items, rejections = parse_latest(client.get_latest())
    assert rejections == []
    assert [it.collected_at_ns for it in items] == [sim.fleet.node(NODE).last_collected_at]
    assert len(items[0].samples) == 5


def test_connection_reused_across_pages(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True, minutes=12)
    cfg = sim.transport_config(NODE)
    with SourceClient(cfg) as client:
        last = sim.fleet.node(NODE).last_collected_at
        assert last is not None
        client.get_window(last - 20 * NS_PER_MINUTE, last, 3, None)
        pool = client._client._transport._pool  # type: ignore[attr-defined]
        first = list(pool.connections)
        client.get_window(last - 20 * NS_PER_MINUTE, last, 3, None)
        assert list(pool.connections) == first
        assert len(first) == 1


# --- TLS failures, each distinct ------------------------------------------------------------


def test_wrong_ca(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=False, bearer=True)
    other = trustme.CA().cert_pem.bytes()
    err = fail(sim.transport_config(NODE, ca_pem=other))
    assert type(err) is UnknownCAError
    assert "ca_bundle_ref" in str(err)
    assert str(err).startswith(f"source '{NODE}': ")
    assert_no_secrets(sim, str(err))


def test_hostname_mismatch_without_server_name(sim_fleet: SimFactory) -> None:
    # Certificate names only the exporter's DNS name; we connect to the IP.
    sim = sim_fleet(mtls=True, server_names=("jp-1.exporter.internal",))
    err = fail(sim.transport_config(NODE))
    assert type(err) is HostnameMismatchError
    assert "server_name" in str(err)
    assert "127.0.0.1" in str(err)


def test_server_name_used_for_sni_and_verification(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True, server_names=("jp-1.exporter.internal",), minutes=4)
    cfg = sim.transport_config(NODE, server_name="jp-1.exporter.internal")
    assert cfg.base_url.startswith("https://127.0.0.1:")
    assert len(collect_all(cfg, sim)) == 4


def test_wrong_server_name_is_hostname_mismatch(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True, server_names=("jp-1.exporter.internal",))
    err = fail(sim.transport_config(NODE, server_name="kr-2.exporter.internal"))
    assert type(err) is HostnameMismatchError
    assert "kr-2.exporter.internal" in str(err)
    assert "server_name" in str(err)


def test_expired_server_certificate(sim_fleet: SimFactory) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    sim = sim_fleet(mtls=True, server_not_after=past)
    err = fail(sim.transport_config(NODE))
    assert type(err) is CertificateExpiredError
    assert "expired" in str(err)


def test_missing_client_certificate(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True)
    err = fail(sim.transport_config(NODE, client=False))
    assert type(err) is ClientCertificateRejectedError
    assert 'auth_mode = "mtls"' in str(err)  # hint: the exporter wants mTLS


def test_client_certificate_from_other_ca(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True)
    rogue = sim_fleet(mtls=True)  # its client cert comes from a CA `sim` does not trust
    cfg = sim.transport_config(NODE)
    from billing_cli.collect._tls import ClientCertificate, build_ssl_context

    ctx = build_ssl_context(
        ca_pem=sim.pki.ca.read_bytes(),
        client=ClientCertificate(rogue.pki.client_cert, rogue.pki.client_key),
    )
    err = fail(TransportConfig(**{**cfg.__dict__, "ssl_context": ctx}))
    assert type(err) is ClientCertificateRejectedError
    assert "client_cert_ref" in str(err)
    assert_no_secrets(sim, str(err))
    assert_no_secrets(rogue, str(err))


def test_wrong_token(sim_fleet: SimFactory, caplog: pytest.LogCaptureFixture) -> None:
    sim = sim_fleet(mtls=False, bearer=True)
    wrong = "wrong-token-0123456789abcdef"
    sim.extra_secrets.append(wrong)
    err = fail(sim.transport_config(NODE, token=wrong))
    assert type(err) is AuthError
    assert "HTTP 401" in str(err)
    assert_no_secrets(sim, str(err), caplog.text)


def test_connection_refused_is_transport_error(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True)
    cfg = sim.transport_config(NODE)
    sim.fleet.stop()
    sleeps = Sleeps()
    with SourceClient(cfg, sleep=sleeps) as client, pytest.raises(SourceError) as ei:
        client.get_latest()
    assert type(ei.value) is TransportError
    assert "cannot reach 127.0.0.1" in str(ei.value)
    assert len(sleeps.calls) == 2  # three attempts


def test_all_failures_distinct_and_clean(
    sim_fleet: SimFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """One run through every failure: distinct classes, distinct messages, no secrets."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    ok = sim_fleet(mtls=True, bearer=True)
    named = sim_fleet(mtls=True, bearer=True, server_names=("only.example",))
    expired = sim_fleet(mtls=True, bearer=True, server_not_after=past)
    errors = [
        fail(ok.transport_config(NODE, ca_pem=trustme.CA().cert_pem.bytes())),
        fail(named.transport_config(NODE)),
        fail(expired.transport_config(NODE)),
        fail(ok.transport_config(NODE, client=False)),
        fail(ok.transport_config(NODE, token="not-the-token-" + "x" * 20)),
    ]
    assert len({type(e) for e in errors}) == len(errors)
    assert len({str(e) for e in errors}) == len(errors)
    for e in errors:
        assert "\n" not in str(e)
        for sim in (ok, named, expired):
            assert_no_secrets(sim, str(e), caplog.text)


# --- simulator faults through the real transport -------------------------------------------


def test_5xx_then_success_over_tls(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True)
    sim.fleet.node(NODE).set_fault("status", times=2, status=503)
    sleeps = Sleeps()
    with SourceClient(sim.transport_config(NODE), sleep=sleeps) as client:
        items, _ = parse_latest(client.get_latest())
    assert len(items) == 1
    assert len(sleeps.calls) == 2


def test_truncated_body_retried(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True)
    sim.fleet.node(NODE).set_fault("truncate", times=1)
    with SourceClient(sim.transport_config(NODE), sleep=Sleeps()) as client:
        items, _ = parse_latest(client.get_latest())
    assert len(items) == 1
    assert [e for e, _ in sim.fleet.node(NODE).requests].count("latest") == 2


def test_slow_response_times_out(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True)
    sim.fleet.node(NODE).set_fault("slow", delay_s=1.5)
    cfg = sim.transport_config(NODE, timeout_s=0.3, retry_attempts=2)
    with SourceClient(cfg, sleep=Sleeps()) as client, pytest.raises(TransportError) as ei:
        client.get_latest()
    assert "timed out" in str(ei.value)


@pytest.mark.parametrize("content_length", [True, False])
def test_oversize_body(sim_fleet: SimFactory, content_length: bool) -> None:
    sim = sim_fleet(mtls=True)
    sim.fleet.node(NODE).set_fault("oversize", size=300_000, content_length=content_length)
    cfg = sim.transport_config(NODE, max_response_bytes=100_000)
    with SourceClient(cfg) as client, pytest.raises(ResponseTooLargeError) as ei:
        client.get_latest()
    assert ("Content-Length" in str(ei.value)) is content_length


def test_redirect_not_followed(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True)
    sim.fleet.node(NODE).set_fault("redirect")
    with (
        SourceClient(sim.transport_config(NODE)) as client,
        pytest.raises(RedirectRefusedError) as ei,
    ):
        client.get_latest()
    assert "elsewhere.example" in str(ei.value)
    assert "redirect-secret" not in str(ei.value)


def test_always_truncated_body_fails_after_retries(sim_fleet: SimFactory) -> None:
    sim = sim_fleet(mtls=True)
    sim.fleet.node(NODE).set_fault("truncate")
    sleeps = Sleeps()
    with (
        SourceClient(sim.transport_config(NODE), sleep=sleeps) as client,
        pytest.raises(SourceError) as ei,
    ):
        client.get_latest()
    assert type(ei.value) is TransportError
    assert "broke while reading the response" in str(ei.value)
    assert "after 3 attempts" in str(ei.value)
    assert len(sleeps.calls) == 2

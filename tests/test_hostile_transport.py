"""The transport against a hostile exporter over real TLS (tests/hostile_exporter.py).

Slow response headers, a stuck request that must be abortable, stacked gzip bombs (with
the peak memory of a real ``billing collect`` process measured), unknown encodings, a
cursor too long for a URL, and the bearer token echoed back in an error body.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hostile_exporter import (
    TOKEN,
    HostileExporter,
    Reply,
    hostile,
    stacked_gzip_bomb,
    subprocess_env,
    window_page,
)

from billing_cli._errors import (
    HTTPStatusError,
    ProtocolError,
    ResponseTooLargeError,
    SourceError,
    TransportError,
)
from billing_cli.collect._deadline import DeadlineBackend
from billing_cli.collect.transport import SourceClient, TransportConfig

__all__ = ["hostile"]

MiB = 1 << 20


def config(hx: HostileExporter, **kw: Any) -> TransportConfig:
    base: dict[str, Any] = {
        "source_id": "hostile",
        "base_url": hx.base_url,
        "auth_mode": "bearer",
        "bearer_token": TOKEN,
        "ssl_context": ssl.create_default_context(cafile=str(hx.ca_path)),
        "timeout_s": 5.0,
        "retry_attempts": 1,
        "budget_s": 60.0,
    }
    base.update(kw)
    return TransportConfig(**base)


def timed_get(client: SourceClient, within_s: float) -> tuple[BaseException | bytes, float]:
    """One window request in a thread; fails the test if it has not ended ``within_s``."""
    result: list[BaseException | bytes] = []

    def run() -> None:
        try:
            result.append(client.get_window(0, 10**18, 10, None))
        except BaseException as exc:
            result.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within_s)
    elapsed = time.monotonic() - t0
    assert not thread.is_alive(), f"the request was still running after {within_s}s"
    return result[0], elapsed


def test_request_timeout_bounds_slow_response_headers(hostile: HostileExporter) -> None:
    # A header byte every 0.2 s: no single read ever waits a second, the headers take 20 s.
    hostile.handler = lambda req: Reply(body=window_page([]), head_delay_s=0.2)
    with SourceClient(config(hostile, timeout_s=1.0)) as client:
        out, elapsed = timed_get(client, within_s=8)
    assert isinstance(out, TransportError), out
    assert "timed out after 1s" in str(out)
    assert elapsed < 3.0


def test_the_time_budget_bounds_a_request_in_flight(hostile: HostileExporter) -> None:
    hostile.handler = lambda req: Reply(body=window_page([]), head_delay_s=0.2)
    cfg = config(hostile, timeout_s=20.0, budget_s=1.5, retry_attempts=3)
    with SourceClient(cfg) as client:
        out, elapsed = timed_get(client, within_s=8)
    assert isinstance(out, TransportError), out
    assert "time budget of 1.5s" in str(out)
    assert elapsed < 3.5


def test_abort_ends_a_stuck_request_from_another_thread(hostile: HostileExporter) -> None:
    hostile.handler = lambda req: Reply(hang=True)
    with SourceClient(config(hostile, timeout_s=30.0, retry_attempts=5)) as client:
        threading.Timer(0.5, client.abort).start()
        out, elapsed = timed_get(client, within_s=8)
    assert isinstance(out, TransportError), out
    assert elapsed < 3.0


@pytest.mark.parametrize("end", ["deadline", "abort"])
def test_no_socket_stays_open_when_a_request_ends_between_connect_and_tls(
    hostile: HostileExporter, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """The connection is made just as the time left runs out (a loaded machine), or as the
    run is stopped: the TLS upgrade is refused before it starts, and the plain socket must
    be closed then. httpcore closes a stream only when the upgrade itself fails; left to
    the garbage collector, the socket is a ResourceWarning in whatever test runs next."""
    opened: list[socket.socket] = []
    real = DeadlineBackend.connect_tcp

    def connect_at_the_end(self: DeadlineBackend, *args: Any, **kw: Any) -> Any:
        stream = real(self, *args, **kw)
        opened.append(stream.get_extra_info("socket"))
        if end == "abort":
            self.abort()
        else:
            assert self.deadline is not None
            time.sleep(max(0.0, self.deadline - time.monotonic()) + 0.01)
        return stream

    monkeypatch.setattr(DeadlineBackend, "connect_tcp", connect_at_the_end)
    try:
        with SourceClient(config(hostile, timeout_s=0.5)) as client:
            out, _ = timed_get(client, within_s=8)
        assert isinstance(out, TransportError), out
        if end == "deadline":
            assert "timed out after 0.5s" in str(out)
        assert len(opened) == 1
        assert opened[0].fileno() == -1, f"left open: {opened[0]!r}"
    finally:
        for sock in opened:
            sock.close()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return stacked_gzip_bomb(1024)


def test_a_stacked_gzip_bomb_is_refused_at_the_cap(hostile: HostileExporter, bomb: bytes) -> None:
    hostile.handler = lambda req: Reply(body=bomb, headers=[("Content-Encoding", "gzip, gzip")])
    client = SourceClient(config(hostile, max_response_bytes=MiB))
    with client, pytest.raises(ResponseTooLargeError) as err:
        client.get_window(0, 10**18, 10, None)
    assert "max_response_bytes 1048576" in str(err.value)
    assert "decompressed" in str(err.value)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "gzip, gzip", "x-gzip"])
def test_compressed_pages_still_decode(hostile: HostileExporter, encoding: str) -> None:
    import gzip
    import zlib

    body = window_page([], window_start="2026-11-24T10:00:00Z")
    encoded = body
    for coding in encoding.split(", "):
        encoded = zlib.compress(encoded) if coding == "deflate" else gzip.compress(encoded)
    hostile.handler = lambda req: Reply(body=encoded, headers=[("Content-Encoding", encoding)])
    with SourceClient(config(hostile)) as client:
        assert client.get_window(0, 10**18, 10, None) == body
    assert hostile.requests[0].headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        ("br", "unsupported Content-Encoding 'br'"),
        ("gzip, gzip, gzip, gzip, gzip", "5 layers"),
        ("gzip", "could not be decoded"),
    ],
)
def test_bad_encodings_are_one_line_protocol_errors(
    hostile: HostileExporter, encoding: str, message: str
) -> None:
    hostile.handler = lambda req: Reply(
        body=b"this is not gzip", headers=[("Content-Encoding", encoding)]
    )
    with SourceClient(config(hostile)) as client, pytest.raises(ProtocolError) as err:
        client.get_window(0, 10**18, 10, None)
    assert message in str(err.value)


def test_an_error_body_that_is_a_bomb_is_read_only_as_far_as_it_is_quoted(
    hostile: HostileExporter, bomb: bytes
) -> None:
    hostile.handler = lambda req: Reply(
        status=404, body=bomb, headers=[("Content-Encoding", "gzip, gzip")]
    )
    with SourceClient(config(hostile)) as client, pytest.raises(HTTPStatusError) as err:
        client.get_window(0, 10**18, 10, None)
    assert err.value.status == 404


def test_the_token_echoed_in_an_error_body_is_redacted(hostile: HostileExporter) -> None:
    hostile.handler = lambda req: Reply(
        status=500, body=f"bad token {req.token}".encode(), content_type="text/plain"
    )
    with SourceClient(config(hostile)) as client, pytest.raises(HTTPStatusError) as err:
        client.get_window(0, 10**18, 10, None)
    assert TOKEN not in str(err.value)
    assert TOKEN not in err.value.body
    assert "bad token [redacted]" in err.value.body


def test_a_cursor_too_long_for_a_url_is_a_protocol_error_not_a_crash(
    hostile: HostileExporter,
) -> None:
    with SourceClient(config(hostile)) as client, pytest.raises(SourceError) as err:
        client.get_window(0, 10**18, 10, "c" * 70_000)
    assert isinstance(err.value, ProtocolError)


@pytest.mark.slow
def test_a_stacked_gzip_bomb_keeps_a_collect_process_near_the_cap(
    hostile: HostileExporter, bomb: bytes, tmp_path: Path
) -> None:
    """The issue's attack: 1 GiB behind 'gzip, gzip', max_response_bytes 1 MiB. Peak RSS
    of the real ``billing collect`` process, from the kernel (wait4)."""
    hostile.handler = lambda req: Reply(body=bomb, headers=[("Content-Encoding", "gzip, gzip")])
    registry = hostile.registry(tmp_path / "sources.toml", defaults="max_response_bytes = 1048576")
    args = [sys.executable, "-m", "billing_cli", "--registry", str(registry)]
    args += ["--db", str(tmp_path / "b.db"), "collect", "--json"]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    with proc.stdout, proc.stderr:  # closed after reading: no pipe outlives the test
        out = proc.stdout.read()
        err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 1, err.decode()
    doc = orjson.loads(out)
    assert "max_response_bytes 1048576" in doc["sources"][0]["error"]
    peak_mib = usage.ru_maxrss / 1024  # KiB on Linux
    assert peak_mib < 200, f"peak RSS {peak_mib:.0f} MiB for a 1 MiB cap"


def test_request_timeout_bounds_name_resolution(
    hostile: HostileExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DNS server that never answers: getaddrinfo has no timeout of its own."""
    real = socket.getaddrinfo

    def stuck(host: str, *args: Any, **kw: Any) -> Any:
        if host == "localhost":
            time.sleep(30)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    url = hostile.base_url.replace("127.0.0.1", "localhost")
    with SourceClient(config(hostile, base_url=url, timeout_s=1.0)) as client:
        out, elapsed = timed_get(client, within_s=8)
    assert isinstance(out, TransportError), out
    assert "timed out after 1s" in str(out)
    assert elapsed < 3.0


def test_a_name_is_resolved_and_every_address_tried(
    hostile: HostileExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first address refuses the connection: the next one is tried, like
    socket.create_connection does."""
    real = socket.getaddrinfo
    port = int(hostile.base_url.rsplit(":", 1)[1])

    def two(host: str, *args: Any, **kw: Any) -> Any:
        if host == "localhost":
            dead = ("127.0.0.2", 1)  # nothing listens there
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", dead),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            ]
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", two)
    hostile.handler = lambda req: Reply(body=window_page([]))
    url = hostile.base_url.replace("127.0.0.1", "localhost")
    with SourceClient(config(hostile, base_url=url)) as client:
        out, _ = timed_get(client, within_s=8)
    assert isinstance(out, bytes), out

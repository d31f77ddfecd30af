"""The simulated fleet: many ``SimNode``s behind one HTTPS (or loopback HTTP) port.

Each node is served under its own path prefix, so one registry source maps to one
exporter endpoint: ``{fleet.url}/nodes/{node_id}`` is the node's ``base_url``, and the
wire paths ``/v1/snapshots/window`` and ``/v1/snapshots/latest`` hang below it. A fleet
of one node also answers at the root (``{fleet.url}/v1/snapshots/...``), like a deployed
exporter does — what a reverse proxy in front of it forwards to. Plain HTTP (no
``ssl_context``) is how the deployed exporter itself listens; TLS then comes from a
terminator in front of it (``scripts/nginx/``).

TLS: the handshake runs in the connection's own thread (not in ``accept``), so a slow or
failing client never blocks the others. With ``client_ca_pem`` every connection must
present a client certificate issued by that CA (mTLS), enforced by OpenSSL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from billing_cli._time import NS_PER_MINUTE, minute_floor_ns
from billing_cli.simulator.node import SimNode, SimResponse, Wire, _Unset

log = logging.getLogger("billing_cli.simulator")


def server_ssl_context(
    cert_chain_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None
) -> ssl.SSLContext:
    """Server context from PEM bytes; with ``client_ca_pem`` a client certificate is required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="billing-sim-") as tmp:
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        with open(cert_path, "wb") as fh:
            fh.write(cert_chain_pem)
        ctx.load_cert_chain(cert_path, key_path)
    if client_ca_pem is not None:
        ctx.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up stop()
    fleet: Fleet
    tls: ssl.SSLContext | None

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock = request
        if self.tls is not None:
            request.settimeout(10)
            try:
                sock = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                # Expected in tests (unknown CA, missing client certificate, ...).
                log.debug("TLS handshake from %s failed: %s", client_address[0], exc)
                with contextlib.suppress(OSError):
                    request.close()
                return
        try:
            self.RequestHandlerClass(sock, client_address, self)  # type: ignore[arg-type]
        finally:
            if sock is not request:
                with contextlib.suppress(OSError):
                    sock.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so clients can reuse connections
    timeout = 30
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        resp = self.server.fleet.dispatch(parts.path, query, headers)
        self._send(resp)

    def _send(self, resp: SimResponse) -> None:
        if resp.delay_s:
            time.sleep(resp.delay_s)
        self.send_response(resp.status)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        if resp.content_length:
            self.send_header("Content-Length", str(len(resp.body)))
        if resp.truncate_at is not None or not resp.content_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        body = resp.body if resp.truncate_at is None else resp.body[: resp.truncate_at]
        with contextlib.suppress(OSError):
            self.wfile.write(body)
            self.wfile.flush()


class Fleet:
    """Simulated exporters. Use as a context manager or call ``start()``/``stop()``.

    ``nodes`` is a count (node ids ``node-01``...) or explicit ids. History: ``minutes``
    items per node, the last one in the minute before ``end_ns`` (default: now), so a
    collector pulling up to "now" sees all of it. ``tokens=True`` gives every node its own
    bearer token (``fleet.tokens[node_id]``).
    """

    def __init__(
        self,
        nodes: int | list[str] = 1,
        *,
        env: str = "prod",
        series: int = 50,
        activity: float = 0.3,
        minutes: int = 60,
        seed: int = 1,
        end_ns: int | None = None,
        wire: Wire = "deployed",
        items_key: Literal["snapshots", "items"] = "snapshots",
        epoch: str | _Unset | None = _Unset.UNSET,
        tokens: bool | dict[str, str] = False,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        ids = [f"node-{i:02d}" for i in range(1, nodes + 1)] if isinstance(nodes, int) else nodes
        if isinstance(tokens, dict):
            self.tokens = dict(tokens)
        elif tokens:
            self.tokens = {n: f"sim-token-{seed}-{n}-{os.urandom(8).hex()}" for n in ids}
        else:
            self.tokens = {}
        self.nodes: dict[str, SimNode] = {
            n: SimNode(
                n,
                env,
                series=series,
                activity=activity,
                seed=seed,
                wire=wire,
                items_key=items_key,
                epoch=epoch,
                token=self.tokens.get(n),
            )
            for n in ids
        }
        self.wire: Wire = wire
        end = minute_floor_ns(end_ns if end_ns is not None else time.time_ns())
        # The next minute to generate; history ends in the minute before `end`.
        self.next_minute_ns = end - minutes * NS_PER_MINUTE
        self._generate(minutes)
        self.ssl_context = ssl_context
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- data --
    def _generate(self, minutes: int) -> None:
        for node in self.nodes.values():
            node.generate_minutes(self.next_minute_ns, minutes)
        self.next_minute_ns += minutes * NS_PER_MINUTE

    def advance(self, minutes: int = 1) -> None:
        """Generate ``minutes`` more items per node and release due late items."""
        self._generate(minutes)
        for node in self.nodes.values():
            with node._lock:
                node.generation += minutes

    def node(self, node_id: str) -> SimNode:
        return self.nodes[node_id]

    def dispatch(self, path: str, query: dict[str, str], headers: dict[str, str]) -> SimResponse:
        parts = path.strip("/").split("/")
        node: SimNode | None = None
        # nodes/<id>/v1/snapshots/<endpoint>, or v1/snapshots/<endpoint> on a one-node fleet
        if len(parts) == 5 and parts[0] == "nodes" and parts[2:4] == ["v1", "snapshots"]:
            node = self.nodes.get(parts[1])
            parts = parts[2:]
        elif len(parts) == 3 and len(self.nodes) == 1:
            node = next(iter(self.nodes.values()))
        if (
            node is not None
            and parts[:2] == ["v1", "snapshots"]
            and parts[2]
            in (
                "window",
                "latest",
            )
        ):
            return node.handle(parts[2], query, headers)
        if self.wire == "deployed":  # Go's http.NotFound
            return SimResponse(
                404, b"404 page not found\n", {"Content-Type": "text/plain; charset=utf-8"}
            )
        return SimResponse(404, b'{"error":"not found"}', {"Content-Type": "application/json"})

    # -- lifecycle --
    def start(self) -> Fleet:
        if self._server is not None:
            return self
        server = _Server((self._host, self._port), _Handler)
        server.fleet = self
        server.tls = self.ssl_context
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("fleet not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self.port}"

    def base_url(self, node_id: str) -> str:
        return f"{self.url}/nodes/{node_id}"

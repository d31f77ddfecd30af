"""A hostile (or just broken) exporter on loopback, over real TLS, for the attack tests.

Raw sockets rather than ``http.server``, so a reply can be anything: status line and
headers sent one byte at a time, a connection that never answers, a body that lies about
its encoding, echoes of the request's bearer token. One server per test, one thread per
connection, ``Connection: close`` on every reply; ``stop()`` closes every socket, which
also ends any reply still trickling.

    hx = HostileExporter(tmp_path)          # trustme CA + certificate for 127.0.0.1/localhost
    hx.handler = lambda req: Reply(body=window_page([...]))
    hx.registry(tmp_path / "sources.toml")  # a [[sources]] entry with a bearer token
    ...
    hx.stop()

Use the ``hostile`` fixture (``from hostile_exporter import hostile``) to have it stopped
at teardown.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import trustme

from billing_cli._time import format_rfc3339_ns

TOKEN = "hx-tok-9c1f4e7a2b5d8c3e6f0a1b4d7e2c5f8a"
NODE = "node-h"
ENV = "prod"
SOURCE = "hostile"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]

    @property
    def token(self) -> str:
        return self.headers.get("authorization", "").removeprefix("Bearer ")


@dataclass
class Reply:
    """What to send back. ``head_delay_s``: seconds between bytes of the status line and
    headers; ``hang``: accept the request and never answer."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"
    head_delay_s: float = 0.0
    hang: bool = False
    delay_s: float = 0.0  # before anything is sent


Handler = Callable[[Request], Reply]


class HostileExporter:
    def __init__(self, directory: Path, *, token: str = TOKEN) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.token = token
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_path = directory / "hostile-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        self.token_path = directory / "hostile-token"
        self.token_path.write_text(token + "\n")
        self.token_path.chmod(0o600)
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self._ctx)
        self.handler: Handler = lambda req: Reply(body=window_page([]))
        self.requests: list[Request] = []
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        # Set before the thread starts: a test that stops the server at once closes the
        # listener before the thread's first line runs.
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="hostile", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def registry_entry(self, *, source_id: str = SOURCE, extra: str = "") -> str:
        return (
            "[[sources]]\n"
            f'source_id = "{source_id}"\n'
            f'node_id = "{NODE}"\n'
            f'env = "{ENV}"\n'
            f'base_url = "{self.base_url}"\n'
            'auth_mode = "bearer"\n'
            f'credential_ref = "file:{self.token_path}"\n'
            f'ca_bundle_ref = "file:{self.ca_path}"\n'
            f"{extra}\n"
        )

    def registry(self, path: Path, *, defaults: str = "", extra: str = "") -> Path:
        text = f"[defaults]\n{defaults}\n\n" if defaults else ""
        path.write_text(text + self.registry_entry(extra=extra))
        return path

    # -- serving --
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, raw: socket.socket) -> None:
        with self._lock:
            self._conns.add(raw)
        conn: ssl.SSLSocket | None = None
        try:
            raw.settimeout(10)
            conn = self._ctx.wrap_socket(raw, server_side=True)
            with self._lock:
                self._conns.add(conn)
            req = _read_request(conn)
            if req is None:
                return
            self.requests.append(req)
            reply = self.handler(req)
            self._send(conn, reply)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            # wrap_socket moves the descriptor to ``conn`` (``raw`` is left detached): it
            # is ``conn`` that must be closed here, not only by stop(), which misses a
            # connection whose handshake ends while it runs.
            with self._lock:
                self._conns.discard(raw)
                if conn is not None:
                    self._conns.discard(conn)
            for sock in (conn, raw):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _send(self, conn: socket.socket, reply: Reply) -> None:
        if reply.delay_s:
            self._stop.wait(reply.delay_s)
        if reply.hang:
            self._stop.wait()
            return
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Connection", "close"),
            *reply.headers,
        ]
        head = f"HTTP/1.1 {reply.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        data = (head + "\r\n").encode("latin-1")
        if reply.head_delay_s:
            for i in range(len(data)):
                if self._stop.wait(reply.head_delay_s):
                    return
                conn.sendall(data[i : i + 1])
        else:
            conn.sendall(data)
        conn.sendall(reply.body)

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()
        self._thread.join(timeout=5)


def _read_request(conn: socket.socket) -> Request | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > 1 << 20:
            return None
    head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    parts = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return Request(method, parts.path, query, headers)


# --- bodies --------------------------------------------------------------------------------


def sample(
    uuid: str = "u1", up: Any = 0, down: Any = 0, *, email: str = "", tag: str = ""
) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "email": email,
        "inbound_tag": tag,
        "uplink_bytes_total": up,
        "downlink_bytes_total": down,
    }


def item(collected_at: int | str, samples: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    at = format_rfc3339_ns(collected_at) if isinstance(collected_at, int) else collected_at
    return {"collected_at": at, "samples": samples, **extra}


def window_page(
    items: list[dict[str, Any]],
    *,
    node_id: str = NODE,
    env: str = ENV,
    next_cursor: str | None = None,
    has_more: bool = False,
    **extra: Any,
) -> bytes:
    doc: dict[str, Any] = {"node_id": node_id, "env": env, "snapshots": items, **extra}
    if next_cursor is not None:
        doc["next_cursor"] = next_cursor
    doc["has_more"] = has_more
    return orjson.dumps(doc)


def gzip_of_zeros(mib: int) -> bytes:
    """A valid gzip member of ``mib`` MiB of zero bytes, built without compressing them all:
    every MiB after a full flush compresses to the same deflate blocks."""
    one = bytes(1 << 20)
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = co.compress(one) + co.flush(zlib.Z_FULL_FLUSH)
    end = co.flush()
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(one, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)
    return header + block * mib + end + trailer


def stacked_gzip_bomb(mib: int = 1024) -> bytes:
    """``Content-Encoding: gzip, gzip``: a few KiB inflating to ``mib`` MiB."""
    return gzip.compress(gzip_of_zeros(mib), compresslevel=9)


# --- fixture -------------------------------------------------------------------------------


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[HostileExporter]:
    hx = HostileExporter(tmp_path / "hostile")
    yield hx
    hx.stop()


def wait_for(cond: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def subprocess_env() -> dict[str, str]:
    """The environment of a ``python -m billing_cli`` child: this checkout, no BILLING_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "DATABASE_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env

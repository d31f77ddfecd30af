"""A whole-request deadline under httpx, and a way to abort a request from another thread.

httpx's timeouts bound each socket operation, not a request: an exporter that sends its
response headers one byte a second never trips a 5 s read timeout, and a run waits as long
as the exporter likes. This module is an httpcore *network backend* (httpcore's documented
extension point) whose streams give every connect, TLS handshake, read and write only
what is left of the current request's deadline, so ``request_timeout`` (and the source's
time budget) bounds name resolution + connect + TLS + headers + body together. CPython's
socket and TLS calls treat a timeout as a deadline for the whole call (a TLS handshake fed
one byte at a time included), so the bound is tight.

:meth:`DeadlineBackend.abort` shuts the open sockets down, which wakes a thread blocked in
``recv``: an interrupted run (Ctrl-C, SIGTERM) need not wait for a stuck exporter.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

_Timeout = type[httpcore.TimeoutException]


class DeadlineBackend(httpcore.NetworkBackend):
    """The standard blocking backend, with one deadline for the request in flight.

    One backend per ``SourceClient`` (one source, one worker thread); ``abort`` may be
    called from any thread.
    """

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()
        self.deadline: float | None = None  # time.monotonic() value; None: no deadline
        self._aborted = threading.Event()
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def timeout(self, timeout: float | None, exc: _Timeout) -> float | None:
        """``timeout`` shortened to what is left of the deadline; raises when none is."""
        if self._aborted.is_set():
            raise httpcore.ReadError("the request was aborted (the run is stopping)")
        if self.deadline is None:
            return timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise exc("the request's total time limit was reached")
        return left if timeout is None else min(timeout, left)

    def track(self, stream: httpcore.NetworkStream) -> DeadlineStream:
        sock = stream.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            with self._lock:
                self._sockets.add(sock)
            if self._aborted.is_set():
                _shutdown(sock)
        return DeadlineStream(stream, self)

    def abort(self) -> None:
        """Make every request of this backend fail now, and every later one at once."""
        self._aborted.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    # -- httpcore.NetworkBackend --
    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        # The name is resolved first, within the deadline too: the system resolver has no
        # timeout of its own here, and a stuck DNS server would otherwise hold the request.
        addresses = self._resolve(host, port, self.timeout(timeout, httpcore.ConnectTimeout))
        error: httpcore.ConnectError | None = None
        for address in addresses:
            t = self.timeout(timeout, httpcore.ConnectTimeout)
            try:
                stream = self._inner.connect_tcp(
                    address, port, t, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectError as exc:
                error = exc  # the next address, as socket.create_connection would
                continue
            return self.track(stream)
        raise error or httpcore.ConnectError(f"no address for {host}")

    def _resolve(self, host: str, port: int, timeout: float | None) -> list[str]:
        """The addresses of ``host`` in the resolver's order, waiting at most ``timeout``.

        ``getaddrinfo`` cannot be interrupted; it runs in a daemon thread that is simply
        left behind when the deadline passes (it ends when the resolver gives up).
        """
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [host]
        found: list[str] = []
        failure: list[OSError] = []
        done = threading.Event()

        def lookup() -> None:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                found.extend(dict.fromkeys(str(info[4][0]) for info in infos))
            except OSError as exc:
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=lookup, name="billing-resolve", daemon=True).start()
        if not done.wait(timeout):
            raise httpcore.ConnectTimeout(f"resolving {host} took longer than the time left")
        if failure:
            raise httpcore.ConnectError(f"cannot resolve {host} ({failure[0]})")
        if not found:
            raise httpcore.ConnectError(f"no address for {host}")
        return found

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:  # pragma: no cover - billing never uses unix sockets
        t = self.timeout(timeout, httpcore.ConnectTimeout)
        return self.track(self._inner.connect_unix_socket(path, t, socket_options))

    def sleep(self, seconds: float) -> None:  # pragma: no cover - used by httpcore retries
        self._aborted.wait(seconds)


class DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, backend: DeadlineBackend) -> None:
        self._inner = inner
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._backend.timeout(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._backend.timeout(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        try:
            t = self._backend.timeout(timeout, httpcore.ConnectTimeout)
            return self._backend.track(self._inner.start_tls(ssl_context, server_hostname, t))
        except BaseException:
            # httpcore closes a stream whose upgrade fails only when the failure is the
            # upgrade's own; a deadline that ran out (or an abort) since the connect fails
            # here first, and the plain socket would be left open until garbage collection
            # (a ResourceWarning in whatever runs then). Closing twice is harmless.
            self._inner.close()
            raise

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _shutdown(sock: socket.socket) -> None:
    # The plain socket's shutdown (not SSLSocket's, which drops its TLS object): wakes a
    # thread blocked in recv on this socket; its read then fails and the request ends.
    with contextlib.suppress(OSError):  # already closed, or never connected
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class DeadlineTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` whose connection pool uses a :class:`DeadlineBackend`.

    httpx does not take a network backend as an argument, so the pool it builds is
    replaced by the same pool with ours; the check below fails loudly (and the transport
    tests with it) should a future httpx build its pool differently.
    """

    def __init__(
        self,
        backend: DeadlineBackend,
        *,
        ssl_context: ssl.SSLContext | None,
        limits: httpx.Limits,
    ) -> None:
        super().__init__(verify=ssl_context if ssl_context is not None else True, limits=limits)
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError("unsupported httpx version: HTTPTransport._pool changed")
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )

"""Throw-away PKI for the simulator (trustme) and the registry snippet that matches it.

Writes, into one directory: ``ca.pem`` (the CA that issued everything), ``server.pem`` /
``server.key`` (the exporter; SANs ``localhost``, ``127.0.0.1`` and any extra names),
``client.pem`` / ``client.key`` (the collector's mTLS identity) and, per node with a
token, ``token-<node_id>`` — keys and tokens with mode 0600. Development only.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trustme

from billing_cli.simulator.server import Fleet, server_ssl_context

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class SimPKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        return server_ssl_context(
            self.server_cert.read_bytes(),
            self.server_key.read_bytes(),
            self.ca.read_bytes() if require_client_cert else None,
        )


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new 0600 file (replacing an old one)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_pki(
    directory: Path,
    *,
    server_names: Iterable[str] = DEFAULT_SERVER_NAMES,
    server_not_after: dt.datetime | None = None,
) -> SimPKI:
    """New CA + server + client certificates in ``directory``.

    ``server_not_after`` in the past issues an already expired server certificate (for
    tests of the expired-certificate error); its validity then starts ten days earlier.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    not_before = server_not_after - dt.timedelta(days=10) if server_not_after else None
    server = ca.issue_cert(*server_names, not_before=not_before, not_after=server_not_after)
    client = ca.issue_cert("billing-collector@sim.example")
    pki = SimPKI(
        dir=directory,
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    pki.ca.write_bytes(ca.cert_pem.bytes())
    pki.server_cert.write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    write_private(pki.server_key, server.private_key_pem.bytes())
    pki.client_cert.write_bytes(b"".join(b.bytes() for b in client.cert_chain_pems))
    write_private(pki.client_key, client.private_key_pem.bytes())
    return pki


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def registry_snippet(
    fleet: Fleet,
    pki: SimPKI | None,
    *,
    mtls: bool,
    token_dir: Path | None = None,
    server_name: str | None = None,
) -> str:
    """``[[sources]]`` tables for every node of ``fleet``; tokens become ``file:`` refs.

    Token files are written to ``token_dir`` (default: the PKI directory) with mode 0600;
    the registry only ever holds references.
    """
    out: list[str] = []
    tdir = token_dir or (pki.dir if pki else None)
    for node_id, node in fleet.nodes.items():
        bearer = node.token is not None
        mode = {(True, True): "mtls+bearer", (True, False): "mtls", (False, True): "bearer"}.get(
            (mtls, bearer), "none"
        )
        lines = [
            "[[sources]]",
            f"source_id = {_q(node_id)}",
            f"node_id = {_q(node_id)}",
            f"env = {_q(node.env)}",
            f"base_url = {_q(fleet.base_url(node_id))}",
            f"auth_mode = {_q(mode)}",
        ]
        if bearer and node.token is not None:
            if tdir is None:
                raise ValueError("bearer tokens need a token_dir to be written to")
            token_path = tdir / f"token-{node_id}"
            write_private(token_path, node.token.encode() + b"\n")
            lines.append(f"credential_ref = {_q('file:' + str(token_path))}")
        if pki is not None:
            lines.append(f"ca_bundle_ref = {_q('file:' + str(pki.ca))}")
            if mtls:
                lines.append(f"client_cert_ref = {_q('file:' + str(pki.client_cert))}")
                lines.append(f"client_key_ref = {_q('file:' + str(pki.client_key))}")
        else:
            lines.append("allow_insecure_http = true")
        if server_name:
            lines.append(f"server_name = {_q(server_name)}")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"

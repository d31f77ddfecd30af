"""TLS in front of the exporter, as operators deploy it: a real nginx (Debian's package)
with the shipped site config (``scripts/nginx/xray-exporter.conf``) in front of the
simulator speaking plain HTTP and the deployed wire, and ``billing collect`` through it.

CI installs nginx (``.ci/run``) and sets ``BILLING_REQUIRE_NGINX=1``: a missing nginx is
then a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import trustme
from _collect_support import assert_no_secrets, expected_usage, store_usage
from conftest import CliResult, CliRunnerFn

from billing_cli.simulator import Fleet
from billing_cli.simulator.certs import write_private

SITE_CONF = Path(__file__).resolve().parent.parent / "scripts" / "nginx" / "xray-exporter.conf"
NODE = "tokyo-1"
TOKEN = "exporter-internal-token-" + os.urandom(8).hex()


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        if os.environ.get("BILLING_REQUIRE_NGINX"):
            pytest.fail("nginx is required here (BILLING_REQUIRE_NGINX=1) but not installed")
        pytest.skip("nginx is not installed (apt-get install nginx; CI installs it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Terminator:
    """An nginx in front of one plain-HTTP simulated exporter, and billing's side of it."""

    fleet: Fleet
    dir: Path
    port: int
    exporter_ca: Path
    client_cert: Path
    client_key: Path
    token_file: Path
    cli: CliRunnerFn
    outputs: list[str]

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    def registry(self, auth_mode: str, *, extra: str = "") -> Path:
        lines = [
            "[defaults]",
            "retry_attempts = 1",
            "",
            "[[sources]]",
            f'source_id = "{NODE}"',
            f'node_id = "{NODE}"',
            'env = "prod"',
            f'base_url = "{self.base_url}"',
            f'auth_mode = "{auth_mode}"',
            f'ca_bundle_ref = "file:{self.exporter_ca}"',
        ]
        if "mtls" in auth_mode:
            lines += [
                f'client_cert_ref = "file:{self.client_cert}"',
                f'client_key_ref = "file:{self.client_key}"',
            ]
        if "bearer" in auth_mode:
            lines.append(f'credential_ref = "file:{self.token_file}"')
        path = self.dir / "sources.toml"
        path.write_text("\n".join(lines) + "\n" + extra)
        return path

    def billing(self, registry: Path, *args: str) -> CliResult:
        res = self.cli("--registry", str(registry), "--db", str(self.dir / "billing.db"), *args)
        self.outputs += [res.stdout, res.stderr]
        return res


def render_site(
    *, port: int, upstream: int, certs: dict[str, Path], verify_client: bool, inject: bool
) -> str:
    """The shipped site config with this test's ports and files, changed only as the
    README tells operators to change it (and without the IPv6 listener)."""
    text = SITE_CONF.read_text()
    text = text.replace("server 127.0.0.1:9550;", f"server 127.0.0.1:{upstream};")
    text = text.replace("listen 9443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    text = text.replace("    listen [::]:9443 ssl;\n", "")
    for name, path in certs.items():
        text = text.replace(f"/etc/nginx/xray-exporter/{name}", str(path))
    if not verify_client:
        text = text.replace("ssl_verify_client on;", "ssl_verify_client off;")
    if inject:
        text = text.replace(
            '# proxy_set_header Authorization "Bearer INTERNAL_SERVICE_TOKEN";',
            f'proxy_set_header Authorization "Bearer {TOKEN}";',
        )
    active = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("#"))
    assert "/etc/nginx" not in active
    assert "9550" not in active
    return text


@pytest.fixture
def terminator(tmp_path: Path, cli: CliRunnerFn) -> Iterator[Callable[..., Terminator]]:
    binary = nginx_binary()
    procs: list[subprocess.Popen[bytes]] = []
    fleets: list[Fleet] = []

    def start(*, verify_client: bool = True, inject: bool = False) -> Terminator:
        exporter_ca, fleet_ca = trustme.CA(), trustme.CA()
        server = exporter_ca.issue_cert("localhost", "127.0.0.1")
        client = fleet_ca.issue_cert("billing-collector@fleet.example")
        files = {
            "exporter-ca.pem": exporter_ca.cert_pem.bytes(),
            "fleet-ca.pem": fleet_ca.cert_pem.bytes(),
            "server.pem": b"".join(b.bytes() for b in server.cert_chain_pems),
            "client.pem": b"".join(b.bytes() for b in client.cert_chain_pems),
        }
        paths = {}
        for name, data in files.items():
            paths[name] = tmp_path / name
            paths[name].write_bytes(data)
        for name, pem in (("server.key", server), ("client.key", client)):
            paths[name] = tmp_path / name
            write_private(paths[name], pem.private_key_pem.bytes())
        write_private(tmp_path / "token", TOKEN.encode() + b"\n")
        # The deployed exporter: plain HTTP on loopback, a token always required.
        fleet = Fleet([NODE], series=8, minutes=10, tokens={NODE: TOKEN}).start()
        fleets.append(fleet)
        port = free_port()
        site = render_site(
            port=port,
            upstream=fleet.port,
            certs={k: paths[k] for k in ("server.pem", "server.key", "fleet-ca.pem")},
            verify_client=verify_client,
            inject=inject,
        )
        (tmp_path / "site.conf").write_text(site)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp_path / sub).mkdir(exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers read this tmp dir
        (tmp_path / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {tmp_path}/nginx.pid;\n"
            f"error_log {tmp_path}/error.log info;\nevents {{ worker_connections 64; }}\n"
            f"http {{\n access_log {tmp_path}/access.log;\n"
            + "".join(
                f" {sub}_temp_path {tmp_path}/{sub};\n"
                for sub in ("proxy", "fastcgi", "uwsgi", "scgi")
            )
            + f" client_body_temp_path {tmp_path}/body;\n include {tmp_path}/site.conf;\n}}\n"
        )
        check = subprocess.run(
            [binary, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen(
            [binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.05)
        return Terminator(
            fleet=fleet,
            dir=tmp_path,
            port=port,
            exporter_ca=paths["exporter-ca.pem"],
            client_cert=paths["client.pem"],
            client_key=paths["client.key"],
            token_file=tmp_path / "token",
            cli=cli,
            outputs=[],
        )

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=20)
    for fleet in fleets:
        fleet.stop()


def collect_json(t: Terminator, registry: Path, expect: int = 0) -> dict[str, object]:
    res = t.billing(registry, "collect", "--json")
    assert res.exit_code == expect, res.output
    doc: dict[str, object] = orjson.loads(res.stdout)
    return doc


def assert_exact(t: Terminator) -> None:
    node = t.fleet.node(NODE)
    ats = node.collected_ats()
    assert store_usage(str(t.dir / "billing.db"), NODE) == expected_usage(node, ats[0], ats[-1])


def test_collect_through_nginx_with_mtls_and_the_exporter_token(
    terminator: Callable[..., Terminator],
) -> None:
    t = terminator()  # the shipped config as it is
    registry = t.registry("mtls+bearer")
    doc = collect_json(t, registry)
    [row] = doc["sources"]  # type: ignore[misc]
    assert (row["status"], row["items"], row["rejected"]) == ("ok", 10, 0)
    assert_exact(t)
    status = t.billing(registry, "status", "--json")
    assert status.exit_code == 0, status.output
    assert_no_secrets(t.outputs, [TOKEN, t.client_key.read_text()])


def test_mtls_alone_with_the_token_kept_on_the_node(
    terminator: Callable[..., Terminator],
) -> None:
    t = terminator(inject=True)
    registry = t.registry("mtls")
    collect_json(t, registry)
    assert_exact(t)


def test_bearer_with_a_pinned_ca_and_no_client_certificate(
    terminator: Callable[..., Terminator],
) -> None:
    t = terminator(verify_client=False)
    registry = t.registry("bearer")
    collect_json(t, registry)
    assert_exact(t)
    assert_no_secrets(t.outputs, [TOKEN])


def test_no_client_certificate_is_named_as_such(terminator: Callable[..., Terminator]) -> None:
    t = terminator()
    doc = collect_json(t, t.registry("bearer"), expect=1)
    [row] = doc["sources"]  # type: ignore[misc]
    assert row["error"] == (
        f"source '{NODE}': TLS terminator of localhost refused the client certificate "
        "(400 No required SSL certificate was sent); the exporter requires mTLS: set auth_mode = "
        '"mtls" (or "mtls+bearer") with client_cert_ref and client_key_ref'
    )


def test_a_wrong_or_missing_token_is_the_exporters_401(
    terminator: Callable[..., Terminator],
) -> None:
    t = terminator(verify_client=False)
    t.token_file.write_text("not-the-token\n")
    doc = collect_json(t, t.registry("bearer"), expect=1)
    [row] = doc["sources"]  # type: ignore[misc]
    assert "answered HTTP 401 (unauthorized)" in str(row["error"])


def test_the_exporter_down_behind_nginx_is_a_502_after_retries(
    terminator: Callable[..., Terminator],
) -> None:
    t = terminator()
    t.fleet.stop()
    doc = collect_json(t, t.registry("mtls+bearer"), expect=1)
    [row] = doc["sources"]  # type: ignore[misc]
    assert "answered HTTP 502 (502 Bad Gateway) after 1 attempts" in str(row["error"])


def test_only_the_snapshot_api_is_exposed(terminator: Callable[..., Terminator]) -> None:
    import httpx

    from billing_cli.collect._tls import ClientCertificate, build_ssl_context

    t = terminator()
    ctx = build_ssl_context(
        ca_pem=t.exporter_ca.read_bytes(), client=ClientCertificate(t.client_cert, t.client_key)
    )
    with httpx.Client(verify=ctx, base_url=t.base_url) as client:
        assert client.get("/metrics").status_code == 404
        assert client.get("/").status_code == 404
        ok = client.get("/v1/snapshots/latest", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert ok.json()["node_id"] == NODE
        denied = client.post("/v1/snapshots/window", headers={"Authorization": f"Bearer {TOKEN}"})
        assert denied.status_code == 403

"""Test helpers: a simulated exporter fleet over real TLS on loopback, with matching registry.

Import in a test module and use the ``sim_fleet`` fixture factory::

    from simfleet import sim_fleet  # re-export the fixture (tests/ is on sys.path)

    def test_x(sim_fleet):
        sim = sim_fleet(nodes=2, series=20, mtls=True, bearer=True)
        sim.fleet.node("node-01").set_fault("status", times=2)
        (sim.dir / "sources.toml").write_text(sim.registry_toml)   # or sim.write_registry()
        ...

Every fleet gets its own trustme CA, certificates in ``tmp_path`` and an ephemeral port on
127.0.0.1; it is stopped at teardown. ``sim.secrets()`` lists every secret in play (tokens
and private key PEMs) so tests can assert none of them reached any output.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from billing_cli.collect._tls import ClientCertificate, build_ssl_context
from billing_cli.collect.transport import TransportConfig
from billing_cli.simulator import Fleet, SimPKI, make_pki, registry_snippet

DEFAULT_PRICING = """
[pricing]
currency = "USD"
rule_version = "sim-1"
unit = "GiB"
price_per_unit = "0.01"
"""


@dataclass
class SimFleet:
    fleet: Fleet
    pki: SimPKI
    dir: Path
    mtls: bool
    server_name: str | None = None
    extra_secrets: list[str] = field(default_factory=list)

    @property
    def registry_toml(self) -> str:
        """``[[sources]]`` tables for every node (refs to files under ``dir``)."""
        return registry_snippet(
            self.fleet, self.pki, mtls=self.mtls, token_dir=self.dir, server_name=self.server_name
        )

    def write_registry(self, path: Path | None = None, *, extra: str = "") -> Path:
        """Write a registry with every node plus ``extra`` (e.g. a ``[pricing]`` table)."""
        target = path or self.dir / "sources.toml"
        target.write_text(self.registry_toml + extra)
        return target

    def secrets(self) -> list[str]:
        """Every secret value a leak check should look for."""
        out = list(self.fleet.tokens.values()) + self.extra_secrets
        for key in (self.pki.client_key, self.pki.server_key):
            pem = key.read_text()
            out.append(pem)
            # The base64 body lines too: a partial dump of the key is still a leak.
            out.extend(line for line in pem.splitlines() if len(line) > 40)
        return out

    def transport_config(
        self,
        node_id: str,
        *,
        token: str | None = None,
        client: bool | None = None,
        ca_pem: bytes | None = None,
        server_name: str | None = None,
        **kw: Any,
    ) -> TransportConfig:
        """A ``TransportConfig`` for one node built from this fleet's PKI (no registry)."""
        use_client = self.mtls if client is None else client
        ctx = build_ssl_context(
            ca_pem=ca_pem if ca_pem is not None else self.pki.ca.read_bytes(),
            client=ClientCertificate(self.pki.client_cert, self.pki.client_key)
            if use_client
            else None,
        )
        tok = token if token is not None else self.fleet.tokens.get(node_id)
        modes = [m for m, on in (("mtls", use_client), ("bearer", tok is not None)) if on]
        return TransportConfig(
            source_id=node_id,
            base_url=self.fleet.base_url(node_id),
            auth_mode="+".join(modes) or "none",
            bearer_token=tok,
            ssl_context=ctx,
            server_name=server_name if server_name is not None else self.server_name,
            **{"timeout_s": 5.0, "budget_s": 30.0, **kw},
        )


def start_sim_fleet(
    directory: Path,
    *,
    nodes: int | list[str] = 1,
    mtls: bool = True,
    bearer: bool = False,
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1"),
    server_name: str | None = None,
    server_not_after: dt.datetime | None = None,
    **fleet_kwargs: Any,
) -> SimFleet:
    """Make a CA and certs in ``directory`` and start a fleet; the caller must ``stop()`` it."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = make_pki(directory, server_names=server_names, server_not_after=server_not_after)
    fleet_kwargs.setdefault("series", 10)
    fleet_kwargs.setdefault("minutes", 10)
    fleet = Fleet(
        nodes,
        tokens=bearer,
        ssl_context=pki.server_context(require_client_cert=mtls),
        **fleet_kwargs,
    )
    fleet.start()
    return SimFleet(fleet=fleet, pki=pki, dir=directory, mtls=mtls, server_name=server_name)


@pytest.fixture
def sim_fleet(tmp_path: Path) -> Iterator[Callable[..., SimFleet]]:
    """Factory fixture: ``sim_fleet(nodes=2, mtls=True, bearer=True, series=20, ...)``."""
    started: list[SimFleet] = []

    def factory(**kwargs: Any) -> SimFleet:
        sim = start_sim_fleet(tmp_path / f"sim{len(started)}", **kwargs)
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.fleet.stop()

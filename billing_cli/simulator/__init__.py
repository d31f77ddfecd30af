"""A deterministic ``xray-exporter`` fleet over real HTTPS, for tests, benchmarks and the demo.

    from billing_cli.simulator import Fleet, make_pki
    pki = make_pki(tmp_dir)
    with Fleet(3, series=100, tokens=True,
               ssl_context=pki.server_context(require_client_cert=True)) as fleet:
        fleet.base_url("node-01")          # https://127.0.0.1:PORT/nodes/node-01
        fleet.advance(5)                   # five more minutes of snapshots per node
        fleet.node("node-01").set_fault("status", times=2)

By default every node speaks the deployed exporter's wire (DESIGN §2a); ``wire="rich"``
serves the richer contract (inbound tags, epochs, page metadata). See the README section
"The exporter simulator" for the full tour.
"""

from billing_cli.simulator.certs import SimPKI, make_pki, registry_snippet
from billing_cli.simulator.node import (
    Fault,
    SimNode,
    SimResponse,
    Wire,
    format_cursor,
    format_deployed_time,
)
from billing_cli.simulator.server import Fleet, server_ssl_context

__all__ = [
    "Fault",
    "Fleet",
    "SimNode",
    "SimPKI",
    "SimResponse",
    "Wire",
    "format_cursor",
    "format_deployed_time",
    "make_pki",
    "registry_snippet",
    "server_ssl_context",
]

"""``python -m billing_cli.simulator``: run a simulated exporter fleet until Ctrl-C.

Prints the registry ``[[sources]]`` snippet that points ``billing`` at it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from billing_cli.simulator.certs import make_pki, registry_snippet
from billing_cli.simulator.server import Fleet

EPILOG = """\
Examples:
  scripts/simulator --nodes 3 --series 200 --port 9550 --cert-dir /tmp/sim-certs
  scripts/simulator --nodes 20 --series 2000 --minutes 60 --bearer --no-mtls
  scripts/simulator --nodes 1 --insecure-http --bearer --port 9550   # like a deployed exporter
  scripts/simulator --nodes 3 --wire rich       # named inbound tags, epochs, page metadata
  scripts/simulator --nodes 1 --store-dir /tmp/sim-store   # also rewrite snapshots.json files
  scripts/simulator --nodes 20 --series 2000 --tick 0 --registry-out /tmp/fleet.toml &
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="simulator",
        description="Serve simulated xray-exporter nodes over HTTPS (window + latest API).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    p.add_argument("--series", type=int, default=100, help="series per node (default 100)")
    p.add_argument("--activity", type=float, default=0.3, help="active fraction per minute")
    p.add_argument("--minutes", type=int, default=60, help="history per node (default 60)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--env", default="prod")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="listen port (default: any free)")
    p.add_argument("--cert-dir", type=Path, help="where to write CA/server/client certs")
    p.add_argument("--no-mtls", action="store_true", help="do not require a client cert")
    p.add_argument("--bearer", action="store_true", help="per-node bearer tokens")
    p.add_argument("--insecure-http", action="store_true", help="plain http (loopback dev)")
    p.add_argument(
        "--wire",
        choices=["deployed", "rich"],
        default="deployed",
        help="deployed: the exporter as deployed (blank inbound tags, no epoch, text errors); "
        "rich: inbound tags, epochs, page metadata (default deployed)",
    )
    p.add_argument("--items-key", choices=["snapshots", "items"], default="snapshots")
    p.add_argument(
        "--store-dir",
        type=Path,
        help="write each node's store file (<node_id>.snapshots.json) there, on every tick",
    )
    p.add_argument("--tick", type=float, default=60.0, help="seconds per new minute (0: off)")
    p.add_argument(
        "--registry-out",
        type=Path,
        help="also write the [[sources]] snippet to this file once the server listens",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    pki = None
    ctx = None
    if not args.insecure_http:
        cert_dir = args.cert_dir or Path(tempfile.mkdtemp(prefix="billing-sim-certs-"))
        pki = make_pki(cert_dir)
        ctx = pki.server_context(require_client_cert=not args.no_mtls)
    fleet = Fleet(
        args.nodes,
        env=args.env,
        series=args.series,
        activity=args.activity,
        minutes=args.minutes,
        seed=args.seed,
        wire=args.wire,
        items_key=args.items_key,
        tokens=args.bearer or (args.no_mtls and not args.insecure_http),
        ssl_context=ctx,
        host=args.host,
        port=args.port,
    )
    fleet.start()
    token_dir = pki.dir if pki else Path(tempfile.mkdtemp(prefix="billing-sim-tokens-"))
    snippet = registry_snippet(
        fleet, pki, mtls=pki is not None and not args.no_mtls, token_dir=token_dir
    )
    if args.registry_out is not None:
        tmp = args.registry_out.with_name(args.registry_out.name + ".tmp")
        tmp.write_text(snippet)
        tmp.replace(args.registry_out)  # atomic: a waiting script never reads half a file
    print(f"# simulator listening on {fleet.url} ({args.nodes} nodes x {args.series} series)")
    print("# add to sources.toml:\n")
    print(snippet, flush=True)

    def write_store_files() -> None:
        if args.store_dir is not None:
            args.store_dir.mkdir(parents=True, exist_ok=True)
            for node_id, node in fleet.nodes.items():
                node.write_store_file(args.store_dir / f"{node_id}.snapshots.json")

    write_store_files()
    try:
        while True:
            if args.tick > 0:
                time.sleep(args.tick)
                fleet.advance(1)
                write_store_files()
            else:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

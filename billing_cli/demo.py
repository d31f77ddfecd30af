"""``billing demo``: a simulated HTTPS fleet, end to end, in a folder of its own.

What it builds (all inside the demo folder, default ``./billing-demo``):

* two private CAs made with trustme: the *fleet CA* (signs exporter A's server certificate
  and billing's client certificate) and *exporter B's own CA* (pinned for source B only);
* two simulated exporters over real HTTPS on loopback ports: ``node-a`` requires mTLS,
  ``node-b`` requires a bearer token and presents a certificate for
  ``exporter-b.demo.internal`` only (the registry reaches it by IP with ``server_name``);
* ``sources.toml`` with both sources plus a third, disabled one, and ``billing.db``.

Then it runs the real commands in-process (``billing_cli.cli.app.run``): collect, a
counter restart on node A, more collects, a late item on node B that lands outside the
collect overlap (so collect cannot see it), a reconcile that repairs it, and status,
usage and ledger tables. The servers are stopped on every path out (error, Ctrl-C).

Time: the simulator's history is laid out relative to the real clock: it ends
``LEAD_MINUTES`` before now, and the demo "advances time" by generating further minutes
that are still in the past. With ``overlap`` wider than that lead, each collect sees the
new minutes, so the run is deterministic: the same bytes every time, whatever the hour.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from billing_cli._errors import BillingError, UsageError
from billing_cli._time import NS_PER_MINUTE, NS_PER_SECOND, now_ns
from billing_cli.simulator.server import Fleet, server_ssl_context

MARKER = ".billing-demo"
# Everything the demo creates; a re-run removes exactly these names and nothing else.
OWNED = (
    MARKER,
    "ca",
    "tls",
    "secrets",
    "sources.toml",
    "billing.db",
    "billing.db-wal",
    "billing.db-shm",
    "billing.db-journal",
    "billing.db.locks",
)
HISTORY_MINUTES = 30  # served from the start
LEAD_MINUTES = 10  # history ends this long before now: room to "advance" in the past
OVERLAP = "15m"  # wider than LEAD_MINUTES, so every collect re-reads the new minutes
STALE_AFTER = "20m"  # longer than LEAD_MINUTES: the newest snapshot is that old by design
ADVANCES = (3, 2)  # minutes the simulator adds before the second and third collect
LATE_ITEM_AGE_MINUTES = 25  # older than now - OVERLAP: only a reconcile can see it
SERIES = 6
SERVER_NAME_B = "exporter-b.demo.internal"
SOURCE_A = "demo-a-mtls"
SOURCE_B = "demo-b-bearer"
SOURCE_OFF = "demo-c-disabled"


class DemoError(BillingError):
    """A demo step failed (exit 1); the message names the step."""


class DemoFolderError(UsageError):
    """The demo folder cannot be used (exit 2); nothing in it was touched."""


@dataclass
class DemoResult:
    """What a finished demo leaves behind (tests compare it with the database)."""

    folder: Path
    registry: Path
    database: Path
    fleets: dict[str, Fleet] = field(default_factory=dict)  # node_id -> simulated exporter
    ports: list[int] = field(default_factory=list)
    late_item_ns: int = 0
    steps: list[tuple[str, int]] = field(default_factory=list)  # (command, exit code)


# --- the folder ----------------------------------------------------------------------


def prepare_folder(folder: Path) -> None:
    """Create ``folder``, or empty a previous demo's files from it.

    A folder that exists, is not empty and has no demo marker is refused: the demo never
    deletes anything it did not create.
    """
    if folder.exists() and not folder.is_dir():
        raise DemoFolderError(f"--dir {folder}: exists and is not a folder")
    if folder.is_dir():
        entries = list(folder.iterdir())
        if entries and not (folder / MARKER).is_file():
            raise DemoFolderError(
                f"--dir {folder}: folder is not empty and was not made by `billing demo` "
                f"(no {MARKER} file); refusing to wipe it: choose a new or empty folder"
            )
        for name in OWNED:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(
        "Made by `billing demo`; a re-run deletes and recreates only these names:\n"
        + "".join(f"  {n}\n" for n in OWNED)
    )


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


# --- the fleet -----------------------------------------------------------------------


@dataclass
class _Pki:
    fleet_ca_pem: bytes
    b_ca_pem: bytes
    a_server: tuple[bytes, bytes]  # (cert chain, key)
    b_server: tuple[bytes, bytes]
    files: dict[str, Path]


def make_pki(folder: Path) -> _Pki:
    import trustme

    fleet_ca = trustme.CA(organization_name="billing demo fleet CA")
    b_ca = trustme.CA(organization_name="billing demo exporter-b CA")
    a_leaf = fleet_ca.issue_cert("127.0.0.1", "localhost")
    b_leaf = b_ca.issue_cert(SERVER_NAME_B)
    client = fleet_ca.issue_cert("billing-demo-collector.local")
    files = {
        "fleet_ca": folder / "ca" / "fleet-ca.pem",
        "b_ca": folder / "ca" / "exporter-b-ca.pem",
        "client_cert": folder / "tls" / "billing-client.pem",
        "client_key": folder / "tls" / "billing-client.key",
        "token_b": folder / "secrets" / "token-b",
    }
    files["fleet_ca"].parent.mkdir(parents=True, exist_ok=True)
    files["fleet_ca"].write_bytes(fleet_ca.cert_pem.bytes())
    files["b_ca"].write_bytes(b_ca.cert_pem.bytes())
    files["client_cert"].parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    files["client_cert"].write_bytes(b"".join(b.bytes() for b in client.cert_chain_pems))
    _write_private(files["client_key"], client.private_key_pem.bytes())

    def pair(leaf: trustme.LeafCert) -> tuple[bytes, bytes]:
        return b"".join(b.bytes() for b in leaf.cert_chain_pems), leaf.private_key_pem.bytes()

    return _Pki(fleet_ca.cert_pem.bytes(), b_ca.cert_pem.bytes(), pair(a_leaf), pair(b_leaf), files)


def registry_text(pki: _Pki, url_a: str, url_b: str) -> str:
    f = pki.files
    return f"""\
# Registry written by `billing demo`. Every *_ref points at a file in this folder;
# no secret is written here.

[defaults]
collect_interval = "1m"
request_timeout = "10s"
# Wider than usual so that each demo collect re-reads the minutes the simulator adds
# {LEAD_MINUTES} minutes in the past (production: "2m").
overlap = "{OVERLAP}"
initial_lookback = "2h"
# The simulated history ends up to {LEAD_MINUTES} minutes in the past, so the newest snapshot is
# that old: allow for it (production default: 5 x collect_interval, at least 5m).
stale_after = "{STALE_AFTER}"

# mTLS: billing presents a client certificate issued by the fleet CA.
[[sources]]
source_id = "{SOURCE_A}"
node_id = "node-a"
env = "demo"
base_url = "{url_a}"
auth_mode = "mtls"
client_cert_ref = "file:{f["client_cert"]}"
client_key_ref = "file:{f["client_key"]}"
ca_bundle_ref = "file:{f["fleet_ca"]}"

# Bearer token + this exporter's own CA (pinned), reached by IP: server_name sets SNI and
# the name its certificate is checked against.
[[sources]]
source_id = "{SOURCE_B}"
node_id = "node-b"
env = "demo"
base_url = "{url_b}"
auth_mode = "bearer"
credential_ref = "file:{f["token_b"]}"
ca_bundle_ref = "file:{f["b_ca"]}"
server_name = "{SERVER_NAME_B}"

# Registered but switched off: collect skips it, status reports it as disabled.
[[sources]]
source_id = "{SOURCE_OFF}"
node_id = "node-c"
env = "demo"
base_url = "https://127.0.0.1:9/nodes/node-c"
enabled = false
auth_mode = "mtls"
client_cert_ref = "file:{f["client_cert"]}"
client_key_ref = "file:{f["client_key"]}"
ca_bundle_ref = "file:{f["fleet_ca"]}"

[pricing]
currency = "USD"
unit = "GB"
price_per_unit = "0.05"
charge = "total"
rule_version = "demo-1"
"""


# --- the run -------------------------------------------------------------------------

Say = Callable[[str], None]
RunBilling = Callable[[list[str]], int]


def _default_run(args: list[str]) -> int:
    from billing_cli.cli.app import run

    return run(args)


@contextlib.contextmanager
def _fleets(pki: _Pki, token: str, end_ns: int) -> Iterator[dict[str, Fleet]]:
    ctx_a = server_ssl_context(*pki.a_server, client_ca_pem=pki.fleet_ca_pem)
    ctx_b = server_ssl_context(*pki.b_server)

    def demo_fleet(
        node: str, seed: int, ctx: ssl.SSLContext, tokens: bool | dict[str, str] = False
    ) -> Fleet:
        return Fleet(
            [node],
            env="demo",
            series=SERIES,
            activity=0.7,
            minutes=HISTORY_MINUTES,
            seed=seed,
            end_ns=end_ns,
            ssl_context=ctx,
            tokens=tokens,
        )

    fleet_a = demo_fleet("node-a", 11, ctx_a)
    fleet_b = demo_fleet("node-b", 12, ctx_b, tokens={"node-b": token})
    started: list[Fleet] = []
    try:
        for fleet in (fleet_a, fleet_b):
            fleet.start()
            started.append(fleet)
        yield {"node-a": fleet_a, "node-b": fleet_b}
    finally:
        # Always: on success, on a failed step, on Ctrl-C.
        for fleet in started:
            fleet.stop()


def run_demo(
    folder: Path,
    *,
    say: Say,
    global_args: list[str],
    run_billing: RunBilling = _default_run,
    quiet: bool = False,
    keep_running: Callable[[DemoResult], None] | None = None,
) -> DemoResult:
    """Run the whole demo; raise ``DemoError`` naming the step that failed.

    ``quiet`` discards the sub-commands' standard output (errors still reach stderr).
    """
    started = time.monotonic()
    folder = folder.expanduser().absolute()
    prepare_folder(folder)
    registry = folder / "sources.toml"
    database = folder / "billing.db"
    result = DemoResult(folder=folder, registry=registry, database=database)
    base = [*global_args, "--registry", str(registry), "--db", str(database)]

    def billing(*args: str, ok: tuple[int, ...] = (0,)) -> int:
        shown = "billing " + " ".join(args)
        say(f"\n$ {shown}")
        with contextlib.ExitStack() as stack:
            if quiet:
                # Data commands print their tables even under -q; the demo's -q means silence.
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            code = run_billing([*base, *args])
        result.steps.append((shown, code))
        if code == 130:
            raise KeyboardInterrupt
        if code not in ok:
            raise DemoError(f"demo step `{shown}` exited {code} (demo folder: {folder})")
        return code

    pki = make_pki(folder)
    token = "demo-" + os.urandom(16).hex()
    _write_private(pki.files["token_b"], token.encode() + b"\n")
    end_ns = now_ns() - LEAD_MINUTES * NS_PER_MINUTE
    with _fleets(pki, token, end_ns) as fleets:
        result.fleets = dict(fleets)
        fa = fleets["node-a"]
        fb = fleets["node-b"]
        result.ports = [fa.port, fb.port]
        registry.write_text(registry_text(pki, fa.base_url("node-a"), fb.base_url("node-b")))
        say(f"Demo folder {folder}:")
        say("  two private CAs, a client certificate, a token, sources.toml, billing.db.")
        say(
            f"Simulated exporters over HTTPS, each with {HISTORY_MINUTES} minutes of "
            f"{SERIES} accounts' counters:"
        )
        say(f"  node-a  {fa.base_url('node-a')}  mTLS")
        say(f"  node-b  {fb.base_url('node-b')}  bearer token, own CA,")
        say(f"          server_name {SERVER_NAME_B}")
        say("  node-c  registered, disabled")
        sources = ["--source", SOURCE_A, "--source", SOURCE_B]

        say("\n1. First collect: no checkpoint yet, so each source is read from 2h ago.")
        billing("collect", *sources)

        say("\n2. Xray restarts on node-a: its counters start again from zero (like the")
        say(f"   deployed exporter, no epoch: billing sees the drop). {ADVANCES[0]} minutes pass.")
        say("   Meanwhile node-b delivers an item from 25 minutes ago, late.")
        fa.node("node-a").restart_counters()
        times_b = fb.node("node-b").collected_ats()
        target = times_b[-1] - (LATE_ITEM_AGE_MINUTES - LEAD_MINUTES) * NS_PER_MINUTE
        before = max(t for t in times_b if t <= target)
        result.late_item_ns = fb.node("node-b").add_late_item(
            before + 30 * NS_PER_SECOND, appear_after_minutes=1
        )
        fa.advance(ADVANCES[0])
        fb.advance(ADVANCES[0])
        billing("collect", *sources)

        say(
            f"\n3. {ADVANCES[1]} more minutes pass; collect again. It re-reads the last "
            f"{OVERLAP} (the overlap)"
        )
        say("   without counting anything twice; the late item is older than that.")
        fa.advance(ADVANCES[1])
        fb.advance(ADVANCES[1])
        billing("collect", *sources)

        say("\n4. Reconcile node-b's last 40 minutes: the late item splits one minute's")
        say("   delta in two buckets. The ledger gets a charge for the new bucket and an")
        say("   adjustment of the old one; the amount column is the net money the run")
        say("   posted: zero (or nano-units of rounding), as the total bytes do not change.")
        behind = LEAD_MINUTES - sum(ADVANCES)
        say(f"   (The newest minutes show as missing: the simulator runs {behind} minutes")
        say("   behind the real clock.)")
        billing("reconcile", "--source", SOURCE_B, "--since", "40m")

        say("\n5. Health of every source (exit 0: every enabled source is healthy).")
        billing("status")

        say("\n6. Usage per account, and what the ledger charged for it.")
        billing("usage", "--totals")
        billing("ledger", "--totals")

        say(f"\nDone in {time.monotonic() - started:.1f}s. Explore:")
        say(f"  billing --registry {registry} \\")
        say(f"      --db {database} sources list")
        if keep_running is not None:
            keep_running(result)
    say("Simulated exporters stopped.")
    return result


def keep_serving(say: Say, *, tick_s: float = 60.0) -> Callable[[DemoResult], None]:
    """For ``--keep-running``: add a minute to each fleet every minute until Ctrl-C."""

    def serve(result: DemoResult) -> None:
        say(
            "\nThe simulated exporters keep running (one new item a minute) so you can try "
            f"`billing --registry {result.registry} --db {result.database} collect` "
            "in another terminal. Ctrl-C stops them."
        )
        try:
            while True:
                time.sleep(tick_s)
                for fleet in result.fleets.values():
                    fleet.advance(1)
        except KeyboardInterrupt:
            say("")

    return serve

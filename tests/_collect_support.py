"""Helpers for the collect/reconcile integration tests: run the CLI against a simulated
fleet, compute what the bytes must add up to, dump a store, and check for leaked secrets."""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import CliResult, CliRunnerFn
from simfleet import DEFAULT_PRICING, SimFleet

from billing_cli._time import NS_PER_MINUTE
from billing_cli.simulator import SimNode
from billing_cli.store import open_store
from billing_cli.store.base import RowFilter

# Room in the past for fleet.advance(): the simulator's history ends this long before now,
# so minutes generated later are still in the past when collect asks for [.., now).
HEADROOM_MIN = 30


def fleet_end_ns() -> int:
    return time.time_ns() - HEADROOM_MIN * NS_PER_MINUTE


@dataclass
class Env:
    sim: SimFleet
    cli: CliRunnerFn
    db: str
    registry: Path
    outputs: list[str] = field(default_factory=list)

    def run(self, *args: str) -> CliResult:
        res = self.cli("--registry", str(self.registry), "--db", self.db, *args)
        self.outputs.append(res.stdout)
        self.outputs.append(res.stderr)
        return res

    def json(self, *args: str, expect: int | None = 0) -> dict[str, Any]:
        res = self.run(*args, "--json")
        if expect is not None:
            assert res.exit_code == expect, res.output
        doc: dict[str, Any] = orjson.loads(res.stdout)
        return doc

    def check_no_secrets(self) -> None:
        assert_no_secrets(self.outputs, self.sim.secrets())
        if not self.db.startswith("postgres"):
            blob = b"".join(
                p.read_bytes() for p in Path(self.db).parent.glob("*.db*") if p.is_file()
            )
            for secret in self.sim.secrets():
                assert secret.encode() not in blob, "a secret reached the database file"


def make_env(
    sim: SimFleet,
    cli: CliRunnerFn,
    db: str,
    *,
    defaults: str = "",
    extra: str = "",
) -> Env:
    text = f"[defaults]\n{defaults}\n" if defaults else ""
    registry = sim.dir / "sources.toml"
    registry.write_text(text + sim.registry_toml + DEFAULT_PRICING + extra)
    return Env(sim=sim, cli=cli, db=db, registry=registry)


def assert_no_secrets(texts: list[str], secrets: list[str]) -> None:
    """No captured output or log line contains any secret (token, key PEM or a line of it)."""
    assert secrets, "the leak check needs the secrets in play"
    joined = "\n".join(texts)
    for secret in secrets:
        s = secret.strip()
        if s:
            assert s not in joined, "a secret (token or key material) appeared in the output"


def expected_usage(node: SimNode, first_ns: int, last_ns: int) -> dict[str, int]:
    """Bytes per uuid the metering rules must produce from the items in [first, last].

    The first received item is the baseline; a drop in either direction is a restart
    (the counters count from zero again), otherwise the difference is billed.
    """
    ats = [t for t in node.collected_ats() if first_ns <= t <= last_ns]
    out: dict[str, int] = defaultdict(int)
    prev = node.totals(ats[0]) if ats else {}
    for at in ats[1:]:
        cur = node.totals(at)
        for u, (up, down) in cur.items():
            pu, pd = prev[u]
            if up < pu or down < pd:
                out[u] += up + down
            else:
                out[u] += (up - pu) + (down - pd)
        prev = cur
    return {u: v for u, v in out.items() if v}


def store_usage(db: str, node_id: str | None = None) -> dict[str, int]:
    store = open_store(db)
    try:
        out: dict[str, int] = defaultdict(int)
        for row in store.iter_usage(RowFilter(node_id=node_id)):
            out[row.uuid] += row.total_bytes
        return {u: v for u, v in out.items() if v}
    finally:
        store.close()


def usage_rows(db: str) -> dict[tuple[str, str, int], tuple[int, int]]:
    store = open_store(db)
    try:
        return {
            (r.node_id, r.uuid, r.bucket_start_ns): (r.uplink_bytes, r.downlink_bytes)
            for r in store.iter_usage(RowFilter())
        }
    finally:
        store.close()


def dump_sqlite(path: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, sorted: 'unchanged row for row' is equality of this."""
    con = sqlite3.connect(path)
    try:
        names = [
            r[0]
            for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        return {n: sorted(con.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
    finally:
        con.close()


MakeEnv = Callable[..., Env]


@pytest.fixture
def make(  # the collect/reconcile tests import it, with simfleet's sim_fleet
    sim_fleet: Callable[..., SimFleet],
    cli: CliRunnerFn,
    tmp_path: Path,
) -> Iterator[MakeEnv]:
    envs: list[Env] = []

    def factory(*, defaults: str = "", db: str | None = None, **kw: Any) -> Env:
        kw.setdefault("end_ns", fleet_end_ns())
        sim = sim_fleet(**kw)
        env = make_env(sim, cli, db or str(tmp_path / f"billing{len(envs)}.db"), defaults=defaults)
        envs.append(env)
        return env

    yield factory
    for env in envs:
        env.check_no_secrets()


def only(doc: dict[str, Any], source_id: str = "node-01") -> dict[str, Any]:
    rows = [s for s in doc["sources"] if s["source_id"] == source_id]
    assert len(rows) == 1, doc
    return rows[0]

"""One simulated exporter node: deterministic counters, window/latest pages, faults.

No sockets here: ``SimNode.handle()`` turns a request (path, query, headers) into a
``SimResponse`` that the HTTP(S) server writes. Everything is generated from a seed, so two
runs with the same calls serve the same items (only ``emitted_at`` differs).

By default a node speaks the wire of the *deployed* exporter
(``ai-workspace-xstream/xray-exporter``, ``internal/snapshot``; DESIGN §2a), the way Go
writes it: one sample per account with ``inbound_tag: ""`` (the exporter sums an account
over its inbounds), no ``counter_epoch``, ``collected_at`` and cursors in RFC3339Nano with
trailing zeros trimmed, the page identity taken from its first snapshot (an empty page is
``{"node_id":"","env":"","snapshots":[],"has_more":false}``), ``next_cursor`` omitted on
the last page, an item without samples as ``"samples":null``, lenient parameters (a bad
``since``/``until`` becomes now-1h/now, a bad cursor is ignored, a bad ``limit`` is 1000;
never a 400), ``text/plain`` errors and 404 ``no snapshot available`` on ``latest`` before
the first item. ``wire="rich"`` serves the richer contract of DESIGN §2 instead: named
inbound tags, epochs, the optional page fields, nine-digit cursors, JSON errors and 400 on
bad parameters; ``epoch`` and ``items_key`` override either style.

Counters are stored per item as two ``array('q')`` (uplink, downlink); an item's JSON is
rendered on demand with pre-built per-series byte prefixes, which keeps a 2,000-series
item at about a millisecond and the memory at 32 KB per item.
"""

from __future__ import annotations

import bisect
import enum
import hmac
import os
import random
import threading
import time
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from billing_cli._time import (
    NS_PER_MINUTE,
    NS_PER_SECOND,
    TimeFormatError,
    format_rfc3339_ns,
    parse_rfc3339_ns,
)

FaultKind = Literal[
    "status",  # answer `status` (default 503)
    "429",  # Too Many Requests with Retry-After `retry_after`
    "slow",  # sleep `delay_s` before answering normally
    "truncate",  # announce the full Content-Length, send half, close
    "wrong_node_id",  # page (where="page") or items (where="item") name another node
    "cursor_loop",  # next_cursor repeats the cursor the client sent (has_more stays true)
    "empty_has_more",  # has_more true with an empty page
    "oversize",  # body padded to `size` bytes (with or without Content-Length)
    "redirect",  # 302 to `location`
    "snapshots_disabled",  # 200 text/html: the deployed exporter's index page
    "bad_samples",  # every counter a string: all samples of the page are refused
]
Endpoint = Literal["window", "latest", "any"]
Wire = Literal["deployed", "rich"]

INBOUND_TAGS = ("vless-in", "vmess-in", "trojan-in")
DEFAULT_LIMIT = 100  # rich wire
MAX_LIMIT = 1000
NO_SNAPSHOT = b"no snapshot available\n"  # Go's http.Error adds the newline
INDEX_HTML = (
    b"<html>\n<head><title>Xray Exporter</title></head>\n<body>\n<h1>Xray Exporter</h1>\n"
    b"</body>\n</html>\n"
)


class _Unset(enum.Enum):
    UNSET = 0  # "not given": the wire style's default


def format_cursor(ns: int) -> str:
    """RFC3339 UTC with exactly nine fraction digits: the simulator's opaque cursor."""
    seconds, frac = divmod(ns, NS_PER_SECOND)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


def format_deployed_time(ns: int) -> str:
    """Go's ``time.RFC3339Nano`` in UTC: the fraction's trailing zeros (and a bare dot)
    trimmed, as the deployed exporter writes ``collected_at`` and its cursors."""
    return format_rfc3339_ns(ns)


def _text(status: int, body: bytes) -> SimResponse:
    """What Go's ``http.Error`` sends."""
    headers = {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"}
    return SimResponse(status, body, headers)


@dataclass
class Fault:
    kind: FaultKind
    times: int | None = None  # None: until cleared
    endpoint: Endpoint = "any"
    status: int = 503
    retry_after: str = "1"
    delay_s: float = 1.0
    size: int = 0
    content_length: bool = True
    location: str = "https://elsewhere.example/v1/snapshots/window?token=redirect-secret"
    where: Literal["page", "item"] = "page"
    hits: int = 0


@dataclass
class SimResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    truncate_at: int | None = None  # send this many body bytes, then drop the connection
    content_length: bool = True  # False: no Content-Length, body ends when we close


@dataclass
class _Item:
    collected_at: int
    up: array[int]
    down: array[int]
    epoch: str | None
    visible_from: int = 0  # fleet generation from which the item is served


class SimNode:
    """A deterministic exporter for one ``node_id``/``env``."""

    def __init__(
        self,
        node_id: str,
        env: str = "prod",
        *,
        series: int = 50,
        activity: float = 0.3,
        seed: int = 1,
        wire: Wire = "deployed",
        items_key: Literal["snapshots", "items"] = "snapshots",
        epoch: str | _Unset | None = _Unset.UNSET,
        token: str | None = None,
        item_identity: bool = True,
        source_id: str | None = None,
    ) -> None:
        if series < 0 or not 0 <= activity <= 1:
            raise ValueError("series must be >= 0 and activity in [0, 1]")
        if wire not in ("deployed", "rich"):
            raise ValueError(f"wire must be 'deployed' or 'rich', got {wire!r}")
        self.node_id = node_id
        self.env = env
        self.series = series
        self.activity = activity
        self.wire: Wire = wire
        self.items_key = items_key
        # The deployed exporter has no epoch; the rich wire starts at "1".
        default_epoch = None if wire == "deployed" else "1"
        self.epoch = default_epoch if isinstance(epoch, _Unset) else epoch
        self.token = token
        self.item_identity = item_identity
        self.source_id = source_id
        self.generation = 0
        self.requests: list[tuple[str, dict[str, str]]] = []  # (endpoint, query) as received
        self._lock = threading.RLock()
        self._rng = random.Random(f"{seed}:{node_id}:{env}")  # noqa: S311 - test data
        self._faults: list[Fault] = []
        self._items: list[_Item] = []
        self._times: list[int] = []
        self._restart_pending = False
        self._offset_ns = self._rng.randrange(1, NS_PER_SECOND)  # nanosecond fraction
        self.uuids: list[str] = []
        self._prefixes: list[bytes] = []
        for i in range(series):
            u = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
            self.uuids.append(u)
            # Deployed: one account-level sample per uuid, summed over its inbounds.
            tag = INBOUND_TAGS[i % len(INBOUND_TAGS)] if wire == "rich" else ""
            email = f"user{i}@{node_id}.example"
            head = orjson.dumps({"uuid": u, "email": email, "inbound_tag": tag})
            self._prefixes.append(head[:-1] + b',"uplink_bytes_total":')
        # Start counters mid-life; series 0 sits above 2^53 to catch float parsing.
        self._up = array("q", (self._rng.randrange(0, 10**12) for _ in range(series)))
        self._down = array("q", (self._rng.randrange(0, 10**12) for _ in range(series)))
        if series:
            self._up[0] = (1 << 53) + 12345

    # -- generation ------------------------------------------------------------------

    def generate_minutes(self, first_minute_ns: int, count: int) -> None:
        """Append ``count`` items, one per minute starting at minute ``first_minute_ns``."""
        with self._lock:
            for k in range(count):
                self._step()
                at = first_minute_ns + k * NS_PER_MINUTE + self._offset_ns
                self._append(_Item(at, array("q", self._up), array("q", self._down), self.epoch))

    def _step(self) -> None:
        rng = self._rng
        up, down = self._up, self._down
        if self._restart_pending:
            # A restarted exporter counts from zero again.
            self._restart_pending = False
            for i in range(self.series):
                up[i] = 0
                down[i] = 0
        act = self.activity
        for i in range(self.series):
            if rng.random() < act:
                up[i] += rng.randrange(1, 50_000_000)
                down[i] += rng.randrange(1, 500_000_000)

    def _append(self, item: _Item) -> None:
        pos = bisect.bisect_right(self._times, item.collected_at)
        if pos > 0 and self._times[pos - 1] == item.collected_at:
            raise ValueError("an item already exists at that collected_at")
        self._times.insert(pos, item.collected_at)
        self._items.insert(pos, item)

    @property
    def last_collected_at(self) -> int | None:
        with self._lock:
            return self._times[-1] if self._times else None

    def collected_ats(self, *, visible_only: bool = True) -> list[int]:
        with self._lock:
            return [
                it.collected_at
                for it in self._items
                if not visible_only or it.visible_from <= self.generation
            ]

    def totals(self, collected_at_ns: int) -> dict[str, tuple[int, int]]:
        """uuid -> (uplink_total, downlink_total) of the item at ``collected_at_ns``."""
        with self._lock:
            it = self._items[self._times.index(collected_at_ns)]
            return {u: (it.up[i], it.down[i]) for i, u in enumerate(self.uuids)}

    def restart_counters(self, *, with_epoch: bool | None = None) -> None:
        """The next generated minute restarts every counter from zero.

        ``with_epoch`` announces it with a new ``counter_epoch``; without it the epoch stays
        as it was (or absent), the way the deployed exporter behaves (its default: a node
        that has an epoch announces it).
        """
        with self._lock:
            self._restart_pending = True
            if with_epoch is None:
                with_epoch = self.epoch is not None
            if with_epoch:
                old = self.epoch or ""
                self.epoch = str(int(old) + 1) if old.isdigit() else "2"

    def add_late_item(
        self, collected_at_ns: int | None = None, *, appear_after_minutes: int = 1
    ) -> int:
        """Insert an item that is served only after ``appear_after_minutes`` more minutes.

        Default time: 30 s after the second-to-last item (i.e. between the last two), so the
        item falls inside a typical overlap. Totals are interpolated between its neighbours,
        keeping counters monotonic. Returns the item's collected_at.
        """
        with self._lock:
            if collected_at_ns is None:
                if len(self._times) < 2:
                    raise ValueError("need two items to place a late item between")
                collected_at_ns = self._times[-2] + 30 * NS_PER_SECOND
            pos = bisect.bisect_left(self._times, collected_at_ns)
            if pos == 0:
                raise ValueError("a late item needs an earlier item to interpolate from")
            prev = self._items[pos - 1]
            nxt = self._items[pos] if pos < len(self._items) else prev
            if nxt.epoch != prev.epoch:
                nxt = prev  # across a restart: repeat the earlier totals
            up = array("q", (a + (b - a) // 2 for a, b in zip(prev.up, nxt.up, strict=True)))
            down = array("q", (a + (b - a) // 2 for a, b in zip(prev.down, nxt.down, strict=True)))
            due = self.generation + appear_after_minutes
            item = _Item(collected_at_ns, up, down, prev.epoch, due)
            self._append(item)
            return collected_at_ns

    # -- faults ----------------------------------------------------------------------

    def set_fault(self, kind: FaultKind, *, times: int | None = None, **params: object) -> Fault:
        """Add a fault; it applies to the next ``times`` matching requests (None: forever)."""
        fault = Fault(kind=kind, times=times, **params)  # type: ignore[arg-type]
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.endpoint not in ("any", endpoint):
                    continue
                if fault.times is not None and fault.hits >= fault.times:
                    continue
                fault.hits += 1
                return fault
            return None

    # -- serving ---------------------------------------------------------------------

    def handle(self, endpoint: str, query: dict[str, str], headers: dict[str, str]) -> SimResponse:
        """Answer ``endpoint`` ('window' or 'latest') for already-routed requests."""
        with self._lock:
            self.requests.append((endpoint, dict(query)))
        if self.token is not None:
            sent = headers.get("authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(sent.encode(), expected.encode()):
                if self.wire == "deployed":
                    return _text(401, b"unauthorized\n")  # no WWW-Authenticate
                return _json(401, {"error": "unauthorized"}, {"WWW-Authenticate": "Bearer"})
        fault = self._take_fault(endpoint)
        if fault is not None:
            early = _early_fault(fault, self.wire)
            if early is not None:
                return early
        try:
            resp = self._latest(fault) if endpoint == "latest" else self._window(query, fault)
        except _BadRequest as exc:
            return _json(400, {"error": str(exc)})
        if fault is not None:
            resp = _late_fault(fault, resp)
        return resp

    def _visible(self) -> list[_Item]:
        return [it for it in self._items if it.visible_from <= self.generation]

    def _latest(self, fault: Fault | None) -> SimResponse:
        with self._lock:
            items = self._visible()
            if not items:
                if self.wire == "deployed":
                    return _text(404, NO_SNAPSHOT)
                return _json(404, {"error": "no snapshot yet"})
            body = self._render_item(
                items[-1], self._node_for(fault, "item"), force_identity=True, fault=fault
            )
        if self.wire == "deployed":
            body += b"\n"  # json.Encoder.Encode
        return SimResponse(200, body, {"Content-Type": "application/json"})

    def _node_for(self, fault: Fault | None, where: str) -> str:
        if fault is not None and fault.kind == "wrong_node_id" and fault.where == where:
            return self.node_id + "-impostor"
        return self.node_id

    def _window(self, query: dict[str, str], fault: Fault | None) -> SimResponse:
        if self.wire == "deployed":
            return self._window_deployed(query, fault)
        try:
            since = parse_rfc3339_ns(query["since"])
            until = parse_rfc3339_ns(query["until"])
        except KeyError as exc:
            raise _BadRequest(f"missing {exc.args[0]}") from None
        except TimeFormatError as exc:
            raise _BadRequest(str(exc)) from None
        try:
            limit = min(MAX_LIMIT, max(1, int(query.get("limit", DEFAULT_LIMIT))))
        except ValueError:
            raise _BadRequest("limit must be an integer") from None
        cursor = query.get("cursor")
        after = since - 1
        if cursor:
            try:
                after = max(after, parse_rfc3339_ns(cursor))
            except TimeFormatError:
                raise _BadRequest("bad cursor") from None
        with self._lock:
            page, has_more = self._select(after, until, limit)
            next_cursor = format_cursor(page[-1].collected_at) if has_more else None
            if fault is not None and fault.kind == "cursor_loop" and cursor:
                next_cursor, has_more = cursor, True
            if fault is not None and fault.kind == "empty_has_more":
                page, has_more = [], True
                next_cursor = format_cursor(until)
            item_node = self._node_for(fault, "item")
            rendered = [self._render_item(it, item_node, fault=fault) for it in page]
        head = {
            "node_id": self._node_for(fault, "page"),
            "env": self.env,
            "window_start": query["since"],
            "window_end": query["until"],
            "next_cursor": next_cursor,
            "has_more": has_more,
            "emitted_at": format_cursor(time.time_ns()),
        }
        if self.source_id:
            head["source_id"] = self.source_id
        body = (
            orjson.dumps(head)[:-1]
            + b',"'
            + self.items_key.encode()
            + b'":['
            + b",".join(rendered)
            + b"]}"
        )
        return SimResponse(200, body, {"Content-Type": "application/json"})

    def _window_deployed(self, query: dict[str, str], fault: Fault | None) -> SimResponse:
        """The deployed exporter's window: lenient parameters, identity from the first
        snapshot, ``next_cursor`` only when more follows, one trailing newline."""
        now = time.time_ns()
        since = _lenient_time(query.get("since"), now - 3600 * NS_PER_SECOND)
        until = _lenient_time(query.get("until"), now)
        try:
            limit = int(query.get("limit", ""))
        except ValueError:
            limit = 0
        if limit <= 0 or limit > MAX_LIMIT:
            limit = MAX_LIMIT
        raw_cursor = query.get("cursor")
        cursor = _lenient_time(raw_cursor, -1) if raw_cursor else -1  # a bad one is ignored
        after = max(since - 1, cursor)
        with self._lock:
            page, has_more = self._select(after, until, limit)
            next_cursor = format_deployed_time(page[-1].collected_at) if has_more else None
            sent = query.get("cursor")
            if fault is not None and fault.kind == "cursor_loop" and sent:
                next_cursor, has_more = sent, True
            if fault is not None and fault.kind == "empty_has_more":
                page, has_more = [], True
                next_cursor = format_deployed_time(until)
            item_node = self._node_for(fault, "item")
            rendered = [self._render_item(it, item_node, fault=fault) for it in page]
        page_node = self._node_for(fault, "page") if page else ""
        head: dict[str, object] = {"node_id": page_node, "env": self.env if page else ""}
        tail: dict[str, object] = {"has_more": has_more}
        if next_cursor:
            tail["next_cursor"] = next_cursor
        body = (
            orjson.dumps(head)[:-1]
            + b',"'
            + self.items_key.encode()
            + b'":['
            + b",".join(rendered)
            + b"],"
            + orjson.dumps(tail)[1:]
            + b"\n"
        )
        return SimResponse(200, body, {"Content-Type": "application/json"})

    def _select(self, after: int, until: int, limit: int) -> tuple[list[_Item], bool]:
        """Visible items with ``after < collected_at <= until``, at most ``limit``, and
        whether a visible one follows in the window (the caller holds the lock)."""
        start = bisect.bisect_right(self._times, after)
        page: list[_Item] = []
        for it in self._items[start:]:
            if it.collected_at > until:
                break
            if it.visible_from > self.generation:
                continue
            if len(page) == limit:
                return page, True
            page.append(it)
        return page, False

    def store_file_bytes(self) -> bytes:
        """The deployed exporter's store file (``snapshots.json``): a bare JSON array of
        every visible snapshot, as Go's ``json.Marshal`` writes it (no trailing newline;
        an empty sample list is ``[]`` there, the store does not clone)."""
        with self._lock:
            rendered = [
                self._render_item(it, self.node_id, force_identity=True, null_empty=False)
                for it in self._visible()
            ]
        return b"[" + b",".join(rendered) + b"]"

    def write_store_file(self, path: Path) -> Path:
        """Write :meth:`store_file_bytes` like the exporter does: mode 0600, atomically."""
        tmp = path.with_name(f".snapshots-{os.getpid()}-{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.store_file_bytes())
        tmp.replace(path)
        return path

    def _render_item(
        self,
        it: _Item,
        node_id: str,
        *,
        force_identity: bool = False,
        fault: Fault | None = None,
        null_empty: bool = True,
    ) -> bytes:
        deployed = self.wire == "deployed"
        when = format_deployed_time if deployed else format_cursor
        head: dict[str, object] = {"collected_at": when(it.collected_at)}
        if deployed or self.item_identity or force_identity or node_id != self.node_id:
            head["node_id"] = node_id
            head["env"] = self.env
        if it.epoch is not None:
            head["counter_epoch"] = it.epoch
        if not self._prefixes:
            # Go: the window and latest clone each snapshot, which turns an empty sample
            # list into nil, encoded as null; the store file keeps [].
            empty = b"null" if deployed and null_empty else b"[]"
            return orjson.dumps(head)[:-1] + b',"samples":' + empty + b"}"
        mid = b',"downlink_bytes_total":'
        fmt = (
            b'%s"%d"%s"%d"}' if fault is not None and fault.kind == "bad_samples" else b"%s%d%s%d}"
        )
        samples = b",".join(
            [fmt % (p, u, mid, d) for p, u, d in zip(self._prefixes, it.up, it.down, strict=True)]
        )
        return orjson.dumps(head)[:-1] + b',"samples":[' + samples + b"]}"


class _BadRequest(ValueError):
    pass


def _lenient_time(value: str | None, fallback: int) -> int:
    """The deployed exporter's ``parseTime``: RFC3339, anything else is the fallback."""
    if not value:
        return fallback
    try:
        return parse_rfc3339_ns(value)
    except TimeFormatError:
        return fallback


def _json(status: int, doc: object, headers: dict[str, str] | None = None) -> SimResponse:
    h = {"Content-Type": "application/json", **(headers or {})}
    return SimResponse(status, orjson.dumps(doc), h)


def _early_fault(fault: Fault, wire: Wire) -> SimResponse | None:
    """Faults that replace the answer entirely."""
    if fault.kind == "status":
        if wire == "deployed":
            return _text(fault.status, b"simulated failure\n")
        return _json(fault.status, {"error": "simulated failure"})
    if fault.kind == "429":
        return _json(429, {"error": "slow down"}, {"Retry-After": fault.retry_after})
    if fault.kind == "redirect":
        return SimResponse(302, b"", {"Location": fault.location})
    if fault.kind == "snapshots_disabled":
        # The exporter without EXPORTER_NODE_ID/ACCOUNTS_BASE_URL/INTERNAL_SERVICE_TOKEN
        # mounts no snapshot API: its catch-all index page answers instead.
        return SimResponse(200, INDEX_HTML, {"Content-Type": "text/html"})
    return None


def _late_fault(fault: Fault, resp: SimResponse) -> SimResponse:
    """Faults that alter a normal answer."""
    if fault.kind == "slow":
        resp.delay_s = fault.delay_s
    elif fault.kind == "truncate":
        resp.truncate_at = len(resp.body) // 2
    elif fault.kind == "oversize" and len(resp.body) < fault.size:
        # Pad inside the JSON object so the body stays valid JSON, just too big.
        body = resp.body.rstrip(b"\n")
        pad = fault.size - len(body) - len(b',"padding":""')
        resp.body = body[:-1] + b',"padding":"' + b"x" * max(0, pad) + b'"}'
        resp.content_length = fault.content_length
    return resp

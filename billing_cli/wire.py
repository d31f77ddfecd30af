"""The upstream wire contract (DESIGN §2): exporter JSON -> validated ``Item``s, in one pass.

Used by the collector (window and latest pages) and by ``billing ingest`` (files).
Parsing is orjson on the raw bytes, then per item a fast path for the clean shape (one C
``itemgetter`` call and a few type/range tests per sample, one set for duplicates) and,
only for an item with any doubt, a per-sample path that words each rejection. No model
object per sample: a fleet delivers ~100k samples a minute (DESIGN §10).

What is refused, and how (one-line messages naming the place):

* Structural garbage makes the whole document unusable -> :class:`WireFormatError`:
  not JSON, a top level of the wrong type, ``items`` not a list, an item that is not an
  object, an item whose ``node_id``/``env`` is neither on the item nor on its page (such
  an item cannot be attributed to any series, so it cannot even be recorded as a
  rejection), a bad ``next_cursor`` type.
* A bad item (``collected_at`` missing or without a zone, ``samples`` not a list,
  ``counter_epoch`` neither string nor integer) -> every sample of that item is a
  :class:`Rejection` (or one rejection for the item when it has no usable sample); the
  rest of the page is kept.
* A bad sample (counter not a JSON integer 0 <= n < 2^63, missing ``uuid``, a
  non-string ``inbound_tag`` or ``email``, a second sample for the same series in one
  item) -> one :class:`Rejection` with the reason; the rest of the item is kept.

Nothing unbounded or unstorable gets through, so both stores hold exactly the same and a
hostile exporter cannot fill the disk through a reason: text fields are bounded and free
of NUL (``uuid``, ``inbound_tag``, ``node_id``, ``env``, ``source_id`` and
``counter_epoch`` at most :data:`MAX_KEY_CHARS` characters, ``email`` at most
:data:`MAX_EMAIL_CHARS`; PostgreSQL refuses NUL in text and long index keys, SQLite takes
both), ``collected_at`` lies in the range of 64-bit nanoseconds the store holds, a
number no float or 64-bit integer can hold (``1e400``, a 309-digit integer) rejects its
sample, quoted values are cut to :data:`QUOTE_CHARS` characters and every reason to
:data:`MAX_REASON_CHARS`, and ``next_cursor`` is at most :data:`MAX_CURSOR_CHARS`.

The deployed exporter (DESIGN §2a) is the normal case, not an exception to it:

* it sums each account over its inbounds, so every sample has ``inbound_tag: ""``: a
  blank (or absent) tag is the account-level series of the node, a valid series key;
* its page identity comes from the page's first snapshot, so an empty window page is
  ``{"node_id":"","env":"","snapshots":[],"has_more":false}``: "nothing new", with
  ``node_id``/``env`` ``None`` on the :class:`WindowPage`;
* Go encodes an item without samples as ``"samples":null``: an item with no samples.

``counter_epoch`` may be a string or an integer and is normalised to a string (integers
in decimal) so that ``7`` and ``"7"`` compare equal; an empty string means "no epoch".
``next_cursor`` is returned verbatim: it is opaque and exporters emit nanosecond cursors.
"""

from __future__ import annotations

import io
import json
import json.decoder
import json.scanner
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Annotated, Any, BinaryIO, cast

import msgspec
import orjson

from billing_cli._errors import one_line
from billing_cli._time import TimeFormatError, parse_rfc3339_ns
from billing_cli.core.types import Item, Rejection, Sample

__all__ = [
    "WindowPage",
    "WireFormatError",
    "iter_ingest",
    "parse_ingest",
    "parse_latest",
    "parse_window_page",
]

COUNTER_LIMIT = 1 << 63  # counters are signed 64-bit on every store; 2^63 and above refused
MAX_KEY_CHARS = 128  # uuid, inbound_tag, node_id, env, source_id, counter_epoch
MAX_EMAIL_CHARS = 320
MAX_CURSOR_CHARS = 4096
QUOTE_CHARS = 200  # a remote value is quoted in a message up to this many characters
MAX_REASON_CHARS = 300
# collected_at the stores can hold: 64-bit nanoseconds, with room for minute arithmetic.
MIN_COLLECTED_AT_NS = parse_rfc3339_ns("1678-01-01T00:00:00Z")
MAX_COLLECTED_AT_NS = parse_rfc3339_ns("2262-01-01T00:00:00Z")  # exclusive
_MAX_TIME_CHARS = 64  # the longest RFC3339 form is 35 characters
_HUGE_INT_DIGITS = 30  # beyond any counter; int() of longer literals is not even tried
_BOM = b"\xef\xbb\xbf"
_MISSING: Any = object()


class WireFormatError(ValueError):
    """The document cannot be used at all. ``str()`` is one line naming where it broke."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


@dataclass(frozen=True)
class WindowPage:
    """One ``/v1/snapshots/window`` response.

    ``node_id``/``env`` are ``None`` when the page names no identity, which the deployed
    exporter does exactly when the page holds no snapshot; items then carry their own.
    """

    source_id: str | None
    node_id: str | None
    env: str | None
    window_start_ns: int | None
    window_end_ns: int | None
    items: list[Item]
    rejections: list[Rejection]
    next_cursor: str | None
    has_more: bool
    emitted_at_ns: int | None


# --- JSON decoding ----------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_int(text: str) -> int | float:
    # Longer than any counter: an infinity that rejects its sample ("out of range"), and
    # int() is not asked to convert thousands of digits (Python refuses beyond 4300).
    if len(text) > _HUGE_INT_DIGITS:
        return -math.inf if text.startswith("-") else math.inf
    return int(text)


def _scan_string(text: str, end: int, strict: bool = True) -> tuple[str, int]:
    value, end = json.decoder.scanstring(text, end, strict)  # type: ignore[attr-defined]
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # orjson refuses lone surrogates; the fallback must not let one reach a store.
        raise ValueError(f"lone surrogate in a string: char {end}") from None
    return value, end


class _FallbackDecoder(json.JSONDecoder):
    """The stdlib decoder, pure-Python scanner, for documents orjson refuses only for a
    number: exact or infinite numbers (never an error), and strings checked like orjson's."""

    def __init__(self) -> None:
        super().__init__(parse_int=_parse_int, parse_constant=_reject_constant)
        self.parse_string = _scan_string
        self.scan_once = json.scanner.py_make_scanner(self)  # type: ignore[attr-defined]


def _loads(raw: bytes | str, where: str = "") -> Any:
    """orjson, with the stdlib as a fallback for numbers orjson cannot hold.

    orjson refuses the whole document for a number beyond a double (``1e400``, a 309-digit
    integer) and some versions for an integer beyond 64 bits; the fallback reads them as
    infinities or exact integers, so that one absurd counter rejects one sample, not the
    page.
    """
    prefix = f"{where}: " if where else ""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
        if where:  # one NDJSON line: orjson's "line 1" would contradict ours
            msg = msg.replace("line 1 column", "column")
        if not any(k in msg.lower() for k in ("64-bit", "integer", "infinity")):
            raise WireFormatError(f"{prefix}invalid JSON: {msg}") from None
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return _FallbackDecoder().decode(text)
    except (ValueError, RecursionError) as exc:
        raise WireFormatError(f"{prefix}invalid JSON: {exc}") from None


# --- field helpers --------------------------------------------------------------------


def _quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """A remote string for a message: printable characters only (so a secret in it stays
    recognisable for redaction), cut to ``limit`` with its length said."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:limit])
    if len(text) <= limit:
        return f"'{shown}'"
    return f"'{shown}…' ({len(text)} characters)"


def _short(value: Any) -> str:
    if isinstance(value, str):
        return _quote(value, 40)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text_problem(name: str, value: str, limit: int) -> str | None:
    """Why a text field cannot be stored (identically by both stores), or None."""
    if len(value) > limit:
        return f"{name} is {len(value)} characters long (at most {limit})"
    if "\x00" in value:
        return f"{name} contains a NUL character"
    return None


def _parse_time(name: str, value: str) -> tuple[int | None, str | None]:
    """``(ns, None)``, or ``(None, why)`` when ``value`` is not an RFC3339 time (the value
    quoted short: it may be a megabyte, or carry a secret the redaction must recognise)."""
    if len(value) > _MAX_TIME_CHARS:
        return None, f"{name}: not an RFC3339 timestamp with a zone: {_quote(value)}"
    try:
        return parse_rfc3339_ns(value), None
    except TimeFormatError as exc:
        return None, f"{name}: {str(exc).replace(repr(value), _quote(value))}"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _counter_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not a valid counter, or ``None`` when it is."""
    if type(value) is int:
        if value < 0:
            return f"{name} is negative ({value})"
        if value >= COUNTER_LIMIT:
            return f"{name} is out of range ({value} >= 2^63)"
        return None
    if value is None:
        return f"{name} is missing"
    if isinstance(value, float) and value.is_integer() and abs(value) >= COUNTER_LIMIT:
        # orjson turns integers beyond 64 bits into floats: it was an integer literal.
        return f"{name} is out of range (beyond 2^63)"
    if isinstance(value, float) and math.isinf(value):
        # 1e400 or a huge integer literal (see _loads): no double or 64-bit integer holds it.
        return f"{name} is out of range (beyond 2^63)"
    return f"{name} must be a JSON integer 0 <= n < 2^63, got {_type_name(value)} {_short(value)}"


def _opt_time(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise WireFormatError(f"{where}{key}: expected an RFC3339 string, got {_type_name(value)}")
    ns, problem = _parse_time(f"{where}{key}", value)
    if problem is not None:
        raise WireFormatError(problem)
    return ns


def _identity(value: Any, fallback: str | None, field: str, where: str) -> str:
    if value is None or value == "":
        if fallback:
            return fallback
        raise WireFormatError(
            f"{where}{field} missing (neither the item nor its page names one); "
            "the item cannot be attributed"
        )
    if not isinstance(value, str):
        raise WireFormatError(f"{where}{field}: expected a string, got {_type_name(value)}")
    problem = _text_problem(field, value, MAX_KEY_CHARS)
    if problem is not None:
        raise WireFormatError(f"{where}{problem}; the item cannot be attributed")
    return value


# --- items ----------------------------------------------------------------------------


def _parse_item(
    obj: Any,
    where: str,
    node_fallback: str | None,
    env_fallback: str | None,
    rejections: list[Rejection],
) -> Item | None:
    """Validate one item. Returns ``None`` when the whole item is rejected (recorded)."""
    if not isinstance(obj, dict):
        raise WireFormatError(f"{where.rstrip('.')}: expected an object, got {_type_name(obj)}")
    node_id = _identity(obj.get("node_id"), node_fallback, "node_id", where)
    env = _identity(obj.get("env"), env_fallback, "env", where)

    problem: str | None = None
    collected_at_ns: int | None = None
    raw_ts = obj.get("collected_at")
    if raw_ts is None:
        problem = "collected_at is missing"
    elif not isinstance(raw_ts, str):
        problem = f"collected_at must be an RFC3339 string, got {_type_name(raw_ts)}"
    else:
        collected_at_ns, problem = _parse_time("collected_at", raw_ts)
        if collected_at_ns is not None and not (
            MIN_COLLECTED_AT_NS <= collected_at_ns < MAX_COLLECTED_AT_NS
        ):
            problem = (
                f"collected_at {_quote(raw_ts)} is outside the range billing can store "
                "(1678-01-01 to 2262-01-01)"
            )
            collected_at_ns = None

    epoch: str | None = None
    raw_epoch = obj.get("counter_epoch")
    if raw_epoch is None or raw_epoch == "":
        epoch = None
    elif type(raw_epoch) is str:
        epoch = raw_epoch
        if problem is None:
            problem = _text_problem("counter_epoch", raw_epoch, MAX_KEY_CHARS)
    elif type(raw_epoch) is int:
        epoch = str(raw_epoch)
    elif problem is None:
        problem = f"counter_epoch must be a string or an integer, got {_type_name(raw_epoch)}"

    samples = obj.get("samples", _MISSING)
    if samples is None:
        samples = []  # Go's encoding of an item without samples (a nil slice)
    elif not isinstance(samples, list):
        if problem is None:
            problem = (
                "samples is missing"
                if samples is _MISSING
                else f"samples must be an array, got {_type_name(samples)}"
            )
        samples = []

    if problem is not None or collected_at_ns is None:
        reason = one_line(f"invalid item: {problem}", MAX_REASON_CHARS)
        ts = collected_at_ns
        keyed = False
        for s in samples:
            if isinstance(s, dict):
                uuid, tag = s.get("uuid"), s.get("inbound_tag")
                rejections.append(
                    Rejection(ts, node_id, env, _key_or_blank(uuid), _key_or_blank(tag), reason)
                )
                keyed = True
            else:
                rejections.append(Rejection(ts, node_id, env, "", "", reason))
                keyed = True
        if not keyed:
            rejections.append(Rejection(ts, node_id, env, "", "", reason))
        return None

    valid = _clean_samples(samples)
    if valid is None:
        valid = _checked_samples(samples, collected_at_ns, node_id, env, rejections)
    return Item(collected_at_ns, node_id, env, epoch, valid)


def _key_or_blank(value: Any) -> str:
    """A uuid or tag for a rejection record: as received when it can be stored, else ""."""
    if isinstance(value, str) and _text_problem("", value, MAX_KEY_CHARS) is None:
        return value
    return ""


# The wire fields in ``Sample`` order, fetched per sample by one C call.
_SAMPLE_FIELDS = operator.itemgetter(
    "uuid", "email", "inbound_tag", "uplink_bytes_total", "downlink_bytes_total"
)
_SAMPLE_FIELDS_NO_EMAIL = operator.itemgetter(
    "uuid", "inbound_tag", "uplink_bytes_total", "downlink_bytes_total"
)
_UUID = operator.itemgetter(0)
_EMAIL = operator.itemgetter(1)
_TAG = operator.itemgetter(2)


def _clean_samples(samples: list[Any]) -> list[Sample] | None:
    """Fast path: the samples of an item in the exact shape well-behaved exporters send.

    Returns ``None`` at the first doubt (a missing field, a wrong type, a counter out of
    range, a duplicate series); the caller then re-checks the whole item sample by sample,
    which decides and words every rejection. Items whose samples all omit the optional
    ``email`` have their own fast path.
    """
    if samples and type(samples[0]) is dict and "email" not in samples[0]:
        return _clean_samples_without_email(samples)
    fields = _SAMPLE_FIELDS
    limit = COUNTER_LIMIT
    new = tuple.__new__  # builds the NamedTuple without its Python-level __new__
    valid: list[Sample] = []
    append = valid.append
    for s in samples:
        try:
            t = fields(s)
        except (KeyError, TypeError, IndexError):
            return None
        uuid, email, tag, up, down = t
        if not (
            type(uuid) is str
            and type(tag) is str
            and type(up) is int  # `is`, not isinstance: bool is not a counter
            and type(down) is int
            and type(email) is str
            and uuid
            and 0 <= up < limit
            and 0 <= down < limit
        ):
            return None
        append(new(Sample, t))
    return valid if _columns_ok(valid, emails=True) else None


def _clean_samples_without_email(samples: list[Any]) -> list[Sample] | None:
    fields = _SAMPLE_FIELDS_NO_EMAIL
    limit = COUNTER_LIMIT
    new = tuple.__new__
    valid: list[Sample] = []
    append = valid.append
    for s in samples:
        try:
            uuid, tag, up, down = fields(s)
        except (KeyError, TypeError, IndexError):
            return None
        if not (
            type(uuid) is str
            and type(tag) is str
            and type(up) is int
            and type(down) is int
            and uuid
            and 0 <= up < limit
            and 0 <= down < limit
            and "email" not in s  # a mixed item: let the slow path keep each email
        ):
            return None
        append(new(Sample, (uuid, "", tag, up, down)))
    return valid if _columns_ok(valid, emails=False) else None


def _columns_ok(valid: list[Sample], *, emails: bool) -> bool:
    """Checked once per item, column by column with C-level loops: no series twice, and
    every text field storable (bounded, no NUL)."""
    if not valid:
        return True
    uuids = list(map(_UUID, valid))
    tags = list(map(_TAG, valid))
    if len(set(zip(uuids, tags, strict=True))) != len(valid):
        return False
    columns = [(uuids, MAX_KEY_CHARS), (tags, MAX_KEY_CHARS)]
    if emails:
        columns.append((list(map(_EMAIL, valid)), MAX_EMAIL_CHARS))
    return all(max(map(len, col)) <= limit and "\x00" not in "".join(col) for col, limit in columns)


def _checked_samples(
    samples: list[Any], ts: int, node_id: str, env: str, rejections: list[Rejection]
) -> list[Sample]:
    """Slow path: every sample checked on its own; invalid ones become rejections."""
    valid: list[Sample] = []
    seen: set[tuple[str, str]] = set()
    for s in samples:
        checked = _check_sample(s, ts, node_id, env, seen)
        if isinstance(checked, Rejection):
            rejections.append(checked)
        else:
            valid.append(checked)
    return valid


def _check_sample(
    s: Any, ts: int, node_id: str, env: str, seen: set[tuple[str, str]]
) -> Sample | Rejection:
    """Slow path: accept an unusual but valid sample, or say precisely why it is refused."""
    if not isinstance(s, dict):
        return Rejection(ts, node_id, env, "", "", f"sample must be an object, got {_type_name(s)}")
    uuid, tag, email = s.get("uuid"), s.get("inbound_tag", ""), s.get("email")
    uuid_s = _key_or_blank(uuid)
    tag_s = _key_or_blank(tag)
    problems: list[str] = []
    if uuid is None or uuid == "":
        problems.append("uuid is missing")
    elif not isinstance(uuid, str):
        problems.append(f"uuid must be a string, got {_type_name(uuid)}")
    else:
        p = _text_problem("uuid", uuid, MAX_KEY_CHARS)
        if p:
            problems.append(p)
    # A blank (or absent) inbound_tag is the account-level series (DESIGN §2a).
    if tag is not None and not isinstance(tag, str):
        problems.append(f"inbound_tag must be a string, got {_type_name(tag)}")
    elif isinstance(tag, str):
        p = _text_problem("inbound_tag", tag, MAX_KEY_CHARS)
        if p:
            problems.append(p)
    if email is not None and not isinstance(email, str):
        problems.append(f"email must be a string, got {_type_name(email)}")
    elif isinstance(email, str):
        p = _text_problem("email", email, MAX_EMAIL_CHARS)
        if p:
            problems.append(p)
    up, down = s.get("uplink_bytes_total"), s.get("downlink_bytes_total")
    for name, value in (("uplink_bytes_total", up), ("downlink_bytes_total", down)):
        p = _counter_problem(name, value)
        if p:
            problems.append(p)
    if uuid_s and (tag is None or tag_s == tag):
        key = (uuid_s, tag_s)
        if key in seen and not problems:
            problems.append("duplicate sample for this series in the same item (first kept)")
        # An invalid sample still claims its series: a later one for it is ambiguous.
        seen.add(key)
    if problems:
        return Rejection(
            ts, node_id, env, uuid_s, tag_s, one_line("; ".join(problems), MAX_REASON_CHARS)
        )
    return Sample(
        uuid_s, email if isinstance(email, str) else "", tag_s, cast(int, up), cast(int, down)
    )


def _parse_items(
    items: Any,
    field: str,
    node_fallback: str | None,
    env_fallback: str | None,
) -> tuple[list[Item], list[Rejection]]:
    if not isinstance(items, list):
        raise WireFormatError(f"{field}: expected an array, got {_type_name(items)}")
    out: list[Item] = []
    rejections: list[Rejection] = []
    for i, obj in enumerate(items):
        item = _parse_item(obj, f"{field}[{i}].", node_fallback, env_fallback, rejections)
        if item is not None:
            out.append(item)
    return out, rejections


def _page_identity(doc: dict[str, Any], field: str) -> str | None:
    value = doc.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise WireFormatError(f"{field}: expected a string, got {_type_name(value)}")
    problem = _text_problem(field, value, MAX_KEY_CHARS)
    if problem is not None:
        raise WireFormatError(problem)
    return value


def _items_field(doc: dict[str, Any]) -> tuple[str, Any]:
    if "items" in doc and doc["items"] is not None:
        return "items", doc["items"]
    if "snapshots" in doc and doc["snapshots"] is not None:
        return "snapshots", doc["snapshots"]
    raise WireFormatError("neither 'items' nor 'snapshots' present")


# --- public parsers ---------------------------------------------------------------------


def parse_window_page(raw: bytes) -> WindowPage:
    """Parse one ``/v1/snapshots/window`` response (``items`` or ``snapshots``)."""
    doc = _loads(raw.removeprefix(_BOM))
    if not isinstance(doc, dict):
        raise WireFormatError(f"window page: expected a JSON object, got {_type_name(doc)}")
    # No page identity is normal for an empty page (the deployed exporter takes it from
    # the first snapshot); items then need their own, which _parse_item insists on.
    node_id = _page_identity(doc, "node_id")
    env = _page_identity(doc, "env")
    source_id = doc.get("source_id")
    if source_id is not None and not isinstance(source_id, str):
        raise WireFormatError(f"source_id: expected a string, got {_type_name(source_id)}")
    if source_id is not None:
        problem = _text_problem("source_id", source_id, MAX_KEY_CHARS)
        if problem is not None:
            raise WireFormatError(problem)
    cursor = doc.get("next_cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise WireFormatError(f"next_cursor: expected a string or null, got {_type_name(cursor)}")
    if cursor is not None:
        # A cursor is a time or an offset; a longer one only grows URLs and memory.
        problem = _text_problem("next_cursor", cursor, MAX_CURSOR_CHARS)
        if problem is not None:
            raise WireFormatError(problem)
    has_more = doc.get("has_more", False)
    if not isinstance(has_more, bool):
        raise WireFormatError(f"has_more: expected true or false, got {_type_name(has_more)}")
    field, raw_items = _items_field(doc)
    items, rejections = _parse_items(raw_items, field, node_id, env)
    return WindowPage(
        source_id=source_id,
        node_id=node_id,
        env=env,
        window_start_ns=_opt_time(doc, "window_start", ""),
        window_end_ns=_opt_time(doc, "window_end", ""),
        items=items,
        rejections=rejections,
        next_cursor=cursor,
        has_more=has_more,
        emitted_at_ns=_opt_time(doc, "emitted_at", ""),
    )


def parse_latest(
    raw: bytes, *, node_id: str | None = None, env: str | None = None
) -> tuple[list[Item], list[Rejection]]:
    """Parse a legacy ``/v1/snapshots/latest`` response: one item.

    ``node_id``/``env`` are used when the item does not carry its own.
    """
    doc = _loads(raw.removeprefix(_BOM))
    if not isinstance(doc, dict):
        raise WireFormatError(f"latest snapshot: expected a JSON object, got {_type_name(doc)}")
    rejections: list[Rejection] = []
    item = _parse_item(doc, "", node_id, env, rejections)
    return ([item] if item is not None else []), rejections


def _parse_document(doc: Any, where: str = "") -> tuple[list[Item], list[Rejection]]:
    """Any ingest shape that is one JSON value."""
    if isinstance(doc, list):
        return _parse_items(doc, "items", None, None)
    if not isinstance(doc, dict):
        raise WireFormatError(f"{where}expected a JSON object or array, got {_type_name(doc)}")
    if "items" in doc or "snapshots" in doc:
        # Window response or exporter snapshot store file: page identity optional here,
        # items of a snapshot store carry their own.
        node_id = _page_identity(doc, "node_id")
        env = _page_identity(doc, "env")
        field, raw_items = _items_field(doc)
        return _parse_items(raw_items, f"{where}{field}", node_id, env)
    if "samples" in doc or "collected_at" in doc:
        rejections: list[Rejection] = []
        item = _parse_item(doc, where, None, None, rejections)
        return ([item] if item is not None else []), rejections
    raise WireFormatError(
        f"{where}unrecognised document: expected 'items', 'snapshots', an array of items, "
        "NDJSON items, or one item with 'collected_at' and 'samples'"
    )


def _is_ndjson_head(line: bytes) -> bool:
    """Whether the first non-blank line is a complete item object on its own."""
    try:
        doc = _loads(line)
    except WireFormatError:
        return False
    return (
        isinstance(doc, dict)
        and ("samples" in doc or "collected_at" in doc)
        and "items" not in doc
        and "snapshots" not in doc
    )


def parse_ingest(raw: bytes) -> tuple[list[Item], list[Rejection]]:
    """Parse any ``billing ingest`` shape held in memory (see :func:`iter_ingest`)."""
    items: list[Item] = []
    rejections: list[Rejection] = []
    for batch_items, batch_rejections in _iter_ingest_bytes(raw):
        items.extend(batch_items)
        rejections.extend(batch_rejections)
    return items, rejections


def _iter_ingest_bytes(raw: bytes) -> Iterator[tuple[list[Item], list[Rejection]]]:
    return iter_ingest(io.BytesIO(raw), batch_samples=1 << 62)


def iter_ingest(
    stream: BinaryIO, batch_samples: int
) -> Iterator[tuple[list[Item], list[Rejection]]]:
    """Yield ``(items, rejections)`` batches of about ``batch_samples`` samples each.

    Accepted: a window response (``items`` or ``snapshots`` with page ``node_id``/``env``),
    a JSON array of items, an exporter snapshot store file (``{"snapshots": [...]}``,
    items carry their own identity), one item, or NDJSON with one item per line (blank
    lines ignored). NDJSON is read line by line, so memory is bounded by a batch; the
    other shapes are one JSON value and are read whole. An item is never split across
    batches. Raises :class:`WireFormatError` (naming the line for NDJSON) on garbage;
    batches before it have already been yielded, so callers that must write nothing on
    bad input validate in a first pass.
    """
    if batch_samples < 1:
        raise ValueError("batch_samples must be positive")
    head = b""
    lineno = 0
    for line in stream:
        lineno += 1
        if lineno == 1:
            line = line.removeprefix(_BOM)
        if line.strip():
            head = line
            break
    if not head:
        raise WireFormatError("empty input: no JSON document")
    if not _is_ndjson_head(head):
        rest = stream.read()
        doc = _loads(head + rest)
        items, rejections = _parse_document(doc)
        yield from _chunk(items, rejections, batch_samples)
        return
    yield from _iter_ndjson(stream, head, lineno, batch_samples)


def _chunk(
    items: list[Item], rejections: list[Rejection], batch_samples: int
) -> Iterator[tuple[list[Item], list[Rejection]]]:
    batch: list[Item] = []
    count = 0
    pending_rejections = rejections
    for item in items:
        batch.append(item)
        count += len(item.samples)
        if count >= batch_samples:
            yield batch, pending_rejections
            pending_rejections = []
            batch, count = [], 0
    if batch or pending_rejections:
        yield batch, pending_rejections


def _iter_ndjson(
    stream: BinaryIO, head: bytes, head_lineno: int, batch_samples: int
) -> Iterator[tuple[list[Item], list[Rejection]]]:
    batch: list[Item] = []
    rejections: list[Rejection] = []
    count = 0

    def lines() -> Iterator[tuple[int, bytes]]:
        yield head_lineno, head
        n = head_lineno
        for line in stream:
            n += 1
            yield n, line

    clean = _clean_lines()
    for n, line in lines():
        if not line.strip():
            continue
        item = clean(line)
        if item is None:
            item = _checked_line(line, n, rejections)
            if item is None:
                continue
        batch.append(item)
        count += len(item.samples)
        if count >= batch_samples:
            yield batch, rejections
            batch, rejections, count = [], [], 0
    if batch or rejections:
        yield batch, rejections


def _checked_line(line: bytes, n: int, rejections: list[Rejection]) -> Item | None:
    """One NDJSON line the exact way: every problem found and worded (or the input refused)."""
    where = f"line {n}"
    obj = _loads(line, where)
    if not isinstance(obj, dict) or (
        "samples" not in obj and ("items" in obj or "snapshots" in obj)
    ):
        got = "a page" if isinstance(obj, dict) else _type_name(obj)
        raise WireFormatError(f"{where}: expected an item object, got {got}")
    return _parse_item(obj, f"{where}: ", None, None, rejections)


# --- the NDJSON fast path (billing ingest) ---------------------------------------------------
# An exporter's NDJSON line in the clean shape, decoded straight into typed structures:
# one C call checks the syntax, every type (bool is not an integer, 5.0 is not a counter),
# every counter's range and every text field's length, with no dict per sample. Anything
# else (a missing, mistyped or unknown field, a counter out of range, a duplicate series, a
# NUL, bad JSON) makes the fast path return None and the exact path decide, word and count
# it, so the outcome for any line is the exact path's (tests/test_wire_ingest_fast.py).
# Unknown fields are refused rather than skipped: msgspec skips a field without checking
# its UTF-8, which orjson (the exact path) refuses. The deployed exporter sends no others.
# The collector's pages keep the orjson path: they are small, and not where the time goes.

_Counter = Annotated[int, msgspec.Meta(ge=0, le=COUNTER_LIMIT - 1)]
_Key = Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS)]  # code points, like len()


class _CleanSample(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    uuid: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_CHARS)]
    inbound_tag: _Key
    uplink_bytes_total: _Counter
    downlink_bytes_total: _Counter
    # Absent: "", what the exact path gives too; null is left to the exact path.
    email: Annotated[str, msgspec.Meta(max_length=MAX_EMAIL_CHARS)] = ""


class _CleanItem(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    node_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_CHARS)]
    env: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_CHARS)]
    collected_at: Annotated[str, msgspec.Meta(max_length=_MAX_TIME_CHARS)]
    samples: list[_CleanSample] | None  # Go's nil slice is null: no samples
    counter_epoch: _Key | int | None = None


_CLEAN_ITEM = msgspec.json.Decoder(_CleanItem)
_FIELD = {name: operator.attrgetter(name) for name in _CleanSample.__struct_fields__}
# Integers orjson decodes as integers (beyond, it gives a float or needs the fallback).
_MIN_INT, _MAX_INT = -(1 << 63), (1 << 64) - 1

_Names = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]  # uuids, emails, tags


class _CleanLines:
    """``(line) -> Item | None``: the item of one NDJSON line in the clean shape, or None
    (take the exact path).

    Remembers the last item's series names: an exporter names every account in every
    item, in the same order, so an item with the same names needs no duplicate or NUL
    check again, and its samples share the previous item's strings (less memory, and
    hashes computed once for the whole input).
    """

    def __init__(self) -> None:
        self._names: _Names | None = None

    def __call__(self, line: bytes) -> Item | None:
        try:
            doc = _CLEAN_ITEM.decode(line)
        except (msgspec.DecodeError, RecursionError):
            # RecursionError: nesting beyond Python's limit (1000), which is below orjson's
            # (1024), so whatever this decoder accepts orjson accepts too.
            return None
        node_id, env, raw_epoch = doc.node_id, doc.env, doc.counter_epoch
        if "\x00" in node_id or "\x00" in env:
            return None
        try:
            collected_at_ns = parse_rfc3339_ns(doc.collected_at)
        except TimeFormatError:
            return None
        if not MIN_COLLECTED_AT_NS <= collected_at_ns < MAX_COLLECTED_AT_NS:
            return None
        epoch: str | None
        if isinstance(raw_epoch, int):  # never a bool: the decoder refuses true for an int
            if not _MIN_INT <= raw_epoch <= _MAX_INT:
                return None
            epoch = str(raw_epoch)
        elif raw_epoch is None or raw_epoch == "":
            epoch = None
        elif "\x00" in raw_epoch:
            return None
        else:
            epoch = raw_epoch
        samples = doc.samples
        if not samples:
            return Item(collected_at_ns, node_id, env, epoch, [])
        names = (
            tuple(map(_FIELD["uuid"], samples)),
            tuple(map(_FIELD["email"], samples)),
            tuple(map(_FIELD["inbound_tag"], samples)),
        )
        if names == self._names:
            names = self._names  # the same strings for every item
        else:
            uuids, emails, tags = names
            if (
                len(set(zip(uuids, tags, strict=True))) != len(uuids)
                or "\x00" in "".join(uuids)
                or "\x00" in "".join(emails)
                or "\x00" in "".join(tags)
            ):
                return None
            self._names = names
        valid = list(
            map(
                tuple.__new__,
                repeat(Sample),
                zip(
                    *names,
                    map(_FIELD["uplink_bytes_total"], samples),
                    map(_FIELD["downlink_bytes_total"], samples),
                    strict=True,
                ),
            )
        )
        return Item(collected_at_ns, node_id, env, epoch, valid)


def _clean_lines() -> _CleanLines:
    return _CleanLines()

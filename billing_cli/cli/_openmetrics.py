"""``billing status --format openmetrics``: the status document as Prometheus metrics.

Only gauges, with ``# HELP``/``# TYPE`` lines and a final ``# EOF``: valid OpenMetrics
(what Prometheus scrapes and ``prometheus_client``'s OpenMetrics parser reads) and valid
classic text format too, which is what node_exporter's textfile collector reads (``# EOF``
is a comment there). A source's health is one gauge per state, 1 for the current one,
so alerts can match ``billing_source_health{health="failing"} == 1``. A value that is
unknown (no data received yet) is left out rather than faked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from billing_cli._time import parse_rfc3339_ns
from billing_cli.health import Health

Doc = dict[str, Any]

# (name, help, value of one source's JSON object or None to leave the sample out)
_PER_SOURCE: tuple[tuple[str, str, Callable[[Doc], float | None]], ...] = (
    (
        "billing_source_enabled",
        "1 when the source is enabled in the registry.",
        lambda s: s["enabled"],
    ),
    (
        "billing_source_lag_seconds",
        "Age of the newest snapshot received from the source (its data lag).",
        lambda s: s["lag_seconds"],
    ),
    (
        "billing_source_max_lag_seconds",
        "Data lag above which the source is degraded (3 x: failing).",
        lambda s: s["max_lag_seconds"],
    ),
    (
        "billing_source_newest_snapshot_timestamp_seconds",
        "collected_at of the newest snapshot received from the source.",
        lambda s: _epoch_s(s["newest_collected_at"]),
    ),
    (
        "billing_source_last_success_timestamp_seconds",
        "When the source was last collected successfully.",
        lambda s: _epoch_s(s["last_succeeded_at"]),
    ),
    (
        "billing_source_consecutive_failures",
        "Failed collects of the source in a row.",
        lambda s: s["consecutive_failures"],
    ),
    (
        "billing_source_open_integrity_events",
        "Integrity events of the source not yet acknowledged.",
        lambda s: s["open_integrity_events"],
    ),
    (
        "billing_source_last_run_samples",
        "Valid samples the source's last run delivered.",
        lambda s: _count(s, "samples"),
    ),
    (
        "billing_source_last_run_refused_samples",
        "Samples of the source's last run that were refused.",
        lambda s: _count(s, "rejected"),
    ),
    (
        "billing_source_last_run_bytes",
        "Bytes the source's last run added to its usage buckets.",
        lambda s: _count(s, "bytes"),
    ),
    (
        "billing_source_last_run_duration_seconds",
        "How long the source's last run took.",
        lambda s: None if s["last_run"] is None else s["last_run"]["duration_seconds"],
    ),
)


def _epoch_s(ts: str | None) -> float | None:
    return None if ts is None else parse_rfc3339_ns(ts) / 1e9


def _count(source: Doc, key: str) -> int | None:
    run = source["last_run"]
    return None if run is None else int(run["counts"].get(key, 0))


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in pairs.items()) + "}"


def _number(value: float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _family(name: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]


def render_status(doc: Doc) -> str:
    """The ``billing status --json`` document as OpenMetrics text (ends with ``# EOF``)."""
    lines: list[str] = []
    lines += _family("billing_status_generated_timestamp_seconds", "When billing status ran.")
    lines.append(
        "billing_status_generated_timestamp_seconds "
        + _number(parse_rfc3339_ns(doc["generated_at"]) / 1e9)
    )
    lines += _family("billing_healthy", "1 when every enabled source is healthy.")
    lines.append(f"billing_healthy {_number(bool(doc['healthy']))}")
    lines += _family(
        "billing_unattributed_integrity_events", "Open integrity events tied to no source."
    )
    lines.append(f"billing_unattributed_integrity_events {doc['unattributed_integrity_events']}")
    sources: list[Doc] = doc["sources"]
    ids = [{"source_id": s["source_id"], "node_id": s["node_id"], "env": s["env"]} for s in sources]
    lines += _family(
        "billing_source_health", "Health of the source: 1 for its current state, else 0."
    )
    for s, labels in zip(sources, ids, strict=True):
        for h in Health:
            state = 1 if s["health"] == h.value else 0
            lines.append(f"billing_source_health{_labels({**labels, 'health': h.value})} {state}")
    for name, help_text, get in _PER_SOURCE:
        samples = [
            f"{name}{_labels(labels)} {_number(value)}"
            for s, labels in zip(sources, ids, strict=True)
            if (value := get(s)) is not None
        ]
        if samples:
            lines += _family(name, help_text)
            lines += samples
    lines.append("# EOF")
    return "\n".join(lines) + "\n"

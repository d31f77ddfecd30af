"""The ``[pricing]`` table of the registry: how bucket bytes become money (DESIGN §5).

Validated here (as part of the registry) and used by ``billing_cli.core.rating``.
Prices and multipliers are decimal strings so that no float ever touches money.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

UNIT_BYTES: dict[str, int] = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}

_HOUR = re.compile(r"([01]\d|2[0-4]):([0-5]\d)")


def _to_decimal(value: Any) -> Decimal:
    if isinstance(value, (bool, float)):
        raise ValueError(f'write decimals as strings, e.g. "{value}" (floats are inexact)')
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"not a decimal number: {value!r}") from None
        if not d.is_finite():
            raise ValueError(f"not a finite decimal: {value!r}")
        return d
    if isinstance(value, Decimal):
        return value
    raise ValueError(f"expected a decimal string, got {type(value).__name__}")


def _non_negative(d: Decimal) -> Decimal:
    if d < 0:
        raise ValueError(f"must not be negative (got {d})")
    return d


ExactDecimal = Annotated[Decimal, BeforeValidator(_to_decimal)]


class PeakWindow(BaseModel):
    """Hours ``[start, end)`` of local time in ``timezone`` where ``multiplier`` applies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str
    start: str = Field(description="HH:MM local time, inclusive")
    end: str = Field(description="HH:MM local time, exclusive; may wrap past midnight")
    multiplier: ExactDecimal

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {v!r} (use an IANA name, e.g. Asia/Tokyo)"
            ) from None
        return v

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        m = _HOUR.fullmatch(v)
        if m is None or (m.group(1) == "24" and m.group(2) != "00"):
            raise ValueError(f"expected HH:MM between 00:00 and 24:00, got {v!r}")
        return v

    @field_validator("multiplier")
    @classmethod
    def _mult(cls, v: Decimal) -> Decimal:
        return _non_negative(v)

    def minutes(self) -> tuple[int, int]:
        """Start and end as minutes after local midnight."""
        sh, sm = (int(x) for x in self.start.split(":"))
        eh, em = (int(x) for x in self.end.split(":"))
        return sh * 60 + sm, eh * 60 + em


class Multipliers(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    env: dict[str, ExactDecimal] = Field(default_factory=dict)
    node_id: dict[str, ExactDecimal] = Field(default_factory=dict)
    inbound_tag: dict[str, ExactDecimal] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _non_negative(self) -> Multipliers:
        for table in (self.env, self.node_id, self.inbound_tag):
            for v in table.values():
                _non_negative(v)
        return self


class Pricing(BaseModel):
    """Validated ``[pricing]`` table. Absent table means: everything rates at zero."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = "USD"
    unit: Literal["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"] = "GB"
    price_per_unit: ExactDecimal = Decimal(0)
    charge: Literal["total", "uplink", "downlink"] = "total"
    rule_version: str = "v1"
    period: Literal["month"] = "month"
    multipliers: Multipliers = Field(default_factory=Multipliers)
    peak: list[PeakWindow] = Field(default_factory=list)
    included_bytes_default: int = Field(default=0, ge=0)
    included_bytes: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Z]{3}", v):
            raise ValueError(f"expected an ISO 4217 code such as USD, got {v!r}")
        return v

    @field_validator("rule_version")
    @classmethod
    def _rule_version(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("price_per_unit")
    @classmethod
    def _price(cls, v: Decimal) -> Decimal:
        return _non_negative(v)

    @property
    def unit_bytes(self) -> int:
        return UNIT_BYTES[self.unit]

    def included_for(self, uuid: str) -> int:
        return self.included_bytes.get(uuid, self.included_bytes_default)

    @property
    def has_included_quota(self) -> bool:
        return self.included_bytes_default > 0 or any(v > 0 for v in self.included_bytes.values())

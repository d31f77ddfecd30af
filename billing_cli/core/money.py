"""Exact money: amounts are integers of nano-units (10^-9 currency units), DESIGN §5.

No float ever touches an amount. Conversions go through exact integer ratios, so the
only rounding anywhere is the single half-even step in :func:`round_half_even`.

Output format (stable, for scripts): :func:`format_amount` always prints exactly nine
decimals, trailing zeros kept (``"1.500000000"``), so columns line up and a value never
changes shape with its magnitude.
"""

from __future__ import annotations

from decimal import Decimal

NANO_PER_UNIT = 1_000_000_000
NANO_DIGITS = 9


def round_half_even(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded to the nearest integer, ties to even. Exact."""
    if denominator == 0:
        raise ZeroDivisionError("round_half_even: zero denominator")
    if denominator < 0:
        numerator, denominator = -numerator, -denominator
    quotient, remainder = divmod(numerator, denominator)  # floor division: 0 <= remainder < d
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def decimal_to_nano(value: Decimal | int | str) -> int:
    """Currency units -> nano-units, rounded half-even at 10^-9 (exact, no context)."""
    d = value if isinstance(value, Decimal) else Decimal(value)
    if not d.is_finite():
        raise ValueError(f"not a finite amount: {value!r}")
    num, den = d.as_integer_ratio()
    return round_half_even(num * NANO_PER_UNIT, den)


def nano_to_decimal(nano: int) -> Decimal:
    """Nano-units -> an exact ``Decimal`` in currency units with exponent -9."""
    # Built from a string: exact at any magnitude (``scaleb`` would round to the context).
    return Decimal(f"{nano}E-{NANO_DIGITS}")


def format_amount(nano: int) -> str:
    """Nano-units as a decimal string in currency units with exactly nine decimals.

    ``format_amount(123456789) == "0.123456789"``, ``format_amount(-5) == "-0.000000005"``,
    ``format_amount(2 * 10**9) == "2.000000000"``.
    """
    sign = "-" if nano < 0 else ""
    units, frac = divmod(abs(nano), NANO_PER_UNIT)
    return f"{sign}{units}.{frac:09d}"

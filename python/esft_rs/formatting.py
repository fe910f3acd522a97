"""Byte sizes for people: one formatting rule for every command."""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def byte_unit(n: float) -> str:
    """The unit ``human_bytes`` shows ``n`` in."""
    for unit in UNITS:
        if abs(n) < 1024 or unit == UNITS[-1]:
            return unit
        n /= 1024
    raise AssertionError("unreachable")


def human_bytes(n: float, unit: str | None = None) -> str:
    """1536 -> '1.5 KiB'; in ``unit`` if given (so that figures side by side compare)."""
    unit = unit or byte_unit(n)
    n /= 1024 ** UNITS.index(unit)
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"

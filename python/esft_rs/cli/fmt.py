"""Small formatting helpers shared by the CLI commands."""

from __future__ import annotations

from esft_rs.ranges import id_ranges

__all__ = ["human_bytes", "id_ranges"]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

"""Small formatting helpers shared by the CLI commands."""

from __future__ import annotations

from esft_rs.ranges import id_ranges
from esft_rs.units import byte_unit, human_bytes

__all__ = ["byte_unit", "human_bytes", "id_ranges"]

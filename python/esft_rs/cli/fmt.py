"""Small formatting helpers shared by the CLI commands."""

from __future__ import annotations

from esft_rs.formatting import byte_unit, human_bytes, id_ranges

__all__ = ["byte_unit", "human_bytes", "id_ranges"]

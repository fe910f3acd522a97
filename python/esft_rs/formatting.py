"""Numbers for people, one rule for every command and message: byte sizes, and sets of
layer and expert ids as compact ranges."""

from __future__ import annotations

from collections.abc import Iterable

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


def id_ranges(ids: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(ids):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)

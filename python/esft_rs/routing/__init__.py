"""Which experts a task uses, and which to train: the profiler's forward passes
(``profiling``), routing statistics (``stats``: counts and gate sums, in the Rust core),
expert scores and top-p (``scoring``), the expert config chosen from them
(``selection``), and the report and plot of a selection (``report``, ``plot``).

``RoutingStats`` and ``aggregate`` are loaded on first use: they need numpy, which
``esft-rs --help`` does not pay for (the CLI imports ``scoring`` from here).
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from esft_rs.routing.stats import RoutingStats, aggregate

_LAZY = {"RoutingStats": "esft_rs.routing.stats", "aggregate": "esft_rs.routing.stats"}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'esft_rs.routing' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["RoutingStats", "aggregate"]

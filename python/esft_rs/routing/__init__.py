"""Which experts a task uses, and which to train: the profiler's forward passes
(``profiling``), routing statistics (``stats``: counts and gate sums, in the Rust core),
expert scores and top-p (``scoring``), the expert config chosen from them
(``selection``), and the report and plot of a selection (``report``, ``plot``).
"""

from esft_rs.routing.stats import RoutingStats, aggregate

__all__ = ["RoutingStats", "aggregate"]

"""The paper's routing analysis: how concentrated each task's routing is, and how
much the selected experts of different tasks overlap."""

from __future__ import annotations

import math
from dataclasses import dataclass

from esft_rs.routing import scoring
from esft_rs.routing.selection import Selection
from esft_rs.routing.stats import RoutingStats

#: Shares of the token selections whose coverage the report gives.
COVERAGE = (0.5, 0.9)


def experts_to_cover(stats: RoutingStats, share: float) -> dict[int, int]:
    """Per layer: how many experts (most-selected first) cover ``share`` of the
    token selections. Layers without tokens are left out."""
    out: dict[int, int] = {}
    for layer, row in zip(stats.layers, stats.token_scores(), strict=True):
        if row.sum() > 0:
            out[int(layer)] = len(scoring.select_top_p(row.tolist(), share)[0])
    return out


def uniform_cover(num_experts: int, share: float) -> int:
    """The same count if routing were uniform over the experts."""
    return math.ceil(share * num_experts - 1e-9)


def jaccard(a: Selection, b: Selection) -> float:
    """Mean over the layers both selections cover of |A & B| / |A | B|."""
    layers = sorted(set(a.experts) & set(b.experts))
    values = []
    for layer in layers:
        x, y = set(a.experts[layer]), set(b.experts[layer])
        values.append(len(x & y) / len(x | y) if x | y else 1.0)
    return sum(values) / len(values) if values else math.nan


def chance_jaccard(a: Selection, b: Selection, num_experts: int) -> float:
    """The mean Jaccard index two random sets of the same sizes would have
    (by the expected intersection |A||B|/E)."""
    layers = sorted(set(a.experts) & set(b.experts))
    values = []
    for layer in layers:
        m, n = len(a.experts[layer]), len(b.experts[layer])
        inter = m * n / num_experts
        values.append(inter / (m + n - inter) if m + n else 1.0)
    return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class TaskSummary:
    name: str
    selection: Selection
    cover: dict[float, dict[int, int]]  # share -> layer -> experts needed

    def mean_cover(self, share: float) -> float:
        v = self.cover[share]
        return sum(v.values()) / len(v) if v else math.nan

    @property
    def mean_selected(self) -> float:
        e = self.selection.experts
        return sum(len(v) for v in e.values()) / len(e) if e else math.nan


def summarize(name: str, selection: Selection) -> TaskSummary:
    stats = selection.stats
    return TaskSummary(name, selection, {p: experts_to_cover(stats, p) for p in COVERAGE})

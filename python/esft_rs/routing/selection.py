"""Choosing the experts to train from routing statistics (``esft_rs.select_experts``)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from esft_rs.files.expert_config import ExpertConfig
from esft_rs.files.outputs import write_file
from esft_rs.routing import scoring
from esft_rs.routing.stats import OFFICIAL_TOP_K, RoutingStats, Source, aggregate


@dataclass(frozen=True)
class Selection:
    """The result of top-p selection, with what the CLI reports."""

    stats: RoutingStats
    score: scoring.Score
    top_p: float
    scores: np.ndarray  # [L, E] the scores selected on (rounded if asked)
    experts: dict[int, list[int]]  # layer -> ids in selection order
    cumulative: dict[int, float]  # layer -> summed score of the chosen experts
    empty_layers: list[int]  # layers that saw no tokens: nothing selected

    def config(
        self, shared_experts: bool = False, non_expert_modules: bool = False
    ) -> ExpertConfig:
        return ExpertConfig(self.experts, shared_experts, non_expert_modules)


def select(
    routing: Source | Sequence[Source],
    *,
    score: scoring.Score = "token",
    top_p: float | None = None,
    average: scoring.Average = "tokens",
    decimals: int | None = None,
    top_k: int = OFFICIAL_TOP_K,
    num_experts: int | None = None,
) -> Selection:
    """Sums the routing sources, scores each layer, selects by cumulative top-p."""
    top_p = scoring.default_top_p(score) if top_p is None else float(top_p)
    scoring.check_top_p(top_p)
    stats = routing if isinstance(routing, RoutingStats) else aggregate(
        routing, top_k=top_k, num_experts=num_experts
    )
    values = scoring.scores(stats, score, average, decimals)
    experts: dict[int, list[int]] = {}
    cumulative: dict[int, float] = {}
    empty: list[int] = []
    for layer, row in zip(stats.layers, values, strict=True):
        if np.isnan(row).any():
            empty.append(int(layer))
            continue
        experts[int(layer)], cumulative[int(layer)] = scoring.select_top_p(row.tolist(), top_p)
    return Selection(stats, score, top_p, values, experts, cumulative, empty)


def select_experts(
    routing: Source | Sequence[Source],
    *,
    score: scoring.Score = "token",
    top_p: float | None = None,
    average: scoring.Average = "tokens",
    decimals: int | None = None,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
    top_k: int = OFFICIAL_TOP_K,
    num_experts: int | None = None,
) -> ExpertConfig:
    """The expert config (official JSON format) for the given routing.

    ``routing``: RoutingStats, routing-stats files or official log folders
    (summed). ``top_p`` defaults to the paper's value for the score (token 0.2,
    gate 0.1). ``decimals`` rounds scores before selecting; the official configs
    were selected from scores rounded to 4. ``top_k`` / ``num_experts`` apply to
    official logs. Layers that saw no tokens get no experts and a warning.
    """
    sel = select(
        routing, score=score, top_p=top_p, average=average, decimals=decimals,
        top_k=top_k, num_experts=num_experts,
    )
    if sel.empty_layers:
        warnings.warn(
            f"layers {sel.empty_layers} saw no tokens; no experts selected there", stacklevel=2
        )
    return sel.config(shared_experts, non_expert_modules)


def summary_json(stats: RoutingStats) -> str:
    """The official ``summary.json`` text (both scores, 4 decimals, no newline)."""
    return json.dumps(scoring.summary(stats))


def write_summary(stats: RoutingStats, path: str | os.PathLike[str]) -> None:
    write_file(path, summary_json(stats))

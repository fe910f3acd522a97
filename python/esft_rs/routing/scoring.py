"""Expert scores and top-p selection: the one place for these formulas.

Per layer l and routed expert e (never across layers):

- token selection ratio ``token[l][e] = count[l][e] / (top_k * tokens[l])``;
- average gate score ``gate[l][e] = gate_sum[l][e] / tokens[l]``.

With ``average="samples"`` (the paper's formula) each is instead the mean over
samples of the sample's own ratio. The released official files use
``average="tokens"``. Selection per layer: sort experts by score, descending,
ties in expert-id order (stable); take experts until the cumulative score
reaches ``top_p``; the expert that crosses is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from esft_rs.errors import EsftValueError, InvalidFileError

if TYPE_CHECKING:
    import numpy as np

    from esft_rs.routing.stats import RoutingStats

Score = Literal["token", "gate"]
Average = Literal["tokens", "samples"]
SCORES: tuple[Score, ...] = ("token", "gate")
AVERAGES: tuple[Average, ...] = ("tokens", "samples")
# The paper's values.
DEFAULT_TOP_P: dict[str, float] = {"token": 0.2, "gate": 0.1}
#: The official logs come from DeepSeek-V2-Lite, which routes each token to 6 experts.
OFFICIAL_TOP_K = 6
#: More decimals than a float64 holds change nothing; a larger --round is a typo.
MAX_DECIMALS = 17
# The official summary.json rounds to 4 decimals.
SUMMARY_DECIMALS = 4


def scores(
    stats: RoutingStats,
    score: Score = "token",
    average: Average = "tokens",
    decimals: int | None = None,
) -> np.ndarray:
    """Scores [layers, experts] (float64); rows of layers without tokens are NaN."""
    if score not in SCORES:
        raise EsftValueError(f"score must be one of {SCORES}, got {score!r}")
    if average not in AVERAGES:
        raise EsftValueError(f"average must be one of {AVERAGES}, got {average!r}")
    import numpy as np  # here, so that the CLI's option parsing does not load numpy

    _check_stats(stats, score, average)
    with np.errstate(divide="ignore", invalid="ignore"):
        if average == "samples":
            total = stats.sample_token_sum if score == "token" else stats.sample_gate_sum
            out = total / max(stats.num_samples, 1)
        elif score == "token":
            out = stats.counts / (stats.top_k * stats.tokens[:, None].astype(np.float64))
        else:
            out = stats.gate_sum / stats.tokens[:, None].astype(np.float64)
    out[stats.tokens == 0] = np.nan
    return out if decimals is None else round_scores(out, decimals)


def _check_stats(stats: RoutingStats, score: Score, average: Average) -> None:
    """Statistics the scores can be computed from: gate sums finite, non-negative and
    present for gate scores; samples counted for per-sample averages."""
    import numpy as np

    if score == "gate":
        sums = [stats.gate_sum] + ([stats.sample_gate_sum] if average == "samples" else [])
        if any(not np.isfinite(g).all() or (g < 0).any() for g in sums):
            raise InvalidFileError("routing statistics: the gate sums hold NaN, infinite or"
                                   " negative values; gate scores cannot be computed")
        if not stats.gate_sum.any() and stats.counts.any():
            raise EsftValueError("routing statistics hold no routing weights (every gate sum"
                                 " is 0): select by token score instead")
    if average == "samples" and stats.num_samples < 1 and stats.tokens.any():
        raise InvalidFileError(f"routing statistics: {stats.num_samples} samples for"
                               f" {int(stats.tokens.max())} tokens; per-sample averages"
                               " cannot be computed (average over tokens instead)")


def round_scores(values: np.ndarray, decimals: int) -> np.ndarray:
    """Rounds as the official scripts did: Python's ``round`` on numpy float64
    values, which is ``np.round`` (scale, round half to even, scale back). It
    can differ in the last place from ``round`` on a Python float."""
    import numpy as np

    if not 0 <= decimals <= MAX_DECIMALS:
        raise EsftValueError(f"decimals must be between 0 and {MAX_DECIMALS}, got {decimals}")
    return np.round(values, decimals)


def select_top_p(row: Sequence[float], top_p: float) -> tuple[list[int], float]:
    """Experts of one layer by cumulative top-p; returns (ids in selection order,
    cumulative score). Summed in Python floats, in order, as the official code."""
    check_top_p(top_p)
    order = sorted(range(len(row)), key=lambda e: row[e], reverse=True)  # stable
    chosen: list[int] = []
    total = 0.0
    for e in order:
        if total >= top_p:
            break
        chosen.append(e)
        total += float(row[e])
    return chosen, total


def default_top_p(score: Score) -> float:
    """The paper's top-p for a score: 0.2 for token scores, 0.1 for gate scores."""
    if score not in SCORES:
        raise EsftValueError(f"score must be one of {SCORES}, got {score!r}")
    return DEFAULT_TOP_P[score]


def check_top_p(top_p: float) -> None:
    if not 0.0 < top_p <= 1.0:
        raise EsftValueError(f"top_p must be in (0, 1], got {top_p}")


def summary(stats: RoutingStats, decimals: int = SUMMARY_DECIMALS) -> dict[str, dict]:
    """The official ``summary.json`` content: ``{"token_scores": {layer: {expert:
    score}}, "gate_scores": ...}``, layers as strings in lexicographic order (as
    released), experts in id order. Layers without tokens are left out."""
    import numpy as np

    out: dict[str, dict] = {}
    for score in SCORES:
        values = scores(stats, score, "tokens", decimals)
        rows = {str(layer): row for layer, row in zip(stats.layers, values, strict=True)}
        out[f"{score}_scores"] = {
            key: {str(e): float(v) for e, v in enumerate(rows[key])}
            for key in sorted(rows)
            if not np.isnan(rows[key]).any()
        }
    return out

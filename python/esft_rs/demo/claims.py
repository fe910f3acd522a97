"""The paper's claims, judged on the demo's figures against noise and chance, not thresholds.

Accuracies are exact match on a finite test split, so two methods differ measurably only
by more than that split's sampling noise: a claim that one method beats (or matches)
another is judged with a tolerance of two standard errors of the difference, from the
binomial error of each accuracy on ``n`` items and, on the means, the spread over the
fine-tuning seeds. Each claim is judged on the means, and separately in every run
(binomial error only), so that the report says in how many runs it held.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

#: The per-run figures that are averaged into ``methods`` (and given a spread).
NUMERIC = ("downstream_acc", "general_acc_before", "general_acc_after", "trainable_params",
           "total_params", "adapter_bytes", "train_seconds", "experts_trained")
#: Two standard errors: a difference smaller than this is within noise.
Z = 2.0
#: Quantile of the chance distribution that "no more overlap than chance" allows.
CHANCE_QUANTILE = 0.95


def mean_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``methods`` as the means of the runs' ``methods`` (per-task accuracies too), each
    with ``sd``: the sample standard deviation over runs of the figures that vary."""
    out: dict[str, dict[str, Any]] = {}
    for name in runs[0]["methods"]:
        per_run = [r["methods"][name] for r in runs]
        m: dict[str, Any] = dict(per_run[0])  # non-numeric entries (paths) from the first run
        for key in NUMERIC:
            values = [r[key] for r in per_run]
            m[key] = None if None in values else statistics.fmean(values)
        tasks = per_run[0]["general_acc_after_by_task"]
        m["general_acc_after_by_task"] = {
            t: statistics.fmean(r["general_acc_after_by_task"][t] for r in per_run) for t in tasks}
        m["sd"] = {key: _sd([r[key] for r in per_run])
                   for key in ("downstream_acc", "general_acc_after", "train_seconds")}
        if "svd_export" in m:
            m["svd_export"] = {rank: {key: statistics.fmean(r["svd_export"][rank][key]
                                                            for r in per_run)
                                      for key in figures}
                               for rank, figures in m["svd_export"].items()}
        out[name] = m
    return out


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def tolerance(a: float, b: float, n: int, sd_a: float = 0.0, sd_b: float = 0.0,
              runs: int = 1) -> float:
    """``Z`` standard errors of ``a - b``: two accuracies on ``n`` items each (binomial
    error) and, when they are means over ``runs`` seeds, the seeds' spread."""
    var = (a * (1 - a) + b * (1 - b)) / max(n, 1) + (sd_a**2 + sd_b**2) / runs
    return Z * math.sqrt(var)


def chance_overlap(sizes: Sequence[Sequence[tuple[int, int]]], num_experts: int, *,
                   draws: int = 2000, seed: int = 0) -> list[float]:
    """Draws of the mean Jaccard overlap of random expert sets of the given sizes.

    ``sizes`` holds, per pair of tasks, per layer, the two selected sets' sizes; each
    draw picks every set uniformly at random and averages the Jaccard index over the
    layers and then the pairs, as ``routing_report.jaccard`` and the report do."""
    rng = random.Random(seed)
    experts = range(num_experts)
    out = []
    for _ in range(draws):
        pairs = []
        for layers in sizes:
            values = []
            for m, n in layers:
                a, b = set(rng.sample(experts, m)), set(rng.sample(experts, n))
                values.append(len(a & b) / len(a | b) if a | b else 1.0)
            pairs.append(sum(values) / len(values))
        out.append(sum(pairs) / len(pairs))
    return out


def quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]


def judge(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every claim: ``value`` (the figures it is judged on), ``holds`` on the means
    (True, False, or None when not measurable), and for the fine-tuning claims
    ``held_in`` (runs in which it held) of ``runs``."""
    base = report["base"]
    n_test = report["settings"]["test_items"]
    n_general = report["settings"]["general_test_items"] * len(base["general_acc_by_task"])
    out: dict[str, dict[str, Any]] = {}
    for name in ("esft_token", "esft_gate"):
        out[f"{name}_matches_fft_downstream"] = _over_runs(
            report, lambda m, k, n=name: _matches(m, n, "fft", n_test, k, before=base))
        out[f"{name}_forgets_less_than_fft"] = _over_runs(
            report, lambda m, k, n=name: _forgets_less(m, n, "fft", n_general, k))
    out["esft_token_beats_random"] = _over_runs(
        report, lambda m, k: _beats(m, "esft_token", "random", n_test, k, before=base))
    r = report["routing"]
    cover = r["concentration"][report["finetune_task"]]["cover_50"]
    out["routing_concentrated"] = {
        "value": {"cover_50": cover, "uniform": r["uniform"]["cover_50"]},
        "holds": cover < r["uniform"]["cover_50"]}
    out["tasks_use_different_experts"] = {
        "value": {"mean_overlap": r["mean_overlap"], "chance_mean": r["chance_overlap"],
                  f"chance_p{int(CHANCE_QUANTILE * 100)}": r["chance_overlap_p95"]},
        "holds": r["mean_overlap"] <= r["chance_overlap_p95"]}
    return out


def _over_runs(report: Mapping[str, Any], check: Any) -> dict[str, Any]:
    """``check(methods, runs)`` on the means, then on each run alone (``runs`` = 1)."""
    runs = report["runs"]
    verdict = check(report["methods"], len(runs))
    each = [check(r["methods"], 1)["holds"] for r in runs]
    return verdict | {"held_in": sum(h is True for h in each), "runs": len(runs)}


def _acc(m: Mapping[str, Any], key: str) -> tuple[float, float]:
    return m[key], m.get("sd", {}).get(key, 0.0)


def _matches(methods: Mapping[str, Any], name: str, ref: str, n: int, runs: int, *,
             before: Mapping[str, Any]) -> dict[str, Any]:
    """``name`` is within noise of ``ref`` downstream, or above it; not measurable when
    ``ref`` gained nothing measurable on the base."""
    (a, sa), (b, sb) = _acc(methods[name], "downstream_acc"), _acc(methods[ref], "downstream_acc")
    tol = tolerance(a, b, n, sa, sb, runs)
    base = before["downstream_acc"]
    gained = b - base > tolerance(b, base, n)
    return {"value": {name: a, ref: b, "tolerance": round(tol, 4)},
            "holds": a >= b - tol if gained else None}


def _beats(methods: Mapping[str, Any], name: str, ref: str, n: int, runs: int, *,
           before: Mapping[str, Any]) -> dict[str, Any]:
    """``name`` above ``ref`` downstream by more than noise; not measurable when
    neither gained on the base."""
    (a, sa), (b, sb) = _acc(methods[name], "downstream_acc"), _acc(methods[ref], "downstream_acc")
    tol = tolerance(a, b, n, sa, sb, runs)
    top, base = max(a, b), before["downstream_acc"]
    gained = top - base > tolerance(top, base, n)
    return {"value": {name: a, ref: b, "tolerance": round(tol, 4)},
            "holds": a - b > tol if gained else None}


def _forgets_less(methods: Mapping[str, Any], name: str, ref: str, n: int, runs: int
                  ) -> dict[str, Any]:
    """``name`` keeps more general accuracy than ``ref`` by more than noise; not
    measurable when neither forgot measurably (nothing to forget less of)."""
    (a, sa), (b, sb) = (_acc(methods[name], "general_acc_after"),
                        _acc(methods[ref], "general_acc_after"))
    before = methods[ref]["general_acc_before"]
    tol = tolerance(a, b, n, sa, sb, runs)
    forgot = before - min(a, b) > tolerance(before, min(a, b), n)
    forget = {name: round(before - a, 4), ref: round(before - b, 4)}
    return {"value": {"forgetting": forget, "tolerance": round(tol, 4)},
            "holds": a - b > tol if forgot else None}

"""The demo's report: routing figures, the method table, report.json/.md and plots."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from esft_rs.routing import RoutingStats
from esft_rs.routing_report import COVERAGE, chance_jaccard, jaccard, summarize, uniform_cover
from esft_rs.selection import Selection, select

LABELS = {"fft": "FFT", "esft_token": "ESFT-Token", "esft_gate": "ESFT-Gate",
          "random": "Random experts"}


def routing_figures(stats: dict[str, RoutingStats], top_p: float) -> dict[str, Any]:
    """Concentration per task and pairwise overlap of the token-selected experts."""
    summaries = {name: summarize(name, select(s, score="token", top_p=top_p))
                 for name, s in stats.items()}
    num_experts = next(iter(stats.values())).num_experts
    concentration = {
        name: {f"cover_{int(p * 100)}": round(t.mean_cover(p), 2) for p in COVERAGE}
        | {"selected": round(t.mean_selected, 2)}
        for name, t in summaries.items()
    }
    uniform = {f"cover_{int(p * 100)}": uniform_cover(num_experts, p) for p in COVERAGE}
    overlap = {}
    for a, b in itertools.combinations(summaries, 2):
        sa, sb = summaries[a].selection, summaries[b].selection
        overlap[f"{a}/{b}"] = round(jaccard(sa, sb), 3)
    chance = [chance_jaccard(summaries[a].selection, summaries[b].selection, num_experts)
              for a, b in itertools.combinations(summaries, 2)]
    return {
        "num_experts": num_experts,
        "top_p": top_p,
        "concentration": concentration,
        "uniform": uniform,
        "overlap": overlap,
        "mean_overlap": round(sum(overlap.values()) / max(len(overlap), 1), 3),
        "chance_overlap": round(sum(chance) / max(len(chance), 1), 3),
    }


def claims(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The paper's claims, each checked against the measured figures."""
    m = report["methods"]
    before = report["base"]["downstream_acc"]
    fft_gain = m["fft"]["downstream_acc"] - before
    out = {}
    # None: not measurable (FFT gained nothing downstream, or the base knew no general task).
    measurable = fft_gain > 0
    knew = report["base"]["general_acc"] > 0
    forget_fft = m["fft"]["general_acc_before"] - m["fft"]["general_acc_after"]
    for name in ("esft_token", "esft_gate"):
        gain = m[name]["downstream_acc"] - before
        kept = round(gain / fft_gain, 3) if measurable else None
        out[f"{name}_keeps_90pct_of_fft_gain"] = {
            "value": kept, "holds": None if kept is None else kept >= 0.9}
        forget_esft = m[name]["general_acc_before"] - m[name]["general_acc_after"]
        out[f"{name}_forgets_less_than_fft"] = {
            "value": [round(forget_esft, 3), round(forget_fft, 3)],
            "holds": forget_esft < forget_fft if knew else None,
        }
    token, rand = m["esft_token"]["downstream_acc"], m["random"]["downstream_acc"]
    out["esft_token_beats_random"] = {
        "value": [token, rand], "holds": token > rand if measurable else None}
    out["routing_concentrated"] = {
        "value": [report["routing"]["concentration"][report["finetune_task"]]["cover_50"],
                  report["routing"]["uniform"]["cover_50"]],
        "holds": report["routing"]["concentration"][report["finetune_task"]]["cover_50"]
        < report["routing"]["uniform"]["cover_50"],
    }
    out["tasks_use_different_experts"] = {
        # Mean Jaccard of the selected sets, and that of random sets of the same sizes.
        "value": [report["routing"]["mean_overlap"], report["routing"]["chance_overlap"]],
        "holds": report["routing"]["mean_overlap"] < 0.5,
    }
    return out


def verdict(holds: bool | None) -> str:
    return {True: "holds", False: "does NOT hold", None: "not measurable"}[holds]


def method_table(report: dict[str, Any]) -> list[str]:
    """Markdown rows: the paper's Tables 1/2/4 in miniature."""
    rows = [
        "| method | downstream acc | general acc (before -> after) | trained params | adapter |"
        " train s |",
        "|---|---|---|---|---|---|",
    ]
    base = report["base"]
    rows.append(f"| base | {base['downstream_acc']:.3f} | {base['general_acc']:.3f} | - | - | - |")
    for name, m in report["methods"].items():
        share = m["trainable_params"] / m["total_params"]
        rows.append(
            f"| {LABELS[name]} | {m['downstream_acc']:.3f} | {m['general_acc_before']:.3f} -> "
            f"{m['general_acc_after']:.3f} | {share:.1%} | {m['adapter_bytes'] / 2**20:.2f} MiB"
            f" | {m['train_seconds']:.1f} |"
        )
    return rows


def forgetting_table(report: dict[str, Any]) -> list[str]:
    """Markdown rows: each general task's exact match in the base and after each method."""
    tasks = list(report["base"]["general_acc_by_task"])
    rows = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    by_model = {"base": report["base"]["general_acc_by_task"]} | {
        LABELS[name]: m["general_acc_after_by_task"] for name, m in report["methods"].items()}
    for label, accs in by_model.items():
        rows.append(f"| {label} | " + " | ".join(f"{accs[t]:.2f}" for t in tasks) + " |")
    return rows


def routing_table(report: dict[str, Any]) -> list[str]:
    r = report["routing"]
    rows = [
        f"Experts per layer covering 50% / 90% of token selections (uniform: "
        f"{r['uniform']['cover_50']} / {r['uniform']['cover_90']} of {r['num_experts']}); "
        f"experts selected at top-p {r['top_p']}:",
        "",
        "| task | cover 50% | cover 90% | selected |",
        "|---|---|---|---|",
    ]
    for name, c in r["concentration"].items():
        rows.append(f"| {name} | {c['cover_50']} | {c['cover_90']} | {c['selected']} |")
    rows += ["", f"Mean Jaccard overlap of selected experts between tasks: {r['mean_overlap']}"
             f" (random sets of the same sizes: {r['chance_overlap']})."]
    return rows


def write_report(report: dict[str, Any], stats: dict[str, RoutingStats],
                 selections: dict[str, Selection], out: Path) -> None:
    from esft_rs.outputs import write_file

    report["claims"] = claims(report)
    plots = _plots(report, selections, out)
    report["plots"] = plots
    write_file(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    lines = ["# esft-rs demo report", "", f"Downstream task: `{report['finetune_task']}`.", ""]
    lines += [*method_table(report), "", "General tasks, exact match:", "",
              *forgetting_table(report), "", "## Routing", "", *routing_table(report)]
    lines += ["", "## The paper's claims, measured here", ""]
    for claim, v in report["claims"].items():
        lines.append(f"- {claim}: {verdict(v['holds'])} ({v['value']})")
    m = report["merge"]
    lines += ["", f"Merged ESFT-Token model: downstream acc {m['downstream_acc']:.3f}, in memory "
              f"{m['in_memory_acc']:.3f} ({'equal' if m['equal'] else 'DIFFERENT'})."]
    if plots:
        lines += ["", *[f"![{Path(p).stem}]({Path(p).name})" for p in plots]]
    write_file(out / "report.md", "\n".join(lines) + "\n")


def _plots(report: dict[str, Any], selections: dict[str, Selection], out: Path) -> list[str]:
    """Routing heatmap and accuracy vs trainable share, when matplotlib is installed."""
    try:
        import matplotlib
    except ImportError:
        return []
    from esft_rs.plot import heatmap, save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / "routing-heatmap.png", out / "accuracy-vs-share.png"]
    heatmap(selections["token"], paths[0])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, m in report["methods"].items():
        share = m["trainable_params"] / m["total_params"]
        ax.scatter(share, m["downstream_acc"], label=LABELS[name])
        ax.annotate(LABELS[name], (share, m["downstream_acc"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("share of parameters trained")
    ax.set_ylabel("downstream exact match")
    fig.tight_layout()
    save_figure(fig, paths[1])
    plt.close(fig)
    return [p.name for p in paths]

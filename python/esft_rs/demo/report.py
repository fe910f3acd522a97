"""The demo's report: routing figures, the method table, report.json/.md and plots."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from esft_rs.demo.claims import CHANCE_QUANTILE, chance_overlap, judge, quantile
from esft_rs.routing.report import COVERAGE, chance_jaccard, jaccard, summarize, uniform_cover
from esft_rs.routing.selection import Selection, select
from esft_rs.routing.stats import RoutingStats

LABELS = {"fft": "FFT", "esft_token": "ESFT-Token", "esft_gate": "ESFT-Gate",
          "random": "Random experts", "lora_r2": "ESFT-LoRA r2", "lora_r8": "ESFT-LoRA r8"}
#: Marker and size per method in accuracy-vs-share.png: coinciding points stay apart.
MARKERS = {"fft": ("s", 7), "esft_token": ("o", 12), "esft_gate": ("^", 7),
           "random": ("x", 7), "lora_r2": ("v", 7), "lora_r8": ("D", 6)}


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
    pairs = list(itertools.combinations(summaries, 2))
    chance = [chance_jaccard(summaries[a].selection, summaries[b].selection, num_experts)
              for a, b in pairs]
    # The same overlap for random sets of the same sizes, drawn: the claim that tasks use
    # different experts holds when the measured overlap is no higher than most draws.
    sets = {name: t.selection.experts for name, t in summaries.items()}
    sizes = [[(len(sets[a][layer]), len(sets[b][layer]))
              for layer in sorted(set(sets[a]) & set(sets[b]))] for a, b in pairs]
    draws = chance_overlap(sizes, num_experts)
    return {
        "num_experts": num_experts,
        "top_p": top_p,
        "concentration": concentration,
        "uniform": uniform,
        "overlap": overlap,
        "mean_overlap": round(sum(overlap.values()) / max(len(overlap), 1), 3),
        "chance_overlap": round(sum(chance) / max(len(chance), 1), 3),
        "chance_overlap_p95": round(quantile(draws, CHANCE_QUANTILE), 3),
    }


def share_on_selected(stats: dict[str, RoutingStats], selection: Selection) -> dict[str, Any]:
    """How much each task relies on the experts ESFT trains: per task, the share of its
    token selections that land on ``selection``'s experts (mean over layers), and the
    share uniform routing would give them. A general task that puts much of its routing
    there is the one fine-tuning those experts can make forget."""
    shares = {}
    for name, st in stats.items():
        scores = st.token_scores()
        shares[name] = round(float(sum(
            scores[i, selection.experts.get(layer, [])].sum() for i, layer in enumerate(st.layers)
        ) / st.num_layers), 3)
    st = next(iter(stats.values()))
    uniform = sum(len(selection.experts.get(layer, [])) for layer in st.layers) / (
        st.num_layers * st.num_experts)
    return {"by_task": shares, "uniform": round(uniform, 3)}


def verdict(holds: bool | None) -> str:
    return {True: "holds", False: "does NOT hold", None: "not measurable"}[holds]


#: What a smoke run (``--quick``) says in place of the claims.
SMOKE_NOTE = ("Smoke run (--quick): every step ran, on a model and data far too small to measure"
              " anything; the figures are not results and no claim is judged. Run without"
              " --quick for the measured report.")


def claim_lines(report: dict[str, Any]) -> list[str]:
    """One line per claim: the verdict on the means, in how many runs it held, the figures
    (a smoke run: the note that it judges none)."""
    if report.get("smoke"):
        return [SMOKE_NOTE]
    lines = []
    for claim, v in report["claims"].items():
        runs = f", held in {v['held_in']} of {v['runs']} runs" if "runs" in v else ""
        lines.append(
            f"- {claim}: **{verdict(v['holds'])}** on the means{runs} ({_brief(v['value'])})")
    return lines


def _brief(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_brief(v)}" for k, v in value.items())
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _pm(m: dict[str, Any], key: str) -> str:
    """Mean ± sample standard deviation over the runs."""
    return f"{m[key]:.3f} ± {m['sd'][key]:.3f}"


def method_table(report: dict[str, Any]) -> list[str]:
    """Markdown rows: the paper's Tables 1/2/4 in miniature."""
    runs = len(report["runs"])
    rows = [
        f"Mean ± standard deviation over {runs} fine-tuning seeds; learning rate chosen per "
        "method on the validation split.",
        "",
        "| method | downstream acc | general acc (before -> after) | trained params | adapter |"
        " LR | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    base = report["base"]
    rows.append(f"| base | {base['downstream_acc']:.3f} | {base['general_acc']:.3f} | - | - | - |"
                " - |")
    for name, m in report["methods"].items():
        share = m["trainable_params"] / m["total_params"]
        rows.append(
            f"| {LABELS[name]} | {_pm(m, 'downstream_acc')} | {m['general_acc_before']:.3f} -> "
            f"{_pm(m, 'general_acc_after')} | {share:.1%} | {m['adapter_bytes'] / 2**20:.2f} MiB"
            f" | {report['learning_rates'][name]['learning_rate']:g}"
            f" | {m['train_seconds']:.1f} |"
        )
    return rows


def svd_lines(report: dict[str, Any]) -> list[str]:
    """ESFT-Token's adapter served as LoRA: its SVD exports against the full adapter."""
    m = report["methods"].get("esft_token", {})
    if "svd_export" not in m:
        return []
    ranks = ", ".join(f"rank {r.removeprefix('r')} {f['downstream_acc']:.3f} (relative error"
                      f" {f['relative_error']:.3f})" for r, f in m["svd_export"].items())
    return ["", f"ESFT-Token's adapter exported as PEFT LoRA by truncated SVD (`esft-rs export"
            f" --rank`) and merged back, downstream acc (mean over the seeds): {ranks}; the"
            f" full adapter {m['downstream_acc']:.3f}."]


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
             f" (random sets of the same sizes: {r['chance_overlap']} on average, "
             f"{r['chance_overlap_p95']} at the 95th percentile)."]
    if "share_on_selected" in r:
        share = r["share_on_selected"]
        rows += ["", "Share of each task's token selections that land on the experts ESFT-Token"
                 f" trains (uniform routing: {share['uniform']}): "
                 + ", ".join(f"{k} {v}" for k, v in share["by_task"].items()) + "."]
    return rows


def write_report(report: dict[str, Any], stats: dict[str, RoutingStats],
                 selections: dict[str, Selection], out: Path) -> None:
    from esft_rs.files.outputs import write_file

    smoke = bool(report["settings"].get("smoke"))
    report["smoke"] = smoke
    report["claims"] = {} if smoke else judge(report)
    plots = _plots(report, selections, out)
    report["plots"] = plots
    write_file(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    lines = ["# esft-rs demo report", ""]
    if smoke:
        lines += [f"**{SMOKE_NOTE}**", ""]
    lines += [f"Downstream task: `{report['finetune_task']}`.", ""]
    lines += [*method_table(report), *svd_lines(report), "", "General tasks, exact match:", "",
              *forgetting_table(report), "", "## Routing", "", *routing_table(report)]
    lines += ["", "## The paper's claims, measured here", ""]
    if not smoke:
        lines += ["Judged on the means; a difference counts when it exceeds two standard errors "
                  "(test-split sampling and the seeds' spread), and an overlap when it exceeds"
                  " the 95th percentile of random sets of the same sizes.", ""]
    lines += claim_lines(report)
    lines += ["", "Learning rates (validation exact match / loss per rate, first seed; the "
              "best exact match, ties to the lower loss):", ""]
    for name, t in report["learning_rates"].items():
        loss = t.get("validation_loss", {})
        grid = ", ".join(f"{lr}: {acc:.3f}" + (f" / {loss[lr]:.2g}" if lr in loss else "")
                         for lr, acc in t["validation_acc"].items())
        lines.append(f"- {LABELS[name]}: {t['learning_rate']:g} ({grid})")
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
    from esft_rs.routing.plot import heatmap, save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / "routing-heatmap.png", out / "accuracy-vs-share.png"]
    heatmap(selections["token"], paths[0], task=f"task {report['finetune_task']}")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    # ESFT-Token and random experts train the same share, and methods often reach the same
    # accuracy: points may coincide, so each has its own marker and size (the larger ones
    # hollow) and a legend names them; no text labels beside the points, which overlapped.
    for name, m in report["methods"].items():
        marker, size = MARKERS.get(name, ("o", 6))
        ax.plot(m["trainable_params"] / m["total_params"], m["downstream_acc"], marker,
                markersize=size, mfc="none", mew=1.5, linestyle="none", label=LABELS[name])
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("share of parameters trained")
    ax.set_ylabel("downstream exact match")
    ax.set_title(f"task {report['finetune_task']}" + (" (smoke run: no measurement)"
                                                      if report.get("smoke") else ""),
                 fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    save_figure(fig, paths[1])
    plt.close(fig)
    return [p.name for p in paths]

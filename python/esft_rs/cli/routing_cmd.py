"""``esft-rs select`` and ``esft-rs routing-report`` (no torch)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from esft_rs._core import MAX_EXPERTS
from esft_rs.routing import scoring
from esft_rs.routing.scoring import OFFICIAL_TOP_K

if TYPE_CHECKING:  # the commands import numpy-backed modules when they run, not at --help
    from esft_rs.routing.report import TaskSummary
    from esft_rs.routing.selection import Selection

ROUTING = click.argument(
    "routing", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path)
)


def _score_options(f: Callable[..., None]) -> Callable[..., None]:
    """The scoring options shared by select and routing-report."""
    options = [
        click.option(
            "--score", type=click.Choice(scoring.SCORES), default="token", show_default=True,
            help="Token selection ratio or average gate score.",
        ),
        click.option(
            "--top-p", type=float, default=None,
            help="Cumulative score to reach per layer, in (0, 1] [default: 0.2 for token, "
            "0.1 for gate scores, as in the paper].",
        ),
        click.option(
            "--average", type=click.Choice(scoring.AVERAGES), default="tokens", show_default=True,
            help="Average over all tokens (official files) or per sample first (paper).",
        ),
        click.option(
            "--round", "decimals", type=click.IntRange(0, scoring.MAX_DECIMALS), default=None,
            help="Round scores to N decimals before selecting (the official configs: 4).",
        ),
        click.option(
            "--top-k", type=click.IntRange(1, MAX_EXPERTS), default=OFFICIAL_TOP_K,
            show_default=True,
            help="Experts per token in official log folders.",
        ),
        click.option(
            "--num-experts", type=click.IntRange(1, MAX_EXPERTS), default=None,
            help="Routed experts per layer in official log folders [default: max id + 1].",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _check_top_p(top_p: float | None) -> None:
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise click.BadParameter(f"{top_p} is not in (0, 1]", param_hint="'--top-p'")


@click.command("select")
@ROUTING
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
    help="Expert config to write (official JSON format).",
)
@_score_options
@click.option("--shared-experts", is_flag=True, help="Also train the shared experts.")
@click.option("--non-expert-modules", is_flag=True, help="Also train non-expert modules.")
@click.option(
    "--summary", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Also write the official summary.json (both scores, 4 decimals).",
)
@click.option(
    "--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Also write a layer x expert heatmap of the scores (needs matplotlib).",
)
def select_cmd(
    routing: tuple[Path, ...],
    output: Path,
    score: scoring.Score,
    top_p: float | None,
    average: scoring.Average,
    decimals: int | None,
    top_k: int,
    num_experts: int | None,
    shared_experts: bool,
    non_expert_modules: bool,
    summary: Path | None,
    plot: Path | None,
) -> None:
    """Choose the experts to train from routing statistics.

    ROUTING: routing-stats files (from `esft-rs profile`) or official log
    folders (expert_weights_<layer>.txt, directly or in rank_* folders); several
    are summed. Per layer, experts are taken by descending score until their
    cumulative score reaches --top-p (the expert that crosses is kept).
    """
    from esft_rs.files.expert_config import OUTPUT_KIND as EXPERT_CONFIG
    from esft_rs.files.outputs import PLOT, SUMMARY, check_outputs, check_target, staged_together
    from esft_rs.routing.selection import select, summary_json

    _check_top_p(top_p)
    check_outputs([output, summary, plot], routing)
    for path, kind in ((output, EXPERT_CONFIG), (summary, SUMMARY), (plot, PLOT)):
        if path is not None:
            check_target(path, kind=kind)
    if plot is not None:
        from esft_rs.routing.plot import MISSING, check_plot_path

        try:
            check_plot_path(plot)
        except ImportError:
            raise click.UsageError(MISSING) from None
    sel = select(
        list(routing), score=score, top_p=top_p, average=average, decimals=decimals,
        top_k=top_k, num_experts=num_experts,
    )
    _print_selection(sel)
    # All outputs are staged first and committed together: a failing plot leaves none.
    with staged_together({p: False for p in (output, summary, plot) if p is not None}) as tmp:
        tmp[output].write_text(sel.config(shared_experts, non_expert_modules).to_json() + "\n")
        if summary is not None:
            tmp[summary].write_text(summary_json(sel.stats))
        if plot is not None:
            from esft_rs.routing.plot import heatmap

            heatmap(sel, tmp[plot], format=plot.suffix.lstrip(".") or None)
    click.echo(f"wrote {', '.join(str(p) for p in tmp)}")


def _print_selection(sel: Selection) -> None:
    stats = sel.stats
    e = stats.num_experts
    echo = click.echo
    echo(f"{'layer':>5} {'tokens':>9} {'experts':>7} {'cum.score':>9} {'share':>6}  selected")
    for row, layer in enumerate(stats.layers):
        ids = sel.experts.get(int(layer))
        if ids is None:
            echo(f"{layer:>5} {int(stats.tokens[row]):>9} {'-':>7} {'-':>9} {'-':>6}  (no tokens)")
            continue
        echo(
            f"{layer:>5} {int(stats.tokens[row]):>9} {len(ids):>7} {sel.cumulative[layer]:>9.4f}"
            f" {len(ids) / e:>6.1%}  {' '.join(map(str, ids))}"
        )
    chosen = sum(len(v) for v in sel.experts.values())
    total = e * len(sel.experts)
    echo(
        f"{chosen} of {total} routed experts ({chosen / max(total, 1):.1%}) in"
        f" {len(sel.experts)} layers; {sel.score} score, top-p {sel.top_p}"
    )
    if sel.empty_layers:
        click.echo(
            f"warning: layers {', '.join(map(str, sel.empty_layers))} saw no tokens;"
            " no experts selected there",
            err=True,
        )


@click.command("routing-report")
@ROUTING
@_score_options
def routing_report_cmd(
    routing: tuple[Path, ...],
    score: scoring.Score,
    top_p: float | None,
    average: scoring.Average,
    decimals: int | None,
    top_k: int,
    num_experts: int | None,
) -> None:
    """Concentration of routing per task, and overlap of selected experts between tasks.

    Each ROUTING (routing-stats file or official log folder) is one task. Prints,
    per layer, how many experts cover 50% and 90% of the task's token selections,
    then the Jaccard overlap of the selected expert sets between tasks.
    """
    from esft_rs.routing.report import summarize
    from esft_rs.routing.selection import select
    from esft_rs.routing.stats import check_same_model

    _check_top_p(top_p)
    names = _task_names(routing)
    tasks = [
        summarize(
            name,
            select(
                path, score=score, top_p=top_p, average=average, decimals=decimals,
                top_k=top_k, num_experts=num_experts,
            ),
        )
        for name, path in zip(names, routing, strict=True)
    ]
    check_same_model([t.selection.stats for t in tasks], [str(p) for p in routing])
    for t, path in zip(tasks, routing, strict=True):
        st = t.selection.stats
        if empty := [int(layer) for layer, n in zip(st.layers, st.tokens, strict=True) if not n]:
            from esft_rs.formatting import id_ranges

            click.echo(f"warning: {path}: no tokens in layer{'s' if len(empty) > 1 else ''}"
                       f" {id_ranges(empty)}; left out of the figures (shown as -)", err=True)
    _print_concentration(tasks)
    click.echo()
    _print_overlap(tasks)


def _task_names(paths: tuple[Path, ...]) -> list[str]:
    from esft_rs.routing.stats import source_name

    names = [Path(source_name(p)).stem or str(p) for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _print_concentration(tasks: list[TaskSummary]) -> None:
    from esft_rs.routing.report import COVERAGE
    from esft_rs.routing.report import uniform_cover as uniform

    echo = click.echo
    lo, hi = COVERAGE
    experts = sorted({t.selection.stats.num_experts for t in tasks})
    uni = ", ".join(f"{uniform(e, lo)}/{uniform(e, hi)} of {e}" for e in experts)
    echo(
        f"Concentration: experts covering {lo:.0%}/{hi:.0%} of token selections per layer"
        f" (uniform routing: {uni})"
    )
    width = max(11, *(len(t.name) for t in tasks))
    echo(f"{'layer':>5}" + "".join(f" {t.name:>{width}}" for t in tasks))
    layers = sorted({layer for t in tasks for layer in t.cover[lo]})
    for layer in layers:
        cells = []
        for t in tasks:
            a, b = t.cover[lo].get(layer), t.cover[hi].get(layer)
            cells.append("-" if a is None else f"{a}/{b}")
        echo(f"{layer:>5}" + "".join(f" {c:>{width}}" for c in cells))
    means = [f"{_f(t.mean_cover(lo), 1)}/{_f(t.mean_cover(hi), 1)}" for t in tasks]
    echo(f"{'mean':>5}" + "".join(f" {m:>{width}}" for m in means))


def _print_overlap(tasks: list[TaskSummary]) -> None:
    from esft_rs.routing.report import chance_jaccard, jaccard

    echo = click.echo
    first = tasks[0].selection
    echo(
        f"Overlap of selected experts ({first.score} score, top-p {first.top_p}):"
        " Jaccard index, mean over layers (chance level in brackets)"
    )
    width = max(13, *(len(t.name) for t in tasks))
    echo(f"{'':>{width}}" + "".join(f" {t.name:>{width}}" for t in tasks))
    for a in tasks:
        cells = []
        for b in tasks:
            e = a.selection.stats.num_experts
            j, c = jaccard(a.selection, b.selection), chance_jaccard(a.selection, b.selection, e)
            cells.append(_f(j, 2) if a is b else f"{_f(j, 2)} ({_f(c, 2)})")
        echo(f"{a.name:>{width}}" + "".join(f" {c:>{width}}" for c in cells))
    echo(
        "selected per layer (mean): "
        + ", ".join(f"{t.name} {_f(t.mean_selected, 1)}" for t in tasks)
    )


def _f(x: float, digits: int) -> str:
    """A figure, or - where there is none (NaN: no layer had tokens)."""
    return "-" if x != x else f"{x:.{digits}f}"

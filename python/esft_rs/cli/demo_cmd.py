"""``esft-rs demo``."""

from __future__ import annotations

from pathlib import Path

import click

from esft_rs.cli.params import SEED, output_option


@click.command("demo")
@output_option("Directory for report.json, report.md, plots and runs.", name="out",
               type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--quick", is_flag=True, help="A smaller run (tiny model, fewer steps): < 1 minute.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("-j", "--jobs", type=click.IntRange(1), default=None,
              help="Fine-tuning runs at a time, each in its own process on one thread"
              " [default: the CPUs available, at most 8]. The figures do not depend on it.")
def demo_cmd(out: Path, quick: bool, seed: int, jobs: int | None) -> None:
    """ESFT end to end on a built-in MoE model, CPU only, in a few minutes.

    Pretrains a small DeepSeek-style MoE on generated general tasks (cached),
    profiles routing per task, fine-tunes a downstream task with FFT, ESFT-Token,
    ESFT-Gate and random experts, and reports accuracy, forgetting, trainable
    share and adapter size, as the paper's tables do.
    """
    from dataclasses import replace

    from esft_rs.demo.pipeline import OUTPUTS, run
    from esft_rs.demo.report import claim_lines, method_table, routing_table
    from esft_rs.demo.settings import FULL, QUICK
    from esft_rs.files.outputs import check_kind, check_outputs, check_target, staged

    settings = replace(QUICK if quick else FULL, seed=seed)
    check_outputs([out], [])
    check_target(out, keep=OUTPUTS)  # replaces an earlier demo's output, nothing else
    check_kind(out, directory=True)
    with staged(out, directory=True, keep=OUTPUTS) as tmp:
        report = run(tmp, settings, final=out, jobs=jobs)
    echo = click.echo
    echo()
    if report["smoke"]:
        echo("SMOKE RUN (--quick): the figures below show that every step runs; they measure"
             " nothing.")
        echo()
    for line in [*method_table(report), "", *routing_table(report)]:
        echo(line)
    echo()
    for line in claim_lines(report):
        echo(line)
    m = report["merge"]
    echo(f"merged model accuracy {m['downstream_acc']:.3f} == in-memory "
         f"{m['in_memory_acc']:.3f}: {m['equal']}")
    echo(f"\nreport: {out / 'report.md'} and {out / 'report.json'}")

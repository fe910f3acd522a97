"""``esft-rs eval``: answer-token loss and greedy exact match of a model on task data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from esft_rs.cli.model_inputs import chat_template_option, parallelism_option
from esft_rs.cli.params import device_option


@click.command("eval")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument(
    "data", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Conversations per forward pass.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first N conversations.")
@device_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON.")
@click.option("--skip-bad", is_flag=True,
              help="Skip malformed JSONL lines (listed) instead of failing.")
@parallelism_option
@chat_template_option
def eval_cmd(
    model: Path,
    data: tuple[Path, ...],
    batch_size: int,
    limit: int | None,
    device: str,
    output: Path | None,
    skip_bad: bool,
    parallelism: str,
    chat_template: str,
) -> None:
    """Evaluate MODEL (built-in or a transformers family; merge an adapter first) on
    DATA (chat data: .jsonl, .jsonl.gz, .parquet): mean loss and perplexity over the
    answer tokens, and the share of conversations whose last turn greedy decoding
    reproduces exactly.

    Conversations are formatted as for training, one per row (never packed); one
    teacher-forced pass scores both (no decoding loop). Under torchrun the ranks share
    the batches (the model sharded over them with --parallelism fsdp) and rank 0 prints
    and writes the figures of one process.
    """
    from dataclasses import asdict, replace

    from tqdm import tqdm

    from esft_rs.cli.model_inputs import load, task_inputs
    from esft_rs.data.preflight import context_length
    from esft_rs.distributed import process_group
    from esft_rs.evaluation import evaluate
    from esft_rs.files.outputs import EVAL, check_outputs, check_target, write_file

    check_outputs([output], [model, *data])
    if output is not None:
        check_target(output, kind=EVAL)
    dev, tokenizer, task = task_inputs(model, data, device, skip_bad, chat_template)
    if limit is not None:
        task = replace(task, conversations=task.conversations[:limit], sources=task.sources[:limit])
    with process_group(dev) as place:
        net = load(model, place, dev, parallelism)
        bars: list[tqdm] = []  # opened once the inputs are checked, so an error is the only line
        # rank 0's share of the batches (batch i runs on rank i mod world size)
        mine = sum(len(task.conversations[i : i + batch_size])
                   for i in range(0, len(task.conversations), batch_size * place.world))

        def advance(n: int) -> None:
            if not bars:
                bars.append(tqdm(total=mine, unit="conv", desc="eval", dynamic_ncols=True))
            bars[0].update(n)

        try:
            result = evaluate(net, tokenizer, task, batch_size=batch_size,
                              max_length=context_length(net),
                              progress=advance if place.main else None)
        finally:
            for bar in bars:
                bar.close()
        if not place.main:
            return
    line = (f"loss {result.loss:.4f} (perplexity {result.perplexity:.2f}) over"
            f" {result.label_tokens} answer tokens of {result.conversations} conversations")
    if result.exact_match is not None:
        line += f"; exact match {result.exact_match:.3f} ({result.correct}/{result.answered})"
    if (unscored := result.conversations - result.answered) > 0:
        line += (f"; {unscored} conversation{'s' if unscored > 1 else ''} not ending in an"
                 " assistant reply to a user: in the loss, not in exact match")
    click.echo(line)
    if output is not None:
        figures = {**asdict(result), "perplexity": result.perplexity,
                   "exact_match": result.exact_match, "model": str(model),
                   "data": [str(d) for d in data]}
        write_file(output, json.dumps(figures, indent=2) + "\n")

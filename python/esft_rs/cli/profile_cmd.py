"""``esft-rs profile``: routing statistics of a model on task data (torch imported inside)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from esft_rs.cli.model_inputs import chat_template_option, parallelism_option
from esft_rs.cli.params import SEED, device_option, output_option, seq_length_option
from esft_rs.training.config import DEFAULT_SEED, TrainConfig

#: ``profiling.DEFAULT_TOKENS``, restated so that --help does not import numpy (a test
#: holds them equal).
DEFAULT_TOKENS = 131072


@click.command("profile")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument(
    "data", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@output_option("Routing-stats file to write (safetensors).", required=True,
               type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--tokens", type=click.IntRange(min=1), default=DEFAULT_TOKENS, show_default=True,
    help="Real tokens to profile: packed rows are taken in order until they hold this many.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Packed rows per forward pass.")
@seq_length_option(
    "Packed row length; a longer one than the model's max_position_embeddings is cut to it,"
    f" as train cuts it [default: {TrainConfig.seq_length}, or the model's context if"
    " smaller].", type=click.IntRange(min=2), default=None,
)
@device_option
@click.option(
    "--records", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Also write every real token's top-K ids and weights (layer_<L>_ids.npy /"
    " layer_<L>_weights.npy; rank_<r>/ folders under torchrun).",
)
@click.option("--skip-bad", is_flag=True, help="Skip bad JSONL lines (listed on stderr).")
@parallelism_option
@click.option("--seed", type=SEED, default=DEFAULT_SEED, show_default=True,
              help="Packing seed (random concatenation), as train's.")
@chat_template_option
def profile_cmd(
    model: Path,
    data: tuple[Path, ...],
    output: Path,
    tokens: int,
    batch_size: int,
    seq_length: int | None,
    device: str,
    records: Path | None,
    skip_bad: bool,
    parallelism: str,
    seed: int,
    chat_template: str,
) -> None:
    """Count which experts route the tokens of task data (the first step of ESFT).

    MODEL: a model directory. DATA: chat data files (.jsonl, .jsonl.gz, .parquet;
    {"messages": [...]}), encoded (--chat-template) and packed as for training. Forward
    passes run without gradients and with a hook on every MoE router; counts and routing
    weights accumulate on the device and padding is never counted. Each packed row is
    one sample for `select --average samples`. Under torchrun every rank profiles a
    disjoint share of the rows and rank 0 writes the file; the result does not depend on
    the number of processes.
    """
    from esft_rs.cli.model_inputs import torch_device
    from esft_rs.routing.profiling import profile_task

    _route_notes()
    result = profile_task(model, data, output, records=records, tokens=tokens,
                          batch_size=batch_size, seq_length=seq_length,
                          device=torch_device(device), parallelism=parallelism,
                          skip_bad=skip_bad, seed=seed, chat_template=chat_template)
    if not result.main:
        return
    stats, world = result.stats, result.world
    note = f" (all the data holds; --tokens {tokens})" if result.available < tokens else ""
    click.echo(
        f"wrote {output}: {result.tokens} tokens{note} in {stats.num_samples} rows of"
        f" {result.seq_length}, {stats.num_layers} MoE layers x {stats.num_experts} experts,"
        f" top-{stats.top_k}; {world} process{'es' if world > 1 else ''} on {result.device},"
        f" {result.seconds:.1f} s"
    )


class _Echo(logging.Handler):
    """The library's notes on stderr: ``warning: skipped ...`` for a skipped data line,
    ``esft-rs: note: ...`` for the others."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if getattr(record, "skipped", False) else "esft-rs: note: "
        click.echo(prefix + record.getMessage(), err=True)


def _route_notes() -> None:
    """``esft_rs.routing.profiling``'s notes go to stderr, from the main process only."""
    logger = logging.getLogger("esft_rs.routing.profiling")
    if not any(isinstance(h, _Echo) for h in logger.handlers):
        main = os.environ.get("RANK", "0") == "0"
        logger.addHandler(_Echo() if main else logging.NullHandler())
        logger.propagate = False

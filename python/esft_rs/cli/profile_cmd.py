"""``esft-rs profile``: routing statistics of a model on task data (torch imported inside)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import click

from esft_rs.cli.model_inputs import chat_template_option, parallelism_option
from esft_rs.cli.params import SEED, device_option, output_option, seq_length_option
from esft_rs.errors import EsftError
from esft_rs.training.config import DEFAULT_SEED

if TYPE_CHECKING:
    from esft_rs.distributed import Dist
    from esft_rs.routing.profiling import Records
    from esft_rs.routing.stats import RoutingStats

#: What the official ESFT scripts profile (``--n_sample_tokens=131072``).
DEFAULT_TOKENS = 131072
#: Packed row length when the model allows it (the data pipeline's default).
DEFAULT_SEQ_LEN = 4096


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
    f"Packed row length [default: {DEFAULT_SEQ_LEN}, or the model's max_position_embeddings if"
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
    from esft_rs.cli.model_inputs import load, task_inputs
    from esft_rs.data.preflight import check_token_ids, context_length
    from esft_rs.distributed import process_group
    from esft_rs.files.outputs import check_outputs, check_target
    from esft_rs.models import as_moe_model
    from esft_rs.routing.profiling import profile_model
    from esft_rs.routing.stats import OUTPUT_KIND as ROUTING

    check_outputs([output, records], [model, *data])
    check_target(output, kind=ROUTING)
    if records is not None and records.parent.is_dir():  # else made (with parents) at the end
        check_target(records)
    dev, tokenizer, task = task_inputs(model, data, device, skip_bad, chat_template)
    with process_group(dev) as place:
        rank, world = place.rank, place.world
        t0 = time.perf_counter()
        moe = as_moe_model(load(model, place, dev, parallelism))
        limit = context_length(moe)
        if seq_length is None:
            seq_length = min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
        elif limit is not None and seq_length > limit:
            raise click.BadParameter(
                f"{seq_length} exceeds the model's max_position_embeddings ({limit})",
                param_hint="'--seq-length'",
            )
        packed = task.pack(tokenizer, seq_length=seq_length, seed=seed)
        ids, mask = packed.input_ids, packed.attention_mask
        check_token_ids(int(ids.min()), int(ids.max()), moe, ",".join(map(str, data)))
        real = mask.sum(dim=1)
        # Rows in order until --tokens; the row that reaches it stays.
        rows = min(int((real.cumsum(0) < tokens).sum()) + 1, len(real))
        ids, mask, real = ids[:rows], mask[:rows], real[:rows]
        batches = [
            (ids[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, rows, batch_size)
        ]
        bar = None
        if rank == 0:
            from tqdm import tqdm

            mine = sum(int(m.sum()) for _, m in batches[::world])
            bar = tqdm(total=mine, unit="tok", unit_scale=True, desc="profile", dynamic_ncols=True)
        metadata = {
            "model": str(model),
            "data": ",".join(map(str, data)),
            "tokens": str(int(real.sum())),
            "seq_len": str(seq_length),
            "seed": str(seed),
            **_fingerprint(model),
        }
        try:
            stats, kept = profile_model(
                moe, batches, keep_records=records is not None, metadata=metadata,
                progress=bar.update if bar is not None else False,
            )
        finally:
            if bar is not None:
                bar.close()
        _write(output, stats, records, kept, place)
        if rank != 0:
            return
        available = int(packed.attention_mask.sum())
        note = f" (all the data holds; --tokens {tokens})" if available < tokens else ""
        click.echo(
            f"wrote {output}: {metadata['tokens']} tokens{note} in {stats.num_samples} rows of"
            f" {seq_length}, {stats.num_layers} MoE layers x {stats.num_experts} experts, top-"
            f"{stats.top_k}; {world} process{'es' if world > 1 else ''} on {dev},"
            f" {time.perf_counter() - t0:.1f} s"
        )


def _write(output: Path, stats: RoutingStats, records: Path | None, kept: Records | None,
           place: Dist) -> None:
    """The stats file and the records folder, committed together by rank 0 (every rank
    calls): a failure leaves neither, and an earlier pair as it was."""
    from esft_rs.distributed import from_rank0
    from esft_rs.files.outputs import staged_together

    with ExitStack() as stack:
        tmp: dict[Path | None, Path] = {}
        if place.main:
            if records is not None:
                records.parent.mkdir(parents=True, exist_ok=True)
            targets = {p: p == records for p in (output, records) if p is not None}
            tmp = stack.enter_context(staged_together(targets))
            stats.save(tmp[output])
        if kept is not None:
            folder = from_rank0(tmp.get(records))
            if place.world > 1:  # rank_<r>/ folders, as profile() writes them
                folder = folder / f"rank_{place.rank}"
                folder.mkdir()
            kept.write(folder)
        place.barrier()  # every rank's records are in; rank 0 commits as the block ends


def _fingerprint(model: Path) -> dict[str, str]:
    """The model's fingerprint for the stats metadata, so that select and routing-report
    can refuse statistics of different models; none for a model without safetensors."""
    from esft_rs.files.adapter import fingerprint
    from esft_rs.routing.stats import MODEL_FINGERPRINT

    try:
        return {MODEL_FINGERPRINT: fingerprint(model)}
    except EsftError:
        return {}


"""``esft-rs plan``: will a training run fit? Memory per rank, from the headers alone."""

from __future__ import annotations

import json
from pathlib import Path

import click

from esft_rs.cli.fmt import byte_unit, human_bytes
from esft_rs.training.config import MAX_SEQ_LENGTH

#: plan's exit code when the run does not fit (0: it fits; 2: bad input).
DOES_NOT_FIT = 3


@click.command("plan")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-e", "--experts", "experts_path", type=click.Path(path_type=Path),
              help="Expert config (JSON) to train; not needed with --mode full.")
@click.option("--mode", type=click.Choice(["esft", "full", "random"]), default="esft",
              show_default=True, help="What trains, as in 'esft-rs train'.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ranks (GPUs) in all; above 1, the figures of each parallelism are shown.")
@click.option("--parallelism", type=click.Choice(["auto", "fsdp", "ddp", "ep"]),
              default="auto", show_default=True,
              help="As in 'esft-rs train': fsdp shards over the ranks, ep spreads the experts,"
              " ddp copies to each; auto takes what fits and moves the fewest bytes.")
@click.option("--seq-length", type=click.IntRange(1, MAX_SEQ_LENGTH), default=4096,
              show_default=True)
@click.option("--per-device-batch-size", type=click.IntRange(min=1), default=1,
              show_default=True)
@click.option("--gradient-accumulation-steps", type=click.IntRange(min=1), default=16,
              show_default=True, help="Micro-steps per optimizer step (for comm_bytes).")
@click.option("--gpu-memory", default="80GiB", show_default=True,
              help="Memory of one device, e.g. 80GiB, 141GB, 24GiB.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True,
              show_default=True)
@click.option("--fsdp-prefetch/--no-fsdp-prefetch", default=True, show_default=True,
              help="As train's fsdp_prefetch: two gathered layers at a time, or one.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda",
              show_default=True, help="cuda computes in bf16, cpu in the checkpoint's dtype.")
@click.option("--lora-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="As in 'esft-rs train': ESFT-LoRA of this rank on the selected experts"
              " (0: ESFT, full weights).")
@click.option("--lora-targets", default="", metavar="NAMES",
              help="As in 'esft-rs train': the projections to adapt, comma-separated; all"
              " when empty.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan_cmd(model: Path, experts_path: Path | None, mode: str, nproc: int, parallelism: str,
             seq_length: int, per_device_batch_size: int,
             gradient_accumulation_steps: int, gpu_memory: str, gradient_checkpointing: bool,
             fsdp_prefetch: bool, device: str, lora_rank: int, lora_targets: str,
             as_json: bool) -> int:
    """Memory per rank of training MODEL (a checkpoint directory): frozen weights, fp32
    master weights, gradients, AdamW state and activations; whether it fits, and what
    to change if not. Reads config.json and the safetensors headers only.

    Exit code: 0 when it fits, 3 when it does not (the figures are printed either way),
    2 on bad input."""
    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.training.planner import parse_size, plan

    try:
        budget = parse_size(gpu_memory)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--gpu-memory") from None
    experts = ExpertConfig.load(experts_path) if experts_path is not None else None
    if lora_rank and parallelism in ("fsdp", "ep"):
        raise click.BadParameter(f"{parallelism}: ESFT-LoRA (--lora-rank) trains under ddp"
                                 " (or auto) only", param_hint="--parallelism")
    if lora_targets and not lora_rank:
        raise click.BadParameter("needs --lora-rank", param_hint="--lora-targets")
    result = plan(model, experts, mode, nproc=nproc, parallelism=parallelism,
                  seq_length=seq_length,
                  per_device_batch_size=per_device_batch_size,
                  gradient_accumulation_steps=gradient_accumulation_steps,
                  gradient_checkpointing=gradient_checkpointing,
                  fsdp_prefetch=fsdp_prefetch, gpu_memory=budget,
                  device=device, origin=str(experts_path or "expert config"),
                  lora_rank=lora_rank,
                  lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()])
    for note in result.notes:
        click.echo(f"esft-rs: note: {note}", err=True)
    seq_length = result.seq_length
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return 0 if result.fits else DOES_NOT_FIT
    echo = click.echo
    ranks = f"{nproc} ranks ({result.parallelism})" if nproc > 1 else "1 rank"
    mode = f"{result.mode} LoRA rank {lora_rank}" if lora_rank else result.mode
    echo(f"{result.model}: {mode} on {ranks},"
         f" {per_device_batch_size} x {seq_length} tokens per device,"
         f" checkpointing {'on' if gradient_checkpointing else 'off'}")
    total = result.total_params
    echo(f"parameters trained: {result.trained_params:,} of {total:,}"
         f" ({result.trained_params / max(1, total):.2%}; the rest frozen);"
         f" adapter {human_bytes(result.adapter_bytes)}")
    rows = [("frozen weights", result.frozen_bytes),
            ("fp32 master weights", result.master_bytes),
            ("fp32 gradients", result.grad_bytes),
            ("AdamW state", result.optimizer_bytes)]
    if result.gather_bytes:
        rows.append(("gathered layers", result.gather_bytes))
    rows += [("activations (estimate)", result.activation_bytes),
             ("total per rank", result.total_bytes)]
    unit = byte_unit(max(result.total_bytes, budget))  # one unit for every figure
    for label, n in rows:
        echo(f"  {label:<24}{human_bytes(n, unit):>12}")
    if result.comm_bytes:
        echo(f"  {'sent + received per step':<24}{human_bytes(result.comm_bytes):>12}")
    verdict = "fits" if result.fits else "does NOT fit"
    echo(f"{verdict} in {human_bytes(budget, unit)} per device")
    if result.options:
        echo(f"{'parallelism':<14}{'per rank':>12}{'moved per step':>16}")
        for how, o in result.options.items():
            mark = ("fits" if o["fits"] else "does not fit") + \
                (" (chosen)" if how == result.parallelism else "")
            echo(f"  {how:<12}{human_bytes(o['total_bytes'], unit):>12}"
                 f"{human_bytes(o['comm_bytes']):>16}  {mark}")
    for line in result.advice:
        echo(f"  - {line}")
    return 0 if result.fits else DOES_NOT_FIT

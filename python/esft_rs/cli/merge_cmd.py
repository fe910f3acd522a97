"""``esft-rs merge`` and ``esft-rs split``."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import click

from esft_rs.cli.fmt import human_bytes, id_ranges
from esft_rs.cli.params import output_option
from esft_rs.cli.progress import StageBars
from esft_rs.files.merging import Extracted, Replacement, merge, split

_EXPERT_KINDS = ("routed_expert", "fused_experts")


def _by_layer(entries: Iterable[Replacement | Extracted]) -> list[str]:
    """'layer L: experts 1,4-6 (N tensors, X MiB)' lines, then one line for the rest."""
    layers: dict[int, list[Replacement | Extracted]] = defaultdict(list)
    others: list[Replacement | Extracted] = []
    for e in entries:
        if e.kind in _EXPERT_KINDS and e.layer is not None:
            layers[e.layer].append(e)
        else:
            others.append(e)
    lines = []
    for layer in sorted(layers):
        es = layers[layer]
        ids = {e.expert for e in es if e.expert is not None}
        what = f"experts {id_ranges(ids)}" if ids else "all experts"
        if any(e.expert is None for e in es) and ids:
            what += " + all experts of a fused tensor"
        size = human_bytes(sum(e.bytes for e in es))
        lines.append(f"  layer {layer}: {what} ({len(es)} tensors, {size})")
    if others:
        names = [e.tensor for e in others]
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        lines.append(f"  other: {shown} ({human_bytes(sum(e.bytes for e in others))})")
    return lines


def _experts_phrase(entries: Iterable[Replacement | Extracted]) -> str:
    pairs = {
        (e.layer, e.expert) for e in entries if e.kind in _EXPERT_KINDS and e.layer is not None
    }
    layers = {layer for layer, _ in pairs}
    if not layers:
        return "no routed experts"
    return f"{len(pairs)} experts in {len(layers)} layers ({id_ranges(layers)})"


@click.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=Path))
@output_option("Output file or directory (default: a new sibling BASE-merged).", name="out",
               type=click.Path(path_type=Path))
@click.option(
    "--on-conflict", type=click.Choice(["error", "first", "last"]), default="error",
    show_default=True, help="When two adapters replace the same tensor: fail, or which one wins.",
)
@click.option(
    "--force", is_flag=True,
    help="Merge even adapters trained from a different base, or holding tensors their own"
    " expert config does not select (other experts, shared experts, non-expert tensors).",
)
@click.option(
    "--requantize-fp8", is_flag=True,
    help="Quantise BF16/F16/F32 adapter tensors into block-FP8 (F8_E4M3) base weights, "
    "rewriting their weight_scale_inv (default: refuse them).",
)
@click.option("--dry-run", is_flag=True, help="List what would be replaced; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace the --output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def merge_cmd(
    base: Path,
    adapters: tuple[Path, ...],
    out: Path | None,
    on_conflict: str,
    force: bool,
    requantize_fp8: bool,
    dry_run: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Merge ADAPTERS into BASE, streaming, in constant memory.

    BASE is a .safetensors file or a checkpoint directory (sharded with an
    index, or a single file); the --output mirrors it, with the model's other files
    copied. An ADAPTER is an esft-rs adapter file (full-weight or ESFT-LoRA), a plain
    safetensors file of tensors named as in BASE, an official ESFT adapter folder
    (expert_cfg.json + safetensors), or a PEFT LoRA adapter directory
    (adapter_config.json + adapter_model.safetensors). LoRA pairs are merged as
    W + scale * B @ A, summed in float32 and rounded once to W's dtype.
    """
    with StageBars() as bars:
        report = merge(
            base, adapters, out, on_conflict=on_conflict, force=force,  # type: ignore[arg-type]
            dry_run=dry_run, overwrite=overwrite, requantize_fp8=requantize_fp8,
            progress=bars, on_warning=bars.warn,
        )
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    n = len(report.replaced)
    size = f"{human_bytes(report.replaced_bytes)} of {human_bytes(report.total_bytes)}"
    q = len(report.requantized)
    requant = f"; requantising {q} tensors to block FP8" if q else ""
    if dry_run:
        click.echo(f"would write {report.out}, replacing {n} tensors ({size}){requant}:")
        for line in _by_layer(report.replaced):
            click.echo(line)
        return
    click.echo(
        f"{report.out}: replaced {n} tensors ({size}), {_experts_phrase(report.replaced)}"
        + (f"; requantised {q} tensors to block FP8" if q else "")
        + (f"; copied {len(report.copied_files)} other files" if report.copied_files else "")
    )


@click.command("split")
@click.argument("model", type=click.Path(path_type=Path))
@output_option("Adapter file to write (.safetensors).", name="out", required=True,
               type=click.Path(path_type=Path))
@click.option(
    "--experts", type=click.Path(path_type=Path),
    help="Expert config (JSON) selecting the experts to extract.",
)
@click.option(
    "--base", type=click.Path(path_type=Path),
    help="Base MODEL was fine-tuned from: extract what differs (without --experts); "
    "its fingerprint is recorded either way.",
)
@click.option(
    "--shared-experts", is_flag=True, help="With --base: include differing shared experts."
)
@click.option(
    "--non-expert-modules", is_flag=True,
    help="With --base: include differing non-expert tensors (attention, router, embeddings...).",
)
@click.option("--dry-run", is_flag=True, help="List what would be extracted; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace the --output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def split_cmd(
    model: Path,
    out: Path,
    experts: Path | None,
    base: Path | None,
    shared_experts: bool,
    non_expert_modules: bool,
    dry_run: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Extract expert weights of MODEL into an adapter.

    With --experts: exactly the configured experts (plus shared experts and
    non-expert modules if the config says so). With --base only: the expert
    tensors whose bytes differ from BASE, with the derived expert config.
    """
    if experts is None and base is None:
        raise click.UsageError("give --experts CONFIG or --base BASE (or both)")
    with StageBars() as bars:
        report = split(
            model, out, experts=experts, base=base, shared_experts=shared_experts,
            non_expert_modules=non_expert_modules, dry_run=dry_run, overwrite=overwrite,
            progress=bars, on_warning=bars.warn,
        )
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    n = len(report.tensors)
    head = f"{n} tensors ({human_bytes(report.bytes)}), {_experts_phrase(report.tensors)}"
    if dry_run:
        click.echo(f"would write {report.out} with {head}:")
        for line in _by_layer(report.tensors):
            click.echo(line)
        return
    fp = "base fingerprint recorded" if report.base_fingerprint else "no base fingerprint"
    click.echo(f"{report.out}: {head}; {fp}")

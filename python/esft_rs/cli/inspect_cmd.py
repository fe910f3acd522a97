"""``esft-rs inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from esft_rs.cli.fmt import human_bytes, id_ranges
from esft_rs.files.inspection import Inspection, inspect


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--tensors/--no-tensors", default=True, help="List every tensor (default: yes).")
def inspect_cmd(path: Path, as_json: bool, tensors: bool) -> None:
    """Show tensors, metadata and MoE structure of a checkpoint or adapter.

    PATH is a .safetensors file, a checkpoint directory (sharded with an index,
    or a single model.safetensors) or an adapter. Only headers are read.
    """
    info = inspect(path)
    if as_json:
        click.echo(json.dumps(info.to_dict()))
        return
    _print(info, tensors)


def _print(info: Inspection, list_tensors: bool) -> None:
    echo = click.echo
    if list_tensors and info.tensors:
        width = max(len(n) for n in info.tensors)
        for t in info.tensors.values():
            shape = "[" + ", ".join(map(str, t.shape)) + "]"
            size = human_bytes(t.bytes)
            echo(f"{t.name:<{width}}  {t.dtype:<8} {shape:<20} {size:>10}  {t.file}")
        echo()
    files = len(info.files)
    echo(
        f"{info.path}: {info.total_tensors} tensors, {human_bytes(info.total_bytes)}"
        f" in {files} file{'s' if files != 1 else ''}"
    )
    if info.metadata:
        echo("metadata: " + ", ".join(f"{k}={_short(v)}" for k, v in info.metadata.items()))
    if (fp8 := info.fp8) is not None:
        rows, cols = fp8.block_size
        echo(
            f"FP8: block-quantised F8_E4M3 base, {rows}x{cols} blocks ({fp8.block_size_from});"
            f" {fp8.scaled_weights} weights with weight_scale_inv"
            f" ({human_bytes(fp8.scale_bytes)} of scales)"
            + (f"; {len(fp8.unscaled)} F8_E4M3 tensors without scales" if fp8.unscaled else "")
        )
    moe = info.moe
    if not moe.moe_layers:
        echo("MoE: none recognised")
        return
    per = moe.experts_per_layer
    echo(
        f"MoE: {len(moe.moe_layers)} of {moe.num_layers} layers"
        f" ({id_ranges(moe.moe_layers)}), dense: {id_ranges(moe.dense_layers) or 'none'}"
    )
    echo(
        f"  routed experts per layer: {per if per is not None else 'varies'};"
        f" {moe.routed_expert_tensors} tensors, {human_bytes(moe.routed_expert_bytes)}"
        + (f"; {human_bytes(moe.bytes_per_expert)} per expert"
           if moe.bytes_per_expert is not None else "")
        + (" incl. block scales" if info.fp8 is not None and info.fp8.scaled_weights else "")
    )
    layouts = sorted({layer.layout for layer in moe.layers.values()})
    shared = sum(layer.shared_experts for layer in moe.layers.values())
    echo(
        f"  layout: {', '.join(layouts)}; shared experts in {shared} layers;"
        f" {moe.router_tensors} router tensors"
    )
    if per is None or any(len(lay.experts) and lay.experts[-1] + 1 != len(lay.experts)
                          for lay in moe.layers.values()):
        for layer, lay in moe.layers.items():
            echo(f"  layer {layer}: experts {id_ranges(lay.experts) or '-'}")


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."

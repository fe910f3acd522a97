"""``esft-rs export``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from esft_rs.cli.params import output_option


@click.command("export")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@output_option("PEFT adapter directory to write.", name="out", required=True,
               type=click.Path(path_type=Path))
@click.option("--rank", type=click.IntRange(min=1),
              help="LoRA rank of a full-weight adapter's SVD (default: the exact rank).")
@click.option("--overwrite", is_flag=True, help="Replace the --output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def export_cmd(base: Path, adapter: Path, out: Path, rank: int | None, overwrite: bool,
               as_json: bool) -> None:
    """Write ADAPTER (trained from BASE) as a PEFT LoRA adapter directory that PEFT and
    vLLM load onto BASE (adapter_config.json, adapter_model.safetensors).

    An ESFT-LoRA adapter is copied exactly. A full-weight adapter's change from BASE is
    factored by a truncated SVD at --rank; the relative error of each tensor is in
    export_report.json, the worst ones and the overall error are printed.
    """
    from esft_rs.exporting import REPORT_NAME, export

    report = export(base, adapter, out, rank=rank, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    how = "copied exactly" if report.source == "lora" else "SVD of the change from the base"
    click.echo(f"{report.output}: {len(report.tensors)} tensors as LoRA rank {report.rank}"
               f" (lora_alpha {report.lora_alpha:g}), {how}; {report.zero_pairs} zero pairs"
               " for the other experts of the layers touched")
    if report.source == "full" or report.error:
        worst = sorted(report.tensors, key=lambda t: t.error, reverse=True)[:5]
        click.echo(f"  {'relative error':>14}  {'rank':>5}  tensor")
        for t in worst:
            click.echo(f"  {t.error:14.3e}  {t.rank:5d}  {t.tensor}")
        click.echo(f"  {report.error:14.3e}  {'':5}  all {len(report.tensors)} tensors"
                   f" (every tensor: {Path(report.output) / REPORT_NAME})")

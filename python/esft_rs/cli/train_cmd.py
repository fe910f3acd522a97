"""``esft-rs train``: one flag per training-config key, generated from ``TrainConfig``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from esft_rs.cli.params import CHAT_TEMPLATE_METAVAR, device_option, option, output_option
from esft_rs.training.config import TrainConfig, load_config, option_fields


def config_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """A click option per ``TrainConfig`` field; unset flags stay None (YAML or default wins)."""
    for name, kind, default, text, choices in reversed(option_fields()):
        flag = "--" + name.replace("_", "-")
        shown = str(default).lower() if kind is bool else default
        help_text = f"{text} [default: {shown}]"
        if kind is bool:
            decl = f"{flag}/--no-{name.replace('_', '-')}"
            f = click.option(decl, name, default=None, help=help_text)(f)
        else:
            t = click.Choice(choices) if choices else kind
            metavar = CHAT_TEMPLATE_METAVAR if name == "chat_template" else None
            f = option(flag, name, type=t, default=None, metavar=metavar, help=help_text)(f)
    return f


@click.command("train", context_settings={"max_content_width": 100})
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-e", "--experts", type=click.Path(path_type=Path),
              help="Expert config JSON (official ESFT format); not needed with --mode full.")
@output_option("Output directory: adapter.safetensors, metrics.jsonl, checkpoints.",
               name="out_dir", required=True, type=click.Path(path_type=Path))
@click.option("-c", "--config", type=click.Path(path_type=Path),
              help="YAML training config: a file (the official ESFT configs work unchanged),"
              " or a starter config shipped with esft-rs: base (the official values) or"
              " small (a first run in minutes on a CPU).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --output.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier run in --output (kept until the new run has finished).")
@click.option("--save-merged", type=click.Path(path_type=Path),
              help="Also write the full merged model here (Rust merge into MODEL).")
@click.option("--requantize-fp8", is_flag=True,
              help="With --save-merged into a block-FP8 base (DeepSeek-V3): quantise the"
              " trained weights with block scales.")
@click.option("--skip-bad", is_flag=True, help="Skip malformed JSONL lines instead of failing.")
@device_option
@config_options
def train_cmd(
    model: Path,
    data: Path,
    experts: Path | None,
    out_dir: Path,
    config: Path | None,
    resume: bool,
    overwrite: bool,
    save_merged: Path | None,
    requantize_fp8: bool,
    skip_bad: bool,
    device: str,
    **overrides: Any,
) -> None:
    """Train only the selected experts of MODEL on DATA; write an adapter.

    MODEL is a checkpoint directory; DATA is chat data in the official ESFT format
    (.jsonl, .jsonl.gz or .parquet), encoded as --chat-template says. Every key of
    the YAML config is also a flag below (flags win). Under torchrun the processes
    share each global batch, and the model is spread over them as --parallelism says
    (gloo on CPU, nccl on GPU).
    """
    main = os.environ.get("RANK", "0") == "0"
    _route_notes(main)
    cfg, notes = load_config(config) if config is not None else (TrainConfig(), [])
    for note in notes:
        logging.getLogger("esft_rs.training").warning("%s", note)
    cfg = cfg.with_overrides(overrides, "command line")

    from esft_rs.training.api import train

    result = train(model, data, out_dir, experts, cfg, resume=resume, overwrite=overwrite,
                   save_merged=save_merged, requantize_fp8=requantize_fp8, skip_bad=skip_bad,
                   device=device, progress=main)
    if not main:
        return
    fit = result.fit
    n = result.experts.num_experts
    click.echo(f"{result.adapter}: {n} routed experts in {len(result.experts.experts)} layers,"
               f" {fit.trainable_params:,} trained parameters")
    losses = f"train loss {fit.train_loss:.4f}" if fit.train_loss is not None else "no new steps"
    if fit.eval_loss is not None:
        losses += f", best eval loss {fit.eval_loss:.4f} (step {fit.best_step}, kept)"
    click.echo(losses)
    if result.merged is not None:
        click.echo(f"merged model: {result.merged}")


class _Echo(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"esft-rs: note: {record.getMessage()}", err=True)


def _route_notes(main: bool) -> None:
    """Training notes go to stderr as ``esft-rs: note: ...``, from the main process only."""
    logger = logging.getLogger("esft_rs.training")
    if not any(isinstance(h, _Echo) for h in logger.handlers):
        logger.addHandler(_Echo() if main else logging.NullHandler())
        logger.propagate = False

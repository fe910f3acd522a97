"""``esft-rs init-model``."""

from __future__ import annotations

from pathlib import Path

import click

from esft_rs.cli.params import SEED
from esft_rs.errors import EsftError
from esft_rs.models.config import CONFIG_NAME, PRESETS


@click.command("init-model")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="tiny: ~1M parameters (tests); small: ~15M (benches, demo).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Model directory to create (config.json + model.safetensors).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Initialisation seed.")
@click.option("--force", is_flag=True, help="Overwrite a model already in the directory.")
def init_model_cmd(preset: str, output: Path, seed: int, force: bool) -> None:
    """Write a freshly initialised built-in MoE model (DeepSeek-V2 layout, byte tokenizer).

    The same preset and seed give the same files, byte for byte.
    """
    from esft_rs.files.outputs import check_kind, check_target

    if not force and (output / CONFIG_NAME).exists():
        raise EsftError(f"{output}: already holds a model (--force overwrites it)")
    if not force and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise EsftError(f"{output}: already exists (--force replaces it)")
    check_target(output, overwrite=force, models=force)  # --force replaces only a checkpoint
    check_kind(output, directory=True)
    from esft_rs.models import init_model, save_model

    model = init_model(preset, seed=seed)
    save_model(model, output, overwrite=force)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    click.echo(
        f"{output}: {preset} model, {params / 1e6:.2f}M parameters, {cfg.num_hidden_layers}"
        f" layers ({len(cfg.moe_layers)} MoE), {cfg.n_routed_experts} routed experts top-"
        f"{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared, seed {seed}"
    )

"""Click parameter types shared by the commands."""

from __future__ import annotations

import click

from esft_rs.training.config import MAX_SEED

#: Seeds torch and numpy accept (a larger one overflowed inside torch.manual_seed).
SEED = click.IntRange(0, MAX_SEED)

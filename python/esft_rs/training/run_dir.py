"""What a finished run leaves in OUT_DIR: the adapter, its expert config and the run's config.

The adapter format (tensor names as in the base, ``__metadata__`` with the
expert config and base fingerprint) belongs to ``esft_rs.files.adapter``; this module
only gathers what goes into it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esft_rs.files.expert_config import ExpertConfig

if TYPE_CHECKING:
    import torch

    from esft_rs.files.tensor_stream import Layout

ADAPTER = "adapter.safetensors"
# With expert_cfg.json beside the adapter, OUT_DIR also reads as an official adapter folder.
EXPERT_CFG = "expert_cfg.json"
CONFIG = "train_config.yaml"


def write_outputs(
    out_dir: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    layout: Layout,
    experts: ExpertConfig,
    base_fingerprint: str | None,
    config: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, str] | None = None,
) -> Path:
    """Write ``expert_cfg.json``, ``train_config.yaml`` and, last, the adapter (whose
    presence marks a finished run) from (name, tensor) pairs taken one at a time, of the
    ``layout`` (name, dtype, shape) declared before; ``extra``: more ``esft.*`` metadata
    (ESFT-LoRA's ``esft.lora``); each file appears whole (``esft_rs.files.outputs``)."""
    import yaml

    from esft_rs.files.adapter import stream_adapter
    from esft_rs.files.outputs import write_file

    experts.save(out_dir / EXPERT_CFG)
    write_file(out_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))
    return stream_adapter(
        tensors, out_dir / ADAPTER, experts, layout=layout, base_fingerprint=base_fingerprint,
        extra_metadata={"esft.training_config": json.dumps(config),
                        "esft.metrics": json.dumps(metrics), **(extra or {})},
    )

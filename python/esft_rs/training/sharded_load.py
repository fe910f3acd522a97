"""Loading a checkpoint straight into FSDP shards: no rank ever holds the whole model.

The model is built on the meta device (shapes and dtypes, no memory); after
``fully_shard`` has decided the placements, ``fill`` allocates each rank's
shards on its device and reads exactly those rows from the safetensors files
(memory-mapped slices), cast to the dtype the model holds them in. Host and
device memory for the weights is then about total / world size per rank.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch

from esft_rs.distributed import Dist
from esft_rs.errors import InvalidFileError


def meta_model(directory: str | os.PathLike[str]) -> torch.nn.Module | None:
    """The built-in model of ``directory`` on the meta device, its tensors checked against
    config.json as ``load_model`` checks them; None for a transformers family (loaded
    whole by transformers, then sharded)."""
    from esft_rs import inspect
    from esft_rs.models import checkpoint, hf
    from esft_rs.models.config import MODEL_TYPE, ModelConfig
    from esft_rs.models.reference import ReferenceMoE

    root = Path(directory)
    if hf.model_type(root) not in (MODEL_TYPE, None):
        return None
    cfg = ModelConfig.load(root)
    with torch.device("meta"):
        model = ReferenceMoE(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    checkpoint._check(root, inspect(root).tensors, expected)
    return model.to(getattr(torch, cfg.torch_dtype)).eval()


def fill(model: torch.nn.Module, directory: str | os.PathLike[str], device: torch.device) -> None:
    """Give every parameter (a DTensor) of a sharded meta ``model`` this rank's rows, read
    from the checkpoint in ``directory`` (parameter names are its tensor names)."""
    from safetensors import safe_open
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from esft_rs import inspect

    root = Path(directory)
    tensors = inspect(root).tensors
    model.to_empty(device=device)
    by_file: dict[str, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for name, p in model.named_parameters():
        if name not in tensors:
            raise InvalidFileError(f"{root}: has no tensor {name}")
        by_file[tensors[name].file].append((name, p))
    with torch.no_grad():
        for file, params in by_file.items():
            with safe_open(root / file, "pt") as f:
                for name, p in params:
                    local = p.to_local()
                    if not local.numel():
                        continue
                    shape, offset = compute_local_shape_and_global_offset(
                        p.shape, p.device_mesh, p.placements)
                    rows = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
                    local.copy_(f.get_slice(name)[rows])


def load_sharded(
    directory: str | os.PathLike[str], place: Dist, device: torch.device
) -> torch.nn.Module:
    """The model of ``directory``, frozen and sharded over all ranks (for profiling).

    The built-in model is read shard by shard; a transformers family is loaded whole
    on the host by transformers (which converts its on-disk layout), then sharded.
    """
    from esft_rs.models import load_model
    from esft_rs.training.sharding import shard

    model = meta_model(directory)
    lazy = model is not None
    if model is None:
        model = load_model(directory)
    model.requires_grad_(False)
    shard(model, [], place, device)
    if lazy:
        fill(model, directory, device)
    return model.eval()

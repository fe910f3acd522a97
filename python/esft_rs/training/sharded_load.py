"""Loading a checkpoint straight into FSDP shards: no rank ever holds the whole model.

The model is built on the meta device (shapes and dtypes, no memory); after
``fully_shard`` has decided the placements, ``fill`` allocates each rank's
shards on its device and reads exactly those rows' bytes from the safetensors files
(positional reads, ``esft_rs.models.rows``; no memory map), cast to the dtype the model
holds them in. Host and device memory for the weights is then about total / world size
per rank. This holds for the built-in model and for the transformers families
(``esft_rs.models.hf_shards``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from esft_rs.distributed import Dist
from esft_rs.errors import InvalidFileError
from esft_rs.files.inspection import inspect
from esft_rs.models import hf, hf_shards, reference_files
from esft_rs.models.config import MODEL_TYPE, ModelConfig
from esft_rs.models.reference import skeleton
from esft_rs.models.rows import Rows, local_rows
from esft_rs.training import expert_parallel
from esft_rs.training.sharding import shard
from esft_rs.training.trained import moe_layout


def meta_model(directory: str | os.PathLike[str]) -> torch.nn.Module:
    """The model of ``directory`` on the meta device, its tensors checked against the
    checkpoint: the built-in model as ``load_model`` checks it, a transformers family
    as ``hf.load`` would build it (``esft_rs.models.hf_shards``)."""
    root = Path(directory)
    if hf.model_type(root) not in (MODEL_TYPE, None):
        return hf_shards.meta(root)
    cfg = ModelConfig.load(root)
    model = skeleton(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reference_files._check(root, inspect(root).tensors, expected)
    return model.to(getattr(torch, cfg.torch_dtype)).eval()


def fill(model: torch.nn.Module, directory: str | os.PathLike[str], device: torch.device) -> int:
    """Give every parameter (a DTensor) of a sharded meta ``model`` this rank's rows, read
    from the checkpoint in ``directory``; returns the bytes read. The built-in model's
    parameter names are its tensor names; a transformers family goes through its
    conversion (``esft_rs.models.hf_shards.fill``)."""
    root = Path(directory)
    if hf.is_hf(model):
        return hf_shards.fill(model, root, device)
    tensors = inspect(root).tensors
    for name, _ in model.named_parameters():
        if name not in tensors:
            raise InvalidFileError(f"{root}: has no tensor {name}")
    model.to_empty(device=device)
    with torch.no_grad(), Rows(root, tensors) as rows:
        for name, p in model.named_parameters():
            for local, part in local_rows(p):
                rows.read(name, part, out=local)
        return rows.bytes


def load_for_inference(
    directory: str | os.PathLike[str], place: Dist, device: torch.device, parallelism: str
) -> tuple[torch.nn.Module, str | None]:
    """The model of ``directory`` for forward passes (profile, eval), frozen and in eval mode:
    under torchrun sharded (``fsdp``) or split by experts (``ep``) as ``parallelism`` says
    (``auto`` resolved by ``parallelism.for_inference``), else whole in this process; and
    the note that says what auto chose, for the caller to show once the model has loaded
    (no note before an error)."""
    from esft_rs.models import load_model
    from esft_rs.training.expert_parallel import uses_ep
    from esft_rs.training.parallelism import for_inference
    from esft_rs.training.sharding import uses_fsdp

    parallelism, note = for_inference(Path(directory), parallelism, place, device)
    if uses_fsdp(parallelism, place.world):
        return load_sharded(directory, place, device), note
    if uses_ep(parallelism, place.world):
        return load_expert_parallel(directory, place, device), note
    return load_model(directory, device=device).requires_grad_(False).eval(), note


def load_sharded(
    directory: str | os.PathLike[str], place: Dist, device: torch.device
) -> torch.nn.Module:
    """The model of ``directory``, frozen and sharded over all ranks (for profiling and
    evaluation): built on the meta device, each rank reading only its own shards."""
    model = meta_model(directory)
    model.requires_grad_(False)
    shard(model, [], place, device)
    fill(model, directory, device)
    return model.eval()


def load_expert_parallel(
    directory: str | os.PathLike[str], place: Dist, device: torch.device
) -> torch.nn.Module:
    """The model of ``directory``, frozen, each rank holding its share of every MoE layer's
    experts (``expert_parallel``; for profiling and evaluation) and the rest whole: each
    rank reads only its experts' bytes."""
    model = meta_model(directory)
    expert_parallel.check_model(model, directory)
    layout = moe_layout((n, tuple(p.shape)) for n, p in model.named_parameters())
    placement = expert_parallel.place_experts(layout, {}, place.world)
    expert_parallel.localize(model, placement, place.rank)
    model.requires_grad_(False)
    fill(model, directory, device)
    expert_parallel.install(model, place, device)
    return model.eval()

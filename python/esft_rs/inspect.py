"""``esft_rs.inspect``: tensors, metadata and MoE structure of a checkpoint, from headers only."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from esft_rs import _core


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int
    file: str


@dataclass(frozen=True)
class MoELayer:
    experts: tuple[int, ...]
    shared_experts: bool
    router: bool
    layout: str  # per-expert | fused | mixed | none
    expert_bytes: int


@dataclass(frozen=True)
class MoEInfo:
    num_layers: int
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    experts_per_layer: int | None
    layers: dict[int, MoELayer]
    router_tensors: int
    shared_expert_tensors: int
    routed_expert_tensors: int
    routed_expert_bytes: int
    bytes_per_expert: int | None  # one routed expert, scale tensors included, when all alike


@dataclass(frozen=True)
class FP8Info:
    """Block-FP8 weights (DeepSeek-V3): F8_E4M3 tensors with ``weight_scale_inv`` companions."""

    block_size: tuple[int, int]
    block_size_from: str  # config.json | default (128x128)
    scaled_weights: int
    scale_bytes: int
    unscaled: tuple[str, ...]  # F8_E4M3 tensors without a scale tensor


@dataclass(frozen=True)
class Inspection:
    path: str
    files: tuple[str, ...]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_metadata: dict[str, dict[str, str]]
    total_tensors: int
    total_bytes: int
    moe: MoEInfo
    fp8: FP8Info | None  # present when the checkpoint holds F8_E4M3 tensors

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape printed by ``esft-rs inspect --json``."""
        d = asdict(self)
        for t in d["tensors"].values():
            del t["name"]
        d["moe"]["layers"] = {str(k): v for k, v in d["moe"]["layers"].items()}
        return d


def inspect(path: str | os.PathLike[str]) -> Inspection:
    """Read the headers of a ``.safetensors`` file, checkpoint directory or adapter.

    Raises ``InvalidFileError`` naming the file for anything the safetensors
    reference would reject, and ``OSError`` subclasses for I/O failures.
    """
    raw = json.loads(_core.inspect_json(os.fspath(path)))
    moe = raw["moe"]
    fp8 = raw["fp8"]
    return Inspection(
        path=raw["path"],
        files=tuple(raw["files"]),
        tensors={
            name: TensorInfo(name, t["dtype"], tuple(t["shape"]), t["bytes"], t["file"])
            for name, t in raw["tensors"].items()
        },
        metadata=raw["metadata"],
        file_metadata=raw["file_metadata"],
        total_tensors=raw["total_tensors"],
        total_bytes=raw["total_bytes"],
        moe=MoEInfo(
            num_layers=moe["num_layers"],
            moe_layers=tuple(moe["moe_layers"]),
            dense_layers=tuple(moe["dense_layers"]),
            experts_per_layer=moe["experts_per_layer"],
            layers={
                int(k): MoELayer(
                    experts=tuple(v["experts"]),
                    shared_experts=v["shared_experts"],
                    router=v["router"],
                    layout=v["layout"],
                    expert_bytes=v["expert_bytes"],
                )
                for k, v in moe["layers"].items()
            },
            router_tensors=moe["router_tensors"],
            shared_expert_tensors=moe["shared_expert_tensors"],
            routed_expert_tensors=moe["routed_expert_tensors"],
            routed_expert_bytes=moe["routed_expert_bytes"],
            bytes_per_expert=moe["bytes_per_expert"],
        ),
        fp8=None if fp8 is None else FP8Info(
            block_size=tuple(fp8["block_size"]),
            block_size_from=fp8["block_size_from"],
            scaled_weights=fp8["scaled_weights"],
            scale_bytes=fp8["scale_bytes"],
            unscaled=tuple(fp8["unscaled"]),
        ),
    )

"""Tensor naming of MoE checkpoints, answered by the Rust core (its single source of truth)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from esft_rs import _core


class TensorRole(NamedTuple):
    """What a checkpoint tensor is, from its name alone."""

    kind: str  # routed_expert | fused_experts | shared_expert | shared_expert_gate | router
    #            | layer_other | global
    layer: int | None
    expert: int | None


def classify(name: str) -> TensorRole:
    """Classify a tensor name, e.g. ``model.layers.3.mlp.experts.12.up_proj.weight``."""
    return TensorRole(*_core.classify_tensor(name))


def canonical(name: str) -> str:
    """Map legacy official-adapter names (``layers.L...``) to ``model.layers.L...``."""
    return _core.canonical_name(name)


def fused_slice_name(fused: str, expert: int) -> str | None:
    """Name of expert ``expert``'s slice of a fused tensor, as adapters store it:
    ``...mlp.experts.gate_up_proj`` -> ``...mlp.experts.E.gate_up_proj``; None if not fused."""
    return _core.fused_slice_name(fused, expert)


def fused_slice_parent(name: str) -> tuple[str, int] | None:
    """The (fused tensor, expert) a slice name stands for; None if it is not one."""
    return _core.fused_slice_parent(name)


def projection(name: str) -> str:
    """The projection an expert tensor is, as the checkpoint names it: ``gate_proj`` of
    ``...experts.3.gate_proj.weight``, ``w1`` (Mixtral), ``gate_up_proj`` of a fused one."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def moe_layout(shapes: Iterable[tuple[str, Sequence[int]]]) -> dict[int, int]:
    """MoE layer -> number of routed experts, from tensor names (and fused tensors' dim 0).

    The Rust core's ``naming::moe_layout``, which inspect and split use too.
    """
    return dict(_core.moe_layout([(name, list(shape)) for name, shape in shapes]))

"""Which tensors train: the expert config applied to a model's checkpoint-named parameters.

Tensors are recognised only through ``esft_rs.naming.classify`` (the single
source of truth for expert naming). Routed experts train when the config lists
them; shared experts and everything else (attention, norms, embeddings,
routers) when the config's ``shared_experts`` / ``non_expert_modules`` flags
say so. A fused ``[E, ...]`` expert tensor trains only its selected slices:
they become one separate parameter, so frozen slices get no gradient, no
optimizer state and no weight decay, and stay bit-identical.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass

import torch

from esft_rs.cli.fmt import id_ranges
from esft_rs.errors import MismatchError
from esft_rs.expert_config import ExpertConfig
from esft_rs.models import hf
from esft_rs.naming import classify, moe_layout  # noqa: F401 (moe_layout: re-exported)

SHARED_KINDS = ("shared_expert", "shared_expert_gate")


def resolve_experts(
    layout: dict[int, int],
    config: ExpertConfig | None,
    mode: str,
    seed: int,
    origin: str = "expert config",
) -> ExpertConfig:
    """The experts that will actually train, checked against the model's MoE layout.

    ``full`` trains everything; ``random`` draws, per layer, as many experts as
    ``config`` lists there (seeded, the paper's ablation); ``esft`` takes ``config``.
    """
    if mode == "full":
        return ExpertConfig({layer: list(range(n)) for layer, n in layout.items()}, True, True)
    if config is None:
        raise MismatchError(f"mode {mode} needs an expert config (--experts)")
    for layer, ids in config.experts.items():
        if layer not in layout:
            raise MismatchError(
                f"{origin}: layer {layer} is not an MoE layer of the model"
                f" (MoE layers: {id_ranges(list(layout)) or 'none'})"
            )
        bad = [e for e in ids if not 0 <= e < layout[layer]]
        if bad:
            raise MismatchError(
                f"{origin}: layer {layer}: expert {bad[0]} is out of range"
                f" (the model has {layout[layer]} routed experts per layer)"
            )
    experts = {layer: sorted(ids) for layer, ids in config.experts.items() if ids}
    if mode == "random":
        rng = random.Random(seed)
        experts = {
            layer: sorted(rng.sample(range(layout[layer]), len(ids)))
            for layer, ids in sorted(experts.items())
        }
    resolved = ExpertConfig(experts, config.shared_experts, config.non_expert_modules)
    if not resolved.num_experts and not resolved.shared_experts and not resolved.non_expert_modules:
        raise MismatchError(
            f"{origin}: selects nothing to train (no experts listed; shared_experts and"
            " non_expert_modules are off)"
        )
    return resolved


def tensor_plan(name: str, experts: ExpertConfig) -> bool | list[int]:
    """True: train the whole tensor; False: freeze it; a list: train those fused slices."""
    role = classify(name)
    if role.kind == "routed_expert":
        return role.expert in experts.experts.get(role.layer, ())
    if role.kind == "fused_experts":
        return list(experts.experts.get(role.layer, ()))
    if role.kind in SHARED_KINDS:
        return experts.shared_experts
    return experts.non_expert_modules


@dataclass
class Trainable:
    """One checkpoint tensor (or the selected slices of a fused one) being trained."""

    name: str  # checkpoint name
    param: torch.nn.Parameter
    dtype: torch.dtype  # the checkpoint's dtype, for the adapter
    experts: tuple[int, ...] | None = None  # fused: the expert ids of param's rows, in order

    def current(self) -> dict[str, torch.Tensor]:
        """The trained values under checkpoint names (fused: one tensor per expert slice)."""
        p = self.param.detach()
        if self.experts is None:
            return {self.name: p.to(self.dtype)}
        from esft_rs.naming import fused_slice_name

        return {fused_slice_name(self.name, e): p[i].to(self.dtype)
                for i, e in enumerate(self.experts)}


def checkpoint_shapes(
    model: torch.nn.Module, trainables: list[Trainable], on_disk: Collection[str] = ()
) -> dict[str, tuple[int, ...] | None]:
    """Base-checkpoint name -> shape of each tensor the adapter will hold (None: a
    fused tensor, whose slices the merge checks). ``on_disk``: the base's tensor names."""
    stored, reverted = _by_layout(model, trainables, on_disk)
    return {**{t.name: None if t.experts else tuple(t.param.shape) for t in stored},
            **(hf.checkpoint_shapes(model, reverted) if reverted else {})}


def checkpoint_tensors(
    model: torch.nn.Module, trainables: list[Trainable], on_disk: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """The trained values under the base checkpoint's names, in its dtypes: what the
    adapter holds (see ``_by_layout``)."""
    stored, reverted = _by_layout(model, trainables, on_disk)
    return {**{n: v for t in stored for n, v in t.current().items()},
            **(hf.checkpoint_tensors(model, reverted) if reverted else {})}


def _by_layout(
    model: torch.nn.Module, trainables: list[Trainable], on_disk: Collection[str]
) -> tuple[list[Trainable], list[Trainable]]:
    """(tensors stored on disk as in memory, tensors transformers converted on load).

    The built-in model and checkpoints that already store a tensor as it is in
    memory (``on_disk`` names it; e.g. experts fused on disk) keep the in-memory
    name, fused slices as ``esft_rs.naming.fused_slice_name`` says; the others are
    reverted to their per-expert on-disk names (``esft_rs.models.hf``).
    """
    if not hf.is_hf(model):
        return trainables, []
    stored = [t for t in trainables if t.name in on_disk]
    return stored, [t for t in trainables if t.name not in on_disk]


def freeze(model: torch.nn.Module, experts: ExpertConfig) -> list[Trainable]:
    """Set ``requires_grad`` on every parameter by ``experts``; returns what trains.

    Fused tensors with selected slices are re-parametrised (see ``FusedSlices``).
    Raises ``MismatchError`` when nothing would train.
    """
    out = []
    for name, p in list(model.named_parameters()):
        plan = tensor_plan(name, experts)
        p.requires_grad_(plan is True)
        if plan is True:
            out.append(Trainable(name, p, p.dtype))
        elif plan:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            slices = FusedSlices(p.detach(), plan)
            torch.nn.utils.parametrize.register_parametrization(module, attr, slices, unsafe=True)
            module.parametrizations[attr].original.requires_grad_(False)
            out.append(Trainable(name, slices.slices, p.dtype, tuple(plan)))
    if not out:
        raise MismatchError("the expert config selects no tensor of this model to train")
    return out


def whole_tensor(model: torch.nn.Module, t: Trainable, *, current: bool = True) -> torch.Tensor:
    """The whole tensor ``t`` trains (a fused one with every expert), without a copy.

    With ``current``, a fused tensor's trained slices are first written into its
    frozen original in place: the forward pass never reads those rows (the
    parametrization puts the slices over them), and a copy of a real model's fused
    layer could take gigabytes. Without, only the shape and dtype are meant.
    """
    if t.experts is None:
        return t.param.detach()
    owner, _, attr = t.name.rpartition(".")
    parametrized = model.get_submodule(owner).parametrizations[attr]
    original = parametrized.original
    if current:
        slices = parametrized[0]
        with torch.no_grad():
            original.index_copy_(0, slices.ids, slices.slices.to(original.dtype))
    return original.detach()


class FusedSlices(torch.nn.Module):
    """Rebuilds a fused [E, ...] weight from its frozen original and the trainable slices.

    Used as a parametrization: the module's attribute reads as the full tensor,
    while autograd and the optimizer see only ``slices``.
    """

    def __init__(self, original: torch.Tensor, ids: list[int]) -> None:
        super().__init__()
        index = torch.tensor(ids, dtype=torch.long, device=original.device)
        self.register_buffer("ids", index, persistent=False)
        self.slices = torch.nn.Parameter(original.index_select(0, index).clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.index_copy(0, self.ids, self.slices.to(original.dtype))

"""Which tensors train: the expert config applied to a model's checkpoint-named parameters.

What trains is decided from names alone (``esft_rs.training.trained``): routed
experts when the config lists them; shared experts and everything else
(attention, norms, embeddings, routers) when its ``shared_experts`` /
``non_expert_modules`` flags say so. A fused ``[E, ...]`` expert tensor trains
only its selected slices: they become one separate parameter (fp32 master
weights), so frozen slices get no gradient, no optimizer state and no weight
decay, and stay bit-identical. The fused tensor is never copied (see
``FusedSlices``), and its frozen experts get no weight gradient computed
(``esft_rs.training.slice_grads``); one whose every expert trains is trained
whole. Names in the checkpoint, and whether experts fit the split, come from the
model interface (``esft_rs.models``): nothing here knows transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import torch

from esft_rs.errors import MismatchError
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.files.naming import classify, fused_slice_name
from esft_rs.models import gated_experts_problem, to_checkpoint
from esft_rs.models.expert_rows import FusedSlices, expert_rows, placement_of
from esft_rs.training import slice_grads
from esft_rs.training.trained import moe_layout, resolve_experts, tensor_plan

log = logging.getLogger("esft_rs.training")

__all__ = ["Trainable", "checkpoint_layout", "checkpoint_shapes", "checkpoint_tensors", "freeze",
           "moe_layout", "resolve_experts", "tensor_plan", "whole_tensor"]


@dataclass
class Trainable:
    """One checkpoint tensor (or the selected slices of a fused one) being trained.

    ``param`` is looked up on its module at each use, so that it stays the module's
    parameter when FSDP2's ``fully_shard`` replaces it with a sharded one.
    """

    name: str  # checkpoint name
    module: torch.nn.Module  # the module that holds the parameter, as ``attr``
    attr: str
    dtype: torch.dtype  # the checkpoint's dtype, for the adapter
    experts: tuple[int, ...] | None = None  # fused: the expert ids of param's rows, in order

    @property
    def param(self) -> torch.nn.Parameter:
        return dict(self.module.named_parameters(recurse=False))[self.attr]

    def current(self, value: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The trained values (``value``, else the parameter) under checkpoint names
        (fused: one tensor per expert slice)."""
        p = self.param.detach() if value is None else value
        if self.experts is None:
            return {self.name: p.to(self.dtype)}
        return {fused_slice_name(self.name, e): p[i].to(self.dtype)
                for i, e in enumerate(self.experts)}


def checkpoint_shapes(
    model: torch.nn.Module, trainables: list[Trainable], on_disk: Collection[str] = ()
) -> dict[str, tuple[int, ...] | None]:
    """Base-checkpoint name -> shape of each tensor the adapter will hold (None: a
    fused tensor, whose slices the merge checks). ``on_disk``: the base's tensor names.
    Computed on the meta device: no memory."""
    out: dict[str, tuple[int, ...] | None] = {}
    for t in trainables:
        stored = _on_disk(model, t, on_disk, meta=True)
        if stored is None:
            out[t.name] = None if t.experts else tuple(t.param.shape)
        else:
            out.update({n: tuple(v.shape) for n, v in stored.items()})
    return out


def checkpoint_tensors(
    model: torch.nn.Module, trainables: list[Trainable], on_disk: Collection[str] = (),
    *, meta: bool = False,
) -> dict[str, torch.Tensor]:
    """The trained values under the base checkpoint's names, in its dtypes: what the
    adapter holds (see ``_on_disk``). ``meta``: their names, dtypes and shapes only, on
    the meta device (no memory, nothing written into a fused tensor)."""
    out = {}
    for t in trainables:
        stored = _on_disk(model, t, on_disk, meta=meta)
        value = torch.empty(t.param.shape, dtype=t.param.dtype, device="meta") if meta \
            else None
        out.update(t.current(value) if stored is None
                   else {n: v.to(t.dtype).contiguous() for n, v in stored.items()})
    return out


def checkpoint_layout(
    model: torch.nn.Module, trainables: list[Trainable], on_disk: Collection[str] = ()
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each tensor the adapter will hold, known before any is
    gathered (the adapter's header is written first)."""
    return [(n, v.dtype, tuple(v.shape))
            for n, v in checkpoint_tensors(model, trainables, on_disk, meta=True).items()]


def _on_disk(
    model: torch.nn.Module, t: Trainable, on_disk: Collection[str], *, meta: bool
) -> dict[str, torch.Tensor] | None:
    """The checkpoint tensors ``t`` is saved as; None when the checkpoint stores it as it
    is in memory (``on_disk`` names it, or the model converts no name; fused slices are
    then named as ``esft_rs.files.naming.fused_slice_name`` says). Of a fused tensor converted
    to per-expert tensors, only the trained experts' are kept."""
    if t.name in on_disk:
        return None
    whole = whole_tensor(model, t, current=not meta)
    stored = to_checkpoint(model, t.name, whole.to("meta") if meta else whole)
    if set(stored) == {t.name}:
        return None
    if t.experts is None:
        return stored
    return {n: v for n, v in stored.items()
            if (role := classify(n)).kind == "routed_expert" and role.expert in t.experts}


def freeze(model: torch.nn.Module, experts: ExpertConfig) -> list[Trainable]:
    """Set ``requires_grad`` on every parameter by ``experts``; returns what trains.

    Fused tensors with some slices selected are re-parametrised (see ``FusedSlices``).
    Raises ``MismatchError`` when nothing would train.
    """
    out = []
    sliced: dict[int, torch.nn.Module] = {}  # modules with fused tensors trained in slices
    for name, p in list(model.named_parameters()):
        plan = tensor_plan(name, experts)
        owner, _, attr = name.rpartition(".")
        rows = expert_rows(model.get_submodule(owner)) if plan else None
        local = plan  # the rows of ``p`` that train
        if rows is not None:  # expert parallelism: p holds these experts' rows
            local = [i for i, e in enumerate(rows) if plan is True or e in plan]
            plan = [rows[i] for i in local]
        whole = plan is True or (plan and len(plan) == p.shape[0])
        p.requires_grad_(bool(whole))
        if whole:
            out.append(Trainable(name, model.get_submodule(owner), attr, p.dtype,
                                 tuple(plan) if plan is not True else None))
        elif plan:
            module = model.get_submodule(owner)
            slices = FusedSlices(p.detach(), local, plan)
            torch.nn.utils.parametrize.register_parametrization(module, attr, slices, unsafe=True)
            module.parametrizations[attr].original.requires_grad_(False)
            out.append(Trainable(name, slices, "slices", p.dtype, tuple(plan)))
            sliced[id(module)] = module
    if not out and placement_of(model) is None:  # under EP, other ranks may train
        raise MismatchError("the expert config selects no tensor of this model to train")
    for module in sliced.values():
        split_weight_grads(module)
    return out


def split_weight_grads(module: torch.nn.Module) -> None:
    """Give ``module``'s backward weight gradients for its trained slices only
    (``esft_rs.training.slice_grads``) when it is fused experts the split knows;
    otherwise its slices take their rows of the whole fused tensor's gradient."""
    params = module.parametrizations
    experts = {params[a][0].experts if a in params else None for a in slice_grads.PROJECTIONS}
    problem = (gated_experts_problem(module) if len(experts) == 1 and None not in experts
               else "its gate_up_proj and down_proj do not train the same experts")
    if problem is None:
        slice_grads.install(module)
    else:
        log.warning("%s: the gradient of the whole fused tensor is computed for its"
                    " trained slices (%s)", type(module).__name__, problem)


def whole_tensor(model: torch.nn.Module, t: Trainable, *, current: bool = True) -> torch.Tensor:
    """The whole tensor ``t`` trains (a fused one with every expert), without a copy.

    With ``current``, a fused tensor's trained slices are first written into its
    frozen original in place (every forward pass does the same, see ``FusedSlices``).
    Without, only the shape and dtype are meant.
    """
    owner, _, attr = t.name.rpartition(".")
    module = model.get_submodule(owner)
    if not torch.nn.utils.parametrize.is_parametrized(module, attr):
        return t.param.detach()
    parametrized = module.parametrizations[attr]
    original = parametrized.original
    if current:
        parametrized[0].write(original)
    return original.detach()

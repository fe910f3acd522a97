"""Which checkpoint experts the rows of a model's fused expert tensors are, once training
has changed the model: the loader (``hf_shards``) and the trainer both ask here.

- Expert parallelism localizes a model (``esft_rs.training.expert_parallel.localize``):
  a fused ``[E, ...]`` experts module keeps only the rows of the experts its rank owns
  (``hold_rows``), and the model remembers its placement (``set_placement``).
- Training a fused tensor's selected experts re-parametrises it (``FusedSlices``): its
  trained rows become one separate parameter over the frozen original.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from esft_rs.training.placement import Placement


def hold_rows(module: torch.nn.Module, rows: tuple[int, ...], total: int) -> None:
    """Record that fused experts ``module`` now holds the rows of experts ``rows`` (in
    order) of the checkpoint's ``total``."""
    module._esft_rows = rows
    module._esft_total = total


def expert_rows(module: torch.nn.Module) -> tuple[int, ...] | None:
    """The experts whose rows a localized fused experts module holds, in order (None:
    not localized, row i is expert i)."""
    return getattr(module, "_esft_rows", None)


def rows_of(model: torch.nn.Module, name: str) -> tuple[tuple[int, ...], int] | None:
    """For in-memory tensor ``name`` of a localized fused experts module: the experts its
    rows are, and how many the checkpoint has; None for any other tensor."""
    owner = model.get_submodule(name.rpartition(".")[0])
    rows = expert_rows(owner)
    return None if rows is None else (rows, int(owner._esft_total))


def set_placement(model: torch.nn.Module, placement: Placement) -> None:
    model._esft_placement = placement


def placement_of(model: torch.nn.Module) -> Placement | None:
    """The placement of a model localized for expert parallelism (None: not localized)."""
    return getattr(model, "_esft_placement", None)


class FusedSlices(torch.nn.Module):

    """The trained slices of a fused [E, ...] weight, over its frozen original.

    Used as a parametrization: the module's attribute reads as the whole fused
    tensor, while autograd and the optimizer see only ``slices`` (fp32 masters
    where the original is bf16). A read writes the slices into the original's
    rows in place and returns the original itself: no fused-size tensor is made
    in the forward pass or saved for backward, with any experts implementation,
    and the frozen rows are never written. With ``split`` the original is returned
    detached and the experts' forward gives the slices their gradient
    (``slice_grads``); without, the read is ``_SlicesInPlace``, whose backward
    takes the slices' rows of the whole fused tensor's gradient.
    """

    def __init__(self, original: torch.Tensor, ids: list[int],
                 experts: list[int] | None = None) -> None:
        super().__init__()
        # the experts of ``slices``' rows (kept for loading a meta model), and the rows of
        # ``original`` they are: the same, unless expert parallelism holds some rows only
        self.experts = tuple(ids if experts is None else experts)
        self.rows = tuple(ids)
        # set by ``slice_grads.install``: the module's forward gives the slices their
        # gradient, so a read returns the original detached
        self.split = False
        index = torch.tensor(ids, dtype=torch.long, device=original.device)
        self.register_buffer("ids", index, persistent=False)
        self.slices = torch.nn.Parameter(original.index_select(0, index).clone())

    def write(self, original: torch.Tensor) -> None:
        """Copy the slices into their rows of ``original``; through ``.data``, so that
        tensors autograd saved from ``original`` are not seen as modified: the rows
        receive the same values on every read between two optimizer steps."""
        with torch.no_grad():
            original.data.index_copy_(0, self.ids, self.slices.detach().to(original.dtype))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.split:
            self.write(original)
            return original.detach()
        return _SlicesInPlace.apply(original, self.slices, self)


class _SlicesInPlace(torch.autograd.Function):
    """original (with the slices written in) -> the same storage; grad -> grad[ids]."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, original: torch.Tensor,
        slices: torch.Tensor, owner: FusedSlices,
    ) -> torch.Tensor:
        owner.write(original)
        ctx.ids, ctx.dtype = owner.ids, slices.dtype  # a buffer: nothing new is saved
        return original.view_as(original)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[None, torch.Tensor, None]:
        return None, grad.index_select(0, ctx.ids).to(ctx.dtype), None

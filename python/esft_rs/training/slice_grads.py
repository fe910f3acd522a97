"""Weight gradients for the trained slices of fused experts only (a straight-through split).

A fused experts module computes, for token t routed to experts e with weights w,
``y_t = sum_e w_te * down_e @ (act(gate_e @ x_t) * (up_e @ x_t))`` over
``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]. Trained in slices, the
module runs as configured (``grouped_mm``, ``batched_mm``, ``eager``, ...) on its
fused tensors, which hold the slices' values (``FusedSlices`` writes them in) but are
detached: its backward computes the input and routing-weight gradients of every
expert and no weight gradient. ``_SliceGrads`` passes the output through unchanged
(bit-identical to training the fused tensor) and, in backward, computes the weight
gradient of the trained slices alone from the n (token, expert) pairs routed to
them: beside those gradients (6 n H I FLOPs), it recomputes the pairs' gate/up output
(4 n H I) and the down projection's input gradient (2 n H I). Against the weight
gradient of all E experts (6 N H I for N routed pairs) that this replaces, ESFT's
backward drops by the frozen share, less that overhead, and no tensor of the fused
size is made.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch.nn.utils import parametrize

PROJECTIONS = ("gate_up_proj", "down_proj")


def install(module: torch.nn.Module) -> None:
    """Route ``module``'s forward through the split. Its ``gate_up_proj`` and
    ``down_proj`` are both parametrised by ``FusedSlices`` of the same experts, and the
    model interface has said that it computes the gated MLP above
    (``esft_rs.models.gated_experts_problem``)."""
    for attr in PROJECTIONS:
        module.parametrizations[attr][0].split = True
    module.forward = types.MethodType(_forward, module)


def _forward(self: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
    # cached: with ``eager``, which reads each fused attribute per expert hit, the
    # slices are written once per forward, not at every read
    with parametrize.cached():
        out = type(self).forward(self, hidden, index, weights)
    gate_up, down = (self.parametrizations[a] for a in PROJECTIONS)
    return _SliceGrads.apply(out, hidden, index, weights, gate_up[0].slices,
                             down[0].slices, (self.act_fn, gate_up[0].ids, gate_up.original.dtype))


class _SliceGrads(torch.autograd.Function):
    """out -> out; backward: grad -> grad, and the trained slices' weight gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, out: torch.Tensor, hidden: torch.Tensor, index: torch.Tensor,
        weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
        how: tuple[torch.nn.Module, torch.Tensor, torch.dtype],  # act_fn, ids, fused dtype
    ) -> torch.Tensor:
        ctx.save_for_backward(hidden, index, weights, gate_up, down)
        ctx.act, ctx.ids, ctx.dtype = how  # a module and a buffer: nothing new is saved
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if not any(ctx.needs_input_grad[4:6]):
            return grad, None, None, None, None, None, None
        hidden, index, weights, gate_up, down = ctx.saved_tensors
        grad_gate_up, grad_down = torch.zeros_like(gate_up), torch.zeros_like(down)
        dtype = ctx.dtype  # the fused tensor's: what the experts computed in
        # (token, top-k position, slice) of every pair routed to a trained expert, by slice
        token, position, slot = (index.unsqueeze(-1) == ctx.ids).nonzero(as_tuple=True)
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=len(ctx.ids)).tolist()
        for i, (tok, pos) in enumerate(zip(token[order].split(counts),
                                           position[order].split(counts), strict=True)):
            if not len(tok):
                continue
            x = hidden[tok].to(dtype)
            dy = (grad[tok] * weights[tok, pos].unsqueeze(-1)).to(dtype)
            with torch.enable_grad():
                gu = (x @ gate_up[i].to(dtype).T).requires_grad_()
                g, u = gu.chunk(2, dim=-1)
                h = ctx.act(g) * u
            grad_down[i] = dy.T @ h.detach()
            (dgu,) = torch.autograd.grad(h, gu, dy @ down[i].to(dtype))
            grad_gate_up[i] = dgu.T @ x
        return grad, None, None, None, grad_gate_up, grad_down, None

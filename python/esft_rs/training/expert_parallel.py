"""Expert parallelism (``parallelism: ep``): each rank owns some of every MoE layer's routed
experts, and tokens travel to their experts' ranks and back by all-to-all.

Everything that is not a routed expert (attention, dense MLPs, shared experts, routers,
embeddings) is replicated: a frozen replicated weight costs memory but no communication,
so in ESFT, where only routed experts train, a step moves only the routed tokens.
Trained replicated tensors (``--mode full``, ``shared_experts``, ``non_expert_modules``)
have their gradients all-reduced once per optimizer step.

The pieces, in the order a run uses them:

- ``place_experts``: which rank owns which expert. ESFT-aware: each layer's trained
  experts are dealt round-robin first, continuing across layers, so every rank holds an
  equal share of the trained experts (within one per layer, and one overall); the frozen
  experts then fill every rank to an equal count (within one).
- ``localize``: on the meta model, before loading, a rank drops the experts it does not
  own. The built-in model keeps per-expert modules (checkpoint names unchanged); a
  transformers family's fused ``[E, ...]`` tensors shrink to the owned rows, and
  ``esft_rs.models.expert_rows`` tells the loader and the trainer which experts those rows are.
- ``install``: the MoE layers' expert computation becomes ``Dispatch``: token rows go to
  their owners by all-to-all (``_AllToAll``, differentiable: its backward is the reverse
  all-to-all), the owner runs its experts (the family's own experts forward, any
  implementation), and the results come back the same way.
- ``finish_grads`` / ``clip_grad_norm``: the gradient of one process with the same
  global batch, and its norm.
- ``adapter_tensors`` / ``state_dict``: the adapter in one process's naming and order,
  and checkpoints keyed by expert, not by rank (any world size resumes them).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch

from esft_rs.distributed import Dist
from esft_rs.errors import MismatchError
from esft_rs.files.naming import classify
from esft_rs.models import hf
from esft_rs.models.expert_rows import hold_rows, placement_of, set_placement
from esft_rs.models.reference import MoE
from esft_rs.training.freeze import Trainable, checkpoint_tensors
from esft_rs.training.placement import Placement, place_experts  # noqa: F401 (re-exported)
from esft_rs.training.sharding import (
    _checkpoint_tensors,
    _input_needs_grad,
    _reverted_slices,
    decoder_layers,
)

PLACEMENT = "placement.json"


def uses_ep(parallelism: str, world: int) -> bool:
    return world > 1 and parallelism == "ep"


# --- the model, before loading --------------------------------------------------------------

class _Absent(torch.nn.Module):
    """An expert another rank owns (the built-in model's per-expert modules)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this expert is owned by another rank")


def moe_blocks(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layer -> its MoE block (the router's parent: ``mlp``), whatever the family."""
    if hf.is_hf(model):
        return {layer: model.get_submodule(_parent(model, router))
                for layer, router in hf.routers(model).items()}
    return {i: layer.mlp for i, layer in enumerate(model.model.layers)
            if isinstance(layer.mlp, MoE)}


def _parent(model: torch.nn.Module, module: torch.nn.Module) -> str:
    name = next(n for n, m in model.named_modules() if m is module)
    return name.rpartition(".")[0]


def localize(model: torch.nn.Module, placement: Placement, rank: int) -> None:
    """Drop from a meta ``model`` the routed experts ``rank`` does not own."""
    # one process's parameter order, which the adapter keeps
    model._esft_order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    for layer, block in moe_blocks(model).items():
        mine = placement.experts_of(layer, rank)
        experts = block.experts
        if isinstance(experts, torch.nn.ModuleList):  # the built-in model: one module each
            for e in range(len(experts)):
                if e not in mine:
                    experts[e] = _Absent()
            continue
        total = int(experts.num_experts)
        index = torch.tensor(mine, dtype=torch.long)
        for attr, p in list(experts.named_parameters(recurse=False)):
            if p.dim() and p.shape[0] == total:
                kept = p.detach().index_select(0, index.to(p.device))
                setattr(experts, attr, torch.nn.Parameter(kept, requires_grad=p.requires_grad))
        experts.num_experts = len(mine)
        hold_rows(experts, tuple(mine), total)
    set_placement(model, placement)


def check_model(model: torch.nn.Module, origin: object) -> None:
    """Refuses, in one line, a model with nothing to place: no MoE layer."""
    if not moe_blocks(model):
        raise MismatchError(f"{origin}: has no MoE layer, so --parallelism ep has no experts"
                            " to place; use fsdp or ddp")


# --- the forward ------------------------------------------------------------------------------

class Dispatch:
    """Token rows to their experts' owners and back, by all-to-all (every rank calls)."""

    def __init__(self, owners: tuple[int, ...], rank: int, world: int,
                 device: torch.device) -> None:
        self.world = world
        self.owner = torch.tensor(owners, dtype=torch.long, device=device)
        local = [0] * len(owners)
        for r in range(world):
            for i, e in enumerate(e for e, o in enumerate(owners) if o == r):
                local[e] = i
        self.local = torch.tensor(local, dtype=torch.long, device=device)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for every token t; ``compute``
        runs this rank's experts on the rows it receives (their local expert index)."""
        import torch.distributed as dist

        tokens, k = ids.shape
        flat = ids.reshape(-1)
        dest = self.owner[flat]
        order = torch.argsort(dest * len(self.owner) + flat, stable=True)
        send = torch.bincount(dest, minlength=self.world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        local_ids = torch.empty(sum(recv_sizes), dtype=torch.long, device=x.device)
        dist.all_to_all_single(local_ids, self.local[flat[order]], recv_sizes, send_sizes)
        rows = x[order // k]
        got = _AllToAll.apply(rows, recv_sizes, send_sizes)
        out = compute(got, local_ids)
        if out.dtype != got.dtype:
            out = out.to(got.dtype)
        back = _AllToAll.apply(out, send_sizes, recv_sizes)
        slots = back[torch.argsort(order)]
        return (slots.view(tokens, k, -1) * weights.unsqueeze(-1).to(slots.dtype)).sum(dim=1)


class _AllToAll(torch.autograd.Function):
    """Rows to the ranks (``send`` of them to each), differentiable: the backward sends
    the gradients back the way the rows came. On ``torch.distributed.all_to_all_single``
    (public, every backend); torch's own autograd wrapper of it is deprecated, and its
    successor is private."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, rows: torch.Tensor, recv: list[int], send: list[int]
    ) -> torch.Tensor:
        import torch.distributed as dist

        ctx.recv, ctx.send = recv, send
        out = rows.new_empty((sum(recv), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv, send)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        import torch.distributed as dist

        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv)
        return out, None, None


def install(model: torch.nn.Module, place: Dist, device: torch.device) -> None:
    """Route every MoE layer's experts through ``Dispatch`` (after ``freeze``, whose
    ``slice_grads`` forward the owner then runs)."""
    placement = placement_of(model)
    if placement is None:
        raise RuntimeError("install: the model was not localized")
    for layer, block in moe_blocks(model).items():
        dispatch = Dispatch(placement.owners[layer], place.rank, place.world, device)
        experts = block.experts
        if isinstance(experts, torch.nn.ModuleList):
            block.routed = types.MethodType(_routed_builtin(dispatch), block)
        else:
            inner = experts.forward  # the family's forward, or slice_grads' around it
            experts.forward = _routed_fused(dispatch, inner)
    # the first layer's input requires grad in training, so that every rank's backward
    # runs through every all-to-all, as its peers' do (see ``sharding._input_needs_grad``)
    layers = decoder_layers(model)
    if layers:
        layers[0].register_forward_pre_hook(_input_needs_grad, with_kwargs=True)


def _connected(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out`` tied to ``rows`` at zero weight when no expert ran here: this rank's backward
    must still pass the reverse all-to-all that its peers wait in."""
    return out if out.grad_fn is not None or not rows.requires_grad else out + rows[:, :0].sum()


def _routed_builtin(dispatch: Dispatch) -> Callable[..., torch.Tensor]:
    def routed(self: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
        mine = [e for e, m in enumerate(self.experts) if not isinstance(m, _Absent)]

        def compute(rows: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
            order = local.argsort(stable=True)
            counts = torch.bincount(local, minlength=len(mine)).tolist()
            outs = [self.experts[mine[i]](c) for i, c in enumerate(rows[order].split(counts))
                    if counts[i]]
            if not outs:
                return _connected(rows * 0, rows)
            done = torch.cat(outs)
            out = torch.empty_like(done)
            out[order] = done
            return out

        return dispatch(x, ids, weights, compute)

    return routed


def _routed_fused(dispatch: Dispatch, inner: Callable[..., torch.Tensor]
                  ) -> Callable[..., torch.Tensor]:
    def forward(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
        def compute(rows: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
            if not len(rows):
                return _connected(rows * 0, rows)
            ones = torch.ones((len(rows), 1), dtype=weights.dtype, device=rows.device)
            return inner(rows, local[:, None], ones)

        return dispatch(hidden, index, weights, compute)

    return forward


# --- gradients ----------------------------------------------------------------------------

def is_local(model: torch.nn.Module, t: Any) -> bool:
    """Whether trained tensor ``t`` is routed experts' (a per-expert tensor, or a fused
    one's rows), held by their owner alone; else it is replicated."""
    return placement_of(model) is not None and (
        t.experts is not None or classify(t.name).kind == "routed_expert")


def finish_grads(model: torch.nn.Module, trainables: list[Any], place: Dist) -> None:
    """One process's gradient with the same global batch: an expert's owner holds the sum of
    every rank's contribution (the loop scales each rank's loss by the world size, which
    data parallelism averages out), so it is divided by the world size; a replicated tensor's
    gradient is averaged over the ranks, and one that no rank's autograd reached stays unset
    (AdamW skips it, as in one process)."""
    import torch.distributed as dist

    shared = [t for t in trainables if not is_local(model, t)]
    for t in trainables:
        if t in shared:
            continue
        if t.param.grad is None and t.experts is not None:
            # one process steps a fused tensor whenever its layer ran (its slices' gradient,
            # zero or not, is computed whole); here the owner's experts may have got no row
            t.param.grad = torch.zeros_like(t.param)
        if t.param.grad is not None:
            t.param.grad.div_(place.world)
    if not shared or place.world == 1:
        return
    reached = torch.tensor([t.param.grad is not None for t in shared], dtype=torch.int32)
    dist.all_reduce(reached)
    for t, hit in zip(shared, reached.tolist(), strict=True):
        if not hit:
            continue
        if t.param.grad is None:
            t.param.grad = torch.zeros_like(t.param)
        place.sum(t.param.grad).div_(place.world)


def clip_grad_norm(model: torch.nn.Module, trainables: list[Any], max_norm: float,
                   place: Dist, device: torch.device) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the gradients of all ranks: the owners' expert
    gradients each counted once, the replicated ones once."""
    local = [t.param.grad for t in trainables if t.param.grad is not None
             and is_local(model, t)]
    shared = [t.param.grad for t in trainables if t.param.grad is not None
              and not is_local(model, t)]
    def squares(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack([g.detach().float().norm() for g in grads]).square().sum()

    total = place.sum(squares(local)) + squares(shared)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in local + shared:
        g.mul_(coef.to(g.dtype))
    return norm


# --- the adapter and checkpoints --------------------------------------------------------------

def adapter_layout(model: torch.nn.Module, trainables: list[Any], on_disk: Any, place: Dist,
                   device: torch.device) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor ``adapter_tensors`` will yield, on rank 0 (the
    adapter's header is written before the first arrives); every rank must call."""
    return [(n, v.dtype, tuple(v.shape))
            for n, v in adapter_tensors(model, trainables, on_disk, place, device, meta=True)]


def adapter_tensors(model: torch.nn.Module, trainables: list[Any], on_disk: Any,
                    place: Dist, device: torch.device, *, meta: bool = False
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """What the adapter holds, in one process's order and naming, whatever the placement:
    rank 0 receives each remote expert's trained tensor from its owner, one at a time.
    Every rank must exhaust it. ``meta``: shapes and dtypes only, nothing sent."""
    import torch.distributed as dist

    mine = [(t.name, t.experts, is_local(model, t), _dtype_name(t.dtype),
             _dtype_name(t.param.dtype), tuple(t.param.shape)) for t in trainables]
    every: list[list[Any]] = [[] for _ in range(place.world)]
    if place.world > 1:
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    order = _param_order(model)
    names = sorted({m[0] for ranked in every for m in ranked}, key=order)
    by_name = {t.name: t for t in trainables}
    for name in names:
        held = [(r, m) for r, ranked in enumerate(every) for m in ranked if m[0] == name]
        if not held[0][1][2]:  # replicated: rank 0 has it
            if place.main:
                t = by_name[name]
                yield from (checkpoint_tensors(model, [t], on_disk, meta=True) if meta else
                            _checkpoint_tensors(model, t, t.param.detach(), on_disk)).items()
            continue
        parts: list[tuple[tuple[int, ...] | None, torch.Tensor]] = []
        for r, (_, experts, _, _, held_dtype, shape) in held:
            if meta:
                parts.append((experts, torch.empty(shape, dtype=getattr(torch, held_dtype),
                                                   device="meta")))
            elif r == place.rank and place.main:
                parts.append((experts, by_name[name].param.detach()))
            elif r == place.rank:
                dist.send(by_name[name].param.detach().contiguous(), dst=0)
            elif place.main:
                buf = torch.empty(shape, dtype=getattr(torch, held_dtype), device=device)
                dist.recv(buf, src=r)
                parts.append((experts, buf))
        if not place.main:
            continue
        dtype = getattr(torch, held[0][1][3])
        if parts[0][0] is None:  # a per-expert tensor (the built-in model): one owner
            yield name, parts[0][1].to(dtype).contiguous()
            continue
        experts = [e for ids, _ in parts for e in ids or ()]
        value = torch.cat([v for _, v in parts])
        value = value[torch.tensor(experts).argsort().to(value.device)]
        t = Trainable(name, torch.nn.Module(), "slices", dtype, tuple(sorted(experts)))
        yield from _reverted_slices(model, t, value).items()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _param_order(model: torch.nn.Module) -> Callable[[str], int]:
    """Sort key: the parameter's place in one process's model (recorded by ``localize``)."""
    order: dict[str, int] = getattr(model, "_esft_order", {})
    return lambda name: order.get(name, len(order))


def _keys(t: Any) -> list[tuple[str, int | None]]:
    """Placement-free keys of a trained tensor's parts: a fused tensor's row per expert
    (``name/E``), else the tensor (its name), so that any world size finds its own."""
    if t.experts is None:
        return [(t.name, None)]
    return [(f"{t.name}/{e}", i) for i, e in enumerate(t.experts)]


def state_dict(trainables: list[Any], optimizer: torch.optim.Optimizer,
               best: Mapping[str, torch.Tensor] | None, *, saving: bool) -> dict[str, Any]:
    """The trained weights, the best ones and the AdamW state under placement-free keys
    (``_keys``), for ``torch.distributed.checkpoint``: rows are views to load into, and
    copies when ``saving`` (a saved view would carry its whole tensor)."""
    out: dict[str, Any] = {}
    group = optimizer.param_groups[0]
    # the scheduler's state holds no learning rate: its next step starts from the group's
    out["optimizer/lr"] = torch.tensor([group["lr"], group.get("initial_lr", math.nan)],
                                       dtype=torch.float64)
    for t in trainables:
        state = optimizer.state.get(t.param, {})
        sources = {"weights": t.param.detach()}
        if best is not None:
            sources["best"] = best[t.name]
        sources.update({f"optimizer/{s}": state[s] for s in ("exp_avg", "exp_avg_sq")
                        if s in state})
        for key, i in _keys(t):
            for kind, value in sources.items():
                part = value if i is None else value[i]
                out[f"{kind}/{key}"] = part.clone() if saving and i is not None else part
            if "step" in state:
                out[f"optimizer/step/{key}"] = state["step"]
    return out


def prepare_optimizer(trainables: list[Any], optimizer: torch.optim.Optimizer,
                      saved: Collection[str]) -> None:
    """Create the AdamW state the checkpoint holds (``saved``: its keys), to load into; a
    tensor with none saved had no gradient yet and keeps none (AdamW counts its steps)."""
    for t in trainables:
        if not any(f"optimizer/step/{key}" in saved for key, _ in _keys(t)):
            continue
        p = t.param
        optimizer.state[p] = {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }


def restore_lr(optimizer: torch.optim.Optimizer, loaded: Mapping[str, Any]) -> None:
    lr, initial = loaded["optimizer/lr"].tolist()
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not math.isnan(initial):
            group["initial_lr"] = initial

"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over a frozen model with trained tensors in it.

One ``fully_shard`` per decoder layer, then the root: every parameter, frozen or
trained, is sharded on dim 0 across the ranks; a layer is gathered for its
forward and backward only. Only parameters that require grad get gradients,
and the optimizer (built after sharding) keeps fp32 state for those only, as
shards. Nothing here knows which tensors train beyond ``requires_grad`` and the
``Trainable`` list, so any freezing mechanism works that leaves trained tensors
as ordinary parameters of the model.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection, Iterable, Iterator
from typing import Any

import torch

from esft_rs.distributed import Dist
from esft_rs.files.naming import classify, fused_slice_name, fused_slice_parent
from esft_rs.models import hf
from esft_rs.models.expert_rows import FusedSlices
from esft_rs.models.hf import _revert
from esft_rs.training.freeze import Trainable, checkpoint_tensors
from esft_rs.training.host_memory import return_freed_memory

#: A decoder layer: ``...layers.<i>`` in a ModuleList (every family names them so).
_LAYER = re.compile(r"(?:^|\.)layers\.\d+$")


def uses_fsdp(parallelism: str, world: int) -> bool:
    return world > 1 and parallelism == "fsdp"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if _LAYER.search(name)]


def shard(
    model: torch.nn.Module, trainables: list[Trainable], place: Dist, device: torch.device,
    *, prefetch: bool = True,
) -> list[Trainable]:
    """Shard ``model`` in place over all ranks (``fully_shard`` replaces every parameter
    by a DTensor; each ``Trainable`` looks its parameter up on its module, so it follows).
    ``prefetch``: gather each layer one ahead, while the layer before it computes; off, a
    rank holds one gathered layer at a time instead of two, and each gather blocks it."""
    from torch.distributed.fsdp import fully_shard

    if device.type == "cpu":
        return_freed_memory()  # else glibc keeps the freed gathers of every layer resident
    mesh = place.mesh(device)
    layers = decoder_layers(model)
    placement = _slices_on_dim_1(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    # Experts that get no token on a rank have no gradient there: reduce zeros for
    # them, or the ranks' reduce-scatters would not match (DDP's find_unused_parameters).
    model.set_reduce_scatter_unused_params(True)
    if layers:
        # Backward gathers each layer it passes through, on every rank alike: a rank whose
        # tokens reached no trained expert of a layer (and none below) would skip it.
        layers[0].register_forward_pre_hook(_input_needs_grad, with_kwargs=True)
        _overlap(model, layers, device, prefetch)
    return trainables


def _slices_on_dim_1(model: torch.nn.Module) -> Any:
    """FSDP2's placement per parameter: the trained slices of a fused experts tensor
    [k, rows, cols] are split along their rows, not their k experts, so that every rank
    holds an equal share of them (and of their AdamW state) even when the ranks outnumber
    a layer's trained experts; everything else on dim 0."""
    from torch.distributed.tensor import Shard

    slices = {id(m.slices) for m in model.modules() if isinstance(m, FusedSlices)
              and m.slices.dim() >= 2}

    def placement(param: torch.nn.Parameter) -> Shard | None:
        return Shard(1) if id(param) in slices else None

    return placement


def _overlap(model: torch.nn.Module, layers: list[torch.nn.Module], device: torch.device,
             prefetch: bool) -> None:
    """Gather each layer while its neighbour computes, and skip the last layer's second gather.

    FSDP2 overlaps by streams, which a CPU has not: there each all-gather blocks the rank
    until it ends. Asynchronous all-gathers issued one layer ahead (the next one in the
    forward, the previous one in the backward) run on the backend's thread instead, under
    the running layer's compute. The backward starts with the last layer just after its
    forward, so it stays gathered in between (as torchtitan does) rather than being
    gathered twice in a row. Memory: at most two layers gathered, as FSDP2's own prefetch.
    On CPU each gather goes in pieces (``chunked_gather``: gloo is faster so).
    """
    if device.type == "cpu":
        from esft_rs import private_api
        from esft_rs.training import chunked_gather

        private_api.set_unshard_async(model)
        chunked_gather.install(model)
    if prefetch:
        model.set_modules_to_forward_prefetch([layers[0]])  # type: ignore[operator]
        for first, second in itertools.pairwise(layers):
            first.set_modules_to_forward_prefetch([second])  # type: ignore[operator]
            second.set_modules_to_backward_prefetch([first])  # type: ignore[operator]
    else:
        # FSDP2 prefetches the previous layer in the backward unless told which to
        # prefetch: the layer itself, gathered by then, makes that a no-op.
        for layer in layers:
            layer.set_modules_to_backward_prefetch([layer])  # type: ignore[operator]
    layers[-1].set_reshard_after_forward(False)  # type: ignore[operator]


def reshard(model: torch.nn.Module) -> None:
    """Shard again what a forward without backward left gathered (the root and the last
    layer, which ``shard`` keeps for the backward): their parameters are DTensors again."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _input_needs_grad(
    _module: torch.nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """Forward pre-hook: the hidden states entering the first layer require grad (in
    training), so backward runs through every layer above them, on every rank."""
    if not torch.is_grad_enabled():
        return None
    if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
        if not args[0].requires_grad:
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
    elif torch.is_tensor(h := kwargs.get("hidden_states")) and not h.requires_grad:
        return args, {**kwargs, "hidden_states": h.detach().requires_grad_()}
    return None


def sync_fused_slices(model: torch.nn.Module) -> None:
    """Write each ``FusedSlices``' current values into its rows of the sharded frozen
    fused tensor (every rank must call, after every change to the slices).

    FSDP2 frees a layer's gathered weights after its forward and gathers them again
    from the shards for its backward. The forward writes the trained slices into the
    gathered tensor only, so without this the backward would compute with the base
    values in the trained rows, not the values the forward used. The all-gather is of
    the trained slices alone."""
    for module in model.modules():
        params = getattr(module, "parametrizations", None)
        if params is None:
            continue
        for plist in params.values():
            for p in plist:
                if not isinstance(p, FusedSlices):
                    continue
                values = full(p.slices.detach())
                original = plist.original
                if not is_sharded(original):
                    p.write(original)
                    continue
                rows = local(original)
                # Shard(0) as torch.chunk: rank r holds rows [r*c, r*c + len) of c = ceil(E/N).
                chunk = -(-original.shape[0] // original.device_mesh.size())
                start = original.device_mesh.get_local_rank() * chunk
                ids = p.ids - start
                mine = (ids >= 0) & (ids < rows.shape[0])
                with torch.no_grad():
                    rows.index_copy_(0, ids[mine], values[mine].to(rows.dtype))


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (all of it when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """All of ``t``, gathered from every rank when it is sharded (every rank must call)."""
    return t.full_tensor() if is_sharded(t) else t


def adapter_tensors(
    model: torch.nn.Module, trainables: list[Trainable], on_disk: Collection[str], place: Dist
) -> Iterator[tuple[str, torch.Tensor]]:
    """What the adapter holds (``freeze.checkpoint_tensors``' names, dtypes and layout),
    gathering only the trained tensors, one at a time: rank 0 gets them, one trained
    tensor's worth at a time, the others nothing. Every rank must exhaust it (each
    step gathers)."""
    for t in trainables:
        value = full(t.param.detach())
        if place.main:
            # Fused slices: their frozen rows stay sharded, so revert the slices alone.
            fused = hf.is_hf(model) and t.experts is not None and t.name not in on_disk
            yield from (_reverted_slices(model, t, value) if fused
                        else _checkpoint_tensors(model, t, value, on_disk)).items()
        del value  # before the next gather


def _checkpoint_tensors(
    model: torch.nn.Module, t: Trainable, value: torch.Tensor, on_disk: Collection[str]
) -> dict[str, torch.Tensor]:
    """``freeze.checkpoint_tensors`` of ``t`` with its whole ``value`` in place of its shard."""
    sharded = t.param
    t.module.register_parameter(t.attr, torch.nn.Parameter(value, requires_grad=False))
    try:
        return checkpoint_tensors(model, [t], on_disk)
    finally:
        t.module.register_parameter(t.attr, sharded)


def _reverted_slices(
    model: torch.nn.Module, t: Trainable, value: torch.Tensor
) -> dict[str, torch.Tensor]:
    """transformers' save-time conversion of a fused tensor's trained slices [k, ...]: it
    names them experts 0..k-1, renamed here to the experts they are."""
    assert t.experts is not None
    out = {}
    for name, reverted in _revert(model, {t.name: value}).items():
        parent = fused_slice_parent(name)
        role = classify(name)
        if parent is None or role.expert is None:
            raise RuntimeError(f"{t.name}: transformers reverted it to {name}, not an expert")
        renamed = fused_slice_name(parent[0], t.experts[role.expert])
        assert renamed is not None
        out[renamed] = reverted.to(t.dtype).contiguous()
    return out


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of these tensors held by this rank."""
    return sum(local(v).numel() * v.element_size() for v in tensors)


def rank_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds: frozen and trained weights, optimizer state (bytes)."""
    params = list(model.parameters())
    return {
        "frozen": local_bytes(p for p in params if not p.requires_grad),
        "trained": local_bytes(p for p in params if p.requires_grad),
        "optimizer": local_bytes(v for s in optimizer.state.values() for v in s.values()
                                 if torch.is_tensor(v)),
    }

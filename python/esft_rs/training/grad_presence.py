"""Which trained tensors autograd reached, on any rank, under FSDP2: those AdamW steps.

In one process a trained tensor that autograd reached has a gradient, possibly exactly
zero (an expert that only padding tokens were routed to: padding carries no loss), and
AdamW steps it (its step count, weight decay); one that autograd never reached has none
and is skipped. FSDP2 reduce-scatters zeros for the tensors a rank's autograd did not
reach (``set_reduce_scatter_unused_params``: every rank's collectives must match), so
after the reduction every trained tensor has a gradient and the difference is gone.
``GradPresence`` records it before: a post-accumulate-grad hook on each unsharded
parameter (what FSDP2 puts on the module for forward and backward; it keeps the same
object from its first all-gather on) marks the tensor when autograd gives it a gradient.
Padding is to the fixed ``seq_length``, so each padding token is in its row in every
engine and is routed alike: the union over ranks and micro-steps of these marks is one
process's "gradient is not None".

DDP needs none of this: its reducer keeps the same record (autograd hooks, summed over
the ``no_sync`` micro-steps and all-reduced over the ranks) and leaves the gradient of a
tensor no rank's autograd reached unset; one reached on any rank gets the all-reduced
gradient, zero or not.
"""

from __future__ import annotations

from typing import Any

import torch

from esft_rs.distributed import Dist
from esft_rs.training.freeze import Trainable
from esft_rs.training.sharding import is_sharded, local


class GradPresence:
    """Marks, per trained tensor, whether autograd gave it a gradient on this rank since
    the last ``drop_unused``. Build it after ``sharding.shard``, before the first forward."""

    def __init__(self, trainables: list[Trainable]) -> None:
        self.trainables = trainables
        self.seen = [False] * len(trainables)
        self._hooked: dict[int, torch.Tensor] = {}  # id -> tensor: kept, so no id is reused
        owned: dict[torch.nn.Module, list[tuple[int, str]]] = {}
        for i, t in enumerate(trainables):
            owned.setdefault(t.module, []).append((i, t.attr))
        for module, attrs in owned.items():
            module.register_forward_pre_hook(self._watch(attrs))

    def _watch(self, attrs: list[tuple[int, str]]) -> Any:
        """Forward pre-hook of a module that owns trained tensors: FSDP2's own pre-forward
        hooks (of this module's ``fully_shard`` unit, which run first) have put the
        unsharded parameters on it; hook each the first time it is seen."""

        def pre_forward(module: torch.nn.Module, _args: tuple) -> None:
            own = dict(module.named_parameters(recurse=False))
            for i, attr in attrs:
                p = own.get(attr)
                # A DTensor is the sharded parameter: FSDP2 runs its post-accumulate-grad
                # hooks after the reduce-scatter, zeros included, so it says nothing here.
                if p is None or is_sharded(p) or id(p) in self._hooked:
                    continue
                self._hooked[id(p)] = p
                p.register_post_accumulate_grad_hook(lambda _p, i=i: self._mark(i))

        return pre_forward

    def _mark(self, i: int) -> None:
        self.seen[i] = True

    def drop_unused(self, place: Dist) -> None:
        """Give no gradient (None) to the trained tensors no rank's autograd reached since
        the last call, as one process has none for them; then start afresh. One
        all-reduce of a flag per tensor; every rank must call.

        A nonzero gradient counts as reached too (autograd reached it on some rank): that
        keeps a tensor whose owner module's forward never ran (read by another module, so
        never hooked) training, as it did before these hooks."""
        device = local(self.trainables[0].param).device
        no = torch.zeros((), dtype=torch.bool, device=device)
        nonzero = torch.stack([local(g).ne(0).any() if (g := t.param.grad) is not None else no
                               for t in self.trainables])
        seen = torch.tensor(self.seen, dtype=torch.bool, device=device) | nonzero
        flags = place.sum(seen.to(torch.int32))
        for t, n in zip(self.trainables, flags.tolist(), strict=True):
            if not n:
                t.param.grad = None
        self.seen = [False] * len(self.trainables)

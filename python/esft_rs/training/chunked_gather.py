"""FSDP2's all-gather of a layer as several smaller gloo all-gathers.

gloo over TCP loopback moves a large tensor at a fraction of the rate it moves pieces that
stay in cache: on the 2-core bench machine (32 MiB L3) a 105 MiB all-gather between 2
ranks took 342 ms as one collective and 122-143 ms as 8-16 (``benches/bench_scale.py``
measures the step). FSDP2 gathers a whole decoder layer in one collective; this one
issues it in pieces of ``CHUNK`` bytes of output into the same output (rank r's shard is
row r of the output viewed as [world, shard]), one after the other: each piece is issued
once the one before is done, and the last is left running (asynchronous to the caller, as
FSDP2's own). Several in flight at once on one gloo group corrupted the C heap now and then
(``malloc(): unaligned tcache chunk detected``: 2 of 30 two-rank runs with 11 pieces a
layer, none of 60 one at a time); one at a time, a 105 MiB all-gather takes 0.66x the time
of one ``all_gather_into_tensor`` at 2 ranks and 0.57x at 4 (``benches/bench_gather.py``).

Where it can (``InPlaceAllGather``: each parameter sharded on dim 0, one all-gather input
each, the usual case), the pieces go straight into each parameter's unsharded storage:
FSDP2 otherwise gathers the layer into one flat buffer and then copies it into the
parameters ("copy-out"), so that each gathered layer was held twice at that moment, the
forward/backward memory peak of a rank (``benches/gather_trace.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from esft_rs import private_api

#: Bytes of output per piece.
CHUNK = 16 * 2**20


class _Pieces(dist.Work):
    """The pieces' works as one: FSDP2 waits on it as on its own all-gather's."""

    def __init__(self, works: list[dist.Work]) -> None:
        super().__init__()
        self.works = works

    def wait(self, timeout: timedelta | None = None) -> bool:
        for w in self.works:
            w.wait()
        return True


def _pieces(segments: list[tuple[torch.Tensor, torch.Tensor]],
            group: dist.ProcessGroup) -> list[dist.Work]:
    """All-gathers of each ``(rows, source)`` pair (``source`` 1-D of this rank's n
    elements, ``rows`` [world, n] where rank r's go), in pieces of up to CHUNK bytes of
    output, each piece one gloo collective over as many pairs as fit (small parameters
    would each cost a round trip); each waits for the one before, the last is running."""
    works: list[dist.Work] = []
    outs: list[list[torch.Tensor]] = []  # [rank][input]: gloo's order
    ins: list[torch.Tensor] = []
    room = 0
    for rows, source in segments:
        world, n = rows.shape
        step = max(1, CHUNK // (source.element_size() * world))
        a = 0
        while a < n:
            if room == 0:
                if ins:
                    _issue(works, group, outs, ins)
                outs, ins, room = [[] for _ in range(world)], [], step
            b = min(n, a + room)
            for r in range(world):
                outs[r].append(rows[r, a:b])
            ins.append(source[a:b])
            room -= b - a
            a = b
    if ins:
        _issue(works, group, outs, ins)
    return works


def _issue(works: list[dist.Work], group: dist.ProcessGroup, outs: list[list[torch.Tensor]],
           ins: list[torch.Tensor]) -> None:
    """One piece, once the one before is done: one piece in flight at a time."""
    if works:
        works[-1].wait()
    works.append(group.allgather_coalesced(outs, ins))


class ChunkedAllGather:
    """An all-gather for ``FSDPModule.set_custom_all_gather`` (FSDP2's ``AllGather``)."""

    def allocate(
        self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        rows = output_tensor.view(group.size(), input_tensor.numel())
        return _finish(_pieces([(rows, input_tensor)], group), async_op)


def _finish(works: list[dist.Work], async_op: bool) -> dist.Work | None:
    work = _Pieces(works)
    if async_op:
        return work
    work.wait()
    return None


class InPlaceAllGather(ChunkedAllGather):
    """The all-gather of one FSDP2 parameter group, into its parameters' unsharded storage.

    FSDP2 allocates a flat output, copies this rank's shards into it ("copy-in") and calls
    this; it gathers each parameter's shard (FSDP2 shards on dim 0, so rank r's shard is
    row r of the unsharded parameter viewed as [world, shard]) into that parameter's
    unsharded storage, allocated here as FSDP2's copy-out would, after freeing the flat
    output (only its copied-in part was ever written). ``copy_out`` replaces FSDP2's
    copy-out: nothing is left to copy. FSDP2's internals are reached through
    ``esft_rs.private_api``; where they differ, ``install`` takes the flat way.
    """

    def __init__(self, group: Any) -> None:
        self.group = group  # FSDP2's parameter group
        self._written: tuple[list[torch.Tensor], list[int]] | None = None

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        world = group.size()
        # The tensors FSDP2's copy-in just read (this rank's padded shards), in its order.
        sources = private_api.gather_inputs(self.group)
        if any(len(s) != 1 for s in sources) or sum(
                s[0].numel() * s[0].element_size() for s in sources) != input_tensor.nbytes:
            raise RuntimeError(f"torch {torch.__version__}: FSDP2's all-gather input is not the"
                               " parameters' shards in order; esft_rs.private_api needs"
                               " updating (ESFT_RS_TEST_HIDE_PRIVATE=fsdp_in_place_gather"
                               " avoids it)")
        output_tensor.untyped_storage().resize_(0)  # the flat output: never read
        segments = []
        self._written = ([], [])
        for p, (source,) in zip(self.group.fsdp_params, sources, strict=True):
            out = private_api.unsharded_output(p, source, world)
            if not out.is_inference():
                # As FSDP2's copy-out, hide the write from autograd: the forward saved the
                # parameter for the backward, which gathers it again into the same tensor.
                self._written[0].append(out)
                self._written[1].append(private_api.version(out))
            rows, source = out.view(world, -1), source.view(-1)
            if source.dtype != input_tensor.dtype:  # mixed dtypes: FSDP2 gathers bytes
                rows, source = rows.view(input_tensor.dtype), source.view(input_tensor.dtype)
            segments.append((rows, source))
        return _finish(_pieces(segments, group), async_op)

    def copy_out(self, fsdp_params: list, result: object, world_size: int) -> None:
        """FSDP2's copy-out, called once the pieces are done."""
        if self._written is not None:
            private_api.set_versions(*self._written)
            self._written = None


def install(model: torch.nn.Module) -> None:
    """Make every FSDP module of ``model`` all-gather in pieces, in place where it can;
    where FSDP2 takes no custom all-gather, it keeps its own."""
    from torch.distributed.fsdp import FSDPModule

    if not private_api.can_set_all_gather():
        return
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = private_api.in_place_group(module)
        if group is not None:
            comm = InPlaceAllGather(group)
            module.set_custom_all_gather(comm)  # type: ignore[arg-type]
            private_api.set_copy_out(group, comm.copy_out)
        else:
            module.set_custom_all_gather(ChunkedAllGather())  # type: ignore[arg-type]

"""FSDP2's all-gather of a layer as several smaller gloo all-gathers.

gloo over TCP loopback moves a large tensor at a fraction of the rate it moves pieces that
stay in cache: on the 2-core bench machine (32 MiB L3) a 105 MiB all-gather between 2
ranks took 342 ms as one collective and 122-143 ms as 8-16 (``benches/bench_scale.py``
measures the step). FSDP2 gathers a whole decoder layer in one collective; this one
issues it in pieces of ``CHUNK`` bytes of output, all asynchronous, into the same output
(rank r's shard is row r of the output viewed as [world, shard]).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

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
        world, n = group.size(), input_tensor.numel()
        rows = output_tensor.view(world, n)
        step = max(1, CHUNK // (input_tensor.element_size() * world))
        work = _Pieces([
            dist.all_gather([rows[r, a:a + step] for r in range(world)], input_tensor[a:a + step],
                            group=group, async_op=True)
            for a in range(0, n, step)
        ])
        if async_op:
            return work
        work.wait()
        return None


def install(model: torch.nn.Module) -> None:
    """Make every FSDP module of ``model`` all-gather in pieces."""
    from torch.distributed.fsdp import FSDPModule

    comm = ChunkedAllGather()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(comm)  # type: ignore[arg-type]

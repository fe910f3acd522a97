"""One process-group setup for every command: torchrun's environment, gloo or nccl, the device.

Under ``torchrun`` (``WORLD_SIZE`` > 1) ``process_group`` joins the job through
torchrun's rendezvous (``env://``: ``MASTER_ADDR``/``MASTER_PORT``, multi-node
alike), with nccl on CUDA and gloo on CPU, and tears the group down if it made
it. Without torchrun it is rank 0 of 1 and touches nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch
import torch.distributed as dist

from esft_rs.errors import EsftValueError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for(name: str | None) -> torch.device:
    """``name`` as a device; None or ``auto``: this rank's GPU (``LOCAL_RANK``) if any, else CPU.
    A bare ``cuda`` is this rank's GPU too."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EsftValueError(f"device {name!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "meta":  # shapes only: no weights can be loaded onto it
        raise EsftValueError(f"device {name!r} holds no data; use cpu or cuda")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank())
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        why = textwrap.shorten(str(e), 160)
        raise EsftValueError(f"device {name!r} is not available here ({why})") from None
    return dev


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> Dist:
        """The process group a caller has set up (rank 0 of 1 without one)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local_rank())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` in place (a CPU copy under gloo, which has no CUDA all-reduce)."""
        if self.world > 1:
            if t.device.type != "cpu" and dist.get_backend() == "gloo":
                host = t.cpu()
                dist.all_reduce(host)
                t.copy_(host)
            else:
                dist.all_reduce(t)
        return t

    def mesh(self, device: torch.device) -> DeviceMesh:
        """A 1-D device mesh over all ranks (what FSDP2 shards over)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device.type, (self.world,))


def is_sharded_model(model: object) -> bool:
    """Whether FSDP2 shards ``model`` (its parameters are DTensors) or its experts are
    spread over the ranks (expert parallelism): either way every forward is collective."""
    from torch.distributed.tensor import DTensor

    if any(getattr(m, "_esft_placement", None) is not None
           for m in (model, getattr(model, "model", None))):
        return True
    params = model.parameters() if hasattr(model, "parameters") else ()
    return any(isinstance(p, DTensor) for p in params)


def sum_over_batches(
    model: torch.nn.Module,
    batches: int,
    run: Callable[[int], torch.Tensor],
    width: int,
    device: torch.device,
    place: Dist | None = None,
) -> torch.Tensor:
    """The sum over batches ``0 .. batches - 1`` of ``run(i)`` (a float64 vector of ``width``
    sums: loss numerators, token counts...), over all ranks (every rank must call).

    Batch i runs on rank i mod world size, so each batch holds the rows it holds in one
    process and the sums equal one process's (up to the order of float additions). A
    model sharded by FSDP2 all-gathers every layer from all ranks in each forward, so
    there every rank runs the same number of forwards: a rank out of batches runs a
    spare one (one token) that counts nothing.
    """
    place = place or Dist.current()
    total = torch.zeros(width, dtype=torch.float64, device=device)
    mine: list[int | None] = list(range(place.rank, batches, place.world))
    if place.world > 1 and is_sharded_model(model):
        mine += [None] * (-(-batches // place.world) - len(mine))
    for i in mine:
        if i is None:
            model(torch.zeros((1, 1), dtype=torch.long, device=device))
        else:
            total += run(i).to(total)
    return place.sum(total)


def from_rank0(path: Path | None) -> Path:
    """Rank 0's ``path`` (a staging folder the ranks write into), on every rank."""
    shared = [str(path) if path is not None else None]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    return Path(str(shared[0]))


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Dist]:
    """Join torchrun's process group for the life of the block (if there is a job).

    A group that already exists (a caller made it) is used as is and left open.
    """
    if world_size() <= 1:
        yield Dist()
        return
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # binding the device lets nccl set up its communicator eagerly
            dist.init_process_group(backend(device), device_id=device)
        else:
            dist.init_process_group(backend(device))
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), local_rank())
    except BaseException:
        if created:
            dist.destroy_process_group()  # no barrier: the other ranks may never come
        raise
    if created:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the process group once every rank is done with it, rank 0 last.

    A rank that tears gloo down while a peer is still in its last collective aborts the
    peer ("terminate called without an active exception"): seen in 1 of 3 profile runs
    at 3 ranks on 2 CPUs, and still in about 1 of 40 with a barrier first, since a rank
    leaves a barrier while a peer may still be finishing it. And rank 0 hosts the
    rendezvous store (a TCPStore), so a peer still waiting on it when rank 0 leaves is
    left talking to a closed server. So, through the store (not gloo):

    1. after the barrier every rank checks in and waits for all: everyone is out of it;
    2. every other rank destroys its group, then acknowledges (its last use of the store);
    3. rank 0 waits for every acknowledgement and only then destroys its group, and
       with it the store: no peer can still be waiting on it.
    """
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    leave = (store.add("esft_rs/leaving", 1) - 1) // world  # this leave's number, on all ranks
    store.set(f"esft_rs/out/{leave}/{rank}", "1")
    store.wait([f"esft_rs/out/{leave}/{r}" for r in range(world)])
    if rank != 0:
        dist.destroy_process_group()
        store.set(f"esft_rs/left/{leave}/{rank}", "1")
    else:
        store.wait([f"esft_rs/left/{leave}/{r}" for r in range(1, world)])
        dist.destroy_process_group()
    _left_group.append(True)


_left_group: list[bool] = []


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``. After ``leave_process_group``, skip the interpreter's teardown:
    gloo aborts a rank there ("terminate called without an active exception") after a
    clean destroy, in about 1 of 20 runs of 3 ranks on 2 loaded CPUs (every rank had
    returned from ``destroy_process_group``); outputs are complete and flushed by then."""
    if _left_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

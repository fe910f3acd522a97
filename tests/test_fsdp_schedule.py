"""Our FSDP2 schedule on CPU (``sharding._overlap``): the all-gather in pieces gathers the
bytes one all-gather does, training with many uneven pieces equals one process, a rank
holds one gathered layer at a time without prefetch (two with it), and what an eval
forward leaves gathered is sharded again before a checkpoint reads it."""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import forked_ranks
from conftest import BUILTIN_EXPERTS, free_port
from esft_rs.distributed import exit_process, leave_process_group
from esft_rs.models import init_model, save_model
from test_train_fsdp import GLOBAL, RUN, assert_same_adapter, train
from train_fakes import ddp_rank, ddp_worker, plus_chat


def gather_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from esft_rs.training import chunked_gather

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    chunked_gather.CHUNK = 40  # bytes of output: 10 floats over the ranks, a short last piece
    comm = chunked_gather.ChunkedAllGather()
    for dtype, n in ((torch.float32, 37), (torch.uint8, 101), (torch.float32, 1)):
        shard = (torch.arange(n) * (rank + 1)).to(dtype)
        expected = torch.empty(n * world, dtype=dtype)
        dist.all_gather_into_tensor(expected, shard)
        for async_op in (False, True):
            out = comm.allocate((n * world,), dtype=dtype, device=torch.device("cpu"))
            out.view(world, n)[rank].copy_(shard)  # FSDP2 copies its shard in so, in place
            work = comm(out, out.view(world, n)[rank], dist.group.WORLD, async_op=async_op)
            assert (work is not None) == async_op
            if work is not None:
                assert isinstance(work, dist.Work)  # FSDP2 waits only on a Work
                work.wait()
            assert torch.equal(out, expected), (dtype, n, async_op)
    leave_process_group()  # not a bare destroy: a peer may still be in the last gather
    exit_process(0)


@pytest.mark.multiprocess
def test_pieces_gather_what_one_all_gather_does() -> None:
    forked_ranks.spawn(gather_worker, args=(3, free_port()), nprocs=3)


class _Work:
    def __init__(self) -> None:
        self.done = False

    def wait(self) -> bool:
        self.done = True
        return True


class _Group:
    """A process group of 2 that records, as each collective is issued, how many issued
    before it are still running."""

    def __init__(self) -> None:
        self.works: list[_Work] = []
        self.running_at_issue: list[int] = []

    def size(self) -> int:
        return 2

    def allgather_coalesced(self, outs: list, ins: list) -> _Work:
        self.running_at_issue.append(sum(not w.done for w in self.works))
        self.works.append(_Work())
        return self.works[-1]


def test_pieces_go_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each piece is issued once the one before is done, and the last is left running for
    the caller to wait on: with several in flight on one gloo group a rank aborted now and
    then with ``malloc(): unaligned tcache chunk detected`` (about 1 two-rank run of
    ``test_fsdp_with_many_pieces_equals_one_process`` in 15)."""
    from esft_rs.training import chunked_gather

    monkeypatch.setattr(chunked_gather, "CHUNK", 40)  # 5 floats a rank a piece
    group = _Group()
    out, shard = torch.empty(2 * 37), torch.arange(37.0)
    work = chunked_gather.ChunkedAllGather()(out, shard, group, async_op=True)  # type: ignore
    assert group.running_at_issue == [0] * 8  # 37 floats in pieces of 5
    assert [w.done for w in group.works] == [True] * 7 + [False]
    assert work is not None and work.wait() and group.works[-1].done


def in_place_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from esft_rs.training import chunked_gather

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    chunked_gather.CHUNK = 64  # bytes of output: pieces across parameters and within them
    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 9, bias=False))
    model[0].weight.requires_grad_(False)
    model[0].weight.data = model[0].weight.data.to(torch.bfloat16)  # mixed: FSDP2 gathers bytes
    want = {k: v.clone() for k, v in model.state_dict().items()}
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    chunked_gather.install(model)
    comm = model._get_fsdp_state()._fsdp_param_groups[0]._all_gather_comm
    assert isinstance(comm, chunked_gather.InPlaceAllGather)
    for async_op in (False, True):
        handle = model.unshard(async_op=async_op)
        if handle is not None:
            handle.wait()
        got = dict(model.named_parameters())
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (k, async_op)
        model.reshard()
    leave_process_group()
    exit_process(0)  # gloo may abort a rank in the interpreter's teardown


@pytest.mark.multiprocess
def test_in_place_gather_gives_each_parameter_its_values() -> None:
    """Unevenly sharded parameters (padded shards), mixed dtypes (gathered as bytes) and
    pieces that span parameters: each unsharded parameter is the one process's."""
    forked_ranks.spawn(in_place_worker, args=(3, free_port()), nprocs=3)


def small_pieces_worker(rank: int, world: int, port: int, args: tuple, kwargs: dict) -> None:
    from esft_rs.training import chunked_gather

    chunked_gather.CHUNK = 100_000  # each layer of the tiny model (~1 MB) in 11 uneven pieces
    ddp_rank(rank, world, port, args, kwargs)


@pytest.mark.multiprocess
def test_fsdp_with_many_pieces_equals_one_process(tmp_path: Path) -> None:
    save_model(init_model("tiny", seed=0), tmp_path / "base")
    (tmp_path / "task.jsonl").write_text(plus_chat(10, 4))
    BUILTIN_EXPERTS.save(tmp_path / "experts.json")
    one = train(tmp_path, tmp_path / "one", 1)
    many = tmp_path / "many"
    args = (tmp_path / "base", tmp_path / "task.jsonl", many, tmp_path / "experts.json")
    kwargs = {**RUN, "per_device_batch_size": GLOBAL // 4}
    forked_ranks.spawn(small_pieces_worker, args=(2, free_port(), args, kwargs), nprocs=2)
    assert_same_adapter(one, many)


def gathered_worker(rank: int, world: int, port: int, args: tuple, kwargs: dict,
                    out: str) -> None:
    """Train, recording the most bytes FSDP's gather buffers held at once on this rank:
    flat all-gather outputs and unsharded parameters, counted whenever one is allocated."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    from esft_rs.training import chunked_gather

    groups: list[FSDPParamGroup] = []
    flats: list[weakref.ref] = []
    most = [0]

    def count() -> None:
        live = [f() for f in flats]
        most[0] = max(most[0], sum(f.untyped_storage().nbytes() for f in live if f is not None)
                      + sum(t.untyped_storage().nbytes() for g in groups for p in g.fsdp_params
                            for t in p.all_gather_outputs))

    init, alloc, allocate = (FSDPParamGroup.__init__, FSDPParam.alloc_all_gather_outputs,
                             chunked_gather.ChunkedAllGather.allocate)

    def tracked_init(self: FSDPParamGroup, *a: object, **k: object) -> None:
        init(self, *a, **k)
        groups.append(self)

    def counted_alloc(self: FSDPParam) -> None:
        alloc(self)
        count()

    def counted_allocate(self: object, *a: object, **k: object) -> torch.Tensor:
        flat = allocate(self, *a, **k)  # type: ignore[arg-type]
        flats.append(weakref.ref(flat))
        count()
        return flat

    FSDPParamGroup.__init__ = tracked_init  # type: ignore[method-assign]
    FSDPParam.alloc_all_gather_outputs = counted_alloc  # type: ignore[method-assign]
    chunked_gather.ChunkedAllGather.allocate = counted_allocate  # type: ignore[method-assign]
    ddp_worker(rank, world, port, args, kwargs)
    sizes = {g._module_fqn: sum(t.numel() * t.element_size() for p in g.fsdp_params
                                for t in p.all_gather_outputs) for g in groups}
    Path(out, f"rank{rank}.json").write_text(json.dumps({"most": most[0], "sizes": sizes}))
    exit_process(0)  # gloo may abort a rank in the interpreter's teardown


@pytest.mark.multiprocess
@pytest.mark.parametrize("prefetch", [False, True])
def test_gathered_layers_at_once(tmp_path: Path, prefetch: bool) -> None:
    """Without prefetch a rank holds the root and one gathered decoder layer at a time,
    with it two layers (the running one and the next): FSDP2's flat all-gather output and
    the copy of it into the parameters held each layer twice (``chunked_gather``)."""
    save_model(init_model("tiny", seed=0), tmp_path / "base")
    (tmp_path / "task.jsonl").write_text(plus_chat(10, 4))
    BUILTIN_EXPERTS.save(tmp_path / "experts.json")
    args = (tmp_path / "base", tmp_path / "task.jsonl", tmp_path / "run",
            tmp_path / "experts.json")
    kwargs = {**RUN, "per_device_batch_size": GLOBAL // 4, "eval_steps": 10**6,
              "save_steps": 10**6, "fsdp_prefetch": prefetch}
    forked_ranks.spawn(gathered_worker, nprocs=2,
                                args=(2, free_port(), args, kwargs, str(tmp_path)))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        root = got["sizes"].pop("")
        layer = max(got["sizes"].values())
        assert len(got["sizes"]) == 4 and root > 0 and layer > 0, got
        assert got["most"] == root + (2 if prefetch else 1) * layer, (got, root, layer)


@pytest.mark.multiprocess
def test_full_mode_eval_then_checkpoint_under_fsdp(tmp_path: Path) -> None:
    """A forward without backward (eval) leaves FSDP's root and last layer gathered; in
    full mode their trained tensors are in the checkpoint written next, which needs them
    sharded again (it failed so: KeyError in ``get_optimizer_state_dict``). Eval at every
    step, checkpoints after it: the run ends, with an adapter of the whole tensors."""
    save_model(init_model("tiny", seed=0), tmp_path / "base")
    (tmp_path / "task.jsonl").write_text(plus_chat(10, 4))
    BUILTIN_EXPERTS.save(tmp_path / "experts.json")
    two = train(tmp_path, tmp_path / "two", 2, mode="full", steps=4, eval_steps=1,
                save_steps=2, val_ratio=0.2)
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-4"]  # the last kept
    base = load_file(tmp_path / "base" / "model.safetensors")
    adapter = load_file(two / "adapter.safetensors")
    assert set(adapter) == set(base)
    assert all(adapter[k].shape == base[k].shape for k in base)

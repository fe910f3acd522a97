"""FSDP2's all-gather on gloo (CPU), in pieces (``chunked_gather.ChunkedAllGather``, as
training issues it) against one collective (``dist.all_gather_into_tensor``, FSDP2's own):
a 105 MiB output, the size of a layer of the 1 GB ``bench_scale.py`` model, between 2
ranks on this machine. Methods interleaved round after round; medians; rank 0 prints."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MiB = 2**20


def rank_main(rank: int, world: int, port: int, mib: int, rounds: int) -> None:
    from esft_rs.training.chunked_gather import ChunkedAllGather

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.distributed_c10d._get_default_group()
    n = mib * MiB // 4 // world
    shard = torch.randn(n)
    out = torch.empty(world * n)
    pieces = ChunkedAllGather()
    methods = {
        "one collective": lambda: dist.all_gather_into_tensor(out, shard),
        "pieces (ours)": lambda: pieces(out, shard, group, async_op=True).wait(),  # type: ignore[union-attr]
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            dist.barrier()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    assert torch.equal(out.view(world, n)[rank], shard)
    if rank == 0:
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name, t in med.items():
            print(f"{name:16s} {t * 1e3:7.0f} ms")
        print(f"pieces / one collective: {med['pieces (ours)'] / med['one collective']:.2f}x"
              f" the time ({mib} MiB, {world} ranks, median of {rounds})")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=105)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args.world, port, args.mib, args.rounds), nprocs=args.world)


if __name__ == "__main__":
    main()

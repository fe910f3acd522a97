"""A torchrun-like process that loads checkpoints shard by shard (``load_sharded``) and checks
each rank's shards, buffers and logits against the whole model loaded in one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def check_shards(rank: int, world: int, port: int, cases: list[tuple[str, str]],
                 out: str) -> None:
    """For each (checkpoint, reference) directory pair: the sharded model of the checkpoint
    holds, on this rank, exactly the rows of the reference's tensors (``load_model``, one
    process), the same buffers, and gives its logits. Writes the bytes each load read
    from disk to ``out/rank-R.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from esft_rs.distributed import exit_process, process_group
    from esft_rs.models import load_model
    from esft_rs.training import sharded_load

    reads: list[int] = []
    fill = sharded_load.fill

    def counted(*args: object) -> int:
        reads.append(fill(*args))  # type: ignore[arg-type]
        return reads[-1]

    sharded_load.fill = counted  # load_sharded calls it by this name
    cpu = torch.device("cpu")
    result = {}
    with process_group(cpu) as place:
        for directory, reference in cases:
            ref = load_model(reference)
            model = sharded_load.load_sharded(directory, place, cpu)
            whole = ref.state_dict()
            state = model.state_dict()
            assert list(state) == list(whole), directory
            for name, t in state.items():
                if isinstance(t, DTensor):
                    shape, offset = compute_local_shape_and_global_offset(
                        t.shape, t.device_mesh, t.placements)
                    want = whole[name][offset[0]:offset[0] + shape[0]]
                    t = t.to_local()
                else:
                    want = whole[name]
                assert t.dtype == want.dtype and torch.equal(t, want), f"{directory}: {name}"
            buffers = dict(model.named_buffers())
            assert buffers.keys() == dict(ref.named_buffers()).keys(), directory
            for name, b in ref.named_buffers():
                assert torch.equal(buffers[name], b), f"{directory}: buffer {name}"
            x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                got, want = model(x).logits, ref(x).logits
            assert torch.equal(got, want), f"{directory}: logits {(got - want).abs().max()}"
            result[directory] = reads[-1]
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    exit_process(0)  # past the interpreter's teardown, where gloo may abort a rank

"""Expert parallelism under torchrun (gloo on CPU): the adapter, AdamW's step counts and the
losses of one process with the same global batch, on the built-in model and on transformers
families; placement; resume on another world size; what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import forked_ranks
from conftest import BUILTIN_EXPERTS, free_port, run_torchrun
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.training.expert_parallel import place_experts
from test_train_fsdp import (
    MOMENTS_TOL,
    WEIGHTS_ATOL,
    adam_state,
    assert_same_adapter,
    hf_run,
    train,
)
from train_fakes import plus_chat, stop_after_2


def test_placement_spreads_the_trained_experts() -> None:
    """Every rank owns E // N or one more experts of each layer, and the trained experts are
    dealt so that no rank holds more than one more of them than another, per layer and in all."""
    layout = {1: 16, 2: 16, 3: 6}
    trained = {1: [0, 1, 2], 2: [3, 4, 5, 6, 7], 3: [0, 1, 2, 3, 4]}
    for world in (2, 3, 4, 8):
        p = place_experts(layout, trained, world)
        for layer, n in layout.items():
            counts = [len(p.experts_of(layer, r)) for r in range(world)]
            assert sorted(counts) == sorted([n // world + (r < n % world) for r in range(world)])
            mine = [sum(p.owners[layer][e] == r for e in trained[layer]) for r in range(world)]
            assert max(mine) - min(mine) <= 1, (world, layer, mine)
        total = p.describe(trained)["trained_per_rank"]
        assert max(total) - min(total) <= 1, (world, total)
    # fewer experts than ranks: some ranks own none of that layer
    p = place_experts({0: 2}, {0: [1]}, 4)
    assert sorted(len(p.experts_of(0, r)) for r in range(4)) == [0, 0, 1, 1]


def assert_same_state(want: dict[str, dict[str, torch.Tensor]],
                      got: dict[str, dict[str, torch.Tensor]]) -> None:
    """AdamW stepped the same tensors the same number of times, with the same moments (one
    process's fused slices are keyed by their parametrization's name)."""
    want = {n.replace(".parametrizations.", ".").removesuffix(".0.slices"): s
            for n, s in want.items()}
    assert set(got) == set(want)
    assert {n: int(s["step"]) for n, s in got.items()} == \
        {n: int(s["step"]) for n, s in want.items()}
    for name, s in want.items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[name][k], s[k], rtol=0,
                                       atol=MOMENTS_TOL * float(s[k].abs().max()), msg=name)


def ep_adam_state(out: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's state in an EP checkpoint, per tensor as one process keys it (a fused
    tensor's rows, saved per expert, stacked back)."""
    from train_fakes import checkpoint_state

    flat = checkpoint_state(out / "checkpoints" / f"step-{step}")["ep"]
    rows: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, v in flat.items():
        kind, _, rest = key.partition("/")
        if kind != "optimizer" or rest == "lr":
            continue
        what, _, name = rest.partition("/")
        base, _, expert = name.partition("/")
        rows.setdefault(base, {}).setdefault(what, {})[int(expert) if expert else -1] = \
            torch.as_tensor(v)
    out_state = {}
    for name, parts in rows.items():
        out_state[name] = {what: (by[-1] if -1 in by else
                                  (next(iter(by.values())) if what == "step"
                                   else torch.stack([by[e] for e in sorted(by)])))
                           for what, by in parts.items()}
    return out_state


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 4])
def test_ep_equals_one_process_builtin(builtin: Path, tmp_path: Path, world: int) -> None:
    one = train(builtin, tmp_path / "one", 1)
    many = train(builtin, tmp_path / "many", world, parallelism="ep")
    assert_same_adapter(one, many)
    assert_same_state(adam_state(one, 3), ep_adam_state(many, 3))
    placement = json.loads((many / "placement.json").read_text())
    trained = placement["trained_per_rank"]
    assert sum(trained) == BUILTIN_EXPERTS.num_experts and max(trained) - min(trained) <= 1


@pytest.mark.multiprocess
def test_ep_full_mode_steps_what_one_process_steps(builtin: Path, tmp_path: Path) -> None:
    """--mode full: experts and the replicated rest (attention, norms, embeddings) alike."""
    kw = {"mode": "full", "steps": 2, "eval_steps": 100, "save_steps": 2}
    one = train(builtin, tmp_path / "one", 1, **kw)
    many = train(builtin, tmp_path / "many", 2, parallelism="ep", **kw)
    assert_same_state(adam_state(one, 2), ep_adam_state(many, 2))
    x, y = load_file(one / "adapter.safetensors"), load_file(many / "adapter.safetensors")
    assert list(x) == list(y)
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=WEIGHTS_ATOL, msg=k)


@pytest.mark.floor
@pytest.mark.multiprocess
def test_ep_resume_on_another_world_size(builtin: Path, tmp_path: Path) -> None:
    """A checkpoint of 2 EP ranks resumes on 2 with the uninterrupted losses exactly, and on
    4 within float tolerance: its keys name experts, not ranks."""
    kw = dict(steps=4, save_steps=2, eval_steps=2, parallelism="ep")
    whole = train(builtin, tmp_path / "whole", 2, **kw)
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="KeyboardInterrupt"):
        train(builtin, tmp_path / "cut", 2, on_step=stop_after_2, **kw)
    import shutil

    shutil.copytree(tmp_path / "cut", tmp_path / "cut4")
    resumed = train(builtin, tmp_path / "cut", 2, resume=True, **kw)
    x, y = load_file(whole / "adapter.safetensors"), load_file(resumed / "adapter.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
    in_four = train(builtin, tmp_path / "cut4", 4, resume=True, **kw)
    assert_same_adapter(whole, in_four)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("family", "world"), [("qwen3_moe", 2), ("deepseek_v3", 2),
                                              ("deepseek_v2", 4), ("mixtral", 2)])
def test_ep_equals_one_process_hf(tmp_path: Path, family: str, world: int) -> None:
    """Fused experts (transformers keeps [E, ...] tensors): each rank holds its experts'
    rows; DeepSeek-V2/V3 add a dense first layer and shared experts (replicated), V3 its
    sigmoid group-limited routing; Mixtral its own naming (block_sparse_moe, w1/w2/w3).
    OLMoE and Qwen2-MoE (shared expert gate) pass too; left out to keep the suite short."""
    root = hf_run(tmp_path, family)
    one = train(root, tmp_path / "one", 1)
    many = train(root, tmp_path / "many", world, parallelism="ep")
    assert_same_adapter(one, many)
    assert_same_state(adam_state(one, 3), ep_adam_state(many, 3))


@pytest.mark.multiprocess
def test_ep_more_ranks_than_experts_and_uneven(tmp_path: Path) -> None:
    """6 experts on 4 ranks (two own 2, two own 1), and 2 experts on 4 ranks (two own none):
    both train as one process does."""
    from esft_rs.models import init_model, save_model
    from esft_rs.models.config import PRESETS

    for n in (6, 2):
        root = tmp_path / f"e{n}"
        cfg = PRESETS["tiny"].replace(n_routed_experts=n, num_experts_per_tok=2)
        save_model(init_model(cfg, seed=0), root / "base")
        (root / "task.jsonl").write_text(plus_chat(10, 4))
        ExpertConfig({1: [1], 2: [0, n - 1]}).save(root / "experts.json")
        one = train(root, tmp_path / f"one{n}", 1)
        many = train(root, tmp_path / f"many{n}", 4, parallelism="ep")
        assert_same_adapter(one, many)


@pytest.mark.multiprocess
def test_ep_on_a_model_without_moe_layers(tmp_path: Path) -> None:
    import subprocess
    import sys

    from esft_rs.models import init_model, save_model
    from esft_rs.models.config import PRESETS

    cfg = PRESETS["tiny"].replace(first_k_dense_replace=PRESETS["tiny"].num_hidden_layers)
    save_model(init_model(cfg, seed=0), tmp_path / "dense")
    (tmp_path / "task.jsonl").write_text(plus_chat(4, 4))
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "esft_rs", "profile", str(tmp_path / "dense"), str(tmp_path / "task.jsonl"),
         "-o", str(tmp_path / "r.safetensors"), "--parallelism", "ep", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    # torchrun exits 1 when a rank fails, and reports the rank's own exit code
    assert r.returncode == 1 and "exitcode  : 2" in r.stderr, r.stderr
    assert f"{tmp_path / 'dense'}: has no MoE layer, so --parallelism ep has no experts to" \
        " place; use fsdp or ddp" in r.stderr
    assert "esft_rs/" not in r.stderr  # no traceback of ours (torchrun prints its own)
    assert not (tmp_path / "r.safetensors").exists()


def _dispatch_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: experts 0 and 1 on rank 0, expert 2 on rank 1, which no token is
    routed to; forward and backward through ``Dispatch`` must still complete on both."""
    import os

    import torch.distributed as dist

    from esft_rs.distributed import exit_process, leave_process_group
    from esft_rs.training.expert_parallel import Dispatch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    weights = torch.nn.Parameter(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1 + rank), requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1]])
    mix = torch.full((6, 2), 0.5)
    mine = [0, 1] if rank == 0 else [2]

    def compute(rows: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        w = weights[torch.tensor(mine)[local]] if len(rows) else weights[:0]
        return torch.einsum("ti,tio->to", rows, w) if len(rows) else rows * 0

    y = Dispatch((0, 0, 1), rank, world, torch.device("cpu"))(x, ids, mix, compute)
    y.square().sum().backward()
    torch.save({"x_grad": x.grad, "w_grad": weights.grad, "y": y.detach()}, f"{out}{rank}.pt")
    leave_process_group()
    exit_process(0)


@pytest.mark.multiprocess
def test_a_rank_whose_experts_get_no_token(tmp_path: Path) -> None:
    """Rank 1 owns expert 2 and no token is routed to it: both ranks' forward and backward
    complete (rank 1's all-to-alls send and receive nothing) and give one process's
    outputs and gradients."""
    forked_ranks.spawn(_dispatch_worker, args=(2, free_port(), str(tmp_path / "r")),
                                nprocs=2)
    weights = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    w_grad = torch.zeros_like(weights)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1]])
    for rank in range(2):
        got = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1 + rank),
                        requires_grad=True)
        w = weights.clone().requires_grad_()
        y = 0.5 * torch.einsum("ti,tkio->tko", x, w[ids]).sum(1)
        y.square().sum().backward()
        torch.testing.assert_close(got["y"], y.detach())
        torch.testing.assert_close(got["x_grad"], x.grad)
        w_grad += w.grad
        if rank == 1:
            assert got["w_grad"] is None or not got["w_grad"][2].any()
    owner0 = torch.load(tmp_path / "r0.pt", weights_only=True)["w_grad"]
    torch.testing.assert_close(owner0[:2], w_grad[:2])  # the owner holds every rank's share


@pytest.mark.multiprocess
def test_auto_under_torchrun_says_what_it_chose(builtin: Path, tmp_path: Path) -> None:
    """The default under torchrun: the plan's choice for this host (CPU: its memory shared by
    the ranks), said in one line and recorded in train_config.yaml."""
    import yaml

    from esft_rs.distributed import Dist
    from esft_rs.training.parallelism import device_memory
    from esft_rs.training.planner import plan

    flags = ["--seq-length", "48", "--per-device-batch-size", "2",
             "--gradient-accumulation-steps", "2", "--steps", "1", "--device", "cpu",
             "--no-gradient-checkpointing"]
    r = run_torchrun("train", builtin / "base", builtin / "task.jsonl", "-e",
                     builtin / "experts.json", "-o", tmp_path / "run", *flags, nproc=2,
                     timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [line for line in r.stderr.splitlines() if "parallelism auto:" in line]
    assert len(notes) == 1, r.stderr[-3000:]  # rank 0 alone says it
    chosen = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())["parallelism"]
    assert notes[0].startswith(f"esft-rs: note: parallelism auto: {chosen} (")
    budget = device_memory(torch.device("cpu"), Dist(0, 2))
    want = plan(builtin / "base", BUILTIN_EXPERTS, nproc=2, seq_length=48,
                per_device_batch_size=2, gradient_accumulation_steps=2,
                gradient_checkpointing=False, gpu_memory=budget, device="cpu")
    assert chosen == want.parallelism

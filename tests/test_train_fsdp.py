"""FSDP2 under torchrun (gloo on CPU): the same adapter as one process with the same global
batch, on the built-in model and on transformers families (experts fused in memory)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import esft_rs
import forked_ranks
from conftest import free_port
from esft_rs.files.expert_config import ExpertConfig
from train_fakes import (
    FakeMoE,
    checkpoint_state,
    constant_routes,
    ddp_rank,
    fsdp_grads_worker,
    plus_chat,
    stop_after_2,
    uneven_batches,
)

#: global batch 8 = per-device batch x processes x 2 micro-steps, whatever the world size
GLOBAL = 8
RUN = dict(steps=3, seq_length=48, gradient_accumulation_steps=2, eval_steps=3, save_steps=3,
           logging_steps=1, learning_rate=5e-3, gradient_checkpointing=False, device="cpu",
           parallelism="fsdp")
HF_EXPERTS = ExpertConfig({1: [1, 5], 2: [0, 6, 7]}, False, False)


def spawn(world: int, args: tuple, kwargs: dict) -> None:
    port = free_port()
    forked_ranks.spawn(ddp_rank, args=(world, port, args, kwargs), nprocs=world)


def train(root: Path, out: Path, world: int, **kw: object) -> Path:
    """Train on ``world`` processes (1: in this process); returns the output directory."""
    args = (root / "base", root / "task.jsonl", out, root / "experts.json")
    kwargs = {**RUN, "per_device_batch_size": GLOBAL // (2 * world), **kw}
    if world == 1:
        esft_rs.train(*args, progress=False, **kwargs)
    else:
        spawn(world, args, kwargs)
    return out


def losses(out: Path) -> torch.Tensor:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r.get("loss", r.get("eval_loss")) for r in rows])


def assert_same_adapter(a: Path, b: Path) -> None:
    """Same names, dtypes, shapes and metadata keys; values within float tolerance."""
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert list(x) == list(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5, msg=k)
    with safe_open(a / "adapter.safetensors", "pt") as f, \
            safe_open(b / "adapter.safetensors", "pt") as g:
        assert set(f.metadata()) == set(g.metadata())
    torch.testing.assert_close(losses(a), losses(b), rtol=1e-5, atol=1e-6)


# Two steps of one process against several ranks: the second step's moments and the weights
# carry the first step's AdamW update, which divides by sqrt(exp_avg_sq) and so turns the
# float noise of near-zero gradients (other summation orders) into weight differences of up
# to 2e-5. Seen: moments within 4.4e-6 of their tensor's largest on an AVX2 machine and
# 2.4e-5 on an AVX-512 one (varying run to run); weights within 2e-5. A wrong gradient is
# off by its own size; a skipped step shows in the exact step counts.
MOMENTS_TOL = 1e-4  # of the tensor's largest element
WEIGHTS_ATOL = 1e-4


def adam_state(out: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's state per trained tensor (``step``, ``exp_avg``, ...) in the run's checkpoint
    at ``step``."""
    state = checkpoint_state(out / "checkpoints" / f"step-{step}")["optimizer"]["state"]
    return {name: {k: torch.as_tensor(v) for k, v in s.items()} for name, s in state.items()}


@pytest.mark.multiprocess
@pytest.mark.parametrize("parallelism", ["fsdp", "ddp"])
def test_full_mode_steps_what_one_process_steps(builtin: Path, tmp_path: Path,
                                                parallelism: str) -> None:
    """Every weight trains. A tensor that autograd reached on some rank gets AdamW's step
    (count, weight decay) even when its gradient is exactly zero, as in one process: an
    expert that no token carrying loss reached, only padding. One that no token reached
    gets none, in every engine. Before, FSDP gave the first kind no gradient either (so no
    step and no weight decay): 9 of the 186 tensors here."""
    kw = {"mode": "full", "steps": 2, "eval_steps": 100, "save_steps": 2}
    one = train(builtin, tmp_path / "one", 1, **kw)
    many = train(builtin, tmp_path / "many", 2, parallelism=parallelism, **kw)
    want, got = adam_state(one, 2), adam_state(many, 2)
    # Not vacuous: in one process some expert was stepped with a gradient that was exactly
    # zero at both steps (it took part in the forward, by tokens without loss only).
    padding_only = [n for n, s in want.items() if not s["exp_avg"].any()]
    assert any(".experts." in n for n in padding_only), padding_only
    assert set(got) == set(want)
    assert {n: int(s["step"]) for n, s in got.items()} == \
        {n: int(s["step"]) for n, s in want.items()}
    for name, s in want.items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[name][k], s[k], rtol=0,
                                       atol=MOMENTS_TOL * float(s[k].abs().max()), msg=name)
    x, y = load_file(one / "adapter.safetensors"), load_file(many / "adapter.safetensors")
    assert list(x) == list(y)
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=WEIGHTS_ATOL, msg=k)


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_equals_one_process_builtin(builtin: Path, tmp_path: Path, world: int) -> None:
    one = train(builtin, tmp_path / "one", 1)
    many = train(builtin, tmp_path / "many", world, save_merged=tmp_path / "merged")
    assert_same_adapter(one, many)
    assert yaml.safe_load((many / "train_config.yaml").read_text())["parallelism"] == "fsdp"
    # frozen tensors bit-identical after merge, trained ones what the adapter holds
    base = load_file(builtin / "base" / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    adapter = load_file(many / "adapter.safetensors")
    for name, t in merged.items():
        assert torch.equal(t, adapter.get(name, base[name])), name
    # Weights and AdamW state per rank: 1/world of one process's. Rank 0 holds the largest
    # shards (dim 0 split as torch.chunk does): at most one row more per tensor, fp32 here.
    per_rank = [json.loads(safe_open(out / "adapter.safetensors", "pt").metadata()
                           ["esft.metrics"])["rank_bytes"] for out in (one, many)]
    tensors = esft_rs.inspect(builtin / "base").tensors.values()
    row = sum(4 * math.prod(t.shape[1:]) for t in tensors)
    for key in ("frozen", "trained", "optimizer"):
        assert per_rank[0][key] / world <= per_rank[1][key] <= per_rank[0][key] / world + 2 * row


@pytest.mark.floor
@pytest.mark.multiprocess
def test_fsdp_resume_and_checkpoint_of_2_ranks_in_1(builtin: Path, tmp_path: Path) -> None:
    """Resumed on 2 ranks: the losses of the uninterrupted run, exactly. The same
    checkpoint resumed in 1 process (the same global batch): equal within float tolerance."""
    kw = dict(steps=4, save_steps=2, eval_steps=2)
    whole = train(builtin, tmp_path / "whole", 2, **kw)
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="KeyboardInterrupt"):
        train(builtin, tmp_path / "cut", 2, on_step=stop_after_2, **kw)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-2"]
    shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
    resumed = train(builtin, tmp_path / "cut", 2, resume=True, **kw)
    assert torch.equal(losses(resumed), losses(whole))
    x, y = load_file(whole / "adapter.safetensors"), load_file(resumed / "adapter.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)

    in_one = train(builtin, tmp_path / "cut1", 1, resume=True, **kw)
    assert_same_adapter(whole, in_one)
    state = json.loads((in_one / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["world"] == 1


@pytest.mark.floor
@pytest.mark.multiprocess
@pytest.mark.parametrize("hide", ["", "fsdp_unused_params"])
def test_fsdp_rank_whose_tokens_reach_no_trained_expert(tmp_path: Path, hide: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1's tokens reach none of the trained experts: its backward still passes every
    layer with rank 0's (FSDP gathers layer by layer), and the gradients are one process's.
    Hidden: the zeros come from ``sharding``'s own hook, as on torch < 2.13 (there FSDP2
    has no ``set_reduce_scatter_unused_params``, and setting it raised AttributeError)."""
    monkeypatch.setenv("ESFT_RS_TEST_HIDE_PRIVATE", hide)
    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.training.freeze import freeze

    missed = {layer: min(set(range(4)) - used) for layer, used in
              constant_routes(FakeMoE(), 5).items()}
    experts = {layer: [e] for layer, e in missed.items()}
    port = free_port()
    out = tmp_path / "grads.pt"
    forked_ranks.spawn(fsdp_grads_worker, args=(2, port, experts, str(out)), nprocs=2)
    model = FakeMoE()
    trainables = freeze(model, ExpertConfig(experts))
    a, b = uneven_batches()
    ((model(a).sum() + model(b).sum()) / 2).backward()  # FSDP averages over the ranks
    want = {t.name: t.param.grad for t in trainables}
    assert all(g is not None for g in want.values())  # rank 0's tokens reach them
    got = torch.load(out, weights_only=True)
    assert set(got) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def hf_run(tmp_path: Path, family: str) -> Path:
    """A tiny transformers ``family`` checkpoint, task data and ``HF_EXPERTS`` (skipped
    without transformers)."""
    pytest.importorskip("transformers")
    from hf_tiny import save

    root = tmp_path / family
    save(family, root / "base")
    (root / "task.jsonl").write_text(plus_chat(10, 4))
    HF_EXPERTS.save(root / "experts.json")
    return root


@pytest.mark.multiprocess
@pytest.mark.parametrize(("family", "world"), [("qwen3_moe", 2), ("mixtral", 2),
                                              ("deepseek_v2", 2), ("qwen3_moe", 4)])
def test_fsdp_equals_one_process_hf(tmp_path: Path, family: str, world: int) -> None:
    root = hf_run(tmp_path, family)
    one = train(root, tmp_path / "one", 1)
    two = train(root, tmp_path / "two", world, save_merged=tmp_path / "merged")
    assert_same_adapter(one, two)
    base = esft_rs.inspect(root / "base")
    merged = esft_rs.inspect(tmp_path / "merged")
    adapter = load_file(two / "adapter.safetensors")
    assert set(adapter) <= set(base.tensors)
    for name in base.tensors:
        if name in adapter:
            continue
        with safe_open(root / "base" / base.tensors[name].file, "pt") as f, \
                safe_open(tmp_path / "merged" / merged.tensors[name].file, "pt") as g:
            assert torch.equal(f.get_tensor(name), g.get_tensor(name)), name

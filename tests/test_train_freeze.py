"""What trains: expert selection per mode, shared/non-expert flags, fused slices, bad configs."""

from __future__ import annotations

import pytest
import torch

from esft_rs.errors import MismatchError
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.training.freeze import freeze, moe_layout, resolve_experts
from train_fakes import FakeMoE, effective, snapshot

LAYOUT = {1: 4, 2: 4}


def shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def trained_names(model: torch.nn.Module, cfg: ExpertConfig) -> set[str]:
    return {t.name for t in freeze(model, cfg)}


@pytest.mark.parametrize("fused", [False, True])
def test_layout_from_names(fused: bool) -> None:
    assert moe_layout(shapes(FakeMoE(fused=fused))) == LAYOUT


def test_esft_trains_exactly_the_listed_experts() -> None:
    model = FakeMoE()
    names = trained_names(model, ExpertConfig({1: [0, 3], 2: [2]}))
    assert names == {
        f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
        for layer, e in [(1, 0), (1, 3), (2, 2)] for p in ("gate", "up", "down")
    }
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names


def test_flags_add_shared_experts_and_non_expert_modules() -> None:
    all_names = {n for n, _ in FakeMoE().named_parameters()}
    shared = trained_names(FakeMoE(), ExpertConfig({1: [0]}, shared_experts=True))
    assert shared - trained_names(FakeMoE(), ExpertConfig({1: [0]})) == {
        f"model.layers.{layer}.mlp.shared_experts.{p}_proj.weight"
        for layer in (1, 2) for p in ("gate", "up", "down")
    }
    everything_else = trained_names(FakeMoE(), ExpertConfig({1: [0]}, non_expert_modules=True))
    assert "model.layers.1.mlp.gate.weight" in everything_else  # routers are non-expert modules
    assert "model.embed_tokens.weight" in everything_else
    assert not any(".experts.1." in n or "shared_experts" in n for n in everything_else)
    full = resolve_experts(LAYOUT, None, "full", 0)
    assert trained_names(FakeMoE(), full) == all_names


def test_random_mode_draws_same_counts_seeded() -> None:
    cfg = ExpertConfig({1: [0, 1], 2: [3]}, shared_experts=True)
    a = resolve_experts(LAYOUT, cfg, "random", seed=7)
    assert {k: len(v) for k, v in a.experts.items()} == {1: 2, 2: 1}
    assert a == resolve_experts(LAYOUT, cfg, "random", seed=7)
    draws = {str(resolve_experts(LAYOUT, cfg, "random", seed=s).experts) for s in range(20)}
    assert len(draws) > 1
    assert a.shared_experts and not a.non_expert_modules


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (ExpertConfig({0: [1]}), "cfg.json: layer 0 is not an MoE layer of the model"
                                 " (MoE layers: 1-2)"),
        (ExpertConfig({2: [1, 4]}), "cfg.json: layer 2: expert 4 is out of range"
                                    " (the model has 4 routed experts per layer)"),
        (ExpertConfig({1: [], 2: []}), "cfg.json: selects nothing to train"),
    ],
)
def test_bad_expert_config(cfg: ExpertConfig, message: str) -> None:
    with pytest.raises(MismatchError) as e:
        resolve_experts(LAYOUT, cfg, "esft", 0, "cfg.json")
    assert str(e.value).startswith(message)


def test_fused_experts_train_only_selected_slices() -> None:
    model = FakeMoE(fused=True)
    base = snapshot(model)
    trainables = freeze(model, ExpertConfig({1: [1, 3]}))
    assert [(t.name, t.experts, tuple(t.param.shape)) for t in trainables] == [
        ("model.layers.1.mlp.experts.gate_up_proj", (1, 3), (2, 16, 16)),
        ("model.layers.1.mlp.experts.down_proj", (1, 3), (2, 16, 8)),
    ]
    # Only the slices are trainable parameters: the fused originals are frozen.
    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(t.param) for t in trainables}
    opt = torch.optim.AdamW([t.param for t in trainables], lr=0.1, weight_decay=0.1)
    x = torch.randint(0, 32, (4, 10))
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(s["exp_avg"].shape[0] == 2 for s in opt.state.values())
    now = effective(model, list(base))
    for name, before in base.items():
        if name.startswith("model.layers.1.mlp.experts."):
            frozen = [0, 2]
            assert torch.equal(now[name][frozen], before[frozen]), name  # bit-identical
            assert not torch.equal(now[name][1], before[1]) and not torch.equal(
                now[name][3], before[3]), name
        else:
            assert torch.equal(now[name], before), name

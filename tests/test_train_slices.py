"""Trained slices of fused expert tensors: no copy of the fused tensor, in the forward or
saved for backward, with every experts implementation transformers offers on CPU, with
and without gradient checkpointing; gradients equal training the whole tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import forked_ranks
from conftest import free_port
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.models.expert_rows import FusedSlices
from esft_rs.training.api import enable_checkpointing
from esft_rs.training.freeze import freeze

transformers = pytest.importorskip("transformers")
import hf_tiny  # noqa: E402
from train_fakes import saved_bytes  # noqa: E402

IMPLEMENTATIONS = ["grouped_mm", "eager", "batched_mm"]
TRAINED = {1: [0, 5], 2: [3]}  # layers 1 and 2 of the tiny Qwen3-MoE; 16 experts each


def model(impl: str, checkpointing: str | None) -> torch.nn.Module:
    """A tiny Qwen3-MoE whose fused experts outweigh its activations (16 experts)."""
    config_cls, model_cls, kwargs = hf_tiny.FAMILIES["qwen3_moe"]
    config = getattr(transformers, config_cls)(**{
        **hf_tiny.COMMON, **kwargs, "num_experts": 16, "moe_intermediate_size": 48})
    torch.manual_seed(0)
    net = getattr(transformers, model_cls)(config).train()
    net.set_experts_implementation(impl)
    if checkpointing is not None:
        assert enable_checkpointing(net, use_reentrant=checkpointing == "reentrant")
        net.enable_input_require_grads()  # reentrant checkpointing needs an input with grad
    return net


def fused(net: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in net.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}


def train_whole(net: torch.nn.Module) -> None:
    """The reference: the fused tensors of the trained layers train whole, nothing else."""
    for name, p in net.named_parameters():
        p.requires_grad_(name in fused(net) and int(name.split(".")[2]) in TRAINED)


def batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def step_bytes(net: torch.nn.Module) -> int:
    """Bytes saved for backward during one step (``train_fakes.saved_bytes``)."""
    return saved_bytes(net, lambda: net(batch()).logits.float().square().mean().backward())


@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_slices_save_no_copy_of_the_fused_tensor(impl: str, checkpointing: str | None) -> None:
    ref = model(impl, checkpointing)
    train_whole(ref)
    activations = step_bytes(ref)
    net = model(impl, checkpointing)
    trainables = freeze(net, ExpertConfig(TRAINED))
    slices = sum(t.param.numel() * t.param.element_size() for t in trainables)
    smallest_fused = min(p.numel() * p.element_size() for p in fused(net).values()
                         if p.shape[0] == 16)
    saved = step_bytes(net)
    # the old re-parametrisation saved a rebuilt fused tensor per read: >= smallest_fused more
    assert saved <= activations + slices < activations + smallest_fused, (saved, activations)


class FusedShaped(TorchDispatchMode):
    """Records every op output, other than a view of the model's own tensors, with the
    shape of a fused expert tensor."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.own = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
        self.shapes = {tuple(p.shape) for n, p in net.named_parameters()
                       if p.ndim == 3 and not n.endswith(".slices")}
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes
                    and t.untyped_storage().data_ptr() not in self.own):
                self.seen.append(str(func))
        return out


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_the_forward_makes_no_fused_size_tensor(impl: str, checkpointing: str | None) -> None:
    net = model(impl, checkpointing)
    freeze(net, ExpertConfig(TRAINED))
    with FusedShaped(net) as mode:
        net(batch()).logits.sum()
    assert mode.seen == []


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_slice_gradients_equal_whole_tensor_gradients(impl: str, checkpointing: str | None
                                                      ) -> None:
    ref = model(impl, checkpointing)
    train_whole(ref)
    ref(batch()).logits.square().mean().backward()
    net = model(impl, checkpointing)
    trainables = freeze(net, ExpertConfig(TRAINED))
    net(batch()).logits.square().mean().backward()
    whole = fused(ref)
    for t in trainables:
        assert t.param.grad is not None and t.param.grad.abs().sum() > 0, t.name
        want = whole[t.name].grad[list(t.experts)]
        torch.testing.assert_close(t.param.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_frozen_slices_stay_bit_identical_and_trained_ones_move(impl: str) -> None:
    net = model(impl, "non-reentrant")
    base = {n: p.detach().clone() for n, p in fused(net).items()}
    trainables = freeze(net, ExpertConfig(TRAINED))
    opt = torch.optim.AdamW([t.param for t in trainables], lr=1e-2)
    for _ in range(3):
        net(batch()).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    net(batch())  # a read writes the trained slices into the fused storage
    for name, before in base.items():
        layer = int(name.split(".")[2])
        owner, _, attr = name.rpartition(".")
        now = getattr(net.get_submodule(owner), attr).detach()
        trained = TRAINED.get(layer, [])
        frozen = [e for e in range(before.shape[0]) if e not in trained]
        assert torch.equal(now[frozen], before[frozen]), name
        for e in trained:
            assert not torch.equal(now[e], before[e]), (name, e)
        if trained:
            t = next(t for t in trainables if t.name == name)
            assert torch.equal(now[trained], t.param.detach()), name


def test_slices_are_the_only_trainable_parameters() -> None:
    """What FSDP2 wraps: the slices are plain trainable parameters, the fused original
    a frozen parameter of the same module, holding the slices' values after a read."""
    net = model("grouped_mm", None)
    trainables = freeze(net, ExpertConfig(TRAINED))
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert len(trainable) == len(trainables) == 4
    assert all(n.endswith(".slices") for n in trainable)
    owners = [n.removesuffix(".0.slices") for n in trainable]
    assert all(isinstance(net.get_submodule(f"{o}.0"), FusedSlices) for o in owners)
    assert all(not net.get_submodule(o).original.requires_grad for o in owners)


def test_every_expert_selected_trains_the_fused_tensor_itself() -> None:
    """Full mode: a fused tensor with every expert selected is trained in place, not
    through a second, sliced copy of it."""
    net = model("grouped_mm", None)
    params = fused(net)
    everything = ExpertConfig({layer: list(range(16)) for layer in range(3)})
    trainables = freeze(net, everything)
    assert {t.name for t in trainables} == set(params)
    assert all(t.param is params[t.name] for t in trainables)
    assert not any(n.endswith(".slices") for n, _ in net.named_parameters())


@pytest.mark.parametrize("mode", ["esft", "full"])
def test_a_bf16_model_keeps_bf16_storage_and_trains_fp32_masters(mode: str, tmp_path: Path) -> None:
    """Frozen tensors stay in the checkpoint's dtype (bf16) on every device; trained ones are
    fp32 masters with fp32 AdamW state; the adapter is written back in bf16."""
    import esft_rs
    from train_fakes import fake_data

    net = hf_tiny.build("qwen3_moe").to(torch.bfloat16)
    base = {n: p.detach().clone() for n, p in net.named_parameters()}
    result = esft_rs.train(
        net, fake_data(vocab=256), tmp_path / "out", ExpertConfig({1: [2]}), progress=False,
        mode=mode, steps=2, per_device_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=1e-2, val_ratio=0.0,
        gradient_checkpointing=False)
    masters = [p for p in net.parameters() if p.requires_grad]
    assert masters and all(p.dtype == torch.float32 for p in masters)
    n = sum(p.numel() for p in masters)
    assert result.fit.trainable_params == n
    assert result.fit.optimizer_state_bytes == 8 * n + 4 * len(masters)
    frozen = {n: p for n, p in net.named_parameters() if not p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    if mode == "full":
        assert not frozen and n == sum(p.numel() for p in base.values())  # no second copy
    else:
        fused = {n: p for n, p in frozen.items() if n.endswith("original")}
        assert len(fused) == 2  # layer 1's gate_up_proj and down_proj, bf16
        for name, p in fused.items():
            before = base[name.replace("parametrizations.", "").removesuffix(".original")]
            assert torch.equal(p[[0, 1, 3]], before[[0, 1, 3]])
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(result.adapter).values()} == {torch.bfloat16}


def test_freezing_imports_neither_transformers_nor_the_cli() -> None:
    """The model interface names checkpoint tensors (``to_checkpoint``): freezing needs no
    transformers and the library never imports the CLI; what trains needs no torch."""
    import subprocess
    import sys

    code = ("import sys, esft_rs.training.trained; assert 'torch' not in sys.modules;"
            " import esft_rs.training.freeze;"
            " bad = {'transformers', 'esft_rs.models.hf', 'esft_rs.cli'} & set(sys.modules);"
            " assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _fsdp_rank(rank: int, world: int, port: int) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from esft_rs.distributed import exit_process, leave_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for impl in IMPLEMENTATIONS:
            ref = model(impl, None)
            train_whole(ref)
            ref(batch()).logits.square().mean().backward()
            net = model(impl, None)
            trainables = freeze(net, ExpertConfig(TRAINED))
            for layer in net.model.layers:
                fully_shard(layer)
            fully_shard(net)
            net(batch()).logits.square().mean().backward()  # the same batch on every rank
            for t in trainables:
                assert type(t.param).__name__ == "DTensor"  # the sharded parameter
                got = t.param.grad.full_tensor()
                torch.testing.assert_close(got, fused(ref)[t.name].grad[list(t.experts)])
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_process_group()
    exit_process(0)


@pytest.mark.multiprocess
def test_fsdp2_shards_the_slices_and_their_gradients_match() -> None:
    """FSDP2 wraps the re-parametrised experts as they are: the slices are sharded like
    any parameter, ``Trainable.param`` follows them, and gradients equal the reference."""

    port = free_port()
    forked_ranks.spawn(_fsdp_rank, args=(2, port), nprocs=2)


def whole_tensor_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``freeze`` train slices as before the split: through their rows of the
    whole fused tensor's gradient (its fallback for experts it does not know)."""
    monkeypatch.setattr("esft_rs.training.freeze.gated_experts_problem", lambda _m: "a test")


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_split_forward_is_bit_identical_and_gradients_equal_the_fused_path(
        impl: str, checkpointing: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over three AdamW steps (trained slices no longer equal to the base): the split
    gives the same logits, bit for bit, as slices trained through the whole fused
    tensor's gradient, and the same slice gradients within float tolerance."""
    net = model(impl, checkpointing)
    split = freeze(net, ExpertConfig(TRAINED))
    assert all(t.module.split for t in split)
    ref = model(impl, checkpointing)
    with monkeypatch.context() as m:
        whole_tensor_path(m)
        fallback = freeze(ref, ExpertConfig(TRAINED))
    assert not any(t.module.split for t in fallback)
    opt = torch.optim.AdamW([t.param for t in fallback], lr=1e-2)
    for step in range(3):
        with torch.no_grad():
            for a, b in zip(split, fallback, strict=True):
                a.param.copy_(b.param)
        got, want = net(batch()).logits, ref(batch()).logits
        assert torch.equal(got, want), step
        got.square().mean().backward()
        want.square().mean().backward()
        for a, b in zip(split, fallback, strict=True):
            assert b.param.grad.abs().sum() > 0, a.name
            torch.testing.assert_close(a.param.grad, b.param.grad, rtol=1e-5, atol=1e-7)
            a.param.grad = None
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("path", ["split", "fused"])
def test_the_backward_makes_no_fused_size_tensor(
        impl: str, checkpointing: str | None, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The split computes no gradient of the whole fused tensor (the path before it
    did: one per projection, with ``eager`` one per expert hit)."""
    net = model(impl, checkpointing)
    if path == "fused":
        whole_tensor_path(monkeypatch)
    freeze(net, ExpertConfig(TRAINED))
    loss = net(batch()).logits.square().mean()
    with FusedShaped(net) as mode:
        loss.backward()
    assert (mode.seen == []) == (path == "split"), mode.seen[:3]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_backward_flops_drop_by_the_frozen_share(impl: str) -> None:
    """Backward matmul FLOPs beyond the input gradients: training the fused tensors
    whole computes every expert's weight gradient (W); the split computes the trained
    slices' (the trained share s of the routed pairs: s W) and recomputes their gate/up
    output and down-input gradient (another s W), so at most 2 s W. The path before it
    computed all of W."""
    from train_fakes import backward_flops

    routed: dict[int, torch.Tensor] = {}
    flops = {}
    for how in ("frozen", "whole", "split"):
        net = model(impl, None)
        net.enable_input_require_grads()  # every variant computes every input gradient
        if how == "frozen":
            net.requires_grad_(False)
        elif how == "whole":
            train_whole(net)
        else:
            freeze(net, ExpertConfig(TRAINED))
            for layer in TRAINED:
                net.model.layers[layer].mlp.experts.register_forward_hook(
                    lambda _m, args, _out, layer=layer: routed.__setitem__(layer, args[1]))
        flops[how] = backward_flops(net(batch()).logits.square().mean())
    share = (sum(torch.isin(routed[layer], torch.tensor(ids)).sum() for layer, ids in
                 TRAINED.items()) / sum(routed[layer].numel() for layer in TRAINED)).item()
    assert share < 0.2
    weight_grads = flops["whole"] - flops["frozen"]
    assert 0 < flops["split"] - flops["frozen"] <= 2 * share * weight_grads * 1.0001, (
        flops, share)


def test_families_experts_are_split_and_variants_fall_back(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every supported family's experts take the split; a variant the split does not
    compute (here a bias) keeps the whole-tensor gradient, and says so."""
    from esft_rs.models import gated_experts_problem

    for family in hf_tiny.FAMILIES:
        net = hf_tiny.build(family)
        experts = [m for n, m in net.named_modules() if n.endswith("mlp.experts")]
        assert experts and all(gated_experts_problem(m) is None for m in experts), family
    net = model("grouped_mm", None)
    net.model.layers[2].mlp.experts.has_bias = True
    trainables = freeze(net, ExpertConfig(TRAINED))
    assert {t.name.split(".")[2]: t.module.split for t in trainables} == {"1": True, "2": False}
    assert "Qwen3MoeExperts.has_bias is True, not False" in caplog.text
    assert gated_experts_problem(torch.nn.Linear(2, 2)) == (
        "Linear is not a transformers experts module")

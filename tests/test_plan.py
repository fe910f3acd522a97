"""``esft-rs plan``: its parameter, gradient and optimizer figures equal what a training run
measures; its activation estimate is within a stated tolerance of the bytes autograd saves;
it reads headers only (no torch) and says what to change when a run does not fit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import esft_rs
import forked_ranks
from conftest import free_port, run_cli
from esft_rs.data import causal_lm_loss
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.models import init_model, load_model, save_model
from esft_rs.training.api import enable_checkpointing
from esft_rs.training.freeze import freeze, moe_layout, resolve_experts
from esft_rs.training.planner import plan
from train_fakes import fake_data, saved_bytes

EXPERTS = ExpertConfig({1: [0, 2]})
#: activation estimate / bytes saved for backward, on the tiny models (see docs/scale.md)
TOLERANCE = (0.65, 1.4)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    out = {"builtin": save_model(init_model("tiny"), root / "builtin")}
    hf_tiny = pytest.importorskip("hf_tiny")
    if pytest.importorskip("transformers"):
        for family in ("qwen3_moe", "deepseek_v2", "deepseek_v3", "qwen2_moe", "mixtral",
                       "olmoe"):
            out[family] = hf_tiny.save(family, root / family)
        from test_hf_families import fp8_copy

        out["fp8"] = fp8_copy(root / "deepseek_v3", root / "fp8")  # bf16 once dequantised
    return {k: Path(v) for k, v in out.items()}


CASES = [("builtin", "esft"), ("builtin", "full"), ("qwen3_moe", "esft"), ("qwen3_moe", "full"),
         ("deepseek_v2", "esft"), ("deepseek_v3", "full"), ("qwen2_moe", "esft"),
         ("mixtral", "random"), ("olmoe", "esft"), ("fp8", "esft"), ("qwen2_moe", "flags")]
#: esft with shared experts and non-expert modules trained too
FLAGS = ExpertConfig(EXPERTS.experts, shared_experts=True, non_expert_modules=True)


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_plan_equals_what_training_measures(models: dict[str, Path], family: str, mode: str,
                                           tmp_path: Path) -> None:
    experts = FLAGS if mode == "flags" else EXPERTS
    mode = "esft" if mode == "flags" else mode
    expected = plan(models[family], experts, mode, device="cpu")
    result = esft_rs.train(
        models[family], fake_data(n=8, seq=64, vocab=256), tmp_path / "out", experts,
        progress=False, device="cpu", mode=mode, steps=2, per_device_batch_size=2,
        gradient_accumulation_steps=2, val_ratio=0.0, gradient_checkpointing=False)
    params = list(result.model.parameters())
    trained = [p for p in params if p.requires_grad]
    assert expected.trained_params == result.fit.trainable_params
    assert expected.master_bytes == sum(p.numel() * p.element_size() for p in trained)
    assert expected.grad_bytes == result.fit.grad_bytes
    assert expected.optimizer_bytes == result.fit.optimizer_state_bytes
    assert expected.frozen_bytes == sum(
        p.numel() * p.element_size() for p in params if not p.requires_grad)
    assert expected.frozen_params + expected.trained_params >= sum(p.numel() for p in params)


@pytest.mark.parametrize("mode", ["esft", "full"])
@pytest.mark.parametrize("family", ["builtin", "qwen3_moe", "deepseek_v2", "mixtral"])
def test_activation_estimate_is_within_tolerance(models: dict[str, Path], family: str,
                                                 mode: str) -> None:
    net = load_model(models[family]).train()
    layout = moe_layout((n, tuple(p.shape)) for n, p in net.named_parameters())
    freeze(net, resolve_experts(layout, EXPERTS, mode, 0))
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        out = net(ids)
        causal_lm_loss(getattr(out, "logits", out), ids, reduction="sum").backward()

    measured = saved_bytes(net, step)
    estimate = plan(models[family], EXPERTS, mode, seq_length=64, per_device_batch_size=2,
                    gradient_checkpointing=False, device="cpu").activation_bytes
    assert TOLERANCE[0] <= estimate / measured <= TOLERANCE[1], (estimate, measured)


@pytest.mark.parametrize("family", ["builtin", "qwen3_moe"])
def test_checkpointing_estimate_lies_between_layer_inputs_and_everything(
        models: dict[str, Path], family: str) -> None:
    """With checkpointing, autograd keeps each layer's input (measured: what the
    non-reentrant forward saves) and one layer is recomputed at a time (estimated)."""
    net = load_model(models[family]).train()
    layout = moe_layout((n, tuple(p.shape)) for n, p in net.named_parameters())
    freeze(net, resolve_experts(layout, None, "full", 0))
    assert enable_checkpointing(net)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        out = net(ids)
        causal_lm_loss(getattr(out, "logits", out), ids, reduction="sum").backward()

    kept = saved_bytes(net, step)
    estimate = {ck: plan(models[family], mode="full", seq_length=64, per_device_batch_size=2,
                         gradient_checkpointing=ck, device="cpu").activation_bytes
                for ck in (True, False)}
    assert kept < estimate[True] < estimate[False]


def test_more_ranks_divide_weights_gradients_and_optimizer_state(
        models: dict[str, Path]) -> None:
    one = plan(models["builtin"], mode="full", device="cpu")
    four = plan(models["builtin"], mode="full", nproc=4, parallelism="fsdp", device="cpu")
    assert four.trained_params == one.trained_params  # the whole run's count
    for key in ("master_bytes", "grad_bytes"):
        # dim 0 of each tensor padded to a multiple of 4: at most 3 rows more per tensor
        assert one.to_dict()[key] / 4 <= four.to_dict()[key] < one.to_dict()[key] / 4 * 1.1
    assert 0 < four.gather_bytes < one.master_bytes  # two layers, all-gathered
    assert four.activation_bytes == one.activation_bytes
    # without prefetch one gathered layer, the most FSDP then holds (test_fsdp_schedule)
    alone = plan(models["builtin"], mode="full", nproc=4, parallelism="fsdp", device="cpu",
                 fsdp_prefetch=False)
    assert alone.gather_bytes * 2 == four.gather_bytes
    assert alone.total_bytes == four.total_bytes - alone.gather_bytes


def test_json_has_the_figures(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(EXPERTS.to_json())
    proc = run_cli("plan", models["builtin"], "-e", cfg, "--nproc", "2", "--seq-length", "512",
                   "--json", check=True)
    got = json.loads(proc.stdout)
    want = plan(models["builtin"], EXPERTS, nproc=2, seq_length=512, gpu_memory=80 * 2**30)
    assert got == want.to_dict()
    assert {"trained_params", "frozen_bytes", "master_bytes", "grad_bytes", "optimizer_bytes",
            "activation_bytes", "total_bytes"} <= set(got)
    assert got["total_bytes"] == sum(got[k] for k in (
        "frozen_bytes", "master_bytes", "grad_bytes", "optimizer_bytes", "gather_bytes",
        "activation_bytes"))


def test_says_whether_it_fits_and_what_to_change(models: dict[str, Path]) -> None:
    fits = run_cli("plan", models["builtin"], "--mode", "full", check=True).stdout
    assert "fits in 80.0 GiB per device" in fits
    # trained of the whole model, not beside a frozen count that reads as the rest
    counts = re.search(r"parameters trained: ([\d,]+) of ([\d,]+) \(100\.00%; the rest frozen\)",
                       fits)
    assert counts and counts[1] == counts[2]
    proc = run_cli("plan", models["builtin"], "--mode", "full", "--gpu-memory", "8MiB",
                   "--seq-length", "64", "--no-gradient-checkpointing")
    assert proc.returncode == 3, proc.stderr  # its own exit code: not a failure, not bad input
    small = proc.stdout
    assert "does NOT fit in 8.0 MiB" in small
    # one unit for every figure, the advice's too
    figures = re.findall(r"\d [KMGT]?i?B\b", small)
    assert figures and all(f.endswith("MiB") for f in figures), small
    assert run_cli("plan", models["builtin"], "--mode", "full", "--gpu-memory", "8MiB",
                   "--json").returncode == 3
    # 15 MiB of fp32 weights, gradients and AdamW state: 4 ranks hold 3.8 MiB each
    assert "gradient checkpointing" in small and "use 4 or more ranks (--nproc 4)" in small


def test_rows_longer_than_the_context_are_cut_as_train_cuts_them(models: dict[str, Path]
                                                                  ) -> None:
    # was: planned 4096-token rows for the tiny model (context 1024), with no word
    proc = run_cli("plan", models["builtin"], "--mode", "full", "--seq-length", "4096",
                   check=True)
    assert proc.stderr == ("esft-rs: note: rows are cut to the model's context of 1024 tokens"
                           " (max_position_embeddings), not seq_length 4096 (--seq-length)\n")
    assert "1 x 1024 tokens per device" in proc.stdout
    cut = plan(models["builtin"], mode="full", seq_length=4096)
    assert cut == replace(plan(models["builtin"], mode="full", seq_length=1024),
                          notes=cut.notes)
    assert cut.notes == ["rows are cut to the model's context of 1024 tokens"
                         " (max_position_embeddings), not seq_length 4096 (seq_length=)"]
    assert plan(models["builtin"], mode="full", seq_length=1024).notes == []


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "esft"], "mode esft needs an expert config"),
    (["--mode", "full", "--gpu-memory", "lots"], "not a size: 'lots'"),
])
def test_bad_input_is_one_line(models: dict[str, Path], args: list[str], message: str) -> None:
    proc = run_cli("plan", models["builtin"], *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout


def test_a_directory_without_config_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("plan", tmp_path, "--mode", "full")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"esft-rs: error: {tmp_path / 'config.json'}: not found (plan reads the model's"
        " config.json)")


def test_a_config_without_sizes_is_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    broken = shutil.copytree(models["builtin"], tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    del config["hidden_size"]
    (broken / "config.json").write_text(json.dumps(config))
    proc = run_cli("plan", broken, "--mode", "full")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"esft-rs: error: {broken / 'config.json'}: hidden_size must be a positive integer,"
        " not None")


def test_plan_imports_no_torch(models: dict[str, Path]) -> None:
    code = ("import sys; from esft_rs.cli import main\n"
            f"try:\n    main(['plan', {str(models['builtin'])!r}, '--mode', 'full'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = {'torch', 'numpy', 'transformers'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)



def bf16_copy(src: Path, out: Path) -> Path:
    """``src`` with every tensor stored in bf16 (config.json saying so)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for file in src.glob("*.safetensors"):
        save_file({n: t.to(torch.bfloat16) for n, t in load_file(file).items()}, out / file.name,
                  metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.update({k: "bfloat16" for k in ("dtype", "torch_dtype") if k in config})
    (out / "config.json").write_text(json.dumps(config))
    return out


def _gradient_bytes() -> int:
    """Bytes of every gradient this process holds: of the model's parameters and of any
    other (FSDP's unsharded parameters accumulate unreduced gradients)."""
    import gc

    from esft_rs.training.sharding import local

    storages = {}
    for obj in gc.get_objects():
        # torch.Tensor's check first: Parameter's is Python code, and the objects are many
        if isinstance(obj, torch.Tensor) and isinstance(obj, torch.nn.Parameter) \
                and obj.grad is not None:
            storage = local(obj.grad).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _rank_figures(rank: int, world: int, port: int, model: str, mode: str, parallelism: str,
                  out: str) -> None:
    """One torchrun-like rank: one optimizer step, then what this rank holds (JSON)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from esft_rs.distributed import exit_process
    from esft_rs.training import loop

    held = []  # gradients held when each micro-step starts: those of the ones before
    forward = loop.loss_sum

    def measured(*args: object) -> torch.Tensor:
        held.append(_gradient_bytes())
        return forward(*args)

    loop.loss_sum = measured
    try:
        result = esft_rs.train(
            model, fake_data(n=8, seq=64, vocab=256), Path(out) / "run", EXPERTS,
            progress=False, device="cpu", mode=mode, parallelism=parallelism, steps=1,
            per_device_batch_size=1, gradient_accumulation_steps=2, val_ratio=0.0,
            gradient_checkpointing=False)
    finally:
        loop.loss_sum = forward  # a pooled rank runs other tests' jobs next
    fit, params = result.fit, list(result.model.parameters())
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "trained_params": fit.trainable_params,
        "frozen_bytes": fit.rank_bytes["frozen"],
        "master_bytes": fit.rank_bytes["trained"],
        "grad_bytes": max(fit.grad_bytes, *held),
        "optimizer_bytes": fit.optimizer_state_bytes,
        "dtypes": sorted({f"{p.requires_grad}:{p.dtype}" for p in params}),
    }))
    exit_process(0)  # past the interpreter's teardown, where gloo may abort a rank


@pytest.mark.multiprocess
@pytest.mark.parametrize("parallelism", ["fsdp", "ddp", "ep"])
@pytest.mark.parametrize("mode", ["esft", "full"])
@pytest.mark.parametrize("family", ["builtin", "qwen3_moe"])
def test_per_rank_figures_equal_what_2_ranks_hold(models: dict[str, Path], tmp_path: Path,
                                                  family: str, mode: str,
                                                  parallelism: str) -> None:
    """2 gloo ranks train one step (2 micro-steps) of a bf16 checkpoint (Qwen3-MoE: experts
    fused in memory). Each rank's frozen weights (bf16, the checkpoint's dtype), fp32
    masters, fp32 gradients (the most it holds at any micro-step) and AdamW state are what
    the plan says, to the byte: rank 0's exactly (it holds the most: FSDP splits dim 0 as
    torch.chunk does), the other's no more. Under EP the plan's are those of the rank that
    holds the most (its experts)."""

    model = bf16_copy(models[family], tmp_path / "bf16")
    port = free_port()
    forked_ranks.spawn(_rank_figures, args=(2, port, str(model), mode, parallelism, str(tmp_path)),
                    nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = plan(model, EXPERTS, mode, nproc=2, parallelism=parallelism, device="cpu").to_dict()
    frozen = [] if mode == "full" else ["False:torch.bfloat16"]
    for rank, got in enumerate(ranks):
        assert got.pop("dtypes") == [*frozen, "True:torch.float32"]
        if parallelism == "ddp":  # DDP's anchor (training.loop._Anchored): 4 bytes, in a
            # gradient bucket beside trained tensors or in one of its own
            assert got["grad_bytes"] - want["grad_bytes"] in (0, 4), got
            got["grad_bytes"] = want["grad_bytes"]
        largest = rank == 0 if parallelism != "ep" else rank == max(
            range(2), key=lambda r: (ranks[r]["frozen_bytes"] + 2 * ranks[r]["master_bytes"]
                                     + ranks[r]["optimizer_bytes"]))
        if largest:
            assert got == {k: want[k] for k in got}
        assert all(got[k] <= want[k] for k in got), (rank, got)
    if parallelism == "ddp":
        assert ranks[0] == ranks[1]


@pytest.mark.parametrize("parallelism", ["ep", "fsdp"])
@pytest.mark.parametrize("model", ["deepseek-v2-lite", "qwen3-30b-a3b"])
def test_adamw_state_per_rank_is_a_fair_share(tmp_path: Path, model: str,
                                              parallelism: str) -> None:
    """On the real shapes (header-only checkpoints) with real selections (DeepSeek-V2-Lite:
    the official intent experts, about 5 of 64 per layer; Qwen3-30B-A3B: 12 of 128), AdamW's
    state per rank at 8 and 64 ranks is at most 1.1x the fair share plus one expert's, under
    EP and FSDP: trained experts are spread over the ranks, and FSDP splits the trained
    slices within each expert. Before, FSDP held whole experts: 1.68 GiB against a fair
    1.00 GiB at 8 ranks on DeepSeek-V2-Lite."""
    import random

    from real_shapes import DEEPSEEK_V2_LITE, QWEN3_30B_A3B, write

    if model == "deepseek-v2-lite":
        root = write(DEEPSEEK_V2_LITE, tmp_path / model)
        experts = ExpertConfig.load(Path(__file__).parent / "data" / "esft-official"
                                    / "expert_configs" / "intent.json")
        expert_elems = 3 * 1408 * 2048
    else:
        root = write(QWEN3_30B_A3B, tmp_path / model)
        rng = random.Random(0)
        experts = ExpertConfig({layer: sorted(rng.sample(range(128), 12)) for layer in range(48)})
        expert_elems = 3 * 768 * 2048
    one = plan(root, experts, nproc=1)
    for nproc in (8, 64):
        got = plan(root, experts, nproc=nproc, parallelism=parallelism)
        fair = one.optimizer_bytes / nproc
        assert got.optimizer_bytes <= 1.1 * fair + 8 * expert_elems, (nproc, got.optimizer_bytes,
                                                                     fair)

"""ESFT-LoRA: low-rank adapters on the selected experts, the base frozen; on the built-in
model (per-expert modules) and a transformers family (experts fused in memory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import esft_rs
from conftest import BUILTIN_EXPERTS, run_cli
from esft_rs.errors import EsftError
from esft_rs.files.expert_config import ExpertConfig
from test_train_fsdp import GLOBAL, HF_EXPERTS, RUN, adam_state, hf_run
from test_train_fsdp import train as train_on
from train_fakes import stop_after_2

RANK, ALPHA = 4, 16.0
LORA = {**RUN, "parallelism": "auto", "lora_rank": RANK, "lora_alpha": ALPHA}
PROJ = {"builtin": ("gate_proj", "up_proj", "down_proj"),
        "qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w2", "w3")}


def train(root: Path, out: Path, world: int = 1, **kw: object) -> Path:
    """``test_train_fsdp.train`` with ESFT-LoRA's settings."""
    return train_on(root, out, world, **{**LORA, **kw})


def expected(base: Path, experts: ExpertConfig, prefix: str, targets: tuple[str, ...]
             ) -> dict[str, tuple[int, ...]]:
    """Adapter name -> shape: A [r, in] and B [out, r] per targeted checkpoint tensor."""
    info = esft_rs.inspect(base).tensors
    out = {}
    for layer, ids in experts.experts.items():
        for e in ids:
            for p in targets:
                stem = f"model.layers.{layer}.{prefix}.experts.{e}.{p}"
                o, i = info[stem + ".weight"].shape
                out[f"{stem}.lora_A.weight"] = (RANK, i)
                out[f"{stem}.lora_B.weight"] = (o, RANK)
    return out


def merged_by_hand(base: Path, adapter: Path, into: Path) -> Path:
    """``base`` with W + alpha / r * B @ A (fp32, rounded to W's dtype) for every pair."""
    shutil.copytree(base, into)
    lora = load_file(adapter)
    with safe_open(adapter, "pt") as f:
        meta = json.loads(f.metadata()["esft.lora"])
    scale = meta["alpha"] / meta["rank"]
    for file in into.glob("*.safetensors"):
        weights = load_file(file)
        for name, w in weights.items():
            stem = name.removesuffix(".weight")
            if f"{stem}.lora_A.weight" in lora:
                a, b = lora[f"{stem}.lora_A.weight"], lora[f"{stem}.lora_B.weight"]
                weights[name] = (w.float() + scale * (b @ a)).to(w.dtype)
        save_file(weights, file, metadata={"format": "pt"})
    return into


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(ids)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("family", ["builtin", "qwen3_moe"])
def test_lora_run(builtin: Path, tmp_path: Path, family: str) -> None:
    """Step 0 is the base model; only the factors have AdamW state; the adapter holds
    exactly the expected pairs and metadata; the base merged with it by hand computes what
    the trained model computes."""
    from esft_rs.models import load_model
    from esft_rs.training import lora

    root = builtin if family == "builtin" else hf_run(tmp_path, family)
    experts = BUILTIN_EXPERTS if family == "builtin" else HF_EXPERTS
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    # step 0: LoRA attached, B = 0, the forward is the base model's, bit for bit
    base_model = load_model(root / "base")
    want = logits(base_model, ids)
    _, targets = lora.attach(base_model, experts, lora.LoraSpec(RANK, ALPHA, ()), 0)
    assert targets == sorted(PROJ[family])
    assert torch.equal(logits(base_model, ids), want)
    assert not any(p.requires_grad for n, p in base_model.named_parameters()
                   if "lora_" not in n)

    out = train(root, tmp_path / "out", steps=3, save_steps=3)
    adapter = out / "adapter.safetensors"
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter).items()}
    assert shapes == expected(root / "base", experts, "mlp", PROJ[family])
    assert {v.dtype for v in load_file(adapter).values()} == {torch.float32}
    with safe_open(adapter, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["esft.lora"]) == {"rank": RANK, "alpha": ALPHA,
                                            "targets": sorted(PROJ[family])}
    assert ExpertConfig.parse(meta["esft.expert_config"]) == experts
    # B moved from zero where tokens reached the expert: the run trained
    b = [k for k in shapes if "lora_B" in k]
    assert sum(bool(load_file(adapter)[k].any()) for k in b) > len(b) // 2
    state = adam_state(out, 3)
    assert state and all("lora_" in n for n in state)
    lora_params = sum(v.numel() for v in load_file(adapter).values())
    assert json.loads(meta["esft.metrics"])["trainable_params"] == lora_params
    # the same weights, merged by hand: the same logits as the trained model
    trained = esft_rs.train(root / "base", root / "task.jsonl", tmp_path / "again",
                            root / "experts.json", progress=False,
                            save_merged=tmp_path / "rust-merged",
                            **{**LORA, "per_device_batch_size": GLOBAL // 2, "steps": 3})
    merged = load_model(merged_by_hand(root / "base", adapter, tmp_path / "merged"))
    torch.testing.assert_close(logits(merged, ids), logits(trained.model, ids),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(merged, ids), want, atol=1e-4)
    # the Rust merge of the run's adapter (--save-merged), and of its PEFT export: the same
    esft_rs.export(root / "base", adapter, tmp_path / "peft")
    esft_rs.merge(root / "base", tmp_path / "peft", tmp_path / "peft-merged")
    for other in ("rust-merged", "peft-merged"):
        torch.testing.assert_close(logits(load_model(tmp_path / other), ids),
                                   logits(merged, ids), rtol=1e-5, atol=1e-5)


def test_lora_targets_and_mixtral_names(tmp_path: Path) -> None:
    """A subset of Mixtral's projections (``w1``, ``w2``, ``w3``, fused in memory as
    gate_up_proj and down_proj): pairs for those only."""
    root = hf_run(tmp_path, "mixtral")
    out = train(root, tmp_path / "out", steps=2, eval_steps=2, lora_targets=["w3", "w2"])
    shapes = {k: tuple(v.shape) for k, v in load_file(out / "adapter.safetensors").items()}
    assert shapes == expected(root / "base", HF_EXPERTS, "block_sparse_moe", ("w2", "w3"))


def test_lora_resume_equals_uninterrupted(builtin: Path, tmp_path: Path) -> None:
    kw = {"steps": 4, "save_steps": 2, "eval_steps": 4}
    whole = train(builtin, tmp_path / "whole", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(builtin, tmp_path / "cut", on_step=stop_after_2, **kw)
    resumed = train(builtin, tmp_path / "cut", resume=True, **kw)
    a, b = (load_file(o / "adapter.safetensors") for o in (whole, resumed))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_plan_counts_what_training_trains(builtin: Path, tmp_path: Path) -> None:
    from esft_rs.training.planner import plan

    out = train(builtin, tmp_path / "out", steps=1, eval_steps=1, lora_targets="down_proj")
    adapter = load_file(out / "adapter.safetensors")
    n = sum(v.numel() for v in adapter.values())
    p = plan(builtin / "base", BUILTIN_EXPERTS, lora_rank=RANK, lora_targets=["down_proj"])
    full = plan(builtin / "base", BUILTIN_EXPERTS)
    assert p.trained_params == n
    assert p.adapter_bytes == 4 * n
    assert p.optimizer_bytes == 8 * n + 4 * len(adapter)
    assert p.optimizer_bytes < full.optimizer_bytes
    cli = run_cli("plan", builtin / "base", "-e", builtin / "experts.json", "--lora-rank", RANK,
                  "--lora-targets", "nope")
    assert cli.returncode == 2
    assert "--lora-targets: the selected experts have no projection 'nope'" in cli.stderr


def test_lora_bad_flags(builtin: Path, tmp_path: Path) -> None:
    args = (builtin / "base", builtin / "task.jsonl")
    common = ["-o", tmp_path / "out", "-e", builtin / "experts.json", "--steps", "1",
              "--device", "cpu"]
    for extra, message in [
        (["--lora-rank", "4", "--lora-targets", "gate_proj,w1"],
         "--lora-targets: the selected experts have no projection 'w1' (they have:"
         " down_proj, gate_proj, up_proj)"),
        (["--lora-targets", "gate_proj"], "lora_targets needs lora_rank"),
        (["--lora-rank", "4", "--parallelism", "fsdp"],
         "--parallelism fsdp: ESFT-LoRA (--lora-rank) trains under --parallelism ddp (or auto)"
         " only"),
        (["--lora-rank", "4", "--mode", "full"], "not mode full"),
        (["--lora-rank", "4", "--lora-alpha", "0"], "lora_alpha must be positive"),
        (["--lora-rank", "49"], "--lora-rank 49: above the smallest dimension of"
         " model.layers.1.mlp.experts.0.gate_proj.weight (48), a targeted expert projection"),
    ]:
        r = run_cli("train", *args, *common, *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()
    with pytest.raises(EsftError, match="parallelism='ep'"):
        esft_rs.train(*args, tmp_path / "out", builtin / "experts.json", lora_rank=4,
                      parallelism="ep", device="cpu")


@pytest.mark.multiprocess
@pytest.mark.parametrize("family", ["builtin", "qwen3_moe"])
def test_lora_two_ranks_equal_one_process(builtin: Path, tmp_path: Path, family: str) -> None:
    """Under torchrun (auto: ddp, the factors replicated), the same global batch gives the
    same adapter and AdamW state as one process."""
    root = builtin if family == "builtin" else hf_run(tmp_path, family)
    one = train(root, tmp_path / "one", 1)
    two = train(root, tmp_path / "two", 2)
    x, y = (load_file(o / "adapter.safetensors") for o in (one, two))
    assert list(x) == list(y)
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-4, atol=1e-5, msg=k)
    want, got = adam_state(one, 3), adam_state(two, 3)
    assert set(got) == set(want)
    for name, s in want.items():
        # within 1e-4 of the tensor's largest: a factor's gradient is a product with the
        # other factor of a gradient summed in another order (2.3e-5 seen; ESFT's 4.4e-6)
        assert int(got[name]["step"]) == int(s["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[name][k], s[k], rtol=0,
                                       atol=1e-4 * float(s[k].abs().max()), msg=name)
    config = (two / "train_config.yaml").read_text()
    assert "parallelism: ddp" in config


@pytest.mark.parametrize("family", ["builtin", "qwen3_moe"])
def test_lora_gradient_checkpointing_changes_nothing(builtin: Path, tmp_path: Path,
                                                     family: str) -> None:
    """Recomputing the forward in backward (the default) reads the factors again: the same
    adapter as keeping the activations."""
    root = builtin if family == "builtin" else hf_run(tmp_path, family)
    kw = {"steps": 2, "eval_steps": 2}
    kept = train(root, tmp_path / "kept", **kw)
    recomputed = train(root, tmp_path / "recomputed", gradient_checkpointing=True, **kw)
    x, y = (load_file(o / "adapter.safetensors") for o in (kept, recomputed))
    assert list(x) == list(y)
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6, msg=k)


def test_lora_with_shared_experts_trained_in_full(builtin: Path, tmp_path: Path) -> None:
    """The expert config's shared_experts: trained in full, under their plain names."""
    root = tmp_path / "run"
    shutil.copytree(builtin, root)
    ExpertConfig({1: [0, 5]}, True, False).save(root / "experts.json")
    out = train(root, tmp_path / "out", steps=1, eval_steps=1)
    adapter = load_file(out / "adapter.safetensors")
    base = esft_rs.inspect(root / "base").tensors
    plain = {k for k in adapter if "lora_" not in k}
    assert plain and plain == {k for k in base if ".shared_experts." in k}
    assert {k.split(".experts.")[1].split(".")[0] for k in adapter if "lora_" in k} == {"0", "5"}

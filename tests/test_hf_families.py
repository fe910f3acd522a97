"""transformers MoE families: profile, train (every mode), merge/split, eval, on tiny random
checkpoints saved with ``save_pretrained`` (per-expert names on disk, fused in memory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

import esft_rs
from conftest import run_cli
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.files.naming import classify
from esft_rs.models import as_moe_model, hf, load_model
from esft_rs.routing.profiling import profile
from hf_tiny import FAMILIES, save

#: Experts to train: MoE layers 1 and 2 exist in every tiny family (DeepSeek's layer 0 is dense).
EXPERTS = ExpertConfig({1: [1, 5], 2: [0, 6, 7]}, False, False)
TRAIN = {"steps": 3, "seq_length": 48, "per_device_batch_size": 2,
         "gradient_accumulation_steps": 1, "learning_rate": 5e-2, "eval_steps": 100,
         "save_steps": 100, "gradient_checkpointing": False, "device": "cpu"}


def make_family(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    save(name, root / "base")
    rows = [{"messages": [{"role": "user", "content": f"Reverse {w}"},
                          {"role": "assistant", "content": w[::-1]}]}
            for w in ("moe", "expert", "router", "gate", "token", "shard", "adapter", "merge")]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    EXPERTS.save(root / "experts.json")
    return root


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_family(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One family for the CLI runs (each pays transformers' import): Mixtral, whose
    on-disk names differ most from the in-memory ones."""
    return make_family(tmp_path_factory, "mixtral")


def reference_routing(
    config: transformers.PretrainedConfig, logits: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K ids and mixing weights from router logits, written from each family's paper
    and model card rules (not from transformers' code path)."""
    k, kind = config.num_experts_per_tok, config.model_type
    logits = logits.double()
    if kind == "deepseek_v3":  # sigmoid; bias only chooses; groups ranked by their top-2 sum
        scores = logits.sigmoid()
        choice = scores + bias.double()
        groups = choice.view(len(choice), config.n_group, -1)
        group_rank = groups.topk(2, dim=-1).values.sum(-1)
    else:
        scores = choice = logits.softmax(-1)
        groups = choice.view(len(choice), getattr(config, "n_group", None) or 1, -1)
        group_rank = groups.max(-1).values
    if kind in ("deepseek_v2", "deepseek_v3"):
        keep = torch.zeros_like(group_rank, dtype=torch.bool)
        keep.scatter_(1, group_rank.topk(config.topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(groups.shape[-1], dim=1), -1.0)
    ids = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if kind == "mixtral" or getattr(config, "norm_topk_prob", False):
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * getattr(config, "routed_scaling_factor", 1.0)


def test_profile_equals_the_models_own_router_outputs(family: Path) -> None:
    model = load_model(family / "base")
    config = model.config
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    stats = profile(as_moe_model(model), [(ids, mask)])

    moe_layers = sorted(hf.routers(model))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, output_router_logits=True).router_logits
    assert len(logits) == len(moe_layers)
    real = mask.reshape(-1).bool()
    assert stats.layers == moe_layers
    for row, (layer, lg) in enumerate(zip(moe_layers, logits, strict=True)):
        bias = getattr(hf.routers(model)[layer], "e_score_correction_bias", None)
        ref_ids, ref_w = reference_routing(config, lg, bias)
        ref_ids, ref_w = ref_ids[real], ref_w[real]
        counts = torch.bincount(ref_ids.reshape(-1), minlength=config_experts(config))
        sums = torch.zeros(config_experts(config), dtype=torch.float64)
        sums.index_add_(0, ref_ids.reshape(-1), ref_w.reshape(-1))
        assert stats.counts[row].tolist() == counts.tolist(), layer
        torch.testing.assert_close(torch.from_numpy(stats.gate_sum[row]), sums,
                                   rtol=1e-5, atol=1e-6)
    assert stats.tokens.tolist() == [int(real.sum())] * len(moe_layers)


def config_experts(config: transformers.PretrainedConfig) -> int:
    for key in ("n_routed_experts", "num_local_experts", "num_experts"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise AssertionError("no expert count in config")


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 3 + 2 * 13).reshape(2, 13)
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("mode", ["esft", "random", "full"])
def test_training_and_merge_give_the_trained_model(family: Path, tmp_path: Path,
                                                   mode: str) -> None:
    base = load_model(family / "base")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    result = esft_rs.train(family / "base", family / "task.jsonl", tmp_path / "out",
                           family / "experts.json", progress=False, mode=mode,
                           save_merged=tmp_path / "merged", **TRAIN)
    trained = result.experts.experts
    # Fused in memory: exactly the selected experts' slices moved, everything else is bit-identical.
    for name, old in before.items():
        owner, _, attr = name.rpartition(".")
        value = getattr(result.model.get_submodule(owner), attr).detach()  # fused: parametrized
        role = classify(name)
        if role.kind == "fused_experts":
            for e in range(value.shape[0]):
                moved = not torch.equal(value[e], old[e])
                assert moved == (e in trained.get(role.layer, ())), (name, e)
        elif mode != "full":
            assert torch.equal(value, old), name
    if mode != "full":  # gradients and optimizer state for the selected slices only
        per_expert = sum(before[n][0].numel() for n in before if classify(n).kind == "fused_experts"
                         and classify(n).layer == 1)
        assert result.fit.trainable_params == per_expert * result.experts.num_experts
        assert result.fit.optimizer_state_bytes < 2 * 4 * result.fit.trainable_params + 1024
    # The adapter holds the checkpoint's own per-expert names, and nothing else.
    with safe_open(tmp_path / "out" / "adapter.safetensors", "pt") as f:
        names = set(f.keys())
    with safe_open(family / "base" / "model.safetensors", "pt") as f:
        on_disk = set(f.keys())
    assert names <= on_disk
    expected = {n for n in on_disk if classify(n).kind == "routed_expert"
                and classify(n).expert in trained.get(classify(n).layer, ())}
    if mode == "full":
        assert expected <= names and len(names) > len(expected)
    else:
        assert names == expected and len(names) == 3 * result.experts.num_experts
    # Merged on disk and loaded by transformers: the same logits as the trained model in memory.
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits_of(merged), logits_of(result.model), rtol=0, atol=1e-6)


def test_split_then_merge_reproduces_the_trained_model(family: Path, tmp_path: Path) -> None:
    result = esft_rs.train(family / "base", family / "task.jsonl", tmp_path / "out",
                           family / "experts.json", progress=False,
                           save_merged=tmp_path / "merged", **TRAIN)
    esft_rs.split(tmp_path / "merged", tmp_path / "split.safetensors", base=family / "base")
    esft_rs.merge(family / "base", tmp_path / "split.safetensors", tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(logits_of(again), logits_of(result.model), rtol=0, atol=1e-6)
    derived = esft_rs.read_adapter(tmp_path / "split.safetensors").expert_config
    assert derived is not None  # lists every MoE layer, as official configs do
    assert {k: v for k, v in derived.experts.items() if v} == result.experts.experts


def test_profile_cli_on_a_transformers_directory(mixtral: Path, tmp_path: Path) -> None:
    proc = run_cli("profile", mixtral / "base", mixtral / "task.jsonl", "-o", tmp_path / "r.st",
                   "--seq-length", "32", "--device", "cpu", check=True)
    assert "3 MoE layers x 8 experts, top-2" in proc.stdout
    stats = esft_rs.RoutingStats.load(tmp_path / "r.st")
    assert stats.layers == [0, 1, 2]


def test_core_package_never_imports_transformers() -> None:
    code = ("import sys, esft_rs, esft_rs.cli, esft_rs.training.api, esft_rs.routing.profiling, "
            "esft_rs.models; assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, mixtral: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(esft_rs.EsftError, match=r"pip install 'esft-rs\[hf\]'"):
        load_model(mixtral / "base")


def test_unsupported_family_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "tokenizer": "byte"}))
    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    proc = run_cli("profile", model, data, "-o", tmp_path / "r.st")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "model_type 'llama' is not a supported MoE family" in proc.stderr


def test_experts_fused_on_disk_keep_fused_slice_names(mixtral: Path, tmp_path: Path) -> None:
    """A checkpoint that stores experts fused, as in memory (some tools write this): the
    adapter holds slices of the fused tensors, and the merge writes them in place."""
    from safetensors.torch import save_file

    fused = tmp_path / "fused"
    fused.mkdir()
    model = load_model(mixtral / "base")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              fused / "model.safetensors", metadata={"format": "pt"})
    (fused / "config.json").write_bytes((mixtral / "base" / "config.json").read_bytes())
    result = esft_rs.train(fused, mixtral / "task.jsonl", tmp_path / "out",
                           mixtral / "experts.json", progress=False,
                           save_merged=tmp_path / "merged", **TRAIN)
    with safe_open(tmp_path / "out" / "adapter.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(
            f"model.layers.{layer}.mlp.experts.{e}.{p}"
            for layer, ids in EXPERTS.experts.items() for e in ids
            for p in ("down_proj", "gate_up_proj"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits_of(merged), logits_of(result.model), rtol=0, atol=1e-6)


def test_train_cli_on_a_transformers_directory(mixtral: Path, tmp_path: Path) -> None:
    """The command line, with the official defaults (gradient checkpointing on)."""
    run_cli("train", mixtral / "base", mixtral / "task.jsonl", "--experts",
            mixtral / "experts.json", "-o", tmp_path / "out", "--steps", "2", "--seq-length", "48",
            "--per-device-batch-size", "2", "--gradient-accumulation-steps", "1", "--device", "cpu",
            check=True)
    with safe_open(tmp_path / "out" / "adapter.safetensors", "pt") as f:
        assert len(f.keys()) == 3 * EXPERTS.num_experts
        assert all(".block_sparse_moe.experts." in k for k in f.keys())
    run_cli("merge", mixtral / "base", tmp_path / "out" / "adapter.safetensors",
            "-o", tmp_path / "merged", check=True)
    adapter = load_file(tmp_path / "out" / "adapter.safetensors")
    merged, base = stored(tmp_path / "merged"), stored(mixtral / "base")
    assert merged.keys() == base.keys() and adapter.keys() <= merged.keys()
    assert any(not torch.equal(t, base[n]) for n, t in adapter.items())  # training changed some
    for name, t in merged.items():  # the adapter's values where it has them, else the base's
        want = adapter.get(name, base[name])
        assert t.dtype == want.dtype and torch.equal(t, want), name


def stored(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, from all its safetensors files."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_shared_experts_train_with_their_gate(name: str, tmp_path_factory: pytest.TempPathFactory,
                                              tmp_path: Path) -> None:
    root = make_family(tmp_path_factory, name)
    cfg = ExpertConfig(EXPERTS.experts, shared_experts=True, non_expert_modules=False)
    esft_rs.train(root / "base", root / "task.jsonl", tmp_path / "out", cfg, progress=False,
                  **TRAIN)
    with safe_open(tmp_path / "out" / "adapter.safetensors", "pt") as f:
        shared = {k for k in f.keys() if classify(k).kind != "routed_expert"}
    kinds = {classify(k).kind for k in shared}
    assert kinds == ({"shared_expert", "shared_expert_gate"} if name == "qwen2_moe"
                     else {"shared_expert"})
    moe_layers = {0, 1, 2} if name == "qwen2_moe" else {1, 2}  # DeepSeek's layer 0 is dense
    assert {classify(k).layer for k in shared} == moe_layers


def fp8_copy(src: Path, out: Path, block: int = 16) -> Path:
    """``src`` as DeepSeek-V3 publishes it: projections in block FP8 with weight_scale_inv."""
    from safetensors.torch import load_file, save_file

    from esft_rs.testing import fp8_config, is_fp8_linear, quantize_fp8_blocks

    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        if is_fp8_linear(name, tuple(t.shape)):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(t, (block, block))
        else:
            tensors[name] = t.to(torch.bfloat16)
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.update(fp8_config((block, block)), dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_fp8_deepseek_v3_trains_and_merges_by_requantising(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """transformers dequantises the FP8 base on CPU; the BF16 adapter goes back into the
    FP8 slots only with --requantize-fp8, which is checked before training starts."""
    root = make_family(tmp_path_factory, "deepseek_v3")
    base = fp8_copy(root / "base", tmp_path / "fp8")
    with pytest.raises(esft_rs.MismatchError, match="pass requantize_fp8=True"):
        esft_rs.train(base, root / "task.jsonl", tmp_path / "refused", root / "experts.json",
                      progress=False, save_merged=tmp_path / "never", **TRAIN)
    assert not (tmp_path / "refused").exists() and not (tmp_path / "never").exists()
    before = logits_of(load_model(base).float())
    result = esft_rs.train(base, root / "task.jsonl", tmp_path / "out", root / "experts.json",
                           progress=False, save_merged=tmp_path / "merged", requantize_fp8=True,
                           **TRAIN)
    with safe_open(tmp_path / "out" / "adapter.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert len(f.keys()) == 3 * EXPERTS.num_experts
    with safe_open(base / "model.safetensors", "pt") as old, \
            safe_open(tmp_path / "merged" / "model.safetensors", "pt") as new:
        changed = {n for n in old.keys() if not torch.equal(
            old.get_tensor(n).view(torch.uint8), new.get_tensor(n).view(torch.uint8))}
    # Only trained experts' weights and their scales change (an expert no token reached
    # may requantise to its old bytes); everything else is byte-identical.
    selected = {n for n in changed if classify(n).kind == "routed_expert"
                and classify(n).expert in EXPERTS.experts.get(classify(n).layer, ())}
    assert changed == selected and len(changed) >= len(EXPERTS.experts)
    assert any(n.endswith("_scale_inv") for n in changed)
    merged = load_model(tmp_path / "merged").float()
    trained, again = logits_of(result.model), logits_of(merged)
    # Requantising costs far less than what training changed.
    assert (again - trained).abs().max() < 0.1 * (before - trained).abs().max()


def test_a_checkpoint_missing_tensors_is_refused(mixtral: Path, tmp_path: Path) -> None:
    """transformers would initialise missing or misfitting tensors at random; esft-rs refuses
    in one line (no load report)."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(mixtral / "base" / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "config.json").write_bytes((mixtral / "base" / "config.json").read_bytes())
    with pytest.raises(esft_rs.InvalidFileError, match=(
            f"{broken}: the checkpoint has no tensor model.layers.1.post_attention_layernorm")):
        load_model(broken)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    proc = run_cli("eval", broken, mixtral / "task.jsonl", "--device", "cpu")
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "Loading weights" not in x]
    assert lines == [f"esft-rs: error: {broken}: tensor model.layers.1.mlp.experts.down_proj is"
                     " made of 8 tensors experts.*.w2.weight (one per expert); the checkpoint"
                     " has 7"]

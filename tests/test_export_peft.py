"""``esft-rs export``: PEFT adapter directories that the real ``peft`` package loads onto the
transformers model, checked against esft-rs's own merge and forward; the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import esft_rs
from conftest import run_cli
from esft_rs.exporting import REPORT_NAME, export
from esft_rs.files.adapter import ADAPTER_KEYS, save_adapter
from esft_rs.files.naming import classify
from esft_rs.models import load_model
from hf_tiny import save

peft = pytest.importorskip("peft")

R, ALPHA = 3, 6.0
#: (layer, expert) pairs an adapter trains, per family: DeepSeek-V2's layer 0 is dense.
TRAINED = {"deepseek_v2": [(1, 2), (1, 5), (2, 0)], "mixtral": [(0, 1), (2, 6)]}


@pytest.fixture(scope="module", params=sorted(TRAINED))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[str, Path]:
    name = request.param
    return name, save(name, tmp_path_factory.mktemp(name) / "base")


def expert_weights(base: Path, family: str) -> dict[str, torch.Tensor]:
    sd = load_file(base / "model.safetensors")
    trained = set(TRAINED[family])
    return {n: t for n, t in sd.items() if classify(n).kind == "routed_expert"
            and (classify(n).layer, classify(n).expert) in trained}


def config_of(family: str) -> dict:
    experts: dict[str, list[int]] = {}
    for layer, e in TRAINED[family]:
        experts.setdefault(str(layer), []).append(e)
    return {"experts": experts, "shared_experts": False, "non_expert_modules": False}


def esft_lora(base: Path, family: str, path: Path) -> Path:
    """An ESFT-LoRA adapter (the agreed format) with random pairs on the trained experts."""
    g = torch.Generator().manual_seed(3)
    pairs = {}
    for name, w in expert_weights(base, family).items():
        module = name.removesuffix(".weight")
        pairs[module + ".lora_A.weight"] = torch.randn(R, w.shape[1], generator=g) * 0.2
        pairs[module + ".lora_B.weight"] = torch.randn(w.shape[0], R, generator=g) * 0.2
    targets = sorted({n.rsplit(".", 3)[-3] for n in pairs})
    lora = json.dumps({"rank": R, "alpha": ALPHA, "targets": targets})
    return save_adapter(pairs, path, config_of(family), base=base,
                        extra_metadata={ADAPTER_KEYS["lora"]: lora})


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 3 + 2 * 13).reshape(2, 13)
    with torch.no_grad():
        return model.eval()(ids).logits


def test_peft_loads_the_export_as_esft_rs_merges_it(family: tuple[str, Path],
                                                     tmp_path: Path) -> None:
    name, base = family
    adapter = esft_lora(base, name, tmp_path / "lora.safetensors")
    report = export(base, adapter, tmp_path / "peft")
    assert (report.source, report.rank, report.lora_alpha, report.error) == (
        "lora", R, ALPHA, 0.0)
    assert json.loads((tmp_path / "peft" / REPORT_NAME).read_text())["rank"] == R
    # vLLM stacks every expert of a touched layer: zeros for the untouched ones.
    layers = {layer for layer, _ in TRAINED[name]}
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    experts = {(classify(k.removeprefix("base_model.model.")).layer,
                classify(k.removeprefix("base_model.model.")).expert) for k in keys}
    assert experts == {(layer, e) for layer in layers for e in range(8)}

    # esft-rs: merge the ESFT-LoRA file (and the export: the same bytes), then its forward.
    esft_rs.merge(base, adapter, tmp_path / "merged")
    esft_rs.merge(base, tmp_path / "peft", tmp_path / "merged-export")
    assert ((tmp_path / "merged" / "model.safetensors").read_bytes()
            == (tmp_path / "merged-export" / "model.safetensors").read_bytes())
    ours = load_model(tmp_path / "merged")

    # PEFT: the export loaded onto the transformers model of the base.
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "peft")
    torch.testing.assert_close(logits_of(peft_model), logits_of(ours), rtol=0, atol=2e-6)
    assert not torch.equal(logits_of(ours), logits_of(load_model(base)))

    # PEFT's merge_and_unload against esft-rs merge, tensor by tensor (fused in memory).
    merged = peft_model.merge_and_unload().state_dict()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert merged.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-7, msg=key)


def full_adapter(base: Path, family: str, path: Path) -> Path:
    g = torch.Generator().manual_seed(4)
    tensors = {n: w + 0.01 * torch.randn(w.shape, generator=g)
               for n, w in expert_weights(base, family).items()}
    return save_adapter(tensors, path, config_of(family), base=base)


def test_full_adapter_export_is_exact_without_rank(family: tuple[str, Path],
                                                   tmp_path: Path) -> None:
    name, base = family
    adapter = full_adapter(base, name, tmp_path / "full.safetensors")
    report = export(base, adapter, tmp_path / "exact")
    # Random changes have full rank: the smallest dimension (16), exact up to float32.
    assert report.source == "full" and report.rank == 16
    assert report.error < 1e-6 and all(t.error < 1e-6 for t in report.tensors)
    esft_rs.merge(base, adapter, tmp_path / "a")
    esft_rs.merge(base, tmp_path / "exact", tmp_path / "b")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)

    low = export(base, adapter, tmp_path / "low", rank=2)
    worst = json.loads((tmp_path / "low" / REPORT_NAME).read_text())
    assert low.rank == 2 and 0.5 < low.error < 1  # random changes: most energy is cut
    assert [t["error"] for t in worst["tensors"]] == [t.error for t in low.tensors]


def one_line_exit_2(*args: object) -> str:
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_export_refusals(family: tuple[str, Path], tmp_path: Path) -> None:
    name, base = family
    adapter = full_adapter(base, name, tmp_path / "full.safetensors")
    other = save(name, tmp_path / "other", seed=1)
    out = tmp_path / "out"
    assert "trained from a different base" in one_line_exit_2("export", other, adapter,
                                                              "-o", out)
    line = one_line_exit_2("export", base, adapter, "-o", out, "--rank", 17)
    assert "--rank 17: above the smallest dimension (16)" in line
    assert "lie inside the input" in one_line_exit_2("export", base, adapter,
                                                     "-o", base / "peft")
    assert not out.exists() and not (base / "peft").exists()


def peft_saved(base: Path, out: Path, **config: object) -> tuple[Path, torch.Tensor,
                                                                   dict[str, torch.Tensor]]:
    """A PEFT adapter as another tool writes it (``get_peft_model``, non-zero B, then
    ``save_pretrained``), with PEFT's logits and its ``merge_and_unload`` state."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(6)
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    peft_model.save_pretrained(out)
    logits = logits_of(peft_model)
    return out, logits, peft_model.merge_and_unload().state_dict()


def test_merge_takes_a_peft_adapter_from_another_tool(family: tuple[str, Path],
                                                      tmp_path: Path) -> None:
    """LoRA on attention (nn.Linear modules): every key maps onto the checkpoint; esft-rs
    merge gives PEFT's logits and PEFT's merged tensors."""
    _, base = family
    adapter, logits, merged = peft_saved(base, tmp_path / "peft",
                                         target_modules=["q_proj", "o_proj"])
    report = esft_rs.merge(base, adapter, tmp_path / "merged")
    assert {r.tensor.rsplit(".", 2)[-2] for r in report.replaced} == {"q_proj", "o_proj"}
    torch.testing.assert_close(logits_of(load_model(tmp_path / "merged")), logits,
                               rtol=0, atol=2e-6)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_merge_takes_peft_lora_on_fused_expert_parameters(family: tuple[str, Path],
                                                          tmp_path: Path) -> None:
    """PEFT's "all-linear" on a transformers 5 MoE targets the experts' fused parameters
    itself (target_parameters, gate_up_proj at rank 2r through rank_pattern): each expert's
    part lands in its per-expert weights (gate rows, then up rows), with PEFT's logits and
    its merge_and_unload tensors."""
    _, base = family
    adapter, logits, merged = peft_saved(base, tmp_path / "peft", target_modules="all-linear")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {"gate_up_proj", "down_proj"} <= set(config["target_parameters"])
    report = esft_rs.merge(base, adapter, tmp_path / "merged")
    assert sum(r.kind == "routed_expert" for r in report.replaced) == 3 * 8 * (
        2 if "deepseek" in str(base) else 3)
    torch.testing.assert_close(logits_of(load_model(tmp_path / "merged")), logits,
                               rtol=0, atol=2e-6)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6, msg=key)

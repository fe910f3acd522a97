"""Merging LoRA adapters (ESFT-LoRA files, PEFT directories) in the Rust core:
W + s*B@A against torch's reference, byte-exactness elsewhere, keys that do not map."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import esft_rs
from conftest import run_cli
from esft_rs.errors import MismatchError
from esft_rs.files.adapter import ADAPTER_KEYS, save_adapter

EXPERT = "model.layers.1.mlp.experts.{}.gate_proj.weight"
FUSED = "model.layers.2.mlp.experts.gate_up_proj"
OUT, IN, R, ALPHA = 64, 48, 4, 6.0


def write_base(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {EXPERT.format(e): torch.randn(OUT, IN, generator=g).to(dtype) for e in range(4)}
    tensors[FUSED] = torch.randn(4, OUT, IN, generator=g).to(dtype)
    tensors["model.norm.weight"] = torch.ones(IN, dtype=dtype)
    tensors[EXPERT.format(0)][0, 0] = -0.0  # a negative zero stays one where nothing changes
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def lora_pairs() -> dict[str, torch.Tensor]:
    """Pairs for expert 1 (a per-expert weight), expert 2's slice of the fused tensor, and
    an all-zero pair for expert 0 (as exports write for experts a task left alone)."""
    g = torch.Generator().manual_seed(1)
    pairs = {}
    for module in ("model.layers.1.mlp.experts.1.gate_proj",
                   "model.layers.2.mlp.experts.2.gate_up_proj"):
        pairs[module + ".lora_A.weight"] = torch.randn(R, IN, generator=g) * 0.3
        pairs[module + ".lora_B.weight"] = torch.randn(OUT, R, generator=g) * 0.3
    pairs["model.layers.1.mlp.experts.0.gate_proj.lora_A.weight"] = torch.zeros(R, IN)
    pairs["model.layers.1.mlp.experts.0.gate_proj.lora_B.weight"] = torch.zeros(OUT, R)
    return pairs


def write_esft_lora(path: Path, base: Path) -> Path:
    config = {"experts": {"1": [0, 1], "2": [2]}, "shared_experts": False,
              "non_expert_modules": False}
    lora = json.dumps({"rank": R, "alpha": ALPHA, "targets": ["gate_proj", "gate_up_proj"]})
    return save_adapter(lora_pairs(), path, config, base=base,
                        extra_metadata={ADAPTER_KEYS["lora"]: lora})


def reference(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (w.float() + ALPHA / R * (b.float() @ a.float())).to(w.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_merge_equals_torch_within_one_unit(tmp_path: Path, dtype: torch.dtype) -> None:
    base = tmp_path / "base.safetensors"
    before = write_base(base, dtype)
    adapter = write_esft_lora(tmp_path / "lora.safetensors", base)
    report = esft_rs.merge(base, adapter, tmp_path / "merged.safetensors")
    assert {(r.tensor, r.expert) for r in report.replaced} == {
        (EXPERT.format(1), 1), (FUSED, 2)}
    after = load_file(tmp_path / "merged.safetensors")
    pairs = lora_pairs()
    want = {EXPERT.format(1): reference(before[EXPERT.format(1)],
                                        pairs[EXPERT.format(1)[:-7] + ".lora_A.weight"],
                                        pairs[EXPERT.format(1)[:-7] + ".lora_B.weight"])}
    fused = before[FUSED].clone()
    fused[2] = reference(fused[2], pairs["model.layers.2.mlp.experts.2.gate_up_proj.lora_A.weight"],
                         pairs["model.layers.2.mlp.experts.2.gate_up_proj.lora_B.weight"])
    want[FUSED] = fused
    for name, ref in want.items():
        got = after[name]
        if dtype == torch.float32:
            # f32 sums in another order than torch's matmul: a few units of the last place.
            torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-6)
            continue
        # One rounding of the f32 result, as torch: equal bits but where the f32 sums'
        # order moves a value across a rounding boundary, then one unit apart (a unit of
        # the larger of |W| and the result: a result that cancels W keeps W's f32 error).
        w = before[name]
        scale = torch.maximum(w.float().abs(), ref.float().abs()).clamp_min(2.0**-14)
        mantissa = 7 if dtype == torch.bfloat16 else 10
        unit = torch.exp2(torch.floor(torch.log2(scale)) - mantissa)
        assert float(((got.float() - ref.float()).abs() / unit).max()) <= 1, name
        equal = (got.view(torch.int16) == ref.view(torch.int16)).float().mean()
        assert float(equal) >= 0.999, name
    # Everything else keeps its bytes: other experts, the zero pair's expert (its -0.0
    # too), the fused tensor's other slices, the header.
    for name, t in before.items():
        if name == FUSED:
            assert torch.equal(after[name][[0, 1, 3]].view(torch.uint8),
                               t[[0, 1, 3]].view(torch.uint8))
        elif name != EXPERT.format(1):
            assert torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)), name
    raw_base, raw_out = base.read_bytes(), (tmp_path / "merged.safetensors").read_bytes()
    head = 8 + int.from_bytes(raw_base[:8], "little")
    assert len(raw_out) == len(raw_base) and raw_out[:head] == raw_base[:head]


def peft_dir(path: Path, tensors: dict[str, torch.Tensor], r: int = R,
             alpha: float = ALPHA) -> Path:
    path.mkdir()
    prefix = ADAPTER_KEYS["peft_prefix"]
    save_file({prefix + k: v for k, v in tensors.items()},
              path / ADAPTER_KEYS["peft_weights"])
    (path / ADAPTER_KEYS["peft_config"]).write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["gate_proj"]}))
    return path


def test_peft_directory_merges_as_the_esft_lora_file(tmp_path: Path) -> None:
    base = tmp_path / "base.safetensors"
    write_base(base, torch.bfloat16)
    esft_rs.merge(base, write_esft_lora(tmp_path / "lora.safetensors", base),
                  tmp_path / "a.safetensors")
    esft_rs.merge(base, peft_dir(tmp_path / "peft", lora_pairs()), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_peft_key_that_does_not_map_is_one_line(tmp_path: Path) -> None:
    base = tmp_path / "base.safetensors"
    write_base(base, torch.bfloat16)
    pairs = lora_pairs()
    bad = "model.layers.1.mlp.experts.7.gate_proj"  # the base has experts 0-3
    pairs[bad + ".lora_A.weight"] = torch.ones(R, IN)
    pairs[bad + ".lora_B.weight"] = torch.ones(OUT, R)
    adapter = peft_dir(tmp_path / "peft", pairs)
    key = f"base_model.model.{bad}.lora_A.weight"
    pattern = f'key "{re.escape(key)}" does not map onto the base .*: it has no tensor'
    with pytest.raises(MismatchError, match=pattern):
        esft_rs.merge(base, adapter, tmp_path / "out.safetensors")
    proc = run_cli("merge", base, adapter, "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(("config", "why"), [
    ({"r": 4, "lora_alpha": 8, "use_dora": True}, "use_dora"),
    ({"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 8}}, 'rank_pattern key "q_proj"'),
    ({"lora_alpha": 8}, '"r"'),
])
def test_peft_configs_merge_cannot_reproduce_are_refused(tmp_path: Path, config: dict,
                                                         why: str) -> None:
    base = tmp_path / "base.safetensors"
    write_base(base, torch.bfloat16)
    adapter = peft_dir(tmp_path / "peft", lora_pairs())
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(esft_rs.InvalidFileError, match=why):
        esft_rs.merge(base, adapter, tmp_path / "out.safetensors")


def test_unpaired_lora_tensor_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.safetensors"
    write_base(base, torch.bfloat16)
    pairs = lora_pairs()
    del pairs["model.layers.1.mlp.experts.1.gate_proj.lora_B.weight"]
    with pytest.raises(esft_rs.InvalidFileError, match=r"lora_A\.weight without"):
        esft_rs.merge(base, peft_dir(tmp_path / "peft", pairs), tmp_path / "out.safetensors")


def test_lora_merge_into_a_sharded_base_keeps_every_other_byte(sharded_ckpt: Path,
                                                               tmp_path: Path) -> None:
    """Pairs on experts in different shards: each lands in its own shard at the base's
    offsets; the shards, the index and the other files are the base's, byte for byte."""
    from esft_rs import inspect

    info = inspect(sharded_ckpt)
    names = sorted(n for n in info.tensors if ".experts." in n and "shared" not in n
                   and n.endswith(".weight"))
    picked = [names[0], names[-1]]
    assert len({info.tensors[n].file for n in picked}) == 2
    g = torch.Generator().manual_seed(5)
    pairs, want = {}, {}
    for name in picked:
        out_dim, in_dim = info.tensors[name].shape
        a, b = torch.randn(2, in_dim, generator=g), torch.randn(out_dim, 2, generator=g)
        module = name.removesuffix(".weight")
        pairs[module + ".lora_A.weight"], pairs[module + ".lora_B.weight"] = a, b
        want[name] = (a, b)
    layers = {str(int(n.split(".")[2])): [int(n.split(".")[5])] for n in picked}
    lora = json.dumps({"rank": 2, "alpha": 2.0, "targets": ["gate_proj", "up_proj", "down_proj"]})
    adapter = save_adapter(pairs, tmp_path / "lora.safetensors",
                           {"experts": layers, "shared_experts": False,
                            "non_expert_modules": False},
                           base=sharded_ckpt, extra_metadata={ADAPTER_KEYS["lora"]: lora})
    out = tmp_path / "merged"
    esft_rs.merge(sharded_ckpt, adapter, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in sharded_ckpt.iterdir())
    for path in sharded_ckpt.iterdir():
        if not path.name.endswith(".safetensors"):
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
            continue
        before, after = load_file(path), load_file(out / path.name)
        raw_base, raw_out = path.read_bytes(), (out / path.name).read_bytes()
        head = 8 + int.from_bytes(raw_base[:8], "little")
        assert len(raw_out) == len(raw_base) and raw_out[:head] == raw_base[:head]
        for name, t in before.items():
            if name in want:
                a, b = want[name]
                torch.testing.assert_close(after[name], t + b @ a, rtol=2e-6, atol=1e-5)
            else:
                assert torch.equal(after[name], t), name


def test_read_adapter_of_a_lora_adapter(tmp_path: Path) -> None:
    base = tmp_path / "base.safetensors"
    write_base(base, torch.bfloat16)
    lora = esft_rs.read_adapter(write_esft_lora(tmp_path / "lora.safetensors", base))
    assert lora.kind == "lora" and list(lora.tensors) == sorted(lora_pairs())
    peft = esft_rs.read_adapter(peft_dir(tmp_path / "peft", lora_pairs()))
    assert peft.kind == "peft" and list(peft.tensors) == sorted(lora_pairs())


def test_export_stays_the_function_once_its_module_is_imported(tmp_path: Path) -> None:
    """The lazy ``esft_rs.export`` once was a module attribute that importing the module of
    the same name replaced: the second call found a module."""
    import esft_rs.exporting

    base = tmp_path / "base.safetensors"
    write_base(base, torch.bfloat16)
    adapter = write_esft_lora(tmp_path / "lora.safetensors", base)
    for _ in range(2):
        with pytest.raises(esft_rs.EsftValueError, match=r"^rank=0: must be a positive"):
            esft_rs.export(base, adapter, tmp_path / "out", rank=0)
    assert not (tmp_path / "out").exists()

"""merge: byte-exact against the python safetensors package, every kind of adapter, every error."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import esft_rs
from conftest import run_cli
from esft_rs.files.adapter import ADAPTER_KEYS, read_adapter, save_adapter
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.testing import (
    MoEShape,
    expert_tensors,
    perturb_experts,
    random_tensors,
    write_checkpoint,
)

SHAPE = MoEShape(layers=3, experts=4, shared_experts=1, hidden=8, intermediate=4, vocab=16)
FUSED = MoEShape(
    layers=3, experts=4, shared_experts=1, hidden=8, intermediate=4, vocab=16, fused=True
)
CHOSEN = {1: [0, 2], 2: [3]}


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path (or of the file itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files
    }


def assert_same_files(got: Path, expected: Path) -> None:
    if expected.is_file():
        assert got.read_bytes() == expected.read_bytes()
        return
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for n in names:
        assert (got / n).read_bytes() == (expected / n).read_bytes(), n


def config_for(experts: dict[int, list[int]]) -> ExpertConfig:
    return ExpertConfig(experts={k: list(v) for k, v in experts.items()})


@pytest.mark.parametrize("shape", [SHAPE, FUSED], ids=["per-expert", "fused"])
@pytest.mark.parametrize("shards", [1, 3])
def test_matches_python_safetensors(tmp_path: Path, shape: MoEShape, shards: int) -> None:
    base_t = random_tensors(shape, seed=1)
    base = write_checkpoint(tmp_path / "base", base_t, shards=shards, config={"m": 1})
    (base / "tokenizer.json").write_text("{}")
    ft_t = perturb_experts(base_t, CHOSEN, seed=2)
    adapter = save_adapter(
        expert_tensors(ft_t, CHOSEN), tmp_path / "ad.safetensors", config_for(CHOSEN), base=base
    )
    before = tree_digest(base) | tree_digest(adapter)

    report = esft_rs.merge(base, adapter, tmp_path / "out")

    # The python safetensors way: load everything, update, save_file.
    expected = write_checkpoint(tmp_path / "expected", ft_t, shards=shards, config={"m": 1})
    (expected / "tokenizer.json").write_text("{}")
    assert_same_files(tmp_path / "out", expected)
    assert tree_digest(base) | tree_digest(adapter) == before
    assert report.copied_files == ("config.json", "tokenizer.json")
    assert {(r.layer, r.expert) for r in report.replaced} == {(1, 0), (1, 2), (2, 3)}
    assert report.replaced_bytes == sum(a.nbytes for a in expert_tensors(ft_t, CHOSEN).values())
    assert report.warnings == ()


def test_single_file_base(tmp_path: Path) -> None:
    base_t = random_tensors(FUSED, seed=1)
    save_file(base_t, tmp_path / "base.safetensors", metadata={"format": "pt"})
    ft_t = perturb_experts(base_t, CHOSEN)
    ad = save_adapter(
        expert_tensors(ft_t, CHOSEN), tmp_path / "ad.safetensors", config_for(CHOSEN),
        base=tmp_path / "base.safetensors",
    )
    report = esft_rs.merge(tmp_path / "base.safetensors", ad)
    assert report.out == str(tmp_path / "base-merged.safetensors")
    save_file(ft_t, tmp_path / "expected.safetensors", metadata={"format": "pt"})
    assert_same_files(Path(report.out), tmp_path / "expected.safetensors")
    # A second merge never overwrites the first (nor an input).
    again = esft_rs.merge(tmp_path / "base.safetensors", ad)
    assert again.out.endswith("base-merged-2.safetensors")


def test_bf16_fused_with_torch(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file as tload
    from safetensors.torch import save_file as tsave

    g = torch.Generator().manual_seed(0)
    base_t = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(6, 8, 4, generator=g).bfloat16(),
        "model.layers.0.mlp.experts.down_proj": torch.randn(6, 4, 4, generator=g).bfloat16(),
        "model.layers.0.mlp.gate.weight": torch.randn(6, 4, generator=g),
    }
    tsave(base_t, tmp_path / "base.safetensors", metadata={"format": "pt"})
    new = torch.randn(8, 4, generator=g).bfloat16()
    save_adapter(
        {"model.layers.0.mlp.experts.5.gate_up_proj": new},
        tmp_path / "ad.safetensors", config_for({0: [5]}), base=tmp_path / "base.safetensors",
    )
    out = tmp_path / "out.safetensors"
    esft_rs.merge(tmp_path / "base.safetensors", tmp_path / "ad.safetensors", out)
    expected = dict(base_t)
    expected["model.layers.0.mlp.experts.gate_up_proj"] = base_t[
        "model.layers.0.mlp.experts.gate_up_proj"
    ].clone()
    expected["model.layers.0.mlp.experts.gate_up_proj"][5] = new
    tsave(expected, tmp_path / "expected.safetensors", metadata={"format": "pt"})
    assert out.read_bytes() == (tmp_path / "expected.safetensors").read_bytes()
    assert torch.equal(tload(out)["model.layers.0.mlp.experts.gate_up_proj"][5], new)


@pytest.mark.parametrize("legacy", [True, False])
def test_official_adapter_folder(tmp_path: Path, legacy: bool) -> None:
    base_t = random_tensors(SHAPE, seed=1)
    base = write_checkpoint(tmp_path / "base", base_t, shards=2)
    ft_t = perturb_experts(base_t, CHOSEN, seed=3)
    ft_t["model.embed_tokens.weight"] = base_t["model.embed_tokens.weight"] + 1
    trained = expert_tensors(ft_t, CHOSEN)
    trained["model.embed_tokens.weight"] = ft_t["model.embed_tokens.weight"]
    folder = tmp_path / "official"
    folder.mkdir()
    # Official adapters saved model.model's state dict: names without "model.".
    names = {n.removeprefix("model.") if legacy else n: a for n, a in trained.items()}
    save_file(names, folder / "model.safetensors")
    cfg = {"experts": {"1": [0, 2], "2": [3]}, "shared_experts": False, "non_expert_modules": True}
    (folder / "expert_cfg.json").write_text(json.dumps(cfg))

    info = read_adapter(folder)
    assert info.kind == "official"
    assert set(info.tensors) == set(trained)
    with pytest.warns(UserWarning, match="no base fingerprint"):
        report = esft_rs.merge(base, folder, tmp_path / "out")
    assert report.adapters[0].kind == "official"
    assert_same_files(tmp_path / "out", write_checkpoint(tmp_path / "expected", ft_t, shards=2))


def test_plain_adapter_warns_and_cli_prints_warning(tmp_path: Path, sharded_ckpt: Path) -> None:
    base_t = {}
    for f in sorted(sharded_ckpt.glob("*.safetensors")):
        base_t |= load_file(f)
    name = "model.layers.1.mlp.experts.1.up_proj.weight"
    save_file({name: base_t[name] * 2}, tmp_path / "plain.safetensors")
    assert read_adapter(tmp_path / "plain.safetensors").kind == "plain"
    with pytest.warns(UserWarning, match="no base fingerprint .plain safetensors file."):
        esft_rs.merge(sharded_ckpt, tmp_path / "plain.safetensors", tmp_path / "out")
    proc = run_cli("merge", sharded_ckpt, tmp_path / "plain.safetensors", "-o", tmp_path / "o2")
    assert proc.returncode == 0, proc.stderr
    assert "esft-rs: warning:" in proc.stderr and "no base fingerprint" in proc.stderr
    assert "replaced 1 tensors" in proc.stdout


def test_dry_run_lists_and_writes_nothing(tmp_path: Path) -> None:
    base_t = random_tensors(SHAPE, seed=1)
    base = write_checkpoint(tmp_path / "base", base_t, shards=2)
    ad = save_adapter(
        expert_tensors(perturb_experts(base_t, CHOSEN), CHOSEN), tmp_path / "ad.safetensors",
        config_for(CHOSEN), base=base,
    )
    report = esft_rs.merge(base, ad, tmp_path / "out", dry_run=True)
    assert report.dry_run and len(report.replaced) == 9
    assert not (tmp_path / "out").exists()
    proc = run_cli("merge", base, ad, "-o", tmp_path / "out", "--dry-run", check=True)
    assert "layer 1: experts 0,2 (6 tensors, 768 B)" in proc.stdout
    assert "layer 2: experts 3 (3 tensors, 384 B)" in proc.stdout
    assert "replacing 9 tensors" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad.safetensors", "base"]
    js = json.loads(run_cli("merge", base, ad, "--dry-run", "--json", check=True).stdout)
    assert js["replaced_bytes"] == 1152 and js["dry_run"] is True


def test_fingerprint(tmp_path: Path) -> None:
    base_t = random_tensors(SHAPE, seed=1)
    single = write_checkpoint(tmp_path / "single", base_t)
    sharded = write_checkpoint(tmp_path / "sharded", base_t, shards=3)
    fp = esft_rs.fingerprint(single)
    assert fp.startswith("v1:") and len(fp) == 35
    assert esft_rs.fingerprint(sharded) == fp == esft_rs.fingerprint(single / "model.safetensors")
    # A fine-tuned model with the same names and shapes fingerprints differently.
    one = {1: [2]}
    ft = write_checkpoint(tmp_path / "ft", perturb_experts(base_t, one))
    assert esft_rs.fingerprint(ft) != fp
    # Also when one expert inside a fused tensor was trained.
    fused_t = random_tensors(FUSED, seed=1)
    fused = write_checkpoint(tmp_path / "fused", fused_t)
    fused_ft = write_checkpoint(tmp_path / "fused_ft", perturb_experts(fused_t, {2: [2]}))
    assert esft_rs.fingerprint(fused) != esft_rs.fingerprint(fused_ft)
    # Sampled, not read whole: a change between the samples goes unseen (by design).
    big = {"w": np.zeros(100_000, np.float32)}
    save_file(big, tmp_path / "a.safetensors")
    big["w"][50_000] = 1.0
    save_file(big, tmp_path / "b.safetensors")
    assert esft_rs.fingerprint(tmp_path / "a.safetensors") == esft_rs.fingerprint(
        tmp_path / "b.safetensors"
    )
    big["w"][-1] = 1.0
    save_file(big, tmp_path / "c.safetensors")
    assert esft_rs.fingerprint(tmp_path / "a.safetensors") != esft_rs.fingerprint(
        tmp_path / "c.safetensors"
    )


def test_save_adapter_metadata(tmp_path: Path, single_ckpt: Path) -> None:
    name = "model.layers.1.mlp.experts.1.up_proj.weight"
    t = load_file(single_ckpt / "model.safetensors")[name]
    cfg = config_for({1: [1]})
    path = save_adapter(
        {name: t + 1}, tmp_path / "a.safetensors", cfg, base=single_ckpt,
        extra_metadata={"esft.train_config": '{"lr": 1e-5}', "esft.metrics": "{}"},
    )
    info = read_adapter(path)
    assert info.kind == "esft"
    assert info.expert_config == cfg
    assert info.base_fingerprint == esft_rs.fingerprint(single_ckpt)
    assert set(info.metadata) == {
        "format", ADAPTER_KEYS["expert_config"], ADAPTER_KEYS["base_fingerprint"],
        "esft.train_config", "esft.metrics",
    }
    assert info.metadata["format"] == "pt"
    # Unknown esft.* keys do not disturb merge.
    esft_rs.merge(single_ckpt, path, tmp_path / "out")
    assert np.array_equal(load_file(tmp_path / "out" / "model.safetensors")[name], t + 1)
    for bad in ("train_config", ADAPTER_KEYS["expert_config"]):
        with pytest.raises(ValueError, match="must start with"):
            save_adapter({name: t}, tmp_path / "b.safetensors", cfg, extra_metadata={bad: "x"})
    assert not (tmp_path / "b.safetensors").exists()


def test_index_total_size_rewritten(tmp_path: Path, sharded_ckpt: Path) -> None:
    index_path = sharded_ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    right = index["metadata"]["total_size"]
    index["metadata"] = {"total_size": 1, "note": "kept"}
    index_path.write_text(json.dumps(index))
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    t = load_file(sharded_ckpt / index["weight_map"][name])[name]
    save_file({name: t}, tmp_path / "p.safetensors")
    with pytest.warns(UserWarning):
        esft_rs.merge(sharded_ckpt, tmp_path / "p.safetensors", tmp_path / "out")
    out = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out["metadata"] == {"total_size": right, "note": "kept"}
    assert out["weight_map"] == index["weight_map"]


def test_skips_subdirectories_and_stray_safetensors(tmp_path: Path, sharded_ckpt: Path) -> None:
    (sharded_ckpt / "original").mkdir()
    (sharded_ckpt / "original" / "consolidated.pth").write_bytes(b"x")
    save_file({"a": np.zeros(1, np.float32)}, sharded_ckpt / "consolidated.safetensors")
    name = "model.layers.2.mlp.experts.0.up_proj.weight"
    save_file({name: np.ones((4, 8), np.float32)}, tmp_path / "p.safetensors")
    messages: list[str] = []
    report = esft_rs.merge(
        sharded_ckpt, tmp_path / "p.safetensors", tmp_path / "out", on_warning=messages.append
    )
    assert report.copied_files == ("config.json",)
    assert any("original: subdirectory not copied" in m for m in messages)
    assert any("consolidated.safetensors: not part of the checkpoint" in m for m in messages)
    assert sorted(report.warnings) == sorted(messages)


def test_conflicts(tmp_path: Path) -> None:
    base_t = random_tensors(FUSED, seed=1)
    base = write_checkpoint(tmp_path / "base", base_t)
    fused = "model.layers.1.mlp.experts.down_proj"
    slice_name = "model.layers.1.mlp.experts.2.down_proj"
    a = save_adapter(
        {fused: base_t[fused] + 1}, tmp_path / "a.safetensors", config_for({1: [0, 1, 2, 3]}),
        base=base,
    )
    b = save_adapter(
        {slice_name: base_t[fused][2] + 5}, tmp_path / "b.safetensors", config_for({1: [2]}),
        base=base,
    )
    with pytest.raises(esft_rs.MismatchError, match='on_conflict="first" or "last"'):
        esft_rs.merge(base, [a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for policy, winner in [("first", 1), ("last", 5)]:
        out = tmp_path / policy
        report = esft_rs.merge(base, [a, b], out, on_conflict=policy)
        got = load_file(out / "model.safetensors")[fused]
        assert np.array_equal(got[2], base_t[fused][2] + winner)
        assert np.array_equal(got[0], base_t[fused][0] + 1)
        expected = {
            "first": {(None, "a.safetensors")},  # the whole tensor from a
            "last": {(0, "a.safetensors"), (1, "a.safetensors"), (3, "a.safetensors"),
                     (2, "b.safetensors")},
        }
        assert {(r.expert, Path(r.adapter).name) for r in report.replaced} == expected[policy]
    # Different slices of one fused tensor from two adapters do not conflict.
    c = save_adapter(
        {"model.layers.1.mlp.experts.0.down_proj": base_t[fused][0] + 7},
        tmp_path / "c.safetensors", config_for({1: [0]}), base=base,
    )
    esft_rs.merge(base, [b, c], tmp_path / "bc")
    got = load_file(tmp_path / "bc" / "model.safetensors")[fused]
    assert np.array_equal(got[0], base_t[fused][0] + 7)
    assert np.array_equal(got[2], base_t[fused][2] + 5)
    assert np.array_equal(got[1], base_t[fused][1])


def test_fingerprint_refusal_and_force(tmp_path: Path) -> None:
    base_t = random_tensors(SHAPE, seed=1)
    base = write_checkpoint(tmp_path / "base", base_t)
    other = write_checkpoint(tmp_path / "other", random_tensors(SHAPE, seed=9))
    ad = save_adapter(
        expert_tensors(perturb_experts(base_t, CHOSEN), CHOSEN), tmp_path / "ad.safetensors",
        config_for(CHOSEN), base=base,
    )
    before = tree_digest(other)
    with pytest.raises(esft_rs.MismatchError, match=r"trained from a different base.*force=True"):
        esft_rs.merge(other, ad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and tree_digest(other) == before
    proc = run_cli("merge", other, ad, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "--force" in proc.stderr
    with pytest.warns(UserWarning, match="merging anyway"):
        esft_rs.merge(other, ad, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def header_file(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32_8x4 = np.ones((4, 8), np.float32)
EXPERT = "model.layers.1.mlp.experts.1.up_proj.weight"
PREFIX = "model.layers.1.mlp.experts"


def _adapter(tmp: Path, case: str, base: Path) -> Path:
    """Build the bad adapter of one error case; returns its path."""
    path = tmp / f"{case}.safetensors"
    cfg = config_for({1: [1]})
    tensors = {
        "not_in_base": {"model.layers.1.mlp.experts.9.up_proj.weight": F32_8x4},
        "dtype": {EXPERT: F32_8x4.astype(np.float16)},
        "shape": {EXPERT: np.ones((8, 4), np.float32)},
        "slice_out_of_range": {f"{PREFIX}.4.gate_up_proj": np.ones((8, 8), np.float32)},
        "slice_shape": {f"{PREFIX}.1.gate_up_proj": np.ones((4, 8), np.float32)},
        "slice_dtype": {f"{PREFIX}.1.gate_up_proj": np.ones((8, 8), np.float16)},
        "slice_no_parent": {f"{PREFIX}.1.w9": np.ones((8, 8), np.float32)},
    }
    if case in tensors:
        return save_adapter(tensors[case], path, cfg)
    if case == "empty":
        save_file({}, path)
    elif case == "malformed":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    elif case == "bad_metadata_config":
        save_file({EXPERT: F32_8x4}, path, metadata={ADAPTER_KEYS["expert_config"]: "[1]"})
    elif case in ("folder_without_cfg", "folder_bad_cfg"):
        path = tmp / case
        path.mkdir()
        save_file({EXPERT: F32_8x4}, path / "model.safetensors")
        if case == "folder_bad_cfg":
            (path / "expert_cfg.json").write_text('{"experts": {"1": [-1]}}')
    elif case == "duplicate_names":
        path = tmp / case
        path.mkdir()
        save_file({"layers.1.mlp.gate.weight": np.ones((4, 8), np.float32),
                   "model.layers.1.mlp.gate.weight": np.ones((4, 8), np.float32)},
                  path / "model.safetensors")
        (path / "expert_cfg.json").write_text('{"experts": {}}')
    return path


ERRORS = {
    "not_in_base": (esft_rs.MismatchError, "is not in the base"),
    "dtype": (esft_rs.MismatchError, "is F16 [4, 8] but the base's"),
    "shape": (esft_rs.MismatchError, "is F32 [8, 4] but the base's"),
    "slice_out_of_range": (esft_rs.MismatchError, "which has 4 experts"),
    "slice_shape": (esft_rs.MismatchError, "one expert's slice"),
    "slice_dtype": (esft_rs.MismatchError, "one expert's slice"),
    "slice_no_parent": (esft_rs.MismatchError, "nor is the fused tensor"),
    "empty": (esft_rs.InvalidFileError, "holds no tensors"),
    "malformed": (esft_rs.InvalidFileError, "not valid JSON"),
    "bad_metadata_config": (esft_rs.InvalidFileError, "esft.expert_config in __metadata__"),
    "folder_without_cfg": (esft_rs.InvalidFileError, "neither expert_cfg.json"),
    "folder_bad_cfg": (esft_rs.InvalidFileError, "expert_cfg.json: layer 1"),
    "duplicate_names": (esft_rs.InvalidFileError, "both name"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_adapter_errors_write_nothing(tmp_path: Path, case: str) -> None:
    shape = MoEShape(layers=2, experts=4, shared_experts=1, hidden=8, intermediate=4, vocab=16,
                     fused=case.startswith("slice"))
    base = write_checkpoint(tmp_path / "base", random_tensors(shape, seed=1), shards=2)
    ad = _adapter(tmp_path, case, base)
    before = tree_digest(base) | tree_digest(ad)
    exc, message = ERRORS[case]
    with pytest.raises(exc, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        esft_rs.merge(base, ad, tmp_path / "out")
    assert str(ad) in str(info.value)
    proc = run_cli("merge", base, ad, "-o", tmp_path / "out")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esft-rs: error: ") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", ad.name])
    assert tree_digest(base) | tree_digest(ad) == before


def test_output_errors(tmp_path: Path, sharded_ckpt: Path) -> None:
    name = "model.layers.2.mlp.experts.0.up_proj.weight"
    ad = tmp_path / "p.safetensors"
    save_file({name: np.ones((4, 8), np.float32)}, ad)
    before = tree_digest(sharded_ckpt)
    for out, message in [
        (sharded_ckpt, "overwrite or lie inside the input"),
        (sharded_ckpt / "merged", "overwrite or lie inside the input"),
        (ad, "overwrite or lie inside the input"),
        (tmp_path, "would contain the input"),
    ]:
        with pytest.raises(esft_rs.EsftError, match=message):
            esft_rs.merge(sharded_ckpt, ad, out, overwrite=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(esft_rs.EsftError, match=r"already exists \(pass overwrite=True"):
        esft_rs.merge(sharded_ckpt, ad, tmp_path / "taken")
    with pytest.raises(FileNotFoundError, match="nope"):
        esft_rs.merge(tmp_path / "nope", ad, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        esft_rs.merge(sharded_ckpt, ad, tmp_path / "missing-dir" / "x")
    proc = run_cli("merge", sharded_ckpt, ad, "-o", tmp_path / "taken")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert tree_digest(sharded_ckpt) == before
    with pytest.warns(UserWarning):
        esft_rs.merge(sharded_ckpt, ad, tmp_path / "taken", overwrite=True)
    assert (tmp_path / "taken" / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob(".*esft*"))


def test_fused_slice_naming() -> None:
    from esft_rs.files.naming import classify, fused_slice_name, fused_slice_parent

    fused = "model.layers.3.mlp.experts.gate_up_proj"
    assert fused_slice_name(fused, 7) == "model.layers.3.mlp.experts.7.gate_up_proj"
    assert classify("model.layers.3.mlp.experts.7.gate_up_proj") == ("routed_expert", 3, 7)
    assert fused_slice_parent("model.layers.3.mlp.experts.7.gate_up_proj") == (fused, 7)
    assert fused_slice_name("model.layers.3.mlp.gate.weight", 1) is None
    assert fused_slice_parent("model.norm.weight") is None

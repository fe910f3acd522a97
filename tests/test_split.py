"""split: by config, by difference, the round trip merge(base, split(ft, base)) == ft, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import esft_rs
from conftest import run_cli
from esft_rs.files.adapter import read_adapter
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.testing import (
    MoEShape,
    expert_tensors,
    perturb_experts,
    random_tensors,
    write_checkpoint,
)
from test_merge import CHOSEN, FUSED, SHAPE, assert_same_files, tree_digest


def load_all(path: Path) -> dict[str, np.ndarray]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out: dict[str, np.ndarray] = {}
    for f in files:
        out |= load_file(f)
    return out


@pytest.mark.parametrize("shape", [SHAPE, FUSED], ids=["per-expert", "fused"])
@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip(tmp_path: Path, shape: MoEShape, shards: int) -> None:
    base_t = random_tensors(shape, seed=1)
    base = write_checkpoint(tmp_path / "base", base_t, shards=shards, config={"m": 1})
    ft_t = perturb_experts(base_t, CHOSEN, seed=5)
    ft = write_checkpoint(tmp_path / "ft", ft_t, shards=shards, config={"m": 1})
    before = tree_digest(base) | tree_digest(ft)

    report = esft_rs.split(ft, tmp_path / "ad.safetensors", base=base)

    assert report.mode == "diff"
    # Every MoE layer is listed (the official loader looks each one up).
    assert report.expert_config == ExpertConfig({1: [0, 2], 2: [3]})
    assert report.base_fingerprint == esft_rs.fingerprint(base)
    assert load_all(tmp_path / "ad.safetensors").keys() == expert_tensors(ft_t, CHOSEN).keys()
    for name, arr in expert_tensors(ft_t, CHOSEN).items():
        assert np.array_equal(load_all(tmp_path / "ad.safetensors")[name], arr)
    info = read_adapter(tmp_path / "ad.safetensors")
    assert info.kind == "esft" and info.expert_config == report.expert_config

    esft_rs.merge(base, tmp_path / "ad.safetensors", tmp_path / "merged")
    assert_same_files(tmp_path / "merged", ft)
    assert tree_digest(base) | tree_digest(ft) == before


def test_all_experts_of_fused_tensor_become_one_tensor(tmp_path: Path) -> None:
    base_t = random_tensors(FUSED, seed=1)
    base = write_checkpoint(tmp_path / "base", base_t)
    everything = {1: [0, 1, 2, 3]}
    ft = write_checkpoint(tmp_path / "ft", perturb_experts(base_t, everything))
    report = esft_rs.split(ft, tmp_path / "ad.safetensors", base=base)
    assert {t.tensor for t in report.tensors} == {
        "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"
    }
    esft_rs.merge(base, tmp_path / "ad.safetensors", tmp_path / "merged")
    assert_same_files(tmp_path / "merged", ft)


def test_non_expert_differences(tmp_path: Path) -> None:
    base_t = random_tensors(SHAPE, seed=1)
    base = write_checkpoint(tmp_path / "base", base_t, shards=2)
    ft_t = perturb_experts(base_t, CHOSEN)
    for name in ("model.norm.weight", "model.layers.2.mlp.shared_experts.up_proj.weight",
                 "model.layers.1.mlp.gate.weight"):
        ft_t[name] = ft_t[name] + 1
    ft = write_checkpoint(tmp_path / "ft", ft_t, shards=2)

    with pytest.warns(UserWarning, match="3 non-routed tensors differ"):
        report = esft_rs.split(ft, tmp_path / "a.safetensors", base=base)
    assert set(report.differing_excluded) == {
        "model.norm.weight", "model.layers.2.mlp.shared_experts.up_proj.weight",
        "model.layers.1.mlp.gate.weight",
    }
    assert not report.expert_config.shared_experts
    proc = run_cli("split", ft, "--base", base, "-o", tmp_path / "cli.safetensors")
    assert proc.returncode == 0 and "--non-expert-modules" in proc.stderr

    report = esft_rs.split(
        ft, tmp_path / "b.safetensors", base=base, shared_experts=True, non_expert_modules=True
    )
    assert report.differing_excluded == ()
    assert report.expert_config.shared_experts and report.expert_config.non_expert_modules
    esft_rs.merge(base, tmp_path / "b.safetensors", tmp_path / "merged")
    assert_same_files(tmp_path / "merged", ft)

    report = esft_rs.split(ft, tmp_path / "c.safetensors", base=base, shared_experts=True,
                           on_warning=lambda m: None)
    assert report.expert_config.shared_experts and not report.expert_config.non_expert_modules
    assert len(report.differing_excluded) == 2


@pytest.mark.parametrize("shape", [SHAPE, FUSED], ids=["per-expert", "fused"])
def test_by_config(tmp_path: Path, shape: MoEShape) -> None:
    base_t = random_tensors(shape, seed=1)
    model_t = perturb_experts(base_t, {1: [1], 2: [0, 1, 2, 3]})
    model = write_checkpoint(tmp_path / "model", model_t, shards=2)
    base = write_checkpoint(tmp_path / "base", base_t)
    cfg = ExpertConfig({1: [0, 2], 2: [3]}, shared_experts=True)
    cfg.save(tmp_path / "cfg.json")

    report = esft_rs.split(model, tmp_path / "ad.safetensors", experts=tmp_path / "cfg.json",
                           base=base)

    expected = expert_tensors(model_t, CHOSEN)
    expected |= {n: a for n, a in model_t.items() if ".shared_experts." in n}
    got = load_all(tmp_path / "ad.safetensors")
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[n], a) for n, a in expected.items())
    assert report.mode == "experts" and report.expert_config == cfg
    with safe_open(tmp_path / "ad.safetensors", "np") as f:
        meta = f.metadata()
    assert json.loads(meta["esft.expert_config"])["experts"] == {"1": [0, 2], "2": [3]}
    assert meta["esft.base_fingerprint"] == esft_rs.fingerprint(base)
    assert meta["format"] == "pt"
    assert report.bytes == sum(a.nbytes for a in expected.values())


def test_by_config_non_expert_modules_without_base(tmp_path: Path, single_ckpt: Path) -> None:
    cfg = ExpertConfig({1: [1]}, non_expert_modules=True)
    cfg.save(tmp_path / "cfg.json")
    with pytest.warns(UserWarning, match="no base= given"):
        report = esft_rs.split(single_ckpt, tmp_path / "a.safetensors",
                               experts=tmp_path / "cfg.json")
    names = {t.tensor for t in report.tensors}
    assert "model.embed_tokens.weight" in names and "model.layers.1.mlp.gate.weight" in names
    assert "model.layers.1.mlp.experts.1.up_proj.weight" in names
    assert not any(".shared_experts." in n or ".experts.0." in n for n in names)
    assert report.base_fingerprint is None
    assert read_adapter(tmp_path / "a.safetensors").base_fingerprint is None


def test_cli_and_dry_run(tmp_path: Path) -> None:
    base_t = random_tensors(SHAPE, seed=1)
    base = write_checkpoint(tmp_path / "base", base_t)
    ft = write_checkpoint(tmp_path / "ft", perturb_experts(base_t, CHOSEN))
    proc = run_cli("split", ft, "--base", base, "-o", tmp_path / "a.safetensors", "--dry-run",
                   check=True)
    assert "layer 1: experts 0,2 (6 tensors" in proc.stdout
    assert not (tmp_path / "a.safetensors").exists()
    proc = run_cli("split", ft, "--base", base, "-o", tmp_path / "a.safetensors", check=True)
    assert "9 tensors" in proc.stdout and "3 experts in 2 layers" in proc.stdout
    assert "base fingerprint recorded" in proc.stdout
    js = json.loads(run_cli("split", ft, "--base", base, "-o", tmp_path / "b.safetensors",
                            "--json", check=True).stdout)
    assert js["expert_config"]["experts"] == {"1": [0, 2], "2": [3]}
    proc = run_cli("merge", base, tmp_path / "a.safetensors", "-o", tmp_path / "m", check=True)
    assert proc.stderr == ""  # fingerprint matches: no warning
    assert_same_files(tmp_path / "m", ft)
    proc = run_cli("split", ft, "-o", tmp_path / "c.safetensors")
    assert proc.returncode == 2 and "--experts" in proc.stderr
    ExpertConfig({1: [0]}).save(tmp_path / "cfg.json")
    proc = run_cli("split", ft, "--experts", tmp_path / "cfg.json", "--shared-experts",
                   "-o", tmp_path / "c.safetensors")
    assert proc.returncode == 2 and "the expert config says what to include" in proc.stderr
    assert not (tmp_path / "c.safetensors").exists()


def _case(tmp: Path, case: str) -> tuple[list[object], type[Exception], str]:
    base_t = random_tensors(SHAPE, seed=1)
    base = write_checkpoint(tmp / "base", base_t)
    cfg = tmp / "cfg.json"
    if case == "identical":
        return [base, "--base", base], esft_rs.MismatchError, "no routed-expert tensor differs"
    if case == "only_non_expert":
        ft_t = dict(base_t)
        ft_t["model.norm.weight"] = ft_t["model.norm.weight"] + 1
        ft = write_checkpoint(tmp / "ft", ft_t)
        return [ft, "--base", base], esft_rs.MismatchError, "1 other tensors differ"
    if case == "shape":
        other = MoEShape(layers=3, experts=4, shared_experts=1, hidden=8, intermediate=6, vocab=16)
        ft = write_checkpoint(tmp / "ft", random_tensors(other))
        return [ft, "--base", base], esft_rs.MismatchError, "not fine-tuned from this base"
    if case == "missing_tensor":
        ft_t = dict(base_t)
        del ft_t["model.norm.weight"]
        ft = write_checkpoint(tmp / "ft", ft_t)
        return [ft, "--base", base], esft_rs.MismatchError, '"model.norm.weight" of the base'
    if case == "extra_tensor":
        ft = write_checkpoint(tmp / "ft", base_t | {"extra": np.ones(2, np.float32)})
        return [ft, "--base", base], esft_rs.MismatchError, '"extra" is not in the base'
    if case == "cfg_layer":
        cfg.write_text('{"experts": {"0": [1]}}')
        return [base, "--experts", cfg], esft_rs.MismatchError, "layer 0 has no routed experts"
    if case == "cfg_expert":
        cfg.write_text('{"experts": {"1": [4]}}')
        return [base, "--experts", cfg], esft_rs.MismatchError, "layer 1 has no expert 4"
    if case == "cfg_invalid":
        cfg.write_text('{"experts": {"1": "x"}}')
        return [base, "--experts", cfg], esft_rs.InvalidFileError, "not an expert config"
    if case == "cfg_empty":
        cfg.write_text('{"experts": {}}')
        return [base, "--experts", cfg], esft_rs.MismatchError, "selects no tensor"
    if case == "cfg_base_mismatch":
        cfg.write_text('{"experts": {"1": [1]}}')
        other = MoEShape(layers=3, experts=4, shared_experts=1, hidden=8, intermediate=6, vocab=16)
        ob = write_checkpoint(tmp / "ob", random_tensors(other))
        return [base, "--experts", cfg, "--base", ob], esft_rs.MismatchError, "but the base"
    raise AssertionError(case)


SPLIT_ERRORS = ["identical", "only_non_expert", "shape", "missing_tensor", "extra_tensor",
                "cfg_layer", "cfg_expert", "cfg_invalid", "cfg_empty", "cfg_base_mismatch"]


@pytest.mark.parametrize("case", SPLIT_ERRORS)
def test_split_errors_write_nothing(tmp_path: Path, case: str) -> None:
    args, exc, message = _case(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    digest = {p.name: tree_digest(p) for p in tmp_path.iterdir()}
    model, *rest = args
    kwargs = {str(k).lstrip("-"): v for k, v in zip(rest[::2], rest[1::2], strict=True)}
    with pytest.raises(exc, match=message):
        esft_rs.split(model, tmp_path / "out.safetensors", **kwargs, on_warning=lambda m: None)
    proc = run_cli("split", *args, "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert {p.name: tree_digest(p) for p in tmp_path.iterdir()} == digest


def test_split_output_checks(tmp_path: Path, single_ckpt: Path) -> None:
    base_t = load_file(single_ckpt / "model.safetensors")
    ft = write_checkpoint(tmp_path / "ft", perturb_experts(base_t, {1: [1]}))
    (tmp_path / "taken.safetensors").write_bytes(b"keep")
    with pytest.raises(esft_rs.EsftError, match="already exists"):
        esft_rs.split(ft, tmp_path / "taken.safetensors", base=single_ckpt)
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep"
    with pytest.raises(esft_rs.EsftError, match="lie inside the input"):
        esft_rs.split(ft, ft / "a.safetensors", base=single_ckpt)
    with pytest.raises(esft_rs.EsftError, match="holds a text file of 4 bytes"):
        esft_rs.split(ft, tmp_path / "taken.safetensors", base=single_ckpt, overwrite=True)
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep"  # not ours: kept
    # a safetensors file that is not an adapter (a model's weights) is not replaced either
    (tmp_path / "taken.safetensors").write_bytes((ft / "model.safetensors").read_bytes())
    with pytest.raises(esft_rs.EsftError, match="is not an adapter written by esft-rs"):
        esft_rs.split(ft, tmp_path / "taken.safetensors", base=single_ckpt, overwrite=True)
    esft_rs.split(ft, tmp_path / "adapter.safetensors", base=single_ckpt)
    esft_rs.split(ft, tmp_path / "adapter.safetensors", base=single_ckpt, overwrite=True)
    assert read_adapter(tmp_path / "adapter.safetensors").kind == "esft"

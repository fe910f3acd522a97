"""Interrupted merges (kill -9, Ctrl-C) leave no complete-looking output and inputs untouched."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import esft_rs
from conftest import run_cli
from esft_rs.files.adapter import save_adapter
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.testing import MoEShape, moe_tensor_shapes, write_checkpoint
from test_merge import tree_digest

# Several shards, so that a merge writes many files before it commits.
BIG = MoEShape(layers=4, experts=8, shared_experts=1, hidden=256, intermediate=128, vocab=256)
EXPERT = "model.layers.2.mlp.experts.3.up_proj.weight"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("big")
    tensors = {n: np.full(s, i, np.float32) for i, (n, s) in enumerate(moe_tensor_shapes(BIG))}
    base = write_checkpoint(tmp / "base", tensors, shards=8, config={"big": True})
    ad = save_adapter({EXPERT: tensors[EXPERT] + 1}, tmp / "ad.safetensors",
                      ExpertConfig({2: [3]}), base=base)
    return base, ad


def interrupt(base: Path, ad: Path, out: Path, sig: str) -> tuple[int, str]:
    """A CLI merge that signals itself once its output is complete in staging, just
    before the commit (deterministic: no race with a timer). Returns (status, stderr)."""
    env = {**os.environ, "ESFT_RS_TEST_INTERRUPT": f"{sig}@commit:{out.name}"}
    proc = run_cli("merge", base, ad, "-o", out, env=env)
    return proc.returncode, proc.stderr


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "esft" in p.name)


@pytest.mark.parametrize("sig", ["KILL", "INT"], ids=["kill-9", "ctrl-c"])
def test_interrupted_merge(tmp_path: Path, big: tuple[Path, Path], sig: str) -> None:
    base, ad = big
    before = tree_digest(base) | tree_digest(ad)
    out = tmp_path / "out"
    code, stderr = interrupt(base, ad, out, sig)
    assert not out.exists()
    if sig == "KILL":
        assert code == -signal.SIGKILL
        # What is left is only the hidden staging directory, never `out`.
        (left,) = leftovers(tmp_path)
        assert left.startswith(f".out{esft_rs._core.STAGING_MARK}")
    else:
        assert code == 130, stderr
        assert "Traceback" not in stderr
        assert leftovers(tmp_path) == []  # cancelled jobs clean up
    assert tree_digest(base) | tree_digest(ad) == before

    report = esft_rs.merge(base, ad, out)  # a re-run succeeds and clears the leftover
    assert leftovers(tmp_path) == [] and out.is_dir()
    shard = out / report.replaced[0].file
    assert np.array_equal(load_file(shard)[EXPERT], load_file(ad)[EXPERT])
    assert tree_digest(base) | tree_digest(ad) == before

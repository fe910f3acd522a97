"""Interrupted merges (kill -9, Ctrl-C) leave no complete-looking output and inputs untouched."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import esft_rs
from conftest import CLI
from esft_rs.adapter import save_adapter
from esft_rs.expert_config import ExpertConfig
from esft_rs.testing import MoEShape, moe_tensor_shapes, write_checkpoint
from test_merge import tree_digest

# About 200 MB in 8 shards: large enough that a merge takes a noticeable time.
BIG = MoEShape(layers=4, experts=8, shared_experts=1, hidden=1024, intermediate=512, vocab=256)
EXPERT = "model.layers.2.mlp.experts.3.up_proj.weight"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("big")
    tensors = {n: np.full(s, i, np.float32) for i, (n, s) in enumerate(moe_tensor_shapes(BIG))}
    base = write_checkpoint(tmp / "base", tensors, shards=8, config={"big": True})
    ad = save_adapter({EXPERT: tensors[EXPERT] + 1}, tmp / "ad.safetensors",
                      ExpertConfig({2: [3]}), base=base)
    return base, ad


def interrupt(base: Path, ad: Path, out: Path, sig: int) -> tuple[int, str] | None:
    """Start a CLI merge and send `sig` as soon as its partial output exists.
    Returns (exit status, stderr), or None if the merge finished first."""
    partial = out.with_name(f".{out.name}.esft-partial")
    proc = subprocess.Popen([*CLI, "merge", base, ad, "-o", out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if partial.exists() and any(partial.iterdir()):
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
            return proc.returncode, err
        time.sleep(0.0005)
    proc.communicate()
    return None


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "esft" in p.name)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_merge(tmp_path: Path, big: tuple[Path, Path], sig: int) -> None:
    base, ad = big
    before = tree_digest(base) | tree_digest(ad)
    out = tmp_path / "out"
    for _ in range(8):  # the merge may win the race; try again
        result = interrupt(base, ad, out, sig)
        if result is None:
            shutil.rmtree(out)
            continue
        code, stderr = result
        if out.exists():
            # Ctrl-C arrived as the merge finished: its output is complete.
            assert sig == signal.SIGINT and leftovers(tmp_path) == []
            shutil.rmtree(out)
            continue
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
            # What is left is only the hidden partial directory, never `out`.
            assert leftovers(tmp_path) in ([], [".out.esft-partial"])
        else:
            assert code == 130, stderr
            assert "Traceback" not in stderr
            assert leftovers(tmp_path) == []  # cancelled jobs clean up
        break
    else:
        pytest.fail("the merge always finished before it could be interrupted")
    assert tree_digest(base) | tree_digest(ad) == before

    report = esft_rs.merge(base, ad, out)  # a re-run succeeds and clears the leftover
    assert leftovers(tmp_path) == [] and out.is_dir()
    shard = out / report.replaced[0].file
    assert np.array_equal(load_file(shard)[EXPERT], load_file(ad)[EXPERT])
    assert tree_digest(base) | tree_digest(ad) == before

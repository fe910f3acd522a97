"""esft_rs.profile on a tiny fake MoE (the MoEModel protocol), one and two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import esft_rs
from esft_rs import MismatchError, RoutingStats, aggregate
from fake_moe import FakeMoE, batches

TESTS = Path(__file__).parent


def reference(model: FakeMoE, data) -> RoutingStats:
    """Capture every router output with plain hooks, drop padding, aggregate."""
    seen: dict[int, list] = {layer: [] for layer in model.routers()}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, layer=layer: seen[layer].append(out))
        for layer, m in model.routers().items()
    ]
    ids_all, w_all, lengths = [], [], []
    with torch.no_grad():
        for ids, mask in data:
            for v in seen.values():
                v.clear()
            model(ids, mask)
            keep = mask.reshape(-1).bool()
            ids_all.append(np.stack([seen[layer][0][0][keep].numpy() for layer in sorted(seen)]))
            w_all.append(np.stack([seen[layer][0][1][keep].numpy() for layer in sorted(seen)]))
            lengths += mask.sum(dim=1).tolist()
    for h in hooks:
        h.remove()
    return aggregate(
        np.concatenate(ids_all, axis=1), np.concatenate(w_all, axis=1),
        num_experts=model.num_experts, layers=sorted(seen), lengths=lengths,
    )


def assert_same(got: RoutingStats, want: RoutingStats) -> None:
    assert got.layers == want.layers and got.top_k == want.top_k
    assert got.num_samples == want.num_samples
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    for name in ("gate_sum", "sample_token_sum", "sample_gate_sum"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6)


def test_profile_matches_captured_routing_without_padding():
    model, data = FakeMoE(), batches()
    stats = esft_rs.profile(model, data, metadata={"model": "fake"})
    assert_same(stats, reference(model, data))
    real = sum(int(m.sum()) for _, m in data)
    assert stats.tokens.tolist() == [real] * 3 and real < 6 * 3 * 7  # padding left out
    assert stats.num_samples == 18 and stats.metadata == {"model": "fake"}
    # Hooks are gone afterwards.
    assert all(not m._forward_hooks for m in model.routers().values())


def test_batch_forms_and_token_budget():
    model, data = FakeMoE(), batches()
    ids = [b[0] for b in data]
    as_tensors = esft_rs.profile(model, ids)
    as_dicts = esft_rs.profile(model, [{"input_ids": i} for i in ids])
    np.testing.assert_array_equal(as_tensors.counts, as_dicts.counts)
    assert as_tensors.tokens[0] == 6 * 3 * 7
    one_row = esft_rs.profile(model, [ids[0][0]])  # [S] is one sample
    assert one_row.num_samples == 1 and one_row.tokens[0] == 7
    budget = esft_rs.profile(model, ids, max_tokens=40)
    assert budget.tokens[0] == 42  # stops after the batch that reaches the budget


def test_records_round_trip(tmp_path):
    model, data = FakeMoE(), batches(n=2)
    stats = esft_rs.profile(model, data, records=tmp_path)
    ids = np.stack([np.load(tmp_path / f"layer_{layer}_ids.npy") for layer in stats.layers])
    w = np.stack([np.load(tmp_path / f"layer_{layer}_weights.npy") for layer in stats.layers])
    again = aggregate(ids, w, num_experts=8, layers=stats.layers)
    np.testing.assert_array_equal(again.counts, stats.counts)
    np.testing.assert_allclose(again.gate_sum, stats.gate_sum, rtol=1e-6)


def test_router_shape_mismatch_is_reported():
    model = FakeMoE()
    model.top_k = 3  # the routers return 2 ids per token
    with pytest.raises(MismatchError, match=r"router of layer 1 returned ids of shape \[21, 2\]"):
        esft_rs.profile(model, batches(n=1))
    assert all(not m._forward_hooks for m in model.routers().values())


@pytest.mark.multiprocess
def test_two_processes_give_the_counts_of_one(tmp_path):
    """torchrun, 2 ranks on CPU (gloo): each profiles half the batches; all-reduced."""
    out = tmp_path / "dist.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(TESTS / "profile_worker.py"), str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(RoutingStats.load(out), esft_rs.profile(FakeMoE(), batches()))


def test_router_that_did_not_run_is_reported():
    class Skipping(FakeMoE):
        def forward(self, input_ids, attention_mask=None):
            flat = self.embed(input_ids).reshape(-1, self.embed.embedding_dim)
            for name, router in self.gates.items():
                if name != "2":  # as if layer 2 were skipped
                    router(flat)

    with pytest.raises(MismatchError, match=r"the routers of layers \[2\] did not run"):
        esft_rs.profile(Skipping(), batches(n=1))

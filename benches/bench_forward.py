"""Forward pass of the built-in `small` model, 4 x 512 tokens on 2 CPU threads.

Baselines, timed in the same run (interleaved, median of several runs):
- official dispatch: the same model with the MoE layers dispatching as the official
  ESFT / DeepSeek-V2 code does (tokens repeated K times, one boolean mask per expert);
- dense equal-FLOP: the same model with every MoE layer replaced by one dense SwiGLU
  of (top-K + shared) x the expert width, i.e. the same matmul FLOPs without routing.
  ours / dense is what routing costs on top of the arithmetic.
"""

from __future__ import annotations

import statistics
import time
import types

import torch

from esft_rs.models import PRESETS, init_model
from esft_rs.models.reference import MoE

BATCH, SEQ, RUNS = 4, 512, 7


def official_dispatch(self: MoE, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    flat_ids = ids.reshape(-1)
    xs = x.repeat_interleave(ids.shape[1], dim=0)
    y = torch.empty_like(xs)
    for e, expert in enumerate(self.experts):
        y[flat_ids == e] = expert(xs[flat_ids == e])
    return (y.view(*ids.shape, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)


def main() -> None:
    torch.set_num_threads(2)
    cfg = PRESETS["small"]
    ours = init_model(cfg, seed=0).eval()
    official = init_model(cfg, seed=0).eval()
    for layer in official.model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp.routed = types.MethodType(official_dispatch, layer.mlp)
    dense_cfg = cfg.replace(
        first_k_dense_replace=cfg.num_hidden_layers,
        intermediate_size=(cfg.num_experts_per_tok + cfg.n_shared_experts)
        * cfg.moe_intermediate_size,
    )
    dense = init_model(dense_cfg, seed=0).eval()
    models = {"ours": ours, "official dispatch": official, "dense equal-FLOP": dense}
    x = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        assert torch.allclose(ours(x), official(x), atol=1e-5, rtol=1e-4)
        for _ in range(2):  # warm-up
            for m in models.values():
                m(x)
        for _ in range(RUNS):
            for name, m in models.items():
                t = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"small preset ({params:.1f}M params), forward {BATCH}x{SEQ} tokens, 2 threads,"
          f" median of {RUNS}:")
    for name, t in med.items():
        ratio = "" if name == "ours" else f"  (ours / this = {med['ours'] / t:.2f})"
        print(f"  {name:<18} {t * 1e3:8.1f} ms  {BATCH * SEQ / t:9.0f} tok/s{ratio}")


if __name__ == "__main__":
    main()

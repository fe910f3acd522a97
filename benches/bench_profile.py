"""Cost of routing profiling: `esft_rs.profile` forward vs the plain forward it hooks.

Built-in `small` preset (5 MoE layers x 64 experts, top-6), batches of 4 x 512 tokens
with an attention mask (the last row half padding, as the last packed row is), 2 CPU
threads. Each round times, interleaved, the plain forward under
``torch.inference_mode()`` and a whole ``esft_rs.profile`` call on the same batch
(hooks installed and removed, accumulators allocated and copied to the host: the
per-call set-up is charged to that one batch). Target: profiled / plain <= 1.03.

On a busy machine the forward time swings by more than the profiling costs (other
jobs can make one forward several times slower), so the bench also prints the ratio
of the fastest runs and times the profiling work alone: ``esft_rs.profile`` on a replay model
whose routers return the recorded outputs of the same batch and which computes
nothing else.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

import esft_rs
from esft_rs.models import RouterOutput, init_model

BATCH, SEQ, ROUNDS, WARMUP = 4, 512, 40, 3


class Replay(torch.nn.Module):
    """An MoEModel whose forward only calls routers that return recorded outputs."""

    def __init__(self, outputs: dict[int, RouterOutput], num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gates = torch.nn.ModuleDict({str(k): _Fixed(v) for k, v in outputs.items()})

    def routers(self) -> dict[int, torch.nn.Module]:
        return {int(k): m for k, m in self.gates.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        for router in self.gates.values():
            router()


class _Fixed(torch.nn.Module):
    def __init__(self, out: RouterOutput) -> None:
        super().__init__()
        self.out = out

    def forward(self) -> RouterOutput:
        return self.out


def record(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Replay:
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, layer=layer: outputs.__setitem__(layer, out))
        for layer, m in model.routers().items()
    ]
    with torch.inference_mode():
        model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return Replay(outputs, model.num_experts, model.top_k)


def main() -> None:
    torch.set_num_threads(2)
    model = init_model("small", seed=0).eval()
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, SEQ // 2:] = 0
    batch = (ids, mask)

    def plain() -> None:
        with torch.inference_mode():
            model(ids, attention_mask=mask)

    def profiled() -> None:
        esft_rs.profile(model, [batch])

    stats = esft_rs.profile(model, [batch])
    assert int(stats.tokens[0]) == int(mask.sum())  # padding is not counted
    times: dict[str, list[float]] = {"plain forward": [], "profiled forward": []}
    runs = {"plain forward": plain, "profiled forward": profiled}
    for r in range(WARMUP + ROUNDS):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            t = time.perf_counter()
            runs[name]()
            if r >= WARMUP:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    ratios = [p / q for p, q in zip(times["profiled forward"], times["plain forward"], strict=True)]
    tokens = BATCH * SEQ
    print(f"small preset, {BATCH}x{SEQ} tokens per batch ({int(mask.sum())} real), 2 threads,"
          f" median of {ROUNDS} interleaved rounds:")
    for name, t in med.items():
        print(f"  {name:<17} median {t * 1e3:7.1f} ms ({tokens / t:5.0f} tok/s),"
              f" fastest {best[name] * 1e3:7.1f} ms")
    print(f"  profiled / plain: {med['profiled forward'] / med['plain forward']:.3f} (medians);"
          f" {np.median(ratios):.3f} (median of per-round ratios);"
          f" {best['profiled forward'] / best['plain forward']:.3f} (fastest runs). Target <= 1.03")
    replay = record(model, ids, mask)
    work = []
    for r in range(WARMUP + 5 * ROUNDS):
        t = time.perf_counter()
        esft_rs.profile(replay, [batch])
        if r >= WARMUP:
            work.append(time.perf_counter() - t)
    w = statistics.median(work)
    print(f"  profiling work alone (replayed routers): {w * 1e3:.2f} ms per batch (median),"
          f" {w / best['plain forward']:.2%} of the fastest plain forward")


if __name__ == "__main__":
    main()

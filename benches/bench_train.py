"""ESFT vs full fine-tuning of the built-in ``small`` model on CPU, in one run.

Both modes train the same model on the same data through the same loop
(``esft_rs.training``); only the expert config differs. ESFT trains the most
used experts of each layer (by routed-token count on the bench data, as
token-score selection does), ``--experts`` of 64 per layer.

Reported per mode: median optimizer-step time (interleaved rounds), peak RSS
of a child process running the steps, bytes saved for backward in one forward,
optimizer-state bytes and trainable parameters. Targets: ESFT step time
<= 0.6x full; ESFT optimizer bytes == full's x the trainable share.

    python benches/bench_train.py [--rounds 7] [--batch 4] [--seq 512] [--experts 6]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from esft_rs.expert_config import ExpertConfig
from esft_rs.models import init_model
from esft_rs.training.api import _prepare
from esft_rs.training.batches import split
from esft_rs.training.config import TrainConfig
from esft_rs.training.freeze import freeze, moe_layout, resolve_experts
from esft_rs.training.loop import Dist, Loop, optimizer_state_bytes


def bench_data(n: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def most_used_experts(model: torch.nn.Module, data: dict, per_layer: int) -> ExpertConfig:
    """Top experts per layer by routed-token count on ``data`` (token-score selection)."""
    counts: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def record(_m, _inp, out) -> None:
            ids = out[0].reshape(-1)
            counts[layer] = counts.get(layer, 0) + torch.bincount(ids, minlength=model.num_experts)
        return record

    handles = [r.register_forward_hook(hook(i)) for i, r in model.routers().items()]
    with torch.no_grad():
        model(data["input_ids"][:4])
    for h in handles:
        h.remove()
    return ExpertConfig({layer: sorted(c.topk(per_layer).indices.tolist())
                         for layer, c in counts.items()})


def make_loop(mode: str, base: torch.nn.Module, data: dict, experts: ExpertConfig,
              batch: int) -> Loop:
    model = copy.deepcopy(base)
    cfg = TrainConfig(per_device_batch_size=batch, gradient_accumulation_steps=1,
                      gradient_checkpointing=False, val_ratio=0.0, mode=mode, steps=1000)
    layout = moe_layout((n, tuple(p.shape)) for n, p in model.named_parameters())
    trainables = freeze(model, resolve_experts(layout, experts, mode, cfg.seed))
    _prepare(model, trainables, torch.device("cpu"), cfg)
    train_idx, val_idx = split(len(data["input_ids"]), cfg.val_ratio, cfg.seed)
    return Loop(model, trainables, data, train_idx, val_idx, cfg, Path(tempfile.gettempdir()),
                device=torch.device("cpu"), place=Dist(), identity={})


def saved_bytes(loop: Loop) -> int:
    """Bytes autograd keeps for backward during one forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    batch = loop._batch(loop.batches(0)[: loop.cfg.per_device_batch_size])
    params = {p.untyped_storage().data_ptr() for p in loop.model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = loop.model(batch["input_ids"], attention_mask=batch["attention_mask"])
    del out
    return sum(b for ptr, b in seen.items() if ptr not in params)


def setup(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, ExpertConfig]:
    torch.manual_seed(0)
    model = init_model("small", seed=0)
    data = bench_data(args.batch * 8, args.seq, 256)
    return model, data, most_used_experts(model, data, args.experts)


def rss_kib(field: str) -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """Peak RSS of one mode in a fresh process: its setup, then ``--child-steps`` steps."""
    model, data, experts = setup(args)
    loop = make_loop(args.child, model, data, experts, args.batch)
    before = rss_kib("VmRSS")
    for step in range(args.child_steps):
        loop.step(step)
    print(json.dumps({"peak_kib": rss_kib("VmHWM"), "before_kib": before}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--experts", type=int, default=6, help="trained experts per MoE layer (of 64)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child", choices=["esft", "full"], help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.threads:
            torch.set_num_threads(args.threads)
        return child(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    memory = {}
    for m in ("esft", "full"):  # first, while this process is small
        out = subprocess.run(
            [sys.executable, __file__, "--child", m, "--batch", str(args.batch), "--seq",
             str(args.seq), "--experts", str(args.experts), "--threads", str(args.threads)],
            capture_output=True, text=True, check=True,
        )
        memory[m] = json.loads(out.stdout.strip().splitlines()[-1])
    model, data, experts = setup(args)
    loops = {mode: make_loop(mode, model, data, experts, args.batch) for mode in ("esft", "full")}
    times: dict[str, list[float]] = {m: [] for m in loops}
    for m, loop in loops.items():
        loop.step(0)  # warm-up: allocator, optimizer state
    for r in range(args.rounds):
        for m, loop in loops.items():
            t = time.perf_counter()
            loop.step(1 + r)
            times[m].append(time.perf_counter() - t)

    rows = {}
    for m, loop in loops.items():
        mem = memory[m]
        rows[m] = {
            "step_s": statistics.median(times[m]),
            "peak_rss_mib": mem["peak_kib"] / 1024,
            "train_growth_mib": (mem["peak_kib"] - mem["before_kib"]) / 1024,
            "saved_for_backward_mib": saved_bytes(loop) / 2**20,
            "optimizer_bytes": optimizer_state_bytes(loop.optimizer),
            "trainable_params": sum(t.param.numel() for t in loop.trainables),
        }

    total = sum(p.numel() for p in model.parameters())
    e, f = rows["esft"], rows["full"]
    share = e["trainable_params"] / f["trainable_params"]
    print(f"small model ({total / 1e6:.1f}M params), batch {args.batch} x {args.seq} tokens, "
          f"ESFT: {args.experts} of 64 experts per layer; median of {args.rounds} interleaved steps")
    print(f"{'':10}{'step s':>9}{'peak RSS MiB':>14}{'+train MiB':>12}{'saved MiB':>11}"
          f"{'optim bytes':>14}{'trainable':>12}")
    for m, r in rows.items():
        print(f"{m:10}{r['step_s']:9.3f}{r['peak_rss_mib']:14.0f}{r['train_growth_mib']:12.0f}"
              f"{r['saved_for_backward_mib']:11.1f}{r['optimizer_bytes']:14,}"
              f"{r['trainable_params']:12,}")
    ratio = e["step_s"] / f["step_s"]
    print(f"step time esft/full: {ratio:.2f}x (target <= 0.60) {'OK' if ratio <= 0.6 else 'MISSED'}")
    expected = f["optimizer_bytes"] * share
    print(f"optimizer bytes esft/full: {e['optimizer_bytes'] / f['optimizer_bytes']:.4f}"
          f" vs trainable share {share:.4f} (exact but for one 4-byte step count per tensor:"
          f" {e['optimizer_bytes'] - expected:+,.0f} bytes)")


if __name__ == "__main__":
    main()

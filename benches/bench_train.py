"""ESFT vs full fine-tuning of the built-in ``small`` model on CPU, in one run.

Both modes train the same model on the same data through the same loop
(``esft_rs.training``); only the expert config differs. ESFT trains the most
used experts of each MoE layer (highest token scores on the bench data, from
``esft_rs.profile``), ``--experts`` of the 64: 6 is 9%, mid-range of the paper's 5-15%.

Reported per mode: the median optimizer step (``Loop.step``, modes interleaved
round by round) in wall time and in process CPU time (steadier on a shared
machine), its forward / backward / optimizer split, peak RSS of a fresh child
process running the steps, bytes autograd saves for backward in one forward,
optimizer-state bytes and trainable parameters. Targets: ESFT step time
<= 0.6x full; ESFT optimizer bytes == full's x the trainable share.

ESFT-LoRA (``lora``: rank ``--lora-rank`` factors on the same experts'
projections, ``esft_rs.training.lora``) runs in the same rounds; its step time and
AdamW bytes are printed against ESFT's.

    python benches/bench_train.py [--rounds 9] [--batch 4] [--seq 512] [--experts 6]
        [--lora-rank 8] [--threads N]
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

import numpy as np
import torch

from esft_rs import profile
from esft_rs.distributed import Dist
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.models import init_model
from esft_rs.training import lora
from esft_rs.training.api import _prepare
from esft_rs.training.batches import split
from esft_rs.training.config import TrainConfig
from esft_rs.training.freeze import freeze, moe_layout, resolve_experts
from esft_rs.training.loop import Loop, loss_sum, optimizer_state_bytes

MODES = ("esft", "full", "lora")


def bench_data(n: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def most_used_experts(model: torch.nn.Module, data: dict, per_layer: int) -> ExpertConfig:
    """Top experts per layer by token score on ``data`` (``esft_rs.profile``)."""
    stats = profile(model, [data["input_ids"][:4]])
    scores = stats.token_scores()
    return ExpertConfig({layer: sorted(np.argsort(-scores[i], kind="stable")[:per_layer].tolist())
                         for i, layer in enumerate(stats.layers)})


def setup(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, ExpertConfig]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = init_model("small", seed=0)
    data = bench_data(args.batch * 16, args.seq)
    return model, data, most_used_experts(model, data, args.experts)


def make_loop(mode: str, base: torch.nn.Module, data: dict, experts: ExpertConfig,
              batch: int, rank: int) -> Loop:
    """The loop ``esft_rs.train`` would run, minus files: same freezing, placement, optimizer."""
    model = copy.deepcopy(base)
    lora_rank = rank if mode == "lora" else 0
    cfg = TrainConfig(per_device_batch_size=batch, gradient_accumulation_steps=1,
                      gradient_checkpointing=False, val_ratio=0.0,
                      mode="esft" if mode == "lora" else mode, lora_rank=lora_rank)
    layout = moe_layout((n, tuple(p.shape)) for n, p in model.named_parameters())
    resolved = resolve_experts(layout, experts, cfg.mode, cfg.seed)
    spec = lora.LoraSpec.of(cfg)
    trainables = (lora.attach(model, resolved, spec, cfg.seed)[0] if spec is not None
                  else freeze(model, resolved))
    _prepare(model, trainables, torch.device("cpu"), cfg)
    train_idx, val_idx = split(len(data["input_ids"]), cfg.val_ratio, cfg.seed)
    return Loop(model, trainables, data, train_idx, val_idx, cfg, Path(tempfile.gettempdir()),
                device=torch.device("cpu"), place=Dist(), identity={})


def phases(loop: Loop, step: int) -> tuple[float, float, float]:
    """CPU seconds of forward, backward and clip + optimizer, the parts of ``Loop.step``."""
    batch = loop._batch(loop.batches(step))
    t0 = time.process_time()
    loss = loss_sum(loop.model, batch)
    t1 = time.process_time()
    loss.backward()
    t2 = time.process_time()
    torch.nn.utils.clip_grad_norm_(loop.params, 1.0)
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.process_time() - t2


def saved_bytes(loop: Loop) -> int:
    """Bytes autograd keeps for backward during one forward (distinct storages, not weights)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    batch = loop._batch(loop.batches(0))
    weights = {p.untyped_storage().data_ptr() for p in loop.model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum(loop.model, batch)
    return sum(b for ptr, b in seen.items() if ptr not in weights)


def rss_kib(field: str) -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """Peak RSS of one mode in a fresh process: its set-up, then 3 steps."""
    model, data, experts = setup(args)
    loop = make_loop(args.child, model, data, experts, args.batch, args.lora_rank)
    before = rss_kib("VmRSS")
    for step in range(3):
        loop.step(step)
    print(json.dumps({"peak_kib": rss_kib("VmHWM"), "before_kib": before}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--experts", type=int, default=6, help="trained experts per MoE layer (of 64)")
    p.add_argument("--lora-rank", type=int, default=8, help="ESFT-LoRA's rank")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="what to run besides esft (lora: ESFT-LoRA against ESFT only)")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.modes = ["esft", *[m for m in args.modes if m != "esft"]]  # the reference
    if args.child:
        return child(args)

    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--experts",
              str(args.experts), "--threads", str(args.threads), "--lora-rank",
              str(args.lora_rank)]
    memory = {  # first, while this process is small
        m: json.loads(subprocess.run([sys.executable, __file__, "--child", m, *common],
                                     capture_output=True, text=True, check=True).stdout)
        for m in args.modes
    }
    model, data, experts = setup(args)
    loops = {m: make_loop(m, model, data, experts, args.batch, args.lora_rank)
             for m in args.modes}
    for step in range(3):  # warm-up: optimizer state, the CPU kernels' per-shape set-up
        for loop in loops.values():
            loop.step(step)
    wall: dict[str, list[float]] = {m: [] for m in args.modes}
    cpu: dict[str, list[float]] = {m: [] for m in args.modes}
    split_s: dict[str, list[tuple[float, float, float]]] = {m: [] for m in args.modes}
    for r in range(args.rounds):
        for m, loop in loops.items():
            t, c = time.perf_counter(), time.process_time()
            loop.step(3 + r)
            wall[m].append(time.perf_counter() - t)
            cpu[m].append(time.process_time() - c)
            split_s[m].append(phases(loop, 3 + r))

    med = statistics.median
    rows = {}
    for m, loop in loops.items():
        rows[m] = {
            "wall": med(wall[m]), "cpu": med(cpu[m]),
            "fwd": med(s[0] for s in split_s[m]), "bwd": med(s[1] for s in split_s[m]),
            "opt": med(s[2] for s in split_s[m]),
            "peak_mib": memory[m]["peak_kib"] / 1024,
            "grow_mib": (memory[m]["peak_kib"] - memory[m]["before_kib"]) / 1024,
            "saved_mib": saved_bytes(loop) / 2**20,
            "optim": optimizer_state_bytes(loop.optimizer),
            "params": sum(t.param.numel() for t in loop.trainables),
        }
    total = sum(p.numel() for p in model.parameters())
    print(f"small model ({total / 1e6:.1f}M params), batch {args.batch} x {args.seq} tokens,"
          f" {torch.get_num_threads()} threads; ESFT trains {args.experts} of 64 experts per"
          f" layer; medians of {args.rounds} interleaved steps")
    print(f"{'':6}{'wall s':>8}{'cpu s':>8}{'fwd':>7}{'bwd':>7}{'opt':>7}{'peak MiB':>10}"
          f"{'+steps':>8}{'saved MiB':>10}{'optim bytes':>14}{'trainable':>12}")
    for m, r in rows.items():
        print(f"{m:6}{r['wall']:8.3f}{r['cpu']:8.3f}{r['fwd']:7.3f}{r['bwd']:7.3f}{r['opt']:7.3f}"
              f"{r['peak_mib']:10.0f}{r['grow_mib']:8.0f}{r['saved_mib']:10.1f}"
              f"{r['optim']:14,}{r['params']:12,}")
    e = rows["esft"]
    if "full" in rows:
        f = rows["full"]
        for what in ("wall", "cpu"):
            ratio = e[what] / f[what]
            verdict = "met" if ratio <= 0.6 else "MISSED"
            print(f"step time esft/full ({what}): {ratio:.2f}x (target <= 0.60: {verdict})")
        share = e["params"] / f["params"]
        extra = e["optim"] - f["optim"] * share
        print(f"optimizer bytes esft/full: {e['optim'] / f['optim']:.4f}, trainable share"
              f" {share:.4f} (difference: {extra:+,.0f} bytes, one 4-byte step count per"
              " tensor)")
    if "lora" not in rows:
        return
    lo = rows["lora"]
    print(f"ESFT-LoRA rank {args.lora_rank} against ESFT: step time {lo['wall'] / e['wall']:.2f}x"
          f" (wall), {lo['cpu'] / e['cpu']:.2f}x (cpu); AdamW bytes"
          f" {lo['optim'] / e['optim']:.4f}x ({lo['optim']:,} against {e['optim']:,});"
          f" trained parameters {lo['params'] / e['params']:.4f}x")


if __name__ == "__main__":
    main()

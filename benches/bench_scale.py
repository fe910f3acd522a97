"""Training one MoE over 1, 2 and 4 processes on CPU (gloo): FSDP2 against expert parallelism
and DDP, ESFT against full and against gradient masking, each beside ``esft_rs.training.planner``'s
prediction.

A random built-in MoE of about ``--gb`` GB of fp32 weights (made locally, per-expert
tensors) is trained for a few steps with the same global batch in every setting, each
run a fresh ``torchrun`` job. Every rank reports its peak RSS, the weight and optimizer
bytes it holds (``FitResult.rank_bytes``), its gradient bytes at the optimizer step and
its median step time (steps after the first). ESFT trains ``--experts`` of the 64 experts
per layer; full trains everything; ``masked`` is the gradient-masking approach other
trainers use for ESFT: every weight gets a gradient and AdamW state (full mode), and the
gradients of the weights ESFT would freeze are zeroed before each optimizer step.

    python benches/bench_scale.py [--gb 1.0] [--worlds 1 2 4] [--steps 4] [--seq 128]
        [--micro-batch 1] [--modes esft masked full] [--parallelisms fsdp ep ddp fsdp0]
        [--ddp-modes esft] [--phases]

``fsdp0`` is FSDP with FSDP2's own schedule in place of ours (``sharding._overlap`` off:
blocking all-gathers on CPU, the last layer gathered again for the backward). Variants of
ours, for A/B runs: ``fsdp+flat`` gathers through FSDP2's flat buffer and copies it out
(``chunked_gather.InPlaceAllGather`` off), ``fsdp+noprefetch`` gathers each layer when
it runs, not one ahead (``fsdp_prefetch: false``), ``fsdp+libc`` keeps glibc's own mmap
threshold (``host_memory`` off); they combine (``fsdp+noprefetch+libc``).

Prints one row per setting (measured / planned for the bytes of rank 0, the largest)
and the ratios, tokens per second (global batch tokens / median step) and the bytes
rank 0 sent plus received per step at the collectives against the plan's ``comm_bytes``
(not under DDP, whose reducer's all-reduce runs in C++); per-rank weight bytes against
total / N, step time against 1 process and against full's at the same world size, peak
RSS above an idle process, then less the torch runtime, against the plan's total (the
plan counts training tensors only: weights, gradients, AdamW state, FSDP's gathered
layer and activations). The runtime is what the same one-process run on a 0.5 MiB model
peaks at above an idle process and its own plan: torch's kernels paged in, autograd's
and the allocator's state, whatever the model's size (~160 MiB here); then EP against FSDP: bytes
moved, tokens per second.
With ``--phases`` each rank also samples its anonymous and file-backed memory
(``memtrace``): their peaks above an idle process's, and a table of them per phase
(model built, sharded, filled from the checkpoint; forward, backward, optimizer step).
Under FSDP also the MiB per step of rank 0's all-gathers (outputs) and reduce-scatters
(inputs), and ``floor s``: the seconds they take at the rate of a plain gloo all-gather
and reduce-scatter of the largest such size, measured by the same job after training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from memtrace import table  # noqa: E402
from timing import clean  # noqa: E402

EXPERTS = 64
MASKED_GRAD_BYTES = [0]  # gradient bytes at the optimizer step, the masked zeros included
COMM = {"gather": 0, "scatter": 0, "gather_max": 0, "scatter_max": 0}  # FSDP's bytes, summed
# bytes rank 0 sent plus received at every collective (all-gathers and reduce-scatters by
# ring, all-reduces as a reduce-scatter and an all-gather; all-to-alls exactly, the part
# it keeps aside), as esft_rs.training.planner counts comm_bytes
MOVED = [0]


def config(gb: float) -> object:
    """A built-in MoE config of about ``gb`` GB fp32: ~100 MB per MoE layer."""
    from esft_rs.models.config import PRESETS

    layers = max(2, round(gb * 1e9 / (EXPERTS * 3 * 512 * 256 * 4 + 4 * 512 * 512 * 4)))
    return PRESETS["tiny"].replace(
        hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=layers + 1, num_attention_heads=8, n_routed_experts=EXPERTS,
        num_experts_per_tok=6, n_shared_experts=1, first_k_dense_replace=1,
        max_position_embeddings=4096,
    )


def make_inputs(root: Path, gb: float, experts: int, cfg: object = None) -> dict[str, Path]:
    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.models import init_model, save_model

    cfg = cfg or config(gb)
    save_model(init_model(cfg, seed=0), root / "base")
    rng = random.Random(0)  # varied bytes, so that the routers spread tokens over all experts

    def text() -> str:
        return "".join(rng.choice(string.printable[:95]) for _ in range(200))

    rows = [{"messages": [{"role": "user", "content": text()},
                          {"role": "assistant", "content": text()}]} for _ in range(64)]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    moe = range(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    ExpertConfig({layer: list(range(experts)) for layer in moe}).save(root / "experts.json")
    return {"base": root / "base", "data": root / "task.jsonl", "experts": root / "experts.json"}


def mask_gradients(experts: Path) -> None:
    """Make the trainer's optimizer zero, before each step, the gradients of the tensors
    ``experts`` leaves frozen: gradient masking (run with mode full)."""
    import torch

    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.training import loop
    from esft_rs.training.sharding import local_bytes
    from esft_rs.training.trained import tensor_plan

    selected = ExpertConfig.load(experts)
    make = loop.make_optimizer

    def masked(trainables: list, cfg: object) -> object:
        frozen = [t for t in trainables if tensor_plan(t.name, selected) is not True]

        def zero(optimizer: object, args: object, kwargs: object) -> None:
            for t in frozen:
                p = t.param
                if p.grad is None:  # got no token: masked trainers still hold a zero gradient
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.zero_()
            MASKED_GRAD_BYTES[0] = max(MASKED_GRAD_BYTES[0], local_bytes(
                t.param.grad for t in trainables if t.param.grad is not None))

        optimizer = make(trainables, cfg)
        optimizer.register_step_pre_hook(zero)
        return optimizer

    loop.make_optimizer = masked


def count_collectives() -> None:
    """Count the bytes of FSDP2's all-gathers (outputs) and reduce-scatters (inputs), and
    what every collective moves (``MOVED``): EP's all-to-alls, the all-reduces."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    away = (world - 1) / world

    def counting(fn: object, kind: str) -> object:
        def wrapped(*args: object, **kwargs: object) -> object:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            t = tensors[0] if kind == "gather" else tensors[1]  # (output, input) in all three
            n = t.numel() * t.element_size()
            COMM[kind] += n
            COMM[f"{kind}_max"] = max(COMM[f"{kind}_max"], n)
            MOVED[0] += int(2 * away * n)
            return fn(*args, **kwargs)  # type: ignore[operator]
        return wrapped

    def all_to_all(fn: object) -> object:
        def wrapped(output: torch.Tensor, input: torch.Tensor, output_split_sizes: object = None,
                    input_split_sizes: object = None, *rest: object, **kw: object) -> object:
            rank = dist.get_rank()
            for t, splits in ((input, input_split_sizes), (output, output_split_sizes)):
                row = t[0].numel() * t.element_size() if len(t) else 0
                sizes = list(splits) if splits else [len(t) // world] * world  # type: ignore
                MOVED[0] += row * (sum(sizes) - sizes[rank])
            return fn(output, input, output_split_sizes, input_split_sizes,  # type: ignore
                      *rest, **kw)
        return wrapped

    def all_reduce(fn: object) -> object:
        def wrapped(t: torch.Tensor, *rest: object, **kw: object) -> object:
            MOVED[0] += int(4 * away * t.numel() * t.element_size())
            return fn(t, *rest, **kw)  # type: ignore[operator]
        return wrapped

    dist.all_to_all_single = all_to_all(dist.all_to_all_single)
    dist.all_reduce = all_reduce(dist.all_reduce)

    from esft_rs.training.chunked_gather import ChunkedAllGather, InPlaceAllGather

    dist.all_gather_single = counting(dist.all_gather_single, "gather")  # FSDP2's own
    for ours in (ChunkedAllGather, InPlaceAllGather):  # on CPU
        ours.__call__ = counting(ours.__call__, "gather")  # type: ignore[method-assign]
    dist.reduce_scatter_single = counting(dist.reduce_scatter_single, "scatter")


def plain_rates() -> dict[str, float]:
    """MiB/s of a plain gloo all-gather (of output) and reduce-scatter (of input) of the
    largest sizes FSDP moved, each into a fresh tensor as FSDP's are: the floor here."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    rates = {}
    for kind in ("gather", "scatter"):
        n = COMM[f"{kind}_max"] // 4 // world
        if not n:
            continue
        piece = torch.ones(n)
        times = []
        for _ in range(3):
            dist.barrier()
            t = time.perf_counter()
            if kind == "gather":
                dist.all_gather_into_tensor(torch.empty(n * world), piece)
            else:
                dist.reduce_scatter_tensor(piece, torch.ones(n * world))
            times.append(time.perf_counter() - t)
        rates[kind] = n * world * 4 / 2**20 / statistics.median(times)
    return rates


def apply_variants(parallelism: str) -> str:
    """Set up this process for a ``--parallelisms`` value; its engine (fsdp, fsdp0, ddp)."""
    engine, *variants = parallelism.split("+")
    from esft_rs.training import chunked_gather, host_memory, sharding

    if engine == "fsdp0":
        sharding._overlap = lambda *_: None
    for v in variants:
        if v == "flat":
            chunked_gather._in_place_fits = lambda _: False
        elif v == "libc":
            host_memory.return_freed_memory = lambda: False
    return engine


def worker(args: argparse.Namespace) -> None:
    """One rank of a torchrun job: train, then write this rank's figures (OUT.rankR.json)."""
    import torch
    import torch.distributed as dist

    import esft_rs
    from esft_rs.distributed import exit_process, leave_process_group

    if args.mode == "masked":
        mask_gradients(args.experts)
    trace = None
    if args.phases:
        from memtrace import Trace, trace_training

        trace = Trace()
        trace_training(trace)
    engine = apply_variants(args.parallelism)
    prefetch = "noprefetch" not in args.parallelism.split("+")
    torch.set_num_threads(1)  # every setting alike, whatever its world size
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # made here, so that it outlives training for the plain collectives
        dist.init_process_group("gloo")
        count_collectives()
    stamps: list[float] = []
    result = esft_rs.train(
        args.base, args.data, args.out, args.experts, progress=False, device="cpu",
        mode="full" if args.mode == "masked" else args.mode,
        parallelism=engine.rstrip("0"), steps=args.steps, seq_length=args.seq,
        per_device_batch_size=micro(args, world),
        gradient_accumulation_steps=args.batch // world // micro(args, world),
        eval_steps=10**6, save_steps=10**6, logging_steps=1, learning_rate=1e-5,
        gradient_checkpointing=False, val_ratio=0.0, fsdp_prefetch=prefetch,
        on_step=lambda step, record: stamps.append(time.perf_counter()),
    )
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    phases = trace.close() if trace is not None else None
    rank = int(os.environ.get("RANK", 0))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the plain ones
    rates = plain_rates() if world > 1 else {}
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({
        "rank": rank,
        # the trace resets the kernel's peak at each phase: its own peaks are the exact ones
        "rss_mb": max(p["rss"] for p in phases["phases"].values()) / 2**20 if phases else rss,
        "step_s": statistics.median(steps) if steps else None,
        "grad_mb": max(result.fit.grad_bytes, MASKED_GRAD_BYTES[0]) / 2**20,
        **{f"{k}_mb": v / 2**20 for k, v in result.fit.rank_bytes.items()},
        "phases": phases,
        # per optimizer step (the run's steps, all alike) and the plain rates, MiB/s
        **{f"{k}_mb_step": COMM[k] / 2**20 / args.steps for k in ("gather", "scatter")},
        "moved_mb_step": MOVED[0] / 2**20 / args.steps,
        "tokens_s": args.batch * args.seq / statistics.median(steps) if steps else None,
        **{f"{k}_rate": v for k, v in rates.items()},
    }))
    if world > 1:
        leave_process_group()
        exit_process(0)


def micro(args: argparse.Namespace, world: int) -> int:
    """Sequences per micro-step and rank: ``--micro-batch``, at most a rank's share."""
    return max(1, min(args.micro_batch, args.batch // world))


def run(inputs: dict[str, Path], world: int, parallelism: str, mode: str,
        args: argparse.Namespace, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", str(HERE), "worker", "--base", str(inputs["base"]),
           "--data", str(inputs["data"]), "--experts", str(inputs["experts"]), "--out", str(out),
           "--mode", mode, "--parallelism", parallelism, "--steps", str(args.steps),
           "--seq", str(args.seq), "--batch", str(args.batch),
           "--micro-batch", str(args.micro_batch)] + (["--phases"] if args.phases else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                                                    "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"bench: {world} x {parallelism} {mode} failed:\n{proc.stderr[-3000:]}")
    reports = [Path(f"{out}.rank{r}.json") for r in range(world)]
    rows = [json.loads(p.read_text()) for p in reports]
    for p in reports:
        p.unlink()
    return rows


def idle_rss_mb() -> float:
    """Peak RSS of a process that imports torch and esft_rs and does nothing else."""
    code = ("import resource, torch, esft_rs.training.api;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                text=True, check=True).stdout)


def runtime_mb(root: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Peak RSS of the same one-process run on the built-in ``tiny`` model (0.5 MiB),
    and that RSS above an idle process and above its plan: what running torch's training
    (kernels paged in, autograd and allocator state) costs whatever the model's size."""
    from esft_rs.models.config import PRESETS

    tiny = PRESETS["tiny"]
    inputs = make_inputs(root / "runtime", 0, min(args.experts, tiny.n_routed_experts), tiny)
    out = root / "out-runtime"
    rss = run(inputs, 1, "fsdp", "esft", args, out)[0]["rss_mb"]
    clean(out)
    return rss, rss - predicted(inputs, "esft", 1, "fsdp", args).total_bytes / 2**20


def idle_status_mb() -> dict[str, float]:
    """``RssAnon`` and ``RssFile`` of such a process (MiB)."""
    code = ("import json, torch, esft_rs.training.api; from memtrace import status;"
            "print(json.dumps(status()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=HERE.parent).stdout
    return {k: v / 2**20 for k, v in json.loads(out).items()}


def predicted(inputs: dict[str, Path], mode: str, world: int, parallelism: str,
              args: argparse.Namespace) -> object:
    """``esft_rs.training.planner`` for this setting (masked trains and holds what full does)."""
    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.training.planner import plan

    return plan(inputs["base"], ExpertConfig.load(inputs["experts"]),
                "full" if mode == "masked" else mode, nproc=world,
                parallelism=parallelism.split("+")[0].rstrip("0"),
                seq_length=args.seq, per_device_batch_size=micro(args, world),
                gradient_accumulation_steps=args.batch // world // micro(args, world),
                gradient_checkpointing=False,
                device="cpu")


def floor_s(row: dict) -> float:
    """Seconds a step's FSDP collectives take at the plain collectives' rates (same job)."""
    return sum(row[f"{k}_mb_step"] / row[f"{k}_rate"] for k in ("gather", "scatter")
               if row[f"{k}_mb_step"])


def parallelism(text: str) -> str:
    """A ``--parallelisms`` value: fsdp, ddp, ep, fsdp0, or fsdp with variants (``fsdp+flat``)."""
    engine, *variants = text.split("+")
    if engine not in ("fsdp", "ddp", "ep", "fsdp0") or (variants and engine != "fsdp") or not all(
            v in ("flat", "libc", "noprefetch") for v in variants):
        raise argparse.ArgumentTypeError(f"unknown parallelism {text!r}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["esft", "masked", "full"],
                        choices=["esft", "masked", "full"])
    parser.add_argument("--parallelisms", nargs="+", default=["fsdp", "ddp"],
                        type=parallelism, help="fsdp, ddp, ep, fsdp0 or fsdp+VARIANT (above)")
    parser.add_argument("--ddp-modes", nargs="+", default=["esft", "masked", "full"],
                        help="the modes run under DDP too (full and masked hold a whole"
                        " replica, its gradients and AdamW state on every rank)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    parser.add_argument("--micro-batch", type=int, default=1,
                        help="sequences per rank and micro-step (at most batch / world); FSDP"
                        " gathers every layer twice per micro-step")
    parser.add_argument("--experts", type=int, default=4, help="ESFT experts per layer, of 64")
    parser.add_argument("--phases", action="store_true",
                        help="print each rank's anonymous and file-backed memory per phase")
    args = parser.parse_args()
    mib = 2**20
    idle = idle_rss_mb()  # first: a child's ru_maxrss starts at its parent's peak (Linux)
    idle_split = idle_status_mb()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny_rss, warm = runtime_mb(root, args)  # before the large model raises our peak
        inputs = make_inputs(root, args.gb, args.experts)
        total_mb = sum(f.stat().st_size for f in inputs["base"].glob("*.safetensors")) / mib
        runtime = warm - idle
        print(f"model: {total_mb:.0f} MiB fp32; idle process (torch imported): {idle:.0f} MiB"
              f" RSS; the torch runtime of a training process: {runtime:.0f} MiB more (the"
              f" same run on a 0.5 MiB model peaks at {tiny_rss:.0f} MiB, plan aside);"
              f" global batch {args.batch} x {args.seq} tokens, micro-batch up to"
              f" {args.micro_batch}; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print("bytes per rank (rank 0), MiB, measured / planned (ratio)")
        print(f"{'setting':<17} {'frozen':>17} {'trained':>19} {'grads':>19} {'AdamW':>19} "
              f"{'x total/N':>9} {'RSS-idle':>8} {'-runtime':>8} {'plan tot':>8} {'RSS/plan':>8}"
              f" {'step s':>7} {'x 1 proc':>8} "
              f"{'x full':>6} {'tok/s':>7} {'moved MiB/step':>19} {'AG MiB':>7} {'RS MiB':>7}"
              f" {'floor s':>7}", flush=True)

        def pair(measured: float, plan_bytes: int) -> str:
            planned = plan_bytes / mib
            ratio = f"{measured / planned:.2f}" if planned else "-"
            return f"{measured:>6.1f}/{planned:<6.1f}({ratio})"

        step_of: dict[tuple[str, int, str], float] = {}
        moved_of: dict[tuple[str, int, str], float] = {}
        tokens_of: dict[tuple[str, int, str], float] = {}
        adam_of: dict[tuple[str, int, str], float] = {}
        for mode in sorted(args.modes, key=["full", "esft", "masked"].index):
            for world in args.worlds:
                for par in (args.parallelisms if world > 1 else ["fsdp"]):
                    if par == "ddp" and mode not in args.ddp_modes:
                        continue
                    out = root / f"out-{mode}-{world}-{par}"
                    rows = run(inputs, world, par, mode, args, out)
                    clean(out)
                    r0 = rows[0]
                    plan = predicted(inputs, mode, world, par, args)
                    weights = r0["frozen_mb"] + r0["trained_mb"]
                    step = max(r["step_s"] for r in rows)
                    step_of[mode, world, par] = step
                    adam_of[mode, world, par] = r0["optimizer_mb"]
                    one = step_of.get((mode, 1, "fsdp"), step)
                    full = step_of.get(("full", world, par))
                    vs_full = f"{step / full:>6.2f}" if full else f"{'-':>6}"
                    rss = max(r["rss_mb"] for r in rows) - idle
                    name = f"{mode} {world}x{par if world > 1 else ''}"
                    name = name if len(name) <= 17 else f"{name}\n{'':<17}"
                    fsdp_io = (f"{r0['gather_mb_step']:>7.0f} {r0['scatter_mb_step']:>7.0f} "
                               f"{floor_s(r0):>7.2f}" if "gather_rate" in r0 else "")
                    moved_of[mode, world, par] = r0["moved_mb_step"]
                    tokens_of[mode, world, par] = r0["tokens_s"]
                    # DDP's all-reduce runs in its C++ reducer, which the count cannot see
                    moved = (f"{'-':>19}" if par == "ddp" and world > 1 else
                             pair(r0["moved_mb_step"], plan.comm_bytes))
                    print(f"{name:<17} {pair(r0['frozen_mb'], plan.frozen_bytes):>17} "
                          f"{pair(r0['trained_mb'], plan.master_bytes):>19} "
                          f"{pair(r0['grad_mb'], plan.grad_bytes):>19} "
                          f"{pair(r0['optimizer_mb'], plan.optimizer_bytes):>19} "
                          f"{weights / (total_mb / world):>9.2f} {rss:>8.0f} "
                          f"{rss - runtime:>8.0f} {plan.total_bytes / mib:>8.0f} "
                          f"{(rss - runtime) / (plan.total_bytes / mib):>8.2f} "
                          f"{step:>7.2f} {step / one:>8.2f} "
                          f"{vs_full} {r0['tokens_s']:>7.0f} {moved:>19} {fsdp_io}",
                          flush=True)
                    if args.phases:
                        anon, file = (max(max(p[k] for p in r["phases"]["phases"].values())
                                          for r in rows) / mib - idle_split[f"Rss{k.title()}"]
                                      for k in ("anon", "file"))
                        print(f"  peak RssAnon - idle {anon:.0f} MiB, peak RssFile - idle"
                              f" {file:.0f} MiB (the largest over the ranks); plan total"
                              f" {plan.total_bytes / mib:.0f} MiB; per phase, MiB:")
                        print(table([r["phases"] for r in rows]), flush=True)
        print("EP against FSDP at the same setting: bytes moved per step, tokens/s (and"
              " against 1 process)")
        for (mode, world, par), moved in moved_of.items():
            if par == "ep" and (mode, world, "fsdp") in moved_of and world > 1:
                fsdp, one = (mode, world, "fsdp"), tokens_of.get((mode, 1, "fsdp"))
                vs_one = f", {tokens_of[mode, world, par] / one:.2f}x 1 process" if one else ""
                print(f"  {mode} {world}x: moved {moved / moved_of[fsdp]:.3f}x fsdp's, tokens/s"
                      f" {tokens_of[mode, world, par] / tokens_of[fsdp]:.2f}x fsdp's{vs_one}")
        print("ESFT against the baselines at the same setting: AdamW bytes, step time")
        for (mode, world, par), step in step_of.items():
            for other in ("masked", "full"):
                if mode == "esft" and (other, world, par) in step_of:
                    print(f"  {world}x{par if world > 1 else ''} vs {other}: AdamW"
                          f" {adam_of[mode, world, par] / adam_of[other, world, par]:.3f}x,"
                          f" step {step / step_of[other, world, par]:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        p = argparse.ArgumentParser()
        for flag in ("base", "data", "experts", "out", "mode", "parallelism"):
            p.add_argument(f"--{flag}")
        for flag in ("steps", "seq", "batch", "micro-batch"):
            p.add_argument(f"--{flag}", type=int)
        p.add_argument("--phases", action="store_true")
        worker(p.parse_args(sys.argv[2:]))
    else:
        main()

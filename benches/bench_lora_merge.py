"""Merging an ESFT-LoRA adapter: esft-rs merge against the Python safetensors way, in one run.

A BF16 checkpoint with DeepSeek-V2-Lite's expert shapes ([1408, 2048] gate/up, [2048, 1408]
down), LAYERS MoE layers of EXPERTS experts, and an ESFT-LoRA adapter (rank 16, float32) on
TRAINED experts per layer. Timed, interleaved, in this process (the machine's other load
shows in both):

- esft-rs merge (`esft_rs.merge`): the LoRA pass in Rust, the rest copied in the kernel;
- the Python way: `load_file`, `(W.float() + s * (B.float() @ A.float())).to(W.dtype)` for
  each pair (torch), `save_file`.

Prints the medians and the ratio, and checks that the two outputs agree within one unit
of BF16 (docs/serving.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import esft_rs
from esft_rs.files.adapter import ADAPTER_KEYS, save_adapter

HIDDEN, INTER, R, ALPHA = 2048, 1408, 16, 32.0


def build(root: Path, layers: int, experts: int, trained: int) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    pairs: dict[str, torch.Tensor] = {}
    for layer in range(1, layers + 1):
        for e in range(experts):
            for proj, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)),
                                ("down_proj", (HIDDEN, INTER))):
                module = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                base[module + ".weight"] = (torch.randn(shape, generator=g) * 0.02).bfloat16()
                if e < trained:
                    pairs[module + ".lora_A.weight"] = torch.randn(R, shape[1], generator=g) * 0.01
                    pairs[module + ".lora_B.weight"] = torch.randn(shape[0], R, generator=g) * 0.01
    path = root / "base.safetensors"
    save_file(base, path, metadata={"format": "pt"})
    config = {"experts": {str(layer): list(range(trained)) for layer in range(1, layers + 1)},
              "shared_experts": False, "non_expert_modules": False}
    lora = json.dumps({"rank": R, "alpha": ALPHA, "targets": ["gate_proj", "up_proj",
                                                              "down_proj"]})
    adapter = save_adapter(pairs, root / "lora.safetensors", config, base=path,
                           extra_metadata={ADAPTER_KEYS["lora"]: lora})
    return path, adapter


def python_way(base: Path, adapter: Path, out: Path) -> None:
    tensors = load_file(base)
    pairs = load_file(adapter)
    s = ALPHA / R
    for key, a in pairs.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            w = tensors[module + ".weight"]
            b = pairs[module + ".lora_B.weight"]
            tensors[module + ".weight"] = (w.float() + s * (b.float() @ a.float())).to(w.dtype)
    save_file(tensors, out, metadata={"format": "pt"})


def ulps(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|a - b| in BF16 units of the larger of |W| and |b| (the merged value): a result
    that cancels W leaves float32 rounding of W's size, not of its own."""
    scale = torch.maximum(w.float().abs(), b.float().abs()).clamp_min(2.0**-126)
    unit = torch.exp2(torch.floor(torch.log2(scale)) - 7)
    return (a.float() - b.float()).abs() / unit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--trained", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="esft-lora-bench-", dir=Path("target").resolve()
                                 if Path("target").is_dir() else None))
    try:
        base, adapter = build(root, args.layers, args.experts, args.trained)
        size = base.stat().st_size
        times: dict[str, list[float]] = {"esft-rs merge": [], "python (torch)": []}
        for _ in range(args.rounds):
            for name in times:
                out = root / f"out-{name.split()[0]}.safetensors"
                out.unlink(missing_ok=True)
                t0 = time.perf_counter()
                if name == "esft-rs merge":
                    esft_rs.merge(base, adapter, out, on_warning=lambda _: None)
                else:
                    python_way(base, adapter, out)
                times[name].append(time.perf_counter() - t0)
        ours, theirs = (load_file(root / f"out-{n}.safetensors") for n in ("esft-rs", "python"))
        before = load_file(base)
        equal, total, worst = 0, 0, 0.0
        for k, t in ours.items():
            equal += int((t.view(torch.int16) == theirs[k].view(torch.int16)).sum())
            total += t.numel()
            worst = max(worst, float(ulps(t, theirs[k], before[k]).max()))
        pairs = args.layers * args.trained * 3
        print(f"base {size / 2**20:.0f} MiB BF16, {pairs} LoRA pairs (r={R}),"
              f" torch threads {torch.get_num_threads()}")
        for name, ts in times.items():
            runs = ", ".join(f"{t:.2f}" for t in ts)
            print(f"  {name:15s} median {statistics.median(ts):6.2f} s  ({runs})")
        ratio = (statistics.median(times["python (torch)"])
                 / statistics.median(times["esft-rs merge"]))
        print(f"  esft-rs is {ratio:.2f}x the Python way; {total - equal} of {total} values"
              f" differ, by at most {worst:.3g} BF16 unit of max(|W|, |result|)")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

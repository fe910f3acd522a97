"""Merge with --requantize-fp8 against the torch way, in one run.

Generates one DeepSeek-V3-shaped MoE layer in block FP8 (8 routed experts of
[2048, 7168] F8_E4M3 projections with 128x128 F32 scales, 2 shards, about
350 MB) and a BF16 adapter of 4 of its experts (about 350 MB), then runs, in
interleaved rounds, each as its own process:

- esft-rs merge with requantize_fp8 (quantisation in Rust, streaming);
- the torch way: for each shard `load_file`, quantise the adapter tensors with
  `esft_rs.testing.quantize_fp8_blocks` (the torch reference), replace weights
  and scales, `save_file`.

The first (untimed) round checks that both outputs are byte-identical. Wall
times are medians, peak RSS the child's ru_maxrss; prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from timing import clean, digest, interleaved_processes, measure

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTER, EXPERTS = 7168, 2048, 8
CHOSEN = [1, 3, 4, 6]

OURS = """
import sys, time, esft_rs
t = time.perf_counter()
esft_rs.merge(sys.argv[1], sys.argv[2], sys.argv[3], requantize_fp8=True, on_warning=print)
print(time.perf_counter() - t)
"""

TORCH_WAY = """
import json, shutil, sys, time
from pathlib import Path
from safetensors.torch import load_file, save_file
from esft_rs.testing import quantize_fp8_blocks
t = time.perf_counter()
base, adapter, out = Path(sys.argv[1]), load_file(sys.argv[2]), Path(sys.argv[3])
out.mkdir()
index = json.loads((base / "model.safetensors.index.json").read_text())
for shard in sorted(set(index["weight_map"].values())):
    tensors = load_file(base / shard)
    for name, x in adapter.items():
        if name in tensors:
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(x)
    save_file(tensors, out / shard, metadata={"format": "pt"})
    del tensors
for f in base.iterdir():
    if not f.name.endswith(".safetensors"):
        shutil.copy(f, out / f.name)
print(time.perf_counter() - t)
"""


def generate(tmp: Path) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    from esft_rs.testing import fp8_config, write_checkpoint

    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    for e in range(EXPERTS):
        for proj, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)),
                            ("down_proj", (HIDDEN, INTER))):
            name = f"model.layers.3.mlp.experts.{e}.{proj}.weight"
            codes = torch.randint(0, 126, shape, generator=g, dtype=torch.uint8)  # no NaN codes
            base[name] = codes.view(torch.float8_e4m3fn)
            base[name + "_scale_inv"] = torch.rand(
                -(-shape[0] // 128), -(-shape[1] // 128), generator=g
            ) * 1e-4
            if e in CHOSEN:
                adapter[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    base_dir = write_checkpoint(tmp / "base", base, shards=2, config=fp8_config())
    save_file(adapter, tmp / "adapter.safetensors")
    return base_dir, tmp / "adapter.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    parent = Path(os.environ.get("ESFT_BENCH_DIR", ROOT / "target"))
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fp8-", dir=parent))
    try:
        run(tmp, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, rounds: int) -> None:
    print(f"generating the checkpoint in {tmp} ...", flush=True)
    base, adapter = generate(tmp)
    base_bytes = sum(f.stat().st_size for f in base.iterdir())
    print(f"base {base_bytes / 1e6:.0f} MB (block FP8, 2 shards); BF16 adapter "
          f"{adapter.stat().st_size / 1e6:.0f} MB, {3 * len(CHOSEN)} tensors to requantise")
    py = sys.executable
    jobs = {
        "esft-rs merge": ([py, "-c", OURS, str(base), str(adapter)], tmp / "out-merge"),
        "torch way": ([py, "-c", TORCH_WAY, str(base), str(adapter)], tmp / "out-torch"),
    }
    for cmd, out in jobs.values():  # untimed warm-up, and the byte-exactness check
        measure([*cmd, str(out)])
    assert digest(jobs["esft-rs merge"][1]) == digest(jobs["torch way"][1]), (
        "requantised merge differs from the torch way"
    )
    print("requantised merge is byte-identical to the torch way", flush=True)
    for _, out in jobs.values():
        clean(out)

    results = interleaved_processes(jobs, rounds)
    med = {k: statistics.median(x["wall"] for x in v) for k, v in results.items()}
    inner = {k: statistics.median(x["inner"] or 0 for x in v) for k, v in results.items()}
    rss = {k: max(x["rss_kb"] for x in v) / 1024 for k, v in results.items()}
    print(f"\n{'':16} {'median wall':>12} {'in-process':>11} {'peak RSS':>10}")
    for k in jobs:
        print(f"{k:16} {med[k]:11.2f}s {inner[k]:10.2f}s {rss[k]:8.0f}MB")
    ours, theirs = med["esft-rs merge"], med["torch way"]
    print(f"\ntorch way / esft-rs merge: {theirs / ours:.2f}x wall, "
          f"{inner['torch way'] / inner['esft-rs merge']:.2f}x in-process; "
          f"peak RSS {rss['esft-rs merge']:.0f} MB vs {rss['torch way']:.0f} MB")
    for k in jobs:
        print(f"  {k} runs: " + " ".join(f"{x['wall']:.2f}" for x in results[k]))


if __name__ == "__main__":
    main()

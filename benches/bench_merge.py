"""Merge and split against `cp -r` and the Python safetensors way, in one run.

Generates a DeepSeek-V2-Lite-shaped checkpoint scaled to about 2 GB in 4 shards
(27 layers, layer 0 dense, 64 routed + 2 shared experts per MoE layer, f16) and
an adapter of 5 experts per MoE layer (about 7% of the bytes), then runs, in
interleaved rounds, each as its own process:

- `cp -r BASE OUT`;
- esft-rs merge (`esft_rs.merge`, whole process: interpreter start included);
- the Python safetensors way: for each shard `load_file`, replace, `save_file`
  (safetensors.torch, as for real bf16 checkpoints; torch import included);
- esft-rs split by expert config (extracting the same 5 experts per layer).

Wall times are medians; peak RSS is the child's ru_maxrss. Every run starts
with no dirty pages (sync between runs). Prints ratios against the targets.
Data lives under target/ (or $ESFT_BENCH_DIR), never on tmpfs, and is deleted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from esft_rs.files.adapter import save_adapter
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.testing import MoEShape, expert_tensors, moe_tensor_shapes, write_checkpoint
from timing import clean, digest, interleaved_processes, measure

ROOT = Path(__file__).resolve().parent.parent
SHAPE = MoEShape(
    layers=27, first_k_dense=1, experts=64, shared_experts=2, hidden=768, intermediate=224,
    dense_intermediate=2048, vocab=8192,
)
CHOSEN = {layer: [3, 17, 29, 41, 60] for layer in range(1, SHAPE.layers)}

OURS = """
import sys, time, esft_rs
t = time.perf_counter()
esft_rs.merge(sys.argv[1], sys.argv[2], sys.argv[3], on_warning=print)
print(time.perf_counter() - t)
"""

PYTHON_WAY = """
import json, shutil, sys, time
from pathlib import Path
from safetensors.torch import load_file, save_file
t = time.perf_counter()
base, adapter, out = Path(sys.argv[1]), load_file(sys.argv[2]), Path(sys.argv[3])
out.mkdir()
index = json.loads((base / "model.safetensors.index.json").read_text())
for shard in sorted(set(index["weight_map"].values())):
    tensors = load_file(base / shard)
    tensors.update({n: a for n, a in adapter.items() if n in tensors})
    save_file(tensors, out / shard, metadata={"format": "pt"})
    del tensors
for f in base.iterdir():
    if not f.name.endswith(".safetensors"):
        shutil.copy(f, out / f.name)
print(time.perf_counter() - t)
"""

SPLIT = """
import sys, time, esft_rs
t = time.perf_counter()
esft_rs.split(sys.argv[1], sys.argv[3], experts=sys.argv[2], on_warning=lambda m: None)
print(time.perf_counter() - t)
"""


def generate(tmp: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    tensors = {
        name: np.frombuffer(rng.bytes(2 * int(np.prod(shape))), np.float16).reshape(shape)
        for name, shape in moe_tensor_shapes(SHAPE)
    }
    base = write_checkpoint(tmp / "base", tensors, shards=4, config={"model_type": "bench"})
    (base / "tokenizer.json").write_text("{}")
    trained = {
        n: np.frombuffer(rng.bytes(a.nbytes), np.float16).reshape(a.shape)
        for n, a in expert_tensors(tensors, CHOSEN).items()
    }
    cfg = ExpertConfig(CHOSEN)
    adapter = save_adapter(trained, tmp / "adapter.safetensors", cfg, base=base)
    cfg.save(tmp / "expert_cfg.json")
    return base, adapter, tmp / "expert_cfg.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    parent = Path(os.environ.get("ESFT_BENCH_DIR", ROOT / "target"))
    parent.mkdir(parents=True, exist_ok=True)
    fstype = subprocess.run(["df", "--output=fstype", parent], capture_output=True,
                            text=True).stdout.split()[-1]
    free = shutil.disk_usage(parent).free
    if fstype == "tmpfs" or free < 10 << 30:
        raise SystemExit(f"bench: {parent} is {fstype} with {free >> 30} GiB free; "
                         "set ESFT_BENCH_DIR to a disk with 10 GiB free")
    tmp = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=parent))
    try:
        run(tmp, fstype, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, fstype: str, rounds: int) -> None:
    print(f"generating the checkpoint in {tmp} ({fstype}) ...", flush=True)
    base, adapter, cfg = generate(tmp)
    base_bytes = sum(f.stat().st_size for f in base.iterdir())
    ad_bytes = adapter.stat().st_size
    print(f"base {base_bytes / 1e9:.2f} GB in 4 shards; adapter {ad_bytes / 1e6:.0f} MB "
          f"({100 * ad_bytes / base_bytes:.1f}%), {sum(map(len, CHOSEN.values()))} experts")
    py = sys.executable
    jobs = {
        "cp -r": (["cp", "-r", str(base)], tmp / "out-cp"),
        "esft-rs merge": ([py, "-c", OURS, str(base), str(adapter)], tmp / "out-merge"),
        "python safetensors": ([py, "-c", PYTHON_WAY, str(base), str(adapter)], tmp / "out-py"),
        "esft-rs split": ([py, "-c", SPLIT, str(base), str(cfg)], tmp / "split.safetensors"),
    }
    # Untimed warm-up round: same bytes as the reference writer, file for file.
    for name in ("esft-rs merge", "python safetensors"):
        cmd, out = jobs[name]
        measure([*cmd, str(out)])
    ours, theirs = (digest(jobs[k][1]) for k in ("esft-rs merge", "python safetensors"))
    assert ours == theirs, "merge output differs from the python safetensors output"
    print("merge output is byte-identical to the python safetensors output", flush=True)
    for _, out in jobs.values():
        clean(out)

    results = interleaved_processes(jobs, rounds)
    med = {k: statistics.median(x["wall"] for x in v) for k, v in results.items()}
    inner = {k: statistics.median(x["inner"] or 0 for x in v) for k, v in results.items()}
    rss = {k: max(x["rss_kb"] for x in v) / 1024 for k, v in results.items()}
    print(f"\n{'':20} {'median wall':>12} {'in-process':>11} {'peak RSS':>10}")
    for k in jobs:
        inproc = f"{inner[k]:10.2f}s" if k != "cp -r" else f"{'-':>11}"
        print(f"{k:20} {med[k]:11.2f}s {inproc} {rss[k]:8.0f}MB")
    cp, ours, pyway, split = (med[k] for k in jobs)
    checks = [
        ("merge / cp -r", ours / cp, "<= 1.0", ours / cp <= 1.0),
        ("python way / merge", pyway / ours, ">= 3.0", pyway / ours >= 3.0),
        ("merge peak RSS (MB)", rss["esft-rs merge"], "<= 64", rss["esft-rs merge"] <= 64),
        ("split / cp -r", split / cp, "<= 0.2", split / cp <= 0.2),
    ]
    print(f"\n{'ratio':22} {'measured':>9}  target")
    for label, value, target, ok in checks:
        print(f"{label:22} {value:9.2f}  {target:7} {'met' if ok else 'NOT MET'}")
    print(f"in-process (interpreter start excluded): merge / cp -r "
          f"{inner['esft-rs merge'] / cp:.2f}, split / cp -r {inner['esft-rs split'] / cp:.2f}")
    print(f"python way peak RSS {rss['python safetensors']:.0f} MB")
    for k in jobs:
        print(f"  {k} runs: " + " ".join(f"{x['wall']:.2f}" for x in results[k]))


if __name__ == "__main__":
    main()

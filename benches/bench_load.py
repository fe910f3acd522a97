"""Loading a whole model in one process (or one DDP rank): ours against the usual way.

Makes (once, in ``--dir``) a random built-in MoE and a random Qwen3-MoE (transformers),
each of about ``--gb`` GB of fp32 weights, then loads each in fp32 and in bf16, in
interleaved rounds, every load in a fresh process:

- ours: ``esft_rs.models.load_model`` (built on the meta device, each tensor read by
  offset into its final dtype);
- the usual way: for the built-in model, the model built (random init) then given the
  checkpoint with ``safetensors.torch.load_file`` + ``load_state_dict(assign=True)``
  (esft-rs's loader before); for Qwen3-MoE, ``AutoModelForCausalLM.from_pretrained``.

Each child imports everything first and builds the model once on meta (the modelling
code's imports), then reports its peak resident memory above that point (the kernel's
``VmHWM``, reset first) and the load's wall time. Prints medians and the ratios.

    python benches/bench_load.py [--gb 0.5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import json, sys, time
import torch
from memory_worker import reset_peak, status
from esft_rs.models import load_model
from esft_rs.training.sharded_load import meta_model

way, kind, path, dtype = sys.argv[1:]
dtype = getattr(torch, dtype)
meta_model(path)
if kind == "hf":
    import transformers
else:
    from safetensors.torch import load_file
    from esft_rs.models import ModelConfig
    from esft_rs.models.reference import ReferenceMoE
before = status()
reset_peak()
t = time.perf_counter()
if way == "ours":
    model = load_model(path, dtype=dtype)
elif kind == "hf":
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
else:
    model = ReferenceMoE(ModelConfig.load(path))
    state = load_file(f"{path}/model.safetensors")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
seconds = time.perf_counter() - t
after = status()
print(json.dumps({"s": seconds, "peak": after["VmHWM"] - before["VmRSS"],
                  "weights": sum(t.numel() * t.element_size()
                                 for t in model.state_dict().values())}))
"""


def make(root: Path, gb: float) -> dict[str, Path]:
    import hf_tiny
    from bench_scale import config
    from esft_rs.models import init_model, save_model

    paths = {"built-in": root / "builtin", "Qwen3-MoE": root / "qwen3_moe"}
    if not paths["built-in"].exists():
        save_model(init_model(config(gb), seed=0), paths["built-in"])
    if not paths["Qwen3-MoE"].exists():
        layers = max(2, round(gb * 1e9 / (64 * 3 * 512 * 256 * 4)))
        hf_tiny.build("qwen3_moe", hidden_size=512, num_hidden_layers=layers, num_experts=64,
                      moe_intermediate_size=256, intermediate_size=512, num_attention_heads=8,
                      head_dim=64).save_pretrained(paths["Qwen3-MoE"])
    return paths


def run(way: str, kind: str, path: Path, dtype: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, way, kind, str(path), dtype],
                         capture_output=True, text=True, cwd=ROOT / "tests")
    if out.returncode:
        raise SystemExit(f"bench: {way} {kind} {dtype} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="keep the models here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make(args.dir or Path(tmp), args.gb)
        cases = [(kind, path, dtype) for kind, path in paths.items()
                 for dtype in ("float32", "bfloat16")]
        runs: dict[tuple[str, str, str], list[dict[str, float]]] = {}
        for r in range(args.rounds):
            for kind, path, dtype in cases:
                for way in ("ours", "usual"):
                    runs.setdefault((kind, dtype, way), []).append(
                        run(way, "hf" if kind != "built-in" else "builtin", path, dtype))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    mib = 2**20
    print("\n| model | dtype | weights MiB | peak above, ours | usual | ours / usual |"
          " load s, ours | usual |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kind, _, dtype in cases:
        ours, usual = runs[(kind, dtype, "ours")], runs[(kind, dtype, "usual")]
        peak = {w: statistics.median(x["peak"] for x in v)
                for w, v in (("ours", ours), ("usual", usual))}
        secs = {w: statistics.median(x["s"] for x in v) for w, v in (("ours", ours),
                                                                    ("usual", usual))}
        w = ours[0]["weights"] / mib
        print(f"| {kind} | {dtype} | {w:.0f} | {peak['ours'] / mib:.0f}"
              f" ({peak['ours'] / mib / w:.2f}x) | {peak['usual'] / mib:.0f}"
              f" ({peak['usual'] / mib / w:.2f}x) | {peak['ours'] / peak['usual']:.2f}"
              f" | {secs['ours']:.2f} | {secs['usual']:.2f} |")


if __name__ == "__main__":
    main()

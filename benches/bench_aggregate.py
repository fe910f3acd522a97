"""Counting routing records and importing official logs, against their baselines.

1. Records: 4 layers x 1M tokens x top-6, int32 expert ids (uniform over 64
   experts) plus float32 weights (192 MB). Per-layer counts and gate sums by
   `np.add.at` (the official approach), `np.bincount`, torch CPU `bincount` +
   `index_add_`, and `esft_rs.aggregate`; a plain numpy read of the same bytes
   (`sum`) bounds what memory allows. Target: esft_rs >= 6x np.bincount.
2. Official logs: the four tasks in shared/esft-official (50.5 MB of text).
   Baseline: the official Python path (read lines, split, int()/float(), then
   `np.add.at` per line, as in the official generate_expert_config.py);
   ours: `RoutingStats.from_official_logs`. Target: >= 30x.
3. `esft-rs select` on one official task, whole process (start-up included).

Methods run interleaved, round after round; figures are medians.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import esft_rs
from esft_rs.routing import RoutingStats
from esft_rs.testing import official_data_dir
from timing import interleaved

L, T, K, E = 4, 1_000_000, 6, 64
TASKS = ("intent", "law", "summary", "translation")


def bench_records(rounds: int, add_at_rounds: int) -> float:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, E, (L, T, K), dtype=np.int32)
    w = rng.random((L, T, K), dtype=np.float32)
    nbytes = ids.nbytes + w.nbytes

    def add_at() -> None:
        counts, gate = np.zeros((L, E), np.int64), np.zeros((L, E))
        for layer in range(L):
            np.add.at(counts[layer], ids[layer].ravel(), 1)
            np.add.at(gate[layer], ids[layer].ravel(), w[layer].ravel())

    def bincount() -> None:
        for layer in range(L):
            np.bincount(ids[layer].ravel(), minlength=E)
            np.bincount(ids[layer].ravel(), weights=w[layer].ravel(), minlength=E)

    # Idle OpenMP threads of torch would otherwise spin and steal the CPUs the
    # next method (numpy or ours) runs on.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    tids, tw = torch.from_numpy(ids), torch.from_numpy(w)

    def torch_cpu() -> None:
        for layer in range(L):
            flat = tids[layer].reshape(-1)
            torch.bincount(flat, minlength=E)
            torch.zeros(E).index_add_(0, flat, tw[layer].reshape(-1))

    def numpy_read() -> None:
        ids.sum(dtype=np.int64)
        w.sum()

    def ours() -> None:
        esft_rs.aggregate(ids, w, num_experts=E)

    # Same numbers as the reference before timing anything.
    stats = esft_rs.aggregate(ids, w, num_experts=E)
    want = np.stack([np.bincount(ids[i].ravel(), minlength=E) for i in range(L)])
    assert (stats.counts == want).all()

    fast = interleaved(
        {"np.bincount": bincount, "torch CPU bincount + index_add_": torch_cpu,
         "plain numpy read (sum)": numpy_read, "esft_rs.aggregate": ours},
        rounds,
    )
    slow = interleaved({"np.add.at (official approach)": add_at}, add_at_rounds)
    results = {**slow, **fast}
    print(f"records: {L} layers x {T:,} tokens x top-{K}, int32 ids + float32 weights "
          f"({nbytes / 1e6:.0f} MB), {os.cpu_count()} CPUs, median of {rounds} rounds")
    base = results["np.bincount"]
    for name, t in results.items():
        print(f"  {name:<34} {t * 1e3:9.1f} ms {nbytes / t / 1e9:7.2f} GB/s"
              f"  {base / t:6.2f}x np.bincount")
    ratio = base / results["esft_rs.aggregate"]
    print(f"  esft_rs.aggregate vs np.bincount: {ratio:.1f}x (target >= 6x)")
    return ratio


def official_python_path(task_dir: Path) -> np.ndarray:
    """Counts as the official script does: text lines -> lists -> np.add.at."""
    gate = np.zeros((26, 64))
    token = np.zeros((26, 64))
    for path in sorted(task_dir.glob("expert_weights_*.txt")):
        layer = int(path.stem.rsplit("_", 1)[1]) - 1
        for line in path.read_text().splitlines():
            id_text, weight_text = line.split("\t\t")
            expert_ids = [int(x) for x in id_text.split("\t")]
            weights = [float(x) for x in weight_text.split("\t")]
            np.add.at(gate[layer], expert_ids, weights)
            np.add.at(token[layer], expert_ids, np.ones_like(weights) / 6)
    return token


def bench_logs(official: Path, rounds: int) -> float:
    dirs = [official / "expert_scores" / t for t in TASKS]
    size = sum(p.stat().st_size for d in dirs for p in d.glob("expert_weights_*.txt"))
    for d in dirs:  # same counts as the official path
        ref = official_python_path(d) * 6
        assert np.allclose(RoutingStats.from_official_logs(d).counts, ref)
    results = interleaved(
        {
            "official Python (parse + np.add.at)": lambda: [official_python_path(d) for d in dirs],
            "esft_rs (from_official_logs)": lambda: [
                RoutingStats.from_official_logs(d) for d in dirs
            ],
        },
        rounds,
    )
    print(f"official logs: {len(dirs)} tasks, {size / 1e6:.1f} MB, median of {rounds} rounds")
    for name, t in results.items():
        print(f"  {name:<34} {t * 1e3:9.1f} ms {size / t / 1e6:8.1f} MB/s")
    ratio = results["official Python (parse + np.add.at)"] / results["esft_rs (from_official_logs)"]
    print(f"  esft_rs vs official Python path: {ratio:.0f}x (target >= 30x)")
    return ratio


def bench_select_cli(official: Path, rounds: int, out: Path) -> None:
    cmd = [sys.executable, "-m", "esft_rs", "select", str(official / "expert_scores" / "law"),
           "-o", str(out), "--round", "4"]
    base = [sys.executable, "-c", "import numpy"]
    results = interleaved(
        {"python -c 'import numpy'": lambda: subprocess.run(base, check=True),
         "esft-rs select (one task)": lambda: subprocess.run(cmd, check=True,
                                                              capture_output=True)},
        rounds,
    )
    print(f"select CLI, whole process, median of {rounds} rounds")
    for name, t in results.items():
        print(f"  {name:<34} {t * 1e3:9.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--add-at-rounds", type=int, default=3)
    args = parser.parse_args()
    bench_records(args.rounds, args.add_at_rounds)
    official = official_data_dir(Path(__file__).parent)
    if official is None:
        print("official logs not found (set ESFT_OFFICIAL): skipping the log import bench")
        return
    print()
    bench_logs(official, max(3, args.rounds // 2))
    print()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"esft-bench-{os.getpid()}.json"
    try:
        bench_select_cli(official, args.rounds, out)
    finally:
        out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

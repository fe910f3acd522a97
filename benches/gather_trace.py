"""What is live at an FSDP rank's forward/backward memory peak (CPU, gloo), event by event.

Trains ``bench_scale.py``'s random built-in MoE (``--gb``) for a few ESFT steps on
``--world`` ranks and records, at every FSDP2 event of every layer (unshard issued,
copy-out, reshard, pre/post backward), the rank's anonymous memory (``RssAnon``), its
sampled peak since the previous event, and FSDP's own buffers then: each layer's
all-gather output (the flat buffer the collective fills) and its unsharded parameters'
storage. Each rank prints its peak in the last step (above that step's least
``RssAnon``, against the decoder layer's size) and the event it came before; rank 0 also
prints every event of that step.

    python benches/gather_trace.py [--gb 0.3] [--world 2] [--steps 2] [--parallelism fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from memtrace import status  # noqa: E402

MiB = 2**20


class Recorder:
    """Events with RssAnon at the event and its sampled peak since the last one."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.groups: list[Any] = []
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            anon = status()["RssAnon"]
            with self._lock:
                self._peak = max(self._peak, anon)

    def census(self) -> dict[str, int]:
        flat = unsharded = 0
        for g in self.groups:
            if g._all_gather_result is not None:
                out = g._all_gather_result.all_gather_output
                flat += out.untyped_storage().nbytes()
            for p in g.fsdp_params:
                for t in getattr(p, "all_gather_outputs", []):
                    unsharded += t.untyped_storage().nbytes()
        state = self.groups[0].comm_ctx.all_gather_state if self.groups else None
        if state is not None:
            flat += state.all_gather_result.all_gather_output.untyped_storage().nbytes()
        return {"flat": flat, "unsharded": unsharded}

    def note(self, what: str, who: str) -> None:
        anon = status()["RssAnon"]
        with self._lock:
            peak, self._peak = max(self._peak, anon), anon
        self.events.append({"what": what, "who": who, "anon": anon, "peak_before": peak,
                            **self.census()})


def instrument(rec: Recorder) -> None:
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    init = FSDPParamGroup.__init__

    def tracked_init(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        rec.groups.append(self)

    FSDPParamGroup.__init__ = tracked_init
    for name in ("unshard", "wait_for_unshard", "reshard", "pre_backward", "post_backward"):
        fn = getattr(FSDPParamGroup, name)

        def wrapped(self: Any, *a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
            out = _fn(self, *a, **k)
            rec.note(_name, self._module_fqn or "root")
            return out

        setattr(FSDPParamGroup, name, wrapped)


def worker(rank: int, world: int, port: int, inputs: dict, steps: int, variant: str,
           out: str) -> None:
    import torch

    import esft_rs
    from bench_scale import apply_variants
    from esft_rs.distributed import exit_process

    apply_variants(variant)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    rec = Recorder()
    instrument(rec)
    marks: list[int] = []
    esft_rs.train(inputs["base"], inputs["data"], Path(out) / "run", inputs["experts"],
                  progress=False, device="cpu", steps=steps, seq_length=64,
                  per_device_batch_size=1, gradient_accumulation_steps=4 // world,
                  eval_steps=10**6, save_steps=10**6, learning_rate=1e-5,
                  gradient_checkpointing=False, val_ratio=0.0,
                  on_step=lambda *_: marks.append(len(rec.events)))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"events": rec.events, "marks": marks}))
    exit_process(0)  # gloo may abort a rank in the interpreter's teardown


def main() -> None:
    import torch

    from bench_scale import make_inputs, parallelism

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=0.3)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--parallelism", type=parallelism, default="fsdp",
                        help="fsdp or a variant of it (bench_scale.py: fsdp+flat, fsdp+ahead0)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        inputs = make_inputs(Path(tmp), args.gb, 4)
        import esft_rs

        tensors = esft_rs.inspect(inputs["base"]).tensors
        layer = max(sum(t.bytes for n, t in tensors.items() if n.startswith(f"model.layers.{i}."))
                    for i in range(64))
        torch.multiprocessing.spawn(worker, args=(args.world, port, inputs, args.steps,
                                                  args.parallelism, tmp),
                                    nprocs=args.world)
        runs = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
    for r, run in enumerate(runs):
        events = run["events"][run["marks"][-2]:run["marks"][-1]]  # the last step
        base = min(e["anon"] for e in events)
        top = max(range(len(events)), key=lambda i: events[i]["peak_before"])
        peak = events[top]["peak_before"]
        print(f"rank {r}: layer {layer / MiB:.1f} MiB; last step's least RssAnon"
              f" {base / MiB:.0f} MiB; peak {peak / MiB:.0f} (+{(peak - base) / MiB:.0f})"
              f" just before event {top}")
        if r:
            continue
        print(f"{'#':>4} {'event':<18} {'layer':<16} {'anon+':>6} {'peak+':>6} {'flat':>6}"
              f" {'unsharded':>9}  (MiB above the step's least RssAnon; FSDP's buffers live)")
        for i, e in enumerate(events):
            print(f"{i:>4} {e['what']:<18} {e['who']:<16} {(e['anon'] - base) / MiB:>6.0f}"
                  f" {(e['peak_before'] - base) / MiB:>6.0f} {e['flat'] / MiB:>6.0f}"
                  f" {e['unsharded'] / MiB:>9.0f}")


if __name__ == "__main__":
    main()

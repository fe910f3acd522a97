"""Training selected slices of fused experts: the straight-through split (ours: weight
gradients for the trained slices only) against the same slices taking their rows of the
whole fused tensor's gradient (the path before it), against rebuilding the fused tensor
on every read (``index_copy``, the path before that; ``--rebuilt``), and against full
fine-tuning, in one run.

The model is a random 2-layer Qwen3-MoE with 64 experts per layer (96 MiB of fp32
expert weights), made locally. For each experts implementation transformers offers on
CPU: bytes autograd saves for backward in one step (distinct storages other than the
model's own parameters), the largest fused-size tensor made in the forward and in the
backward, the backward's matmul FLOPs, and the median step time (forward, backward,
AdamW; CPU time of the process, and wall time), all methods interleaved round by round.
Targets: ESFT saves no more than training the fused tensors whole, makes no fused-size
tensor, and its backward drops the frozen experts' weight-gradient FLOPs: ESFT step
near the method's bound, about 0.67x full.

    python benches/bench_slices.py [--rounds 5] [--tokens 512] [--experts 6] [--threads 1]
        [--implementations grouped_mm eager batched_mm] [--rebuilt]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import transformers

from esft_rs.files.expert_config import ExpertConfig
from esft_rs.training import freeze as freezing
from esft_rs.training.freeze import freeze

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from timing import interleaved
from train_fakes import backward_flops, saved_bytes

IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")
MiB = 2**20


class Rebuilt(torch.nn.Module):
    """The baseline: a parametrization that rebuilds the fused tensor with ``index_copy``."""

    def __init__(self, original: torch.Tensor, ids: list[int]) -> None:
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids), persistent=False)
        self.slices = torch.nn.Parameter(original.index_select(0, self.ids).clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.index_copy(0, self.ids, self.slices.to(original.dtype))


def rebuilt_freeze(model: torch.nn.Module, experts: ExpertConfig) -> list[torch.Tensor]:
    out = []
    for name, p in list(model.named_parameters()):
        layer = int(name.split(".")[2]) if ".layers." in name else None
        p.requires_grad_(False)
        if name.endswith(("gate_up_proj", "down_proj")) and experts.experts.get(layer):
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            slices = Rebuilt(p.detach(), experts.experts[layer])
            torch.nn.utils.parametrize.register_parametrization(module, attr, slices, unsafe=True)
            out.append(slices.slices)
    return out


def build(impl: str) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=1024, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=128, intermediate_size=1024, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).train()
    model.set_experts_implementation(impl)
    return model


def fused_grad_freeze(model: torch.nn.Module, experts: ExpertConfig) -> list[torch.Tensor]:
    """The path before the split: the slices, in place, take their rows of the whole
    fused tensor's gradient (``freeze``'s fallback for experts the split does not know)."""
    known = freezing.gated_experts_problem
    freezing.gated_experts_problem = lambda _module: "the baseline"
    try:
        return [t.param for t in freeze(model, experts)]
    finally:
        freezing.gated_experts_problem = known


def largest_fused_tensor(model: torch.nn.Module, run: Callable[[], object]) -> int:
    """Bytes of the largest fused-shaped tensor ``run`` makes (0: none)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    own = {t.untyped_storage().data_ptr() for t in model.parameters()}
    shapes = {tuple(p.shape) for n, p in model.named_parameters()
              if p.ndim == 3 and not n.endswith("slices")}
    found = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if (isinstance(t, torch.Tensor) and tuple(t.shape) in shapes
                        and t.untyped_storage().data_ptr() not in own):
                    found[0] = max(found[0], t.untyped_storage().nbytes())
            return out

    with Watch():
        run()
    return found[0]


def loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float().logsumexp(-1).mean()


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    loss(model, ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--experts", type=int, default=6, help="trained experts per layer, of 64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS,
                    default=list(IMPLEMENTATIONS))
    ap.add_argument("--rebuilt", action="store_true", help="time the index_copy path too")
    args = ap.parse_args()
    logging.getLogger("esft_rs.training").setLevel(logging.ERROR)  # the baseline's fallback
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    experts = ExpertConfig({layer: list(range(0, 64, 64 // args.experts))[:args.experts]
                            for layer in (0, 1)})
    expert_bytes = sum(p.numel() * 4 for n, p in build("eager").named_parameters()
                       if n.endswith(("gate_up_proj", "down_proj")))
    print(f"Qwen3-MoE, 2 layers x 64 experts ({expert_bytes / MiB:.0f} MiB of fp32 expert"
          f" weights), {args.tokens} tokens, ESFT trains {args.experts} experts per layer;"
          f" step times: medians of {args.rounds} interleaved rounds, {torch.get_num_threads()}"
          " thread(s)")
    print(f"{'implementation':<12} {'method':<10} {'saved MiB':>9} {'fused fwd MiB':>13}"
          f" {'fused bwd MiB':>13} {'bwd GFLOP':>9} {'step CPU s':>10} {'step wall s':>11}")
    for impl in args.implementations:
        models: dict[str, torch.nn.Module] = {}
        params: dict[str, list[torch.Tensor]] = {}
        for method in (["rebuilt"] if args.rebuilt else []) + ["fused-grad", "split", "full"]:
            model = build(impl)
            if method == "rebuilt":
                params[method] = rebuilt_freeze(model, experts)
            elif method == "fused-grad":
                params[method] = fused_grad_freeze(model, experts)
            elif method == "split":
                params[method] = [t.param for t in freeze(model, experts)]
            else:
                params[method] = list(model.parameters())
            models[method] = model
        optimizers = {m: torch.optim.AdamW(p, lr=1e-5) for m, p in params.items()}
        steps = {m: partial(step, models[m], optimizers[m], ids) for m in models}
        steps_again = dict(steps)
        cpu = interleaved(steps, args.rounds, clock=time.process_time)
        wall = interleaved(steps_again, args.rounds)
        flops = {}
        for method, model in models.items():
            saved = saved_bytes(model, lambda model=model: loss(model, ids).backward())
            model.zero_grad(set_to_none=True)
            fwd = largest_fused_tensor(model, lambda model=model: model(ids))
            out = loss(model, ids)
            bwd = largest_fused_tensor(model, out.backward)
            model.zero_grad(set_to_none=True)
            flops[method] = backward_flops(loss(model, ids))
            model.zero_grad(set_to_none=True)
            print(f"{impl:<12} {method:<10} {saved / MiB:>9.1f} {fwd / MiB:>13.1f}"
                  f" {bwd / MiB:>13.1f} {flops[method] / 1e9:>9.2f} {cpu[method]:>10.3f}"
                  f" {wall[method]:>11.3f}")
        print(f"{impl:<12} split / fused-grad: step CPU {cpu['split'] / cpu['fused-grad']:.2f}x,"
              f" wall {wall['split'] / wall['fused-grad']:.2f}x, backward FLOPs"
              f" {flops['split'] / flops['fused-grad']:.2f}x; ESFT / full: step CPU"
              f" split {cpu['split'] / cpu['full']:.2f}x (fused-grad"
              f" {cpu['fused-grad'] / cpu['full']:.2f}x), wall split"
              f" {wall['split'] / wall['full']:.2f}x, backward FLOPs split"
              f" {flops['split'] / flops['full']:.2f}x (fused-grad"
              f" {flops['fused-grad'] / flops['full']:.2f}x)")


if __name__ == "__main__":
    main()

"""Training selected slices of fused experts: in place (ours) against rebuilding the fused
tensor on every read (the re-parametrisation esft-rs used before, ``index_copy``), in one run.

The model is a random 2-layer Qwen3-MoE with 64 experts per layer (48 MiB of fp32
expert weights), made locally. For each experts implementation transformers offers on
CPU, and for full fine-tuning beside it: bytes autograd saves for backward in one step
(distinct storages other than the model's own parameters), the largest tensor the
forward makes, and the median step time (forward, backward, AdamW), ESFT and full
interleaved round by round. Targets: ESFT saves no more than training the fused
tensors whole (the activations) plus the trained slices; ESFT step <= full step.

    python benches/bench_slices.py [--rounds 5] [--tokens 512] [--experts 6] [--threads N]
        [--implementations grouped_mm eager batched_mm]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import transformers

from esft_rs.expert_config import ExpertConfig
from esft_rs.training.freeze import freeze

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from timing import interleaved
from train_fakes import saved_bytes

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


def largest_forward_tensor(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the largest fused-shaped tensor the forward makes (0: none)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    own = {t.untyped_storage().data_ptr() for t in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters() if p.ndim == 3}
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
        model(ids)
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
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS,
                    default=list(IMPLEMENTATIONS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    experts = ExpertConfig({layer: list(range(0, 64, 64 // args.experts))[:args.experts]
                            for layer in (0, 1)})
    expert_bytes = sum(p.numel() * 4 for n, p in build("eager").named_parameters()
                       if n.endswith(("gate_up_proj", "down_proj")))
    print(f"Qwen3-MoE, 2 layers x 64 experts ({expert_bytes / MiB:.0f} MiB of fp32 expert"
          f" weights), {args.tokens} tokens, ESFT trains {args.experts} experts per layer;"
          f" step times: medians of {args.rounds} interleaved rounds")
    print(f"{'implementation':<12} {'method':<9} {'saved MiB':>9} {'fused copy MiB':>14}"
          f" {'step s':>8}")
    for impl in args.implementations:
        models: dict[str, torch.nn.Module] = {}
        params: dict[str, list[torch.Tensor]] = {}
        for method in ("rebuilt", "in-place", "full"):
            model = build(impl)
            if method == "rebuilt":
                params[method] = rebuilt_freeze(model, experts)
            elif method == "in-place":
                params[method] = [t.param for t in freeze(model, experts)]
            else:
                params[method] = list(model.parameters())
            models[method] = model
        optimizers = {m: torch.optim.AdamW(p, lr=1e-5) for m, p in params.items()}
        times = interleaved({m: partial(step, models[m], optimizers[m], ids) for m in models},
                            args.rounds)
        saved = {}
        for method, model in models.items():
            saved[method] = saved_bytes(model, lambda model=model: loss(model, ids).backward())
            copy = largest_forward_tensor(model, ids)
            print(f"{impl:<12} {method:<9} {saved[method] / MiB:>9.1f} {copy / MiB:>14.1f}"
                  f" {times[method]:>8.3f}")
        print(f"{impl:<12} saved in-place/rebuilt {saved['in-place'] / saved['rebuilt']:.3f};"
              f" step in-place/rebuilt {times['in-place'] / times['rebuilt']:.2f}x;"
              f" ESFT (in-place)/full {times['in-place'] / times['full']:.2f}x")


if __name__ == "__main__":
    main()

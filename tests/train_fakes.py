"""A tiny DeepSeek-style MoE in plain torch, named like the checkpoints, for the trainer's tests.

It stands in for any model family: the trainer sees only parameter names
(``model.layers.L.mlp.experts.E.*``, or fused ``mlp.experts.gate_up_proj``) and
a forward that returns logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class MLP(nn.Module):
    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedExperts(nn.Module):
    """Experts as [E, ...] tensors, as transformers v5 keeps them."""

    def __init__(self, e: int, h: int, i: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(e, h, i) * 0.1)

    def run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up_proj[e].T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down_proj[e].T


class MoE(nn.Module):
    def __init__(self, h: int, i: int, e: int, k: int, fused: bool) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = FusedExperts(e, h, i) if fused else nn.ModuleList(
            MLP(h, i) for _ in range(e))
        self.shared_experts = MLP(h, i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x).softmax(-1).topk(self.k, dim=-1)
        out = self.shared_experts(x)
        n = self.gate.out_features
        for e in range(n):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if not len(tok):
                continue
            run = self.experts.run if isinstance(self.experts, FusedExperts) else (
                lambda e, t: self.experts[e](t))
            out = out.index_add(0, tok, run(e, x[tok]) * weights[tok, slot, None])
        return out.reshape(shape)


class Attention(nn.Module):
    """Causal mean of projected states: enough to mix positions, cheap to run."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return self.o_proj(self.q_proj(x).cumsum(1) / pos)


class Layer(nn.Module):
    def __init__(self, h: int, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(h)
        self.self_attn = Attention(h)
        self.post_attention_layernorm = RMSNorm(h)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, vocab: int, h: int, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(h)


class FakeMoE(nn.Module):
    """Layer 0 dense, then MoE layers of ``experts`` routed (top-``k``) + 1 shared expert."""

    def __init__(self, vocab: int = 32, hidden: int = 16, inter: int = 8, layers: int = 3,
                 experts: int = 4, k: int = 2, fused: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        blocks = [Layer(hidden, MLP(hidden, 2 * inter))]
        blocks += [Layer(hidden, MoE(hidden, inter, experts, k, fused)) for _ in range(layers - 1)]
        self.model = Body(vocab, hidden, blocks)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.num_experts, self.top_k = experts, k

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


def fake_data(n: int = 24, seq: int = 12, vocab: int = 32, seed: int = 0
              ) -> dict[str, torch.Tensor]:
    """Packed sequences with the first 3 tokens of each masked from the loss, like prompts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def effective(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors the forward pass uses, by checkpoint name (fused: rebuilt if parametrised)."""
    out = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        out[name] = getattr(model.get_submodule(owner), attr).detach().clone()
    return out


def ddp_worker(rank: int, world: int, port: int, args: tuple, kwargs: dict) -> None:
    """One torchrun-like process (for torch.multiprocessing.spawn): env as torchrun sets it."""
    import os

    import esft_rs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    esft_rs.train(*args, progress=False, **kwargs)


def ddp_rank(rank: int, world: int, port: int, args: tuple, kwargs: dict) -> None:
    """``ddp_worker`` as a whole spawned process: it exits past the interpreter's teardown
    (``exit_process``), where gloo may abort a rank."""
    from esft_rs.distributed import exit_process

    ddp_worker(rank, world, port, args, kwargs)
    exit_process(0)


def saved_bytes(model: nn.Module, step: Callable[[], None]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``step`` runs
    (a forward and backward), other than the model's own parameters and buffers.

    Saved tensors are kept alive until the end, so no address is reused: with
    reentrant checkpointing, the recomputed forward saves under these hooks too.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept.setdefault(storage.data_ptr(), storage)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(s.nbytes() for s in kept.values())


def _grouped_mm_flops(a: list[int], b: list[int], *_: object, out_shape: list[int],
                     **__: object) -> int:
    """FLOPs of ``aten._grouped_mm`` (FlopCounterMode has no formula for it): a 2-D output
    contracts a's last dim; 2-D x 2-D (a weight gradient, [G, M, N] out) contracts a's
    columns over all groups; 3-D x 3-D is a batched mm."""
    if len(out_shape) == 2:
        return 2 * out_shape[0] * out_shape[1] * a[-1]
    if len(a) == len(b) == 2:
        return 2 * out_shape[1] * out_shape[2] * a[1]
    return 2 * out_shape[0] * out_shape[1] * out_shape[2] * a[-1]


def backward_flops(loss: torch.Tensor) -> int:
    """Matmul FLOPs of ``loss.backward()`` (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops}) as m:
        loss.backward()
    return m.get_total_flops()


def stop_after_2(step: int, record: dict) -> None:
    """``on_step`` that stops a run after step 2, as a crash would (picklable, for spawn)."""
    if step == 2:
        raise KeyboardInterrupt


def constant_routes(model: FakeMoE, token: int) -> dict[int, set[int]]:
    """MoE layer -> the experts a sequence of one repeated ``token`` is routed to."""
    seen: dict[int, set[int]] = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda _m, _i, out, i=i: seen.setdefault(i, set()).update(
            out.topk(model.top_k, dim=-1).indices.flatten().tolist()))
        for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
    with torch.no_grad():
        model(torch.full((1, 6), token))
    for h in hooks:
        h.remove()
    return seen


def uneven_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's batch (varied tokens) and rank 1's (one token, repeated)."""
    return torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1)), \
        torch.full((2, 6), 5)


def fsdp_grads_worker(rank: int, world: int, port: int, experts: dict, out: str) -> None:
    """One FSDP step of FakeMoE on ``uneven_batches``; rank 0 saves the trained tensors'
    gradients (whole)."""
    import os

    import torch.distributed as dist

    from esft_rs.distributed import Dist, exit_process, leave_process_group
    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.training import sharding
    from esft_rs.training.freeze import freeze
    from esft_rs.training.grad_presence import GradPresence

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = FakeMoE()
    trainables = freeze(model, ExpertConfig(experts))
    trainables = sharding.shard(model, trainables, Dist(rank, world), torch.device("cpu"))
    presence = GradPresence(trainables)
    model(uneven_batches()[rank]).sum().backward()
    presence.drop_unused(Dist(rank, world))
    grads = {t.name: sharding.full(t.param.grad) for t in trainables if t.param.grad is not None}
    if rank == 0:
        torch.save(grads, out)
    leave_process_group()
    exit_process(0)


def checkpoint_state(checkpoint: Path) -> dict:
    """What a checkpoint's DCP folder holds (``weights``, ``optimizer``, ...), read whole
    in this process whatever world size wrote it."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(checkpoint / "dcp", Path(d) / "state.pt")
        return torch.load(Path(d) / "state.pt", weights_only=True)


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained tensors a checkpoint holds, read back from its DCP folder."""
    return checkpoint_state(checkpoint)["weights"]


def plus_chat(a_values: int, b_values: int) -> str:
    """Task data (JSONL): "What is a plus b?" answered, for a < a_values, b < b_values."""
    import json

    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(a_values) for b in range(b_values)]
    return "".join(json.dumps(r) + "\n" for r in rows)

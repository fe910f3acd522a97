"""A tiny MoE that implements esft_rs.models.interface.MoEModel, for profiler tests."""

from __future__ import annotations

import torch
from torch import nn

from esft_rs.models.interface import RouterOutput


class FakeRouter(nn.Module):
    def __init__(self, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> RouterOutput:
        weights, ids = torch.topk(self.proj(x).softmax(dim=-1), self.top_k, dim=-1)
        return RouterOutput(ids, weights)


class FakeMoE(nn.Module):
    """Embedding, then per MoE layer a router whose weights scale the hidden state."""

    def __init__(self, vocab: int = 32, hidden: int = 16, experts: int = 8, top_k: int = 2,
                 layers: tuple[int, ...] = (1, 2, 3), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.num_experts, self.top_k = experts, top_k
        self.embed = nn.Embedding(vocab, hidden)
        self.gates = nn.ModuleDict({str(i): FakeRouter(hidden, experts, top_k) for i in layers})

    def routers(self) -> dict[int, nn.Module]:
        return {int(i): m for i, m in self.gates.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = self.embed(input_ids)
        flat = x.reshape(-1, x.shape[-1])
        for router in self.gates.values():
            _, weights = router(flat)
            flat = flat * (1 + weights.sum(dim=-1, keepdim=True))
        return flat.view_as(x) @ self.embed.weight.T


def batches(n: int = 6, rows: int = 3, seq: int = 7, vocab: int = 32, seed: int = 1):
    """Batches with right padding: (ids, mask), the first row of each batch full."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (rows, seq), generator=g)
        lengths = torch.randint(1, seq + 1, (rows,), generator=g)
        lengths[0] = seq
        mask = (torch.arange(seq) < lengths[:, None]).long()
        out.append((ids, mask))
    return out

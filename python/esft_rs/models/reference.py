"""The built-in reference MoE model: a DeepSeek-V2-style decoder in plain torch.

Fine-grained routed experts plus always-on shared experts, a softmax top-K router,
dense first layers, RMSNorm, rotary multi-head attention and SwiGLU MLPs. Module
names follow DeepSeek-V2, so ``state_dict()`` names are its checkpoint names, and
every routed expert owns its parameters (the trainer freezes them one by one).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from esft_rs.models.config import ModelConfig
from esft_rs.models.interface import RouterOutput


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; a dense layer, one expert, or the shared experts."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Softmax gate with top-K: the one hook point per MoE layer for profiling.

    Input: hidden states [tokens, H] (the row-major flattened batch). Output: a
    ``RouterOutput`` holding exactly the ids and weights the layer mixes with.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        # Scores in float32 whatever the model dtype, as DeepSeek-V2 does (autocast too).
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        self.aux_loss = None
        if self.training and self.aux_loss_alpha > 0:
            # Expert-level balance loss (DeepSeek-V2 eq. 12): E * sum_e f_e * P_e, where f_e
            # is e's share of the top-K selections and P_e its mean routing probability.
            e = scores.shape[-1]
            share = torch.bincount(ids.reshape(-1), minlength=e).float() / ids.numel()
            self.aux_loss = self.aux_loss_alpha * e * (share * scores.mean(0)).sum()
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.routed_scaling_factor
        return RouterOutput(ids, weights)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(h, i) for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(h, i * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = self.gate(flat)
        y = self.routed(flat, ids, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view_as(x)

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum of weighted expert outputs: tokens sorted by expert, one matmul chain per expert."""
        tokens, k = ids.shape
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat_ids, minlength=len(self.experts)).tolist()
        chunks = x[order // k].split(counts)
        outs = [self.experts[e](c) for e, c in enumerate(chunks) if counts[e]]
        if not outs:
            return x.new_zeros(tokens, x.shape[-1])
        out = torch.cat(outs)  # in the experts' dtype: x's, or autocast's (bf16 in training)
        slots = torch.empty_like(out)
        slots[order] = out
        return (slots.view(tokens, k, -1) * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, s, h = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, -1).transpose(1, 2)

        q = _rotate(heads(self.q_proj(x)), *rope)
        k = _rotate(heads(self.k_proj(x)), *rope)
        v = heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split convention (Llama / DeepSeek)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp: nn.Module = (
            MLP(cfg.hidden_size, cfg.intermediate_size)
            if index < cfg.first_k_dense_replace
            else MoE(cfg)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ReferenceMoE(nn.Module):
    """Causal LM over the built-in config; satisfies ``esft_rs.models.interface.MoEModel``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False

    @property
    def num_experts(self) -> int:
        return self.config.n_routed_experts

    @property
    def top_k(self) -> int:
        return self.config.num_experts_per_tok

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer's activations in backward: less memory, more compute."""
        self.gradient_checkpointing = True

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the routers' balance losses from the last training forward, if any."""
        losses = [r.aux_loss for r in self.routers().values() if r.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def routers(self) -> dict[int, nn.Module]:
        return {
            i: layer.mlp.gate
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.mlp, MoE)
        }

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, S, V] for token ids [B, S].

        ``attention_mask`` [B, S] (1 = token, 0 = padding): real tokens get the same
        logits as without padding, left or right. Padded positions still pass through
        every layer (and router): callers that count routing mask them out.
        """
        b, s = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        keep = None if attention_mask is None else attention_mask.bool()
        # Right padding (packed rows) needs no mask: causal attention already keeps
        # real tokens from seeing it, and positions count from 0 either way.
        if keep is None or bool((keep[:, 1:] <= keep[:, :-1]).all()):
            positions = torch.arange(s, device=input_ids.device).expand(b, s)
            mask = None
        else:
            positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            # Each query also sees itself, so rows of pure padding stay finite.
            mask = (causal & keep[:, None, :]) | torch.eye(s, dtype=torch.bool, device=x.device)
            mask = mask[:, None]  # [B, 1, S, S], broadcast over heads
        rope = _rope_tables(self.config, positions, x.dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:
                x = checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask)
        return self.lm_head(self.model.norm(x))


def _rope_tables(
    cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, S, head_dim] for integer positions [B, S]."""
    d = cfg.head_dim
    inv_freq = cfg.rope_theta ** -(
        torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d
    )
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


#: the ``torch.nn.init`` functions the model's modules call when they are built
_INITS = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")


def skeleton(cfg: ModelConfig) -> ReferenceMoE:
    """The model on the meta device (shapes and dtypes, no memory), for a loader that
    assigns every tensor: no second, random copy of the weights.

    ``torch.nn.init`` is switched off while it is built (as transformers'
    ``no_init_weights``): initialising on meta goes through torch's Python
    decompositions, whose first use imports for over a second.
    """
    from unittest import mock

    with contextlib.ExitStack() as stack, torch.device("meta"):
        for name in _INITS:
            stack.enter_context(mock.patch.object(torch.nn.init, name, _unchanged))
        return ReferenceMoE(cfg)


def _unchanged(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


def blank(cfg: ModelConfig) -> ReferenceMoE:
    """A CPU model whose weights are about to be set; torch's global RNG is left as it was.

    (Not the meta device: torch's first meta-device initialisation takes seconds.)
    """
    with torch.random.fork_rng(devices=[]):
        return ReferenceMoE(cfg)


def build(cfg: ModelConfig, seed: int = 0) -> ReferenceMoE:
    """A float32 CPU model: seeded N(0, initializer_range) weights and unit norms.

    Initialisation draws from its own generator in parameter order, so it neither
    depends on nor disturbs torch's global random state.
    """
    model = blank(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range, generator=gen)
    return model

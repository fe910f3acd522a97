"""What the rest of esft-rs needs from an MoE model, whatever its family.

Profiling hooks the routers; training freezes and unfreezes tensors by their
checkpoint names (classified by ``esft_rs.files.naming``). A model family plugs in by
providing an ``MoEModel``: the built-in reference model does so directly, and
transformers families through thin adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


class RouterOutput(NamedTuple):
    """What a router decided for a flattened batch of tokens (row-major [B*S])."""

    topk_ids: torch.Tensor  # [tokens, K] int64 expert ids
    topk_weights: torch.Tensor  # [tokens, K] the weights that mix the expert outputs


@runtime_checkable
class MoEModel(Protocol):
    """A causal LM whose MoE routers can be hooked.

    ``routers()`` maps decoder-layer index -> router module. Each router's forward
    returns a ``RouterOutput`` (or a tuple starting with ids and weights), so a
    forward hook sees exactly what the forward pass used.
    """

    num_experts: int
    top_k: int

    def routers(self) -> dict[int, torch.nn.Module]: ...

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:  # logits [B, S, V]
        ...

"""``GradPresence``, what FSDP uses to step exactly the tensors one process steps: in one
process it records exactly the trained tensors that get a gradient (an expert that only
padding reached: a zero one), on the built-in model and on every transformers family,
every tensor trained, or the selected slices of fused ones."""

from __future__ import annotations

import pytest
import torch

from esft_rs.files.expert_config import ExpertConfig
from esft_rs.models import init_model
from esft_rs.training.freeze import freeze, moe_layout, resolve_experts
from esft_rs.training.grad_presence import GradPresence
from esft_rs.training.loop import loss_sum

FAMILIES = ["builtin", "deepseek_v2", "deepseek_v3", "mixtral", "olmoe", "qwen2_moe",
            "qwen3_moe"]


def build(family: str) -> torch.nn.Module:
    if family == "builtin":
        return init_model("tiny", seed=0)
    pytest.importorskip("transformers")
    import hf_tiny

    return hf_tiny.build(family)


def padded_batch() -> dict[str, torch.Tensor]:
    """Two rows of 12 tokens, the last 5 of the second padding (no label, masked out)."""
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("mode", ["full", "esft"])
@pytest.mark.parametrize("family", FAMILIES)
def test_records_the_tensors_that_get_a_gradient(family: str, mode: str) -> None:
    model = build(family).train()
    layout = moe_layout((n, tuple(p.shape)) for n, p in model.named_parameters())
    selected = ExpertConfig({layer: [0, 1] for layer in layout}, False, False)
    trainables = freeze(model, resolve_experts(layout, selected, mode, 0))
    presence = GradPresence(trainables)
    batch = padded_batch()
    loss_sum(model, batch).backward()
    got = presence.seen
    grads = [t.param.grad for t in trainables]
    assert got == [g is not None for g in grads]
    assert any(got)
    if family == "builtin":  # per-expert tensors: some that no token reached, some zero
        assert not all(got)
        assert any(g is not None and not g.any() for g in grads)

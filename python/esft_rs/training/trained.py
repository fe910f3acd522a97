"""Which checkpoint tensors train, from their names alone (no torch: ``esft-rs plan``
and the trainer share it). Tensors are recognised only through
``esft_rs.files.naming.classify``, the single source of truth for expert naming.
"""

from __future__ import annotations

import random

from esft_rs.errors import MismatchError
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.files.naming import classify, moe_layout  # noqa: F401 (moe_layout: re-exported)
from esft_rs.formatting import id_ranges

SHARED_KINDS = ("shared_expert", "shared_expert_gate")


def resolve_experts(
    layout: dict[int, int],
    config: ExpertConfig | None,
    mode: str,
    seed: int,
    origin: str = "expert config",
) -> ExpertConfig:
    """The experts that will actually train, checked against the model's MoE layout.

    ``full`` trains everything; ``random`` draws, per layer, as many experts as
    ``config`` lists there (seeded, the paper's ablation); ``esft`` takes ``config``.
    """
    if mode == "full":
        return ExpertConfig({layer: list(range(n)) for layer, n in layout.items()}, True, True)
    if config is None:
        raise MismatchError(f"mode {mode} needs an expert config (--experts)")
    for layer, ids in config.experts.items():
        if layer not in layout:
            raise MismatchError(
                f"{origin}: layer {layer} is not an MoE layer of the model"
                f" (MoE layers: {id_ranges(list(layout)) or 'none'})"
            )
        bad = [e for e in ids if not 0 <= e < layout[layer]]
        if bad:
            raise MismatchError(
                f"{origin}: layer {layer}: expert {bad[0]} is out of range"
                f" (the model has {layout[layer]} routed experts per layer)"
            )
    experts = {layer: sorted(ids) for layer, ids in config.experts.items() if ids}
    if mode == "random":
        rng = random.Random(seed)
        experts = {
            layer: sorted(rng.sample(range(layout[layer]), len(ids)))
            for layer, ids in sorted(experts.items())
        }
    resolved = ExpertConfig(experts, config.shared_experts, config.non_expert_modules)
    if not resolved.num_experts and not resolved.shared_experts and not resolved.non_expert_modules:
        raise MismatchError(
            f"{origin}: selects nothing to train (no experts listed; shared_experts and"
            " non_expert_modules are off)"
        )
    return resolved


def tensor_plan(name: str, experts: ExpertConfig) -> bool | list[int]:
    """True: train the whole tensor; False: freeze it; a list: train those fused slices."""
    role = classify(name)
    if role.kind == "routed_expert":
        return role.expert in experts.experts.get(role.layer, ())
    if role.kind == "fused_experts":
        return list(experts.experts.get(role.layer, ()))
    if role.kind in SHARED_KINDS:
        return experts.shared_experts
    return experts.non_expert_modules

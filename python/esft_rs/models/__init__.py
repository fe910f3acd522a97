"""MoE models: the built-in reference model and the interface every family meets.

Importing this package does not import torch; the functions below do.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from esft_rs.models.config import PRESETS, ModelConfig
from esft_rs.models.interface import MoEModel, RouterOutput

if TYPE_CHECKING:
    import torch

    from esft_rs.models.reference import ReferenceMoE

__all__ = [
    "PRESETS",
    "MoEModel",
    "ModelConfig",
    "RouterOutput",
    "as_moe_model",
    "gated_experts_problem",
    "init_model",
    "load_model",
    "save_model",
    "to_checkpoint",
]


def init_model(config: ModelConfig | str = "tiny", *, seed: int = 0) -> ReferenceMoE:
    """A freshly initialised built-in model (float32, CPU) from a config or a preset name.

    The same config and seed give the same weights, bit for bit.
    """
    from esft_rs.errors import EsftError
    from esft_rs.models.reference import build

    if isinstance(config, str):
        if config not in PRESETS:
            raise EsftError(f"unknown preset {config!r} (choose from {', '.join(PRESETS)})")
        config = PRESETS[config]
    if problems := config.problems():
        raise EsftError(f"invalid model config: {'; '.join(problems)}")
    return build(config, seed)


def save_model(
    model: ReferenceMoE, directory: str | os.PathLike[str], *, overwrite: bool = False
) -> os.PathLike[str]:
    """Write ``config.json`` + ``model.safetensors`` (DeepSeek-V2 tensor names) as a new
    directory, or in place of an existing checkpoint directory with ``overwrite``."""
    from esft_rs.models import reference_files

    return reference_files.save_model(model, directory, overwrite=overwrite)


def load_model(
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load a model directory: the built-in model (its tensors checked against
    config.json), or a transformers MoE family (``esft_rs.models.hf``, extra ``hf``),
    by config.json's ``model_type``."""
    from esft_rs.models import hf
    from esft_rs.models.config import MODEL_TYPE

    if hf.model_type(directory) not in (MODEL_TYPE, None):
        return hf.load(directory, dtype=dtype, device=device)
    from esft_rs.models import reference_files

    return reference_files.load_model(directory, dtype=dtype, device=device)


def as_moe_model(model: torch.nn.Module) -> MoEModel:
    """``model`` seen through the ``MoEModel`` interface (for profiling).

    A transformers model gets a view whose hooks on its routers last until
    ``view.close()`` (or a ``with`` block ends, or the view is dropped); calling
    this again while that view is open returns it, so hooks never pile up. The
    built-in model is returned as it is. Anything else is a ``TypeError``.
    """
    from esft_rs.models import hf

    if hf.is_hf(model):
        return hf.MoEView.view(model)
    if isinstance(model, (MoEModel, hf.MoEView)):
        return model
    raise TypeError(
        "expected an MoE model: the built-in model (esft_rs.models.load_model) or a"
        f" transformers MoE model (AutoModelForCausalLM), got {type(model).__name__}"
    )


def to_checkpoint(
    model: torch.nn.Module, name: str, tensor: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors that ``model``'s in-memory tensor ``name`` (holding ``tensor``)
    is stored as: itself for the built-in model and plain torch models; transformers
    families revert their load-time conversion (fused experts -> one tensor per expert)."""
    from esft_rs.models import hf

    return hf.to_checkpoint(model, name, tensor) if hf.is_hf(model) else {name: tensor}


def gated_experts_problem(module: torch.nn.Module) -> str | None:
    """None when ``module`` holds fused routed experts computing, for each routed pair,
    ``down_e @ (act(gate_e @ x) * (up_e @ x))`` weighted by the router (what
    ``esft_rs.training.slice_grads`` differentiates); otherwise why not, in words."""
    from esft_rs.models import hf

    if not hf.is_hf(module):
        return f"{type(module).__name__} is not a transformers experts module"
    return hf.gated_experts_problem(module)

"""Hugging Face transformers MoE families: DeepSeek-V2/V3, Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE.

Needs the optional extra ``esft-rs[hf]``; nothing outside ``models/hf*.py`` (and the
private-API probes, ``esft_rs.private_api``) imports transformers.

transformers 5 gives every family the same shape: ``model.layers.L.mlp.gate`` is a
router module returning ``(router_logits, weights, indices)``, where ``weights`` are
the ones that mix the expert outputs (DeepSeek-V3: sigmoid scores chosen with
``e_score_correction_bias`` and group limits, normalised and scaled), and the
routed experts are fused in memory into ``mlp.experts.gate_up_proj`` [E, 2I, H] and
``mlp.experts.down_proj`` [E, H, I]. Checkpoints on disk keep per-expert names
(Mixtral: ``block_sparse_moe.experts.E.w1``). transformers converts on load and
reverts on save; adapters are written with the reverted, on-disk names
(``to_checkpoint``), so ``esft-rs merge`` writes into the original shards.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from esft_rs.errors import InvalidFileError
from esft_rs.files.inputs import load_json
from esft_rs.models.hf_family import (  # noqa: F401 (re-exported: hf.is_hf etc.)
    FAMILIES,
    TRANSFORMERS_RANGE,
    check_family,
    config,
    is_hf,
    model_type,
    require_transformers,
    routers,
)
from esft_rs.models.interface import RouterOutput
from esft_rs.private_api import set_weight_conversions, weight_conversions


def load(
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """A transformers MoE causal LM from a local directory (never the network).

    ``dtype`` defaults to config.json's. The model is the one ``from_pretrained`` gives,
    built on the meta device and filled tensor by tensor (``hf_shards``); a quantised
    checkpoint goes through ``from_pretrained``. Raises ``InvalidFileError`` for a family
    esft-rs does not support, or a checkpoint transformers cannot load or would
    complete with random tensors; ``EsftError`` without a supported transformers.
    """
    root = Path(directory)
    check_family(root)
    raw = load_json(root / "config.json")
    if "quantization_config" not in raw:
        # Built on meta, each tensor read once into its place: from_pretrained peaked at
        # 2.2x the weights (fp32) and 3x (bf16), a map of the file beside its copies.
        from esft_rs.models import hf_shards

        model = hf_shards.meta(root, dtype)
        hf_shards.fill(model, root, torch.device(device))
        return model
    # transformers' own loader keeps FP8 layers on a GPU
    transformers = require_transformers()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report: esft-rs says it in one line
    bar = transformers.logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # as tqdm's disable=None: no bar in logs, before an error line
        transformers.logging.disable_progress_bar()
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            root, config=config(root), dtype=dtype if dtype is not None else "auto",
            local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
        )
    except (OSError, ImportError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidFileError(f"{root}: transformers cannot load it: {first}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.logging.enable_progress_bar()
    # transformers would initialise these at random: never train or profile that
    if mismatched := sorted(info.get("mismatched_keys", ()), key=str):
        name, disk, want = mismatched[0]  # (in-memory name, loaded shape, config's shape)
        raise InvalidFileError(
            f"{root}: tensor {name} has shape {list(disk)}, config.json needs {list(want)}"
            " (a tensor missing from a fused expert group shortens it)"
        )
    if missing := sorted(info.get("missing_keys", ())):
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InvalidFileError(f"{root}: the checkpoint has no tensor {missing[0]}{more}")
    model.config.use_cache = False  # training and profiling never decode incrementally
    routers(model)  # fails early, with the family's name, when no router is found
    return model.to(device)


class RouterTap(torch.nn.Module):
    """Re-emits a transformers router's decision as a ``RouterOutput`` through a module
    the profiler can hook (transformers routers return logits first)."""

    def forward(self, out: RouterOutput) -> RouterOutput:
        return out

    def hook(self, _router: Any, _inputs: Any, output: tuple[Any, ...]) -> None:
        """Forward hook for the router: its (logits, mixing weights, ids)."""
        _logits, weights, indices = output[:3]
        self(RouterOutput(indices, weights))


class MoEView:
    """A transformers MoE model seen through ``esft_rs.models.interface.MoEModel``.

    It hooks the model's routers until ``close()`` (or the end of a ``with`` block,
    or until the view is garbage-collected); ``view()`` returns a model's open view
    rather than hooking the routers again.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.config = model.config
        found = routers(model)
        first = next(iter(found.values()))
        self.num_experts = int(first.num_experts)
        self.top_k = int(first.top_k)
        self._taps = {layer: RouterTap() for layer in found}
        handles = [router.register_forward_hook(self._taps[layer].hook)
                   for layer, router in found.items()]
        # the hooks hold the taps, not the view: a dropped view removes them
        self._close = weakref.finalize(self, _remove_hooks, handles)

    @classmethod
    def view(cls, model: torch.nn.Module) -> MoEView:
        """The model's open view, or a new one."""
        ref = getattr(model, "_esft_moe_view", None)
        existing = ref() if ref is not None else None
        if existing is not None and existing._close.alive:
            return existing
        new = cls(model)
        model._esft_moe_view = weakref.ref(new)
        return new

    def close(self) -> None:
        """Removes the router hooks (idempotent); the view no longer sees routing."""
        self._close()

    def __enter__(self) -> MoEView:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def routers(self) -> dict[int, torch.nn.Module]:
        return dict(self._taps)

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        return self.model.parameters()

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask, use_cache=False).logits


def _remove_hooks(handles: list[Any]) -> None:
    for h in handles:
        h.remove()


#: What ``use_experts_implementation`` must have said of an experts class for
#: ``gated_experts_problem``: [gate; up] concatenated on dim 1, not transposed, no
#: bias, no norm after the experts, no expert parallelism.
GATED_EXPERTS = {"has_gate": True, "is_concatenated": True, "is_transposed": False,
                 "has_bias": False, "has_post_expert_norm": False, "_is_expert_parallel": False}


def gated_experts_problem(module: torch.nn.Module) -> str | None:
    """None when ``module`` is a supported family's routed experts as transformers 5
    makes them (every implementation, ``eager`` included, computes
    ``down_e @ (act_fn(gate) * up)`` per routed pair, weighted by the router); otherwise
    why not. Families outside ``FAMILIES``, and variants (biases, transposed or
    interleaved weights, a custom ``_apply_gate``, expert parallelism), are refused."""
    name = type(module).__name__
    family = next((c.__module__ for c in type(module).__mro__
                   if c.__module__.startswith("transformers.models.")), None)
    if family not in {f"transformers.models.{t}.modeling_{t}" for t in FAMILIES}:
        return f"{name} is not the experts module of a supported family"
    for flag, want in GATED_EXPERTS.items():
        if getattr(module, flag, None) is not want:
            return f"{name}.{flag} is {getattr(module, flag, None)}, not {want}"
    gate = getattr(type(module), "_apply_gate", None)
    if getattr(gate, "__qualname__", None) != "_default_apply_gate":
        return f"{name} has its own _apply_gate"
    return None


def to_checkpoint(
    model: torch.nn.Module, name: str, tensor: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The on-disk tensors that in-memory tensor ``name`` (holding ``tensor``) is saved as:
    transformers' own save-time conversion (a fused expert tensor: one per expert)."""
    return _revert(model, {name: tensor})


def _revert(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' save-time conversion of ``state``, without quantisation.

    A model loaded through a quantiser's conversion (FP8 weights dequantised on
    load: ``Fp8Dequantize``, an op from ``transformers.integrations``, not a layout
    op of ``transformers.core_model_loading``) is reverted with its family's layout
    mapping, the one ``save_pretrained`` uses for a model built from scratch: the
    adapter keeps the trained dtype, and ``esft-rs merge --requantize-fp8`` quantises.
    """
    from transformers.core_model_loading import revert_weight_conversion

    loaded = weight_conversions(model)
    ops = [op for c in loaded or () for op in getattr(c, "operations", ())]
    if all(type(op).__module__ == "transformers.core_model_loading" for op in ops):
        return revert_weight_conversion(model, state)
    if not set_weight_conversions(model, None):
        return revert_weight_conversion(model, state)
    try:
        return revert_weight_conversion(model, state)
    finally:
        set_weight_conversions(model, loaded)

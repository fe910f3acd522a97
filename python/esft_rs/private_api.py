"""Every use of a private torch or transformers API, in one place.

Each piece is probed once, on first use, against the installed versions. When one is
missing or has changed, the caller takes the public path (stock FSDP2, a computed offset,
all optimizer state, the model's own dtype) and one ``UserWarning`` line says so; nothing
fails for it. ``tests/test_private_api.py`` removes each piece and checks the fallback, and
that no other module touches these names. docs/ARCHITECTURE.md lists the pieces with
their public alternatives.

The pieces (``PIECES``): FSDP2's in-place all-gather internals (``fsdp_in_place_gather``),
its custom all-gather hook (``fsdp_chunked_gather``), asynchronous unshard
(``fsdp_async_unshard``) and zero gradients for unused parameters (``fsdp_unused_params``,
public since torch 2.13); DTensor's local offset (``dtensor_offset``); DCP's flattened
metadata keys (``dcp_flat_keys``); transformers' dtype plan (``hf_dtype_plan``), load-time
conversions (``hf_weight_conversions``) and ``_init_weights`` hook (``hf_init_weights``);
``nn.Module``'s set of non-persistent buffers (``module_buffers``).

Set ``ESFT_RS_TEST_HIDE_PRIVATE`` to piece names (comma-separated) or ``all`` to take the
public paths, as if those pieces were missing (the tests do, under torchrun too).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

PIECES = ("fsdp_in_place_gather", "fsdp_chunked_gather", "fsdp_async_unshard",
          "fsdp_unused_params", "dtensor_offset", "dcp_flat_keys", "hf_dtype_plan",
          "hf_weight_conversions", "hf_init_weights", "module_buffers")


def _hidden(piece: str) -> bool:
    names = os.environ.get("ESFT_RS_TEST_HIDE_PRIVATE", "")
    return piece in names.split(",") or names == "all"


@functools.cache
def _fallback(piece: str, why: str) -> None:
    """Say once per process that ``piece`` takes its public path."""
    warnings.warn(f"esft-rs: {why}; {piece} takes the public path (see"
                  " esft_rs.private_api)", UserWarning, stacklevel=3)


def _probe(piece: str, check: Callable[[], str | None]) -> bool:
    """Whether ``piece`` is there: ``check`` returns None when it is, else what is missing."""
    if _hidden(piece):
        _fallback(piece, "hidden by ESFT_RS_TEST_HIDE_PRIVATE")
        return False
    try:
        why = check()
    except Exception as e:  # an import that fails, a changed signature
        why = f"{type(e).__name__}: {e}".splitlines()[0]
    if why is not None:
        import torch

        _fallback(piece, f"torch {torch.__version__}: {why}")
        return False
    return True


def clear() -> None:
    """Probe again (tests change what is installed)."""
    _fsdp_in_place.cache_clear()
    _fsdp_chunked.cache_clear()
    _fsdp_async.cache_clear()
    _fsdp_unused.cache_clear()
    _fallback.cache_clear()


# --- FSDP2 ---------------------------------------------------------------------------

_PARAM_METHODS = ("init_all_gather_outputs", "alloc_all_gather_outputs")


@functools.cache
def _fsdp_in_place() -> bool:
    def check() -> str | None:
        import torch
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives, _fsdp_param

        missing = [f"FSDPParam.{a}" for a in _PARAM_METHODS
                   if not callable(getattr(_fsdp_param.FSDPParam, a, None))]
        if not callable(getattr(_fsdp_collectives, "_default_all_gather_output_fn", None)):
            missing.append("_default_all_gather_output_fn")
        if not hasattr(FSDPModule, "_get_fsdp_state"):
            missing.append("FSDPModule._get_fsdp_state")
        if not callable(getattr(torch._C._autograd, "_unsafe_set_version_counter", None)):
            missing.append("_unsafe_set_version_counter")
        return f"FSDP2 has no {', '.join(missing)}" if missing else None

    return _fsdp_chunked() and _probe("fsdp_in_place_gather", check)


def _fsdp_method(piece: str, name: str) -> bool:
    """Whether ``FSDPModule`` has method ``name`` (``piece`` in the probe's warning)."""
    def check() -> str | None:
        from torch.distributed.fsdp import FSDPModule

        ok = callable(getattr(FSDPModule, name, None))
        return None if ok else f"FSDPModule has no {name}"

    return _probe(piece, check)


@functools.cache
def _fsdp_chunked() -> bool:
    return _fsdp_method("fsdp_chunked_gather", "set_custom_all_gather")


@functools.cache
def _fsdp_async() -> bool:
    return _fsdp_method("fsdp_async_unshard", "_set_unshard_async_op")


@functools.cache
def _fsdp_unused() -> bool:
    return _fsdp_method("fsdp_unused_params", "set_reduce_scatter_unused_params")


def set_reduce_unused(module: Any) -> bool:
    """Have FSDP2 reduce-scatter zeros for the parameters of ``module`` (and its FSDP2
    submodules) that got no gradient on a rank; False where it cannot (torch < 2.13):
    the caller then gives them zero gradients itself."""
    if not _fsdp_unused():
        return False
    module.set_reduce_scatter_unused_params(True)
    return True


def set_unshard_async(module: Any) -> None:
    """Issue ``module``'s all-gathers without waiting (CPU prefetch), where FSDP2 can."""
    if _fsdp_async():
        module._set_unshard_async_op(True)


def can_set_all_gather() -> bool:
    """Whether FSDP2 takes a custom all-gather (``FSDPModule.set_custom_all_gather``)."""
    return _fsdp_chunked()


def in_place_group(module: Any) -> Any | None:
    """``module``'s one FSDP2 parameter group when an all-gather can land in its
    parameters' own storage (each sharded on dim 0, one all-gather input, no CPU offload,
    FSDP2's own copy-out in place); else None, and the flat way is taken."""
    if not _fsdp_in_place():
        return None
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    groups = module._get_fsdp_state()._fsdp_param_groups
    if len(groups) != 1:
        return None
    group = groups[0]
    if (getattr(group, "_all_gather_output_fn", None)
            is not _fsdp_collectives._default_all_gather_output_fn):
        _fallback("fsdp_in_place_gather", "FSDP2's parameter group has another copy-out")
        return None
    params = group.fsdp_params
    if not all(hasattr(type(p), "all_gather_inputs") and hasattr(p, "_sharded_local_tensor")
               for p in params):
        _fallback("fsdp_in_place_gather", "FSDP2's parameters have no all_gather_inputs")
        return None
    if all(p.fsdp_placement.dim == 0 and not p.offload_to_cpu
           and not hasattr(p._sharded_local_tensor, "fsdp_pre_all_gather") for p in params):
        return group
    return None


def set_copy_out(group: Any, copy_out: Callable[..., None]) -> None:
    """Replace FSDP2's copy-out of ``group`` (called once its all-gather is done)."""
    group._all_gather_output_fn = copy_out


def gather_inputs(group: Any) -> list[Sequence[Any]]:
    """The tensors FSDP2's copy-in read for each parameter of ``group``, in its order."""
    return [p.all_gather_inputs for p in group.fsdp_params]


def unsharded_output(param: Any, source: Any, world: int) -> Any:
    """FSDP2 parameter ``param``'s unsharded storage for ``world`` shards like ``source``,
    allocated as FSDP2's copy-out would."""
    param.init_all_gather_outputs([source.numel()], [source.dtype], world, source.device)
    param.alloc_all_gather_outputs()
    (out,) = param.all_gather_outputs
    return out


def version(t: Any) -> int:
    """Autograd's version counter of ``t`` (bumped by every in-place write)."""
    return int(t._version)


def set_versions(tensors: Sequence[Any], versions: Sequence[int]) -> None:
    """Put back autograd's version counters of ``tensors`` (a write autograd must not see)."""
    import torch

    torch._C._autograd._unsafe_set_version_counter(tuple(tensors), tuple(versions))


# --- DTensor -------------------------------------------------------------------------

def local_shape_and_offset(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset in the whole tensor) of DTensor ``t``'s local part on this rank."""
    def check() -> str | None:
        from torch.distributed.tensor import _utils

        ok = callable(getattr(_utils, "compute_local_shape_and_global_offset", None))
        return None if ok else "no compute_local_shape_and_global_offset"

    if _probe("dtensor_offset", check):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh,
                                                              t.placements)
        return tuple(shape), tuple(offset)
    mesh = t.device_mesh
    return shard_extent(tuple(t.shape), tuple(mesh.shape), tuple(mesh.get_coordinate()),
                        t.placements)


def shard_extent(shape: tuple[int, ...], mesh: tuple[int, ...], coordinate: tuple[int, ...],
                 placements: Sequence[Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The public path of ``local_shape_and_offset``: each ``Shard(d)`` placement (mesh
    dims in order) splits what is left of dim d as ``torch.chunk`` does (ceil-sized
    pieces, the last ones shorter or empty); other placements keep it whole."""
    size, offset = list(shape), [0] * len(shape)
    for mesh_dim, placement in enumerate(placements):
        d = getattr(placement, "dim", None)
        if d is None or not placement.is_shard():
            continue
        d %= len(shape)
        n, k = size[d], mesh[mesh_dim]
        chunk = -(-n // k)
        start = min(coordinate[mesh_dim] * chunk, n)
        size[d] = min(chunk, n - start)
        offset[d] += start
    return tuple(size), tuple(offset)


# --- torch.distributed.checkpoint ------------------------------------------------------

def had_state(saved_keys: set[str], prefix: str) -> bool | None:
    """Whether a DCP checkpoint with metadata keys ``saved_keys`` holds an entry under the
    nested-dict path ``prefix`` (``optimizer.state.FQN``); None when its keys are not
    flattened dotted paths (the caller then loads everything)."""
    def check() -> str | None:
        flat = not saved_keys or any("." in k for k in saved_keys)
        return None if flat else "DCP's metadata keys are not dotted paths"

    if not _probe("dcp_flat_keys", check):
        return None
    return any(k.startswith(f"{prefix}.") for k in saved_keys)


def nested_keys(saved_keys: set[str], top: str) -> set[str] | None:
    """The keys under ``top`` of the nested dict a DCP checkpoint saved (``ep`` ->
    ``{"layers.1...", ...}``); None when its keys are not flattened dotted paths."""
    if had_state(saved_keys, top) is None:
        return None
    return {k.removeprefix(f"{top}.") for k in saved_keys if k.startswith(f"{top}.")}


# --- transformers --------------------------------------------------------------------

def dtype_plan(model: Any, dtype: Any) -> tuple[dict[str, Any], Callable[[str], Any]] | None:
    """(patterns -> dtype, name -> its dtype or None) of the tensors transformers keeps in
    another dtype than ``dtype`` when it loads ``model``; None when it keeps none."""
    def check() -> str | None:
        from transformers.core_model_loading import build_glob_alternation  # noqa: F401

        ok = callable(getattr(model, "_get_dtype_plan", None))
        return None if ok else "transformers models have no _get_dtype_plan"

    if not _probe("hf_dtype_plan", check):
        return None
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype)
    if not plan:
        return None
    pattern, by_group, _ = build_glob_alternation(list(plan))

    def of(name: str) -> Any:
        found = pattern.search(name)
        return None if found is None else plan[by_group[found.lastgroup]]

    return plan, of


def weight_conversions(model: Any) -> Any:
    """The conversions transformers applied when it loaded ``model`` (None if unknown)."""
    return getattr(model, "_weight_conversions", None)


def set_weight_conversions(model: Any, conversions: Any) -> bool:
    """Replace ``model``'s load-time conversions (what ``revert_weight_conversion`` reads);
    False (nothing changed) when transformers keeps them elsewhere."""
    if not _probe("hf_weight_conversions",
                  lambda: None if hasattr(model, "_weight_conversions")
                  else "the model has no _weight_conversions"):
        return False
    model._weight_conversions = conversions
    return True


def init_weights(model: Any, module: Any) -> None:
    """``model``'s own initialisation of ``module`` (``PreTrainedModel._init_weights``, the
    hook each family defines); it alone computes buffers such as rotary ``inv_freq``."""
    init = getattr(model, "_init_weights", None)
    if not callable(init):
        from esft_rs.errors import EsftError

        raise EsftError(f"{type(model).__name__}: this transformers has no _init_weights,"
                        " which esft-rs needs to compute the model's buffers")
    init(module)


def mark_initialized(t: Any) -> None:
    """Tell transformers' ``_init_weights`` that ``t`` is loaded: it leaves it alone."""
    t._is_hf_initialized = True


# --- torch.nn.Module -----------------------------------------------------------------

def non_persistent_buffers(module: Any) -> set[str]:
    """Names of ``module``'s own buffers that its state dict leaves out."""
    found = getattr(module, "_non_persistent_buffers_set", None)
    if isinstance(found, set) and not _hidden("module_buffers"):
        return found
    own = {n for n, _ in module.named_buffers(recurse=False)}
    return own - set(module.state_dict(keep_vars=True))

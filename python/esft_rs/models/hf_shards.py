"""transformers families built on the meta device, then filled shard by shard from safetensors.

``meta`` builds the model ``from_pretrained`` would give (same class, dtype, attention
and experts implementations) with no memory, and checks every tensor it needs against
the checkpoint's headers. Once FSDP has sharded it, ``fill`` gives each rank's
shards their values, reading only this rank's rows from the files (positional reads of
their bytes, ``esft_rs.models.rows``). Unsharded, the same two load a whole model with
no second copy (``hf.load``).

The in-memory layout comes from transformers' own load-time conversion
(``get_model_conversion_mapping``: renamings, then ``WeightConverter``s such as
per-expert ``experts.E.gate_proj.weight`` + ``up_proj`` -> fused ``gate_up_proj``
[E, 2I, H]). A converter that stacks per-expert tensors on dim 0 and then only
works on later dims (``MergeModulelist(0)`` then ``Concatenate(dim >= 1)``) is run
on this rank's experts alone; any other converter falls back to reading the whole
tensor (said in a warning). Block-FP8 weights (F8_E4M3 + ``weight_scale_inv``) are
dequantised as transformers does (fp32 product, cast to the model's dtype), from the
weight rows and the scale rows covering them only.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from esft_rs.errors import EsftError, InvalidFileError
from esft_rs.files.dtypes import FLOAT, to_torch
from esft_rs.files.inspection import inspect
from esft_rs.models import hf_family
from esft_rs.models.expert_rows import FusedSlices, rows_of
from esft_rs.models.rows import Rows, local_rows
from esft_rs.private_api import (
    dtype_plan,
    init_weights,
    local_shape_and_offset,
    mark_initialized,
    non_persistent_buffers,
)

log = logging.getLogger(__name__)

FP8 = "F8_E4M3"
SCALE = "_scale_inv"


def meta(directory: str | os.PathLike[str], dtype: torch.dtype | None = None
         ) -> torch.nn.Module:
    """The transformers model of ``directory`` on the meta device, as ``from_pretrained``
    builds it (``dtype``: config.json's by default).

    Raises ``InvalidFileError`` (one line) for an unsupported family or quantisation,
    a tensor the model needs that the checkpoint lacks, or one of the wrong shape.
    """
    root = Path(directory)
    hf_family.check_family(root)
    transformers = hf_family.require_transformers()
    try:
        config = hf_family.config(root)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidFileError(f"{root}: transformers cannot load it: {first}") from None
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(
            quant, "quant_method", None)
        if str(getattr(method, "value", method)) != "fp8":
            raise InvalidFileError(
                f"{root / 'config.json'}: quantization {method!r} cannot be loaded shard by"
                " shard (block FP8 can)")
        del config.quantization_config  # dequantised here, as transformers does on CPU
    dtype = dtype or config.dtype or _disk_dtype(root)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    _keep_dtypes(model, dtype)
    model.config.use_cache = False
    Plan(model, root, _names(model))  # refuses a checkpoint that does not fit, before any read
    hf_family.routers(model)
    # the dtype each tensor is loaded in, as hf.load does, even where training later
    # keeps fp32 masters (they are cast from it, as from a model loaded whole)
    model._esft_load_dtypes = {name: t.dtype for name, t in _persistent(model)}
    return model.eval()


def fill(model: torch.nn.Module, directory: str | os.PathLike[str], device: torch.device) -> int:
    """Give every parameter and buffer of a (sharded) meta transformers ``model`` its values:
    this rank's rows of each, read from ``directory``; returns the bytes read from disk."""
    names = _names(model)
    plan = Plan(model, Path(directory), names)
    dtypes = getattr(model, "_esft_load_dtypes", {})
    model.to_empty(device=device)
    with torch.no_grad(), ExitStack() as files:
        reader = _Reader(plan, files)
        for name, t in _persistent(model):
            target = names[name]
            held = rows_of(model, target)  # expert parallelism: these experts' rows only
            for local, rows in local_rows(t):
                which = rows if held is None else list(held[0][rows])
                local.copy_(reader.rows(target, which, dtypes.get(target, t.dtype)))
        for owner, attr, slices in _fused_slices(model):
            original = owner.parametrizations[attr].original
            target = names[_state_name(model, original)]
            slices.ids.copy_(torch.tensor(slices.rows, dtype=torch.long))
            dtype = dtypes.get(target, original.dtype)
            for local, part in _slice_parts(slices.slices):
                # the trained experts' tensors are read whole, then this rank's part taken
                local.copy_(reader.rows(target, list(slices.experts[part[0]]), dtype)[part])
    _init_buffers(model)
    return reader.bytes


def _slice_parts(t: torch.Tensor) -> list[tuple[torch.Tensor, tuple[slice, ...]]]:
    """(this rank's part of trained slices ``t``, its index in ``t``): FSDP splits them on
    dim 1 (``sharding``), expert parallelism not at all; none when the rank holds none."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return [(t, (slice(0, t.shape[0]),))] if t.numel() else []
    local = t.to_local()
    if not local.numel():
        return []
    shape, offset = local_shape_and_offset(t)
    return [(local, tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True)))]


def _keep_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Tensors the model keeps in another dtype than ``dtype`` (its ``dtype_plan``, e.g.
    DeepSeek-V3's fp32 ``e_score_correction_bias`` in a bf16 model), as transformers
    casts them on load."""
    plan = dtype_plan(model, dtype)
    if plan is None:
        return
    _, dtype_of = plan
    for name, t in _persistent(model):
        if (kept := dtype_of(name)) is None:
            continue
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        cast = t.detach().to(kept)
        if isinstance(t, torch.nn.Parameter):
            module.register_parameter(attr, torch.nn.Parameter(cast, requires_grad=t.requires_grad))
        else:
            module.register_buffer(attr, cast)  # persistent: _persistent lists no other


def _disk_dtype(root: Path) -> torch.dtype:
    """The first float dtype among the checkpoint's tensors (``dtype="auto"`` without one
    in config.json, as transformers decides)."""
    found = (to_torch(t.dtype) for t in inspect(root).tensors.values() if t.dtype in FLOAT)
    return next(found, torch.float32)


@dataclass
class Group:
    """The checkpoint tensors one in-memory tensor is made of."""

    converter: Any  # a transformers WeightConverter, or None: one tensor, renamed at most
    sources: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))


class Plan:
    """In-memory name -> its checkpoint tensors, through transformers' conversion mapping,
    checked: every tensor of the model exists on disk with the shape the model needs."""

    def __init__(self, model: torch.nn.Module, root: Path, names: dict[str, str]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        info = inspect(root)
        self.model, self.root, self.tensors = model, root, info.tensors
        self.block = info.fp8.block_size if info.fp8 is not None else (128, 128)
        shapes = _shapes(model, names)
        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        self.groups: dict[str, Group] = {}
        for key in sorted(self.tensors, key=dot_natural_key):
            if self.is_scale(key):
                continue
            target, pattern = rename_source_key(key, renamings, converters,
                                                model.base_model_prefix, shapes)
            if target not in shapes and key in shapes:
                target, pattern = key, None
            if target not in shapes:
                continue  # transformers ignores what the model does not hold; so does hf.load
            group = self.groups.setdefault(
                target, Group(by_pattern[pattern] if pattern is not None else None))
            group.sources[pattern if pattern is not None else key].append(key)
        self.made: dict[str, str] = {}  # in-memory name -> the group that makes it
        for first, group in self.groups.items():
            self._check_count(first, group, shapes[first])
            for name, value in self.convert(first, group, None, meta=True).items():
                self.made[name] = first
                if name in shapes and tuple(value.shape) != shapes[name]:
                    raise InvalidFileError(
                        f"{root}: tensor {name} has shape {list(value.shape)}, config.json needs"
                        f" {list(shapes[name])} (a tensor missing from a fused expert group"
                        " shortens it)")
        if missing := sorted(set(shapes) - set(self.made)):
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InvalidFileError(f"{root}: the checkpoint has no tensor {missing[0]}{more}")
        self.shapes = shapes

    def _check_count(self, first: str, group: Group, shape: tuple[int, ...]) -> None:
        """A group stacked on dim 0 needs one tensor per row of each kind (per expert)."""
        if group.converter is None or not self.per_slice(group):
            return
        for pattern, keys in group.sources.items():
            if len(keys) != shape[0]:
                raise InvalidFileError(
                    f"{self.root}: tensor {first} is made of {shape[0]} tensors"
                    f" {pattern.strip('.')} (one per expert); the checkpoint has {len(keys)}")

    def is_scale(self, key: str) -> bool:
        base = self.tensors.get(key.removesuffix(SCALE)) if key.endswith(SCALE) else None
        return base is not None and base.dtype == FP8

    def per_slice(self, group: Group) -> bool:
        """Whether ``group``'s conversion can run on some experts alone: it stacks them on
        dim 0 first and then works on later dims only."""
        if group.converter is None:
            return True
        ops = group.converter.operations
        return (type(ops[0]).__name__ == "MergeModulelist" and getattr(ops[0], "dim", None) == 0
                and all(type(op).__name__ == "Concatenate" and op.dim >= 1 for op in ops[1:]))

    def convert(self, first: str, group: Group, read: Any, *, meta: bool,
                 index: list[int] | None = None) -> dict[str, torch.Tensor]:
        """transformers' conversion of ``group``'s sources (the ``index``-th of each list,
        else all), each produced by ``read(key)`` (or empty on the meta device)."""
        def source(key: str) -> Any:
            if meta:
                return lambda: torch.empty(self.tensors[key].shape, device="meta")
            return lambda: read(key)

        if group.converter is None:
            (key,) = next(iter(group.sources.values()))
            return {first: source(key)()}
        converter = copy.deepcopy(group.converter)
        for pattern, keys in group.sources.items():
            for i in index if index is not None else range(len(keys)):
                converter.add_tensor(first, keys[i], pattern, source(keys[i]))
        try:
            out = converter.convert(first, model=self.model, config=self.model.config)
        except Exception as e:  # transformers raises whatever its ops raise
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidFileError(
                f"{self.root}: cannot convert the tensors of {first}: {first_line}") from None
        return {k: v[0] if isinstance(v, list) else v for k, v in out.items()}


class _Reader:
    """Reads rows of in-memory tensors from the checkpoint (``esft_rs.models.rows``: this
    rank's bytes only), counting the bytes it reads."""

    def __init__(self, plan: Plan, files: ExitStack) -> None:
        self.plan = plan
        self._rows = files.enter_context(Rows(plan.root, plan.tensors))
        self._warned: set[str] = set()

    @property
    def bytes(self) -> int:
        return self._rows.bytes

    def _take(self, key: str, rows: slice) -> torch.Tensor:
        return self._rows.read(key, rows)

    def disk_rows(self, key: str, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """Rows of one checkpoint tensor in ``dtype``; block-FP8 dequantised from the scale
        rows that cover them."""
        info = self.plan.tensors[key]
        if info.dtype != FP8 or key + SCALE not in self.plan.tensors:
            return self._take(key, rows).to(dtype)
        start, stop, _ = rows.indices(info.shape[0])
        b0, b1 = self.plan.block
        q = self._take(key, slice(start, stop)).float()
        scale = self._take(key + SCALE, slice(start // b0, -(-stop // b0))).float()
        full = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)
        skip = start - (start // b0) * b0
        return (q * full[skip:skip + stop - start, :q.shape[1]]).to(dtype)

    def rows(self, name: str, rows: slice | list[int], dtype: torch.dtype) -> torch.Tensor:
        """Rows (dim 0) of in-memory tensor ``name``: a range, or a list of expert ids."""
        plan = self.plan
        first = plan.made[name]
        group = plan.groups[first]
        if first == name and group.converter is None:
            (key,) = next(iter(group.sources.values()))
            if isinstance(rows, slice):
                return self.disk_rows(key, rows, dtype)
            return torch.cat([self.disk_rows(key, slice(r, r + 1), dtype) for r in rows])
        ids = list(range(*rows.indices(plan.shapes[name][0]))) if isinstance(rows, slice) \
            else rows
        whole = slice(None)
        if first == name and plan.per_slice(group) and self._stacks_experts(group, name):
            return plan.convert(first, group, lambda k: self.disk_rows(k, whole, dtype),
                                 meta=False, index=ids)[name]
        if name not in self._warned:
            self._warned.add(name)
            ops = ", ".join(type(op).__name__ for op in group.converter.operations)
            log.warning("%s: transformers' conversion (%s) cannot run per shard; this rank"
                        " reads the whole tensor", name, ops)
        made = plan.convert(first, group, lambda k: self.disk_rows(k, whole, dtype),
                             meta=False)[name]
        return made[ids]

    def _stacks_experts(self, group: Group, name: str) -> bool:
        """Each source list holds one tensor per row of ``name`` (an expert each)."""
        rows = self.plan.shapes[name][0]
        return all(len(keys) == rows for keys in group.sources.values())


def _names(model: torch.nn.Module) -> dict[str, str]:
    """Model state name -> the in-memory name transformers knows it by (a parametrised
    tensor's ``parametrizations.X.original`` is ``X``)."""
    out = {}
    for name, _ in _persistent(model):
        owner, _, attr = name.rpartition(".")
        if attr == "original" and ".parametrizations." in f".{owner}":
            head, _, parametrised = owner.rpartition(".")
            name_in_memory = head.removesuffix("parametrizations").removesuffix(".")
            out[name] = f"{name_in_memory}.{parametrised}" if name_in_memory else parametrised
        else:
            out[name] = name
    return out


def _persistent(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers (what a checkpoint holds), by state-dict name;
    FusedSlices' own parameters aside (``fill`` reads them as rows of their tensor)."""
    skip = {id(m.slices) for m in model.modules() if isinstance(m, FusedSlices)}

    out = [(n, p) for n, p in model.named_parameters() if id(p) not in skip]
    for mod_name, module in model.named_modules():
        transient = non_persistent_buffers(module)
        for b_name, b in module.named_buffers(recurse=False):
            if b_name not in transient:
                out.append((f"{mod_name}.{b_name}" if mod_name else b_name, b))
    return out


def _shapes(model: torch.nn.Module, names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """In-memory name -> the shape the checkpoint makes it (all experts, where expert
    parallelism holds some)."""
    out = {}
    for n, t in _persistent(model):
        held = rows_of(model, names[n])
        out[names[n]] = tuple(t.shape) if held is None else (held[1], *t.shape[1:])
    return out


def _fused_slices(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Any]]:
    """(module, attribute, its FusedSlices) for every fused tensor trained in slices."""
    return [(m, attr, plist[0]) for m in model.modules()
            for attr, plist in getattr(m, "parametrizations", {}).items()
            if isinstance(plist[0], FusedSlices)]


def _state_name(model: torch.nn.Module, t: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is t)


def _init_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (rotary ``inv_freq``, not in checkpoints), computed as
    ``from_pretrained`` does: the model's ``_init_weights`` on their modules, with every
    loaded tensor marked initialised so that nothing else is touched."""
    from transformers import initialization

    owners = [m for m in model.modules() if not isinstance(m, FusedSlices)
              and any(n in non_persistent_buffers(m) for n, _ in m.named_buffers(recurse=False))]
    if not owners:
        return
    unset: dict[str, torch.Tensor] = {}
    for mod_name, m in model.named_modules():
        if m not in owners:
            continue
        for p in m.parameters(recurse=False):
            mark_initialized(p)
        transient = non_persistent_buffers(m)
        for n, b in m.named_buffers(recurse=False):
            if n in transient:
                b.fill_(float("nan") if b.is_floating_point() else torch.iinfo(b.dtype).min)
                unset[f"{mod_name}.{n}"] = b
            else:
                mark_initialized(b)
    with torch.no_grad(), initialization.guard_torch_init_functions():
        for m in owners:
            init_weights(model, m)
    for name, b in unset.items():
        blank = b.isnan() if b.is_floating_point() else b.eq(torch.iinfo(b.dtype).min)
        if b.numel() and bool(blank.all()):
            raise EsftError(f"{type(model).__name__}: its init does not compute buffer {name}")

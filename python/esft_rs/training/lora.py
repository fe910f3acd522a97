"""ESFT-LoRA: low-rank adapters on the selected experts only, everything else frozen.

Every targeted projection W [out, in] of a selected expert (named as the checkpoint
stores it) reads as ``(W.float() + alpha / r * B @ A).to(W.dtype)``, with A [r, in]
initialised as PEFT does (Kaiming-uniform, a = sqrt(5)) and B [out, r] at zero: step 0
is the base model, and the forward uses, bit for bit, the weights a merge of the
adapter gives (the format's rule, ``docs/guide.md#esft-lora``).

How: a parametrization. A per-expert ``nn.Linear`` weight gets ``LoraDelta``; a fused
``[E, out, in]`` tensor (transformers v5 ``experts.gate_up_proj``/``down_proj``) gets
``LoraSlices``, a ``FusedSlices`` whose slices are computed from a frozen copy of the
selected rows and the LoRA factors, so that the fused experts' own kernels and
``slice_grads`` work unchanged. One checkpoint tensor of a fused row block (gate_proj
and up_proj inside gate_up_proj) has its own A and B. Why not a forward wrapper
(y += s * x A^T B^T, PEFT's way): it needs each family's experts forward rewritten,
and it is not the merged model's arithmetic. The cost is transient: the selected
experts' merged weights live during a forward/backward (in the model's dtype, fp32 for
fused slices), none of it is kept between steps, and AdamW state and fp32 masters
exist for the factors only.

Shared experts and non-expert modules, when the expert config trains them, train in
full as in ESFT (``freeze``), and the adapter holds them under their plain names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from esft_rs.errors import MismatchError, option
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.files.naming import classify, fused_slice_name, projection
from esft_rs.models import to_checkpoint
from esft_rs.models.expert_rows import expert_rows
from esft_rs.training.freeze import (
    FusedSlices,
    Trainable,
    checkpoint_layout,
    checkpoint_shapes,
    checkpoint_tensors,
    freeze,
    split_weight_grads,
)

if TYPE_CHECKING:
    from esft_rs.training.config import TrainConfig

#: the adapter's ``__metadata__`` key that marks a LoRA adapter (``docs/guide.md#esft-lora``)
KEY = "esft.lora"


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # as the checkpoint names the projections; empty: all

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def of(cls, cfg: TrainConfig) -> LoraSpec | None:
        if not cfg.lora_rank:
            return None
        return cls(cfg.lora_rank, cfg.lora_alpha, parse_targets(cfg.lora_targets))


def parse_targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def metadata(spec: LoraSpec, targets: list[str]) -> dict[str, str]:
    return {KEY: json.dumps({"rank": spec.rank, "alpha": spec.alpha, "targets": targets})}


def adapter_base(name: str) -> str:
    """The stem of a LoRA pair: the checkpoint name without its trailing ``.weight``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


@dataclass
class LoraTrainable(Trainable):
    """A LoRA factor: ``names`` are its adapter names, one per row of a stacked factor
    ([n, r, in] for n experts of a fused tensor), or one for a per-expert factor."""

    names: tuple[str, ...] = ()
    stored: tuple[str, ...] = ()  # the checkpoint tensors they change, row by row
    base_shape: tuple[int, ...] = ()  # [out, in] of each
    stacked: bool = False

    def current(self, value: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        p = self.param.detach() if value is None else value
        if not self.stacked:
            return {self.names[0]: p.to(self.dtype)}
        return {n: p[i].to(self.dtype) for i, n in enumerate(self.names)}


class LoraDelta(torch.nn.Module):
    """Parametrization of one expert's [out, in] weight: W + scale * B @ A in fp32, in W's
    dtype."""

    def __init__(self, out: int, inp: int, rank: int, scale: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.scale = scale
        self.lora_A = torch.nn.Parameter(_kaiming(torch.empty(rank, inp), generator))
        self.lora_B = torch.nn.Parameter(torch.zeros(out, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            delta = self.lora_B @ self.lora_A
            return (weight.float() + self.scale * delta).to(weight.dtype)


class LoraSlices(FusedSlices):
    """The selected experts' rows of a fused [E, out, in] tensor, as LoRA makes them: a
    frozen copy of the base rows plus, per targeted row block [a, b) of ``out`` (one
    checkpoint tensor each), scale * B @ A. Read through ``slices`` (fp32, differentiable
    in the factors), as ``FusedSlices`` reads its trained parameter."""

    def __init__(self, original: torch.Tensor, ids: list[int], experts: list[int],
                 blocks: list[tuple[int, int, bool]], rank: int, scale: float,
                 generator: torch.Generator) -> None:
        torch.nn.Module.__init__(self)
        self.experts, self.rows, self.split = tuple(experts), tuple(ids), False
        index = torch.tensor(ids, dtype=torch.long, device=original.device)
        self.register_buffer("ids", index, persistent=False)
        self.register_buffer("base", original.detach().index_select(0, index).clone(),
                             persistent=False)
        self.scale, self.blocks = scale, [(a, b, t) for a, b, t in blocks]
        n, inp = len(ids), original.shape[2]
        for k, (a, b, targeted) in enumerate(blocks):
            if targeted:
                factor = torch.empty(n, rank, inp)
                for i in range(n):
                    _kaiming(factor[i], generator)
                setattr(self, f"lora_A{k}", torch.nn.Parameter(factor))
                setattr(self, f"lora_B{k}", torch.nn.Parameter(torch.zeros(n, b - a, rank)))

    @property
    def slices(self) -> torch.Tensor:  # type: ignore[override]
        base = self.base.float()
        with torch.autocast(base.device.type, enabled=False):
            parts = [base[:, a:b] + self.scale * (getattr(self, f"lora_B{k}")
                                                  @ getattr(self, f"lora_A{k}"))
                     if targeted else base[:, a:b]
                     for k, (a, b, targeted) in enumerate(self.blocks)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _kaiming(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PEFT's init of lora_A (nn.Linear's: Kaiming-uniform with a = sqrt(5)), seeded."""
    with torch.no_grad():
        return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


def attach(model: torch.nn.Module, experts: ExpertConfig, spec: LoraSpec, seed: int
           ) -> tuple[list[Trainable], list[str]]:
    """Freeze ``model``, train what ``experts`` says outside the routed experts in full,
    and parametrise the selected experts' targeted projections with LoRA factors (seeded
    by ``seed``: every process makes the same). Returns what trains and the targets (as
    the checkpoint names them). Raises ``MismatchError`` (one line) for a target the
    model's experts do not have, or a fused layout that is not row blocks of its
    checkpoint tensors."""
    others = ExpertConfig({}, experts.shared_experts, experts.non_expert_modules)
    if others.shared_experts or others.non_expert_modules:
        trainables = freeze(model, others)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        trainables = []
    generator = torch.Generator().manual_seed(seed)
    # (parameter, None or a fused tensor's (rows, experts), its checkpoint tensors)
    plans: list[tuple[str, Any, Any]] = []
    found: set[str] = set()
    for name, p in model.named_parameters():
        role = classify(name)
        chosen = experts.experts.get(role.layer, ()) if role.layer is not None else ()
        if role.kind == "routed_expert" and role.expert in chosen and p.ndim == 2:
            stored = _stored(model, name, p)
            found |= {projection(n) for n, _, _ in stored}
            plans.append((name, None, stored))
        elif role.kind == "fused_experts" and chosen and p.ndim == 3:
            owner = model.get_submodule(name.rpartition(".")[0])
            rows = expert_rows(owner)
            ids = [i for i, e in enumerate(rows) if e in chosen] if rows else list(chosen)
            held = [rows[i] for i in ids] if rows else list(chosen)
            blocks = _fused_blocks(model, name, p, held)
            found |= {projection(n) for n, _, _ in blocks[held[0]]}
            plans.append((name, (ids, held), blocks))
    targets = list(spec.targets) or sorted(found)
    unknown = [t for t in targets if t not in found]
    if unknown:
        raise MismatchError(
            f"{option('lora_targets')}: the selected experts have no projection"
            f" {unknown[0]!r} (they have: {', '.join(sorted(found)) or 'none'})")
    for name, fused, stored in plans:  # a rank above min(out, in) adds no expressiveness
        inp = model.get_parameter(name).shape[-1]
        for key, a, b in stored if fused is None else stored[fused[1][0]]:
            if projection(key) in targets and spec.rank > min(b - a, inp):
                raise MismatchError(
                    f"{option('lora_rank', spec.rank)}: above the smallest dimension of"
                    f" {key} ({min(b - a, inp)}), a targeted expert projection")
    fused_modules = {}
    for name, fused, stored in plans:
        if fused is None:
            trainables += _per_expert(model, name, stored, targets, spec, generator)
        else:
            trainables += _fused(model, name, fused, stored, targets, spec, generator)
            owner = name.rpartition(".")[0]
            fused_modules[owner] = model.get_submodule(owner)
    for module in fused_modules.values():  # the slices' gradients alone, as ESFT's
        split_weight_grads(module)
    if not any(isinstance(t, LoraTrainable) for t in trainables):
        raise MismatchError("the expert config selects no expert of this model for LoRA")
    return trainables, [t for t in sorted(found) if t in targets]


def _stored(model: torch.nn.Module, name: str, p: torch.Tensor) -> list[tuple[str, int, int]]:
    """A per-expert weight as the checkpoint stores it: (name, 0, out) of one tensor."""
    stored = to_checkpoint(model, name, torch.empty(p.shape, device="meta"))
    if len(stored) != 1 or next(iter(stored.values())).shape != p.shape:
        raise MismatchError(f"ESFT-LoRA: {name} is not one checkpoint tensor of its shape")
    return [(next(iter(stored)), 0, p.shape[0])]


def _fused_blocks(model: torch.nn.Module, name: str, p: torch.Tensor, experts: list[int]
                  ) -> dict[int, list[tuple[str, int, int]]]:
    """Per expert, the checkpoint tensors its rows of fused ``name`` [E, out, in] are
    stored as: (checkpoint name, first row, end row), found by saving a probe that holds
    each row's index (one column: no memory) through the model's own conversion."""
    e_count, out = p.shape[0], p.shape[1]
    probe = torch.arange(e_count * out, dtype=torch.float64).view(e_count, out, 1)
    stored = to_checkpoint(model, name, probe)
    if set(stored) == {name}:  # stored fused, one slice per expert
        return {e: [(fused_slice_name(name, e) or name, 0, out)] for e in experts}
    found: dict[int, list[tuple[str, int, int]]] = {e: [] for e in experts}
    for key, v in stored.items():
        role = classify(key)
        if role.expert not in found:
            continue
        flat = v.reshape(-1)
        first = int(flat[0]) - role.expert * out
        if v.ndim != 2 or v.shape[1] != 1 or not torch.equal(
                flat, torch.arange(int(flat[0]), int(flat[0]) + len(flat), dtype=flat.dtype)):
            raise MismatchError(f"ESFT-LoRA: {name} is not stored as row blocks of per-expert"
                                f" [out, in] tensors ({key}); LoRA cannot target it")
        found[role.expert].append((key, first, first + len(flat)))
    for e, blocks in found.items():
        blocks.sort(key=lambda x: x[1])
        if [b[1] for b in blocks] != [0] + [b[2] for b in blocks[:-1]] or \
                not blocks or blocks[-1][2] != out:
            raise MismatchError(f"ESFT-LoRA: {name}: expert {e}'s rows are not covered by its"
                                " checkpoint tensors")
    return found


def _per_expert(model: torch.nn.Module, name: str, stored: list[tuple[str, int, int]],
                targets: list[str], spec: LoraSpec, generator: torch.Generator
                ) -> list[Trainable]:
    from torch.nn.utils import parametrize

    key = stored[0][0]
    if projection(key) not in targets:
        return []
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    weight = module.get_parameter(attr)
    delta = LoraDelta(weight.shape[0], weight.shape[1], spec.rank, spec.scale, generator)
    delta.to(weight.device)
    parametrize.register_parametrization(module, attr, delta, unsafe=True)
    module.parametrizations[attr].original.requires_grad_(False)
    stem = adapter_base(key)
    return [LoraTrainable(f"{stem}.lora_{x}.weight", delta, f"lora_{x}", torch.float32,
                          names=(f"{stem}.lora_{x}.weight",), stored=(key,),
                          base_shape=tuple(weight.shape)) for x in ("A", "B")]


def _fused(model: torch.nn.Module, name: str, fused: tuple[list[int], list[int]],
           blocks: dict[int, list[tuple[str, int, int]]], targets: list[str], spec: LoraSpec,
           generator: torch.Generator) -> list[Trainable]:
    """``LoraSlices`` over fused ``name``'s selected rows; under it every block is in the
    slices, targeted or not (the experts' forward reads them all), and only targeted
    blocks have factors."""
    from torch.nn.utils import parametrize

    ids, held = fused
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    original = module.get_parameter(attr)
    first = blocks[held[0]]
    layout = [(a, b, projection(k) in targets) for k, a, b in first]
    slices = LoraSlices(original, ids, held, layout, spec.rank, spec.scale, generator)
    parametrize.register_parametrization(module, attr, slices, unsafe=True)
    module.parametrizations[attr].original.requires_grad_(False)
    out: list[Trainable] = []
    for k, (key, a, b) in enumerate(first):
        if not layout[k][2]:
            continue
        stored = tuple(blocks[e][k][0] for e in held)
        for x in ("A", "B"):
            names = tuple(f"{adapter_base(n)}.lora_{x}.weight" for n in stored)
            out.append(LoraTrainable(f"{name}.{projection(key)}.lora_{x}", slices,
                                     f"lora_{x}{k}", torch.float32, tuple(held), names=names,
                                     stored=stored, base_shape=(b - a, original.shape[2]),
                                     stacked=True))
    return out


def split(trainables: list[Trainable]) -> tuple[list[LoraTrainable], list[Trainable]]:
    lora = [t for t in trainables if isinstance(t, LoraTrainable)]
    return lora, [t for t in trainables if not isinstance(t, LoraTrainable)]


def layout(model: torch.nn.Module, trainables: list[Trainable], on_disk: Collection[str] = ()
           ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each adapter tensor, in the order ``tensors`` gives them."""
    out = []
    for t in trainables:
        if isinstance(t, LoraTrainable):
            shape = tuple(t.param.shape[1:] if t.stacked else t.param.shape)
            out += [(n, t.dtype, shape) for n in t.names]
        else:
            out += checkpoint_layout(model, [t], on_disk)
    return out


def tensors(model: torch.nn.Module, trainables: list[Trainable],
            on_disk: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter's tensors, one trained tensor's worth at a time."""
    for t in trainables:
        if isinstance(t, LoraTrainable):
            yield from t.current().items()
        else:
            yield from checkpoint_tensors(model, [t], on_disk).items()


def base_shapes(model: torch.nn.Module, trainables: list[Trainable],
                on_disk: Collection[str] = ()) -> dict[str, tuple[int, ...] | None]:
    """The base checkpoint's tensors the adapter changes, with their shapes: what must
    exist in the base for the adapter to merge."""
    lora, plain = split(trainables)
    out = checkpoint_shapes(model, plain, on_disk)
    for t in lora:
        out.update({n: t.base_shape for n in t.stored})
    return out

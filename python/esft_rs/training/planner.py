"""``esft-rs plan``: the memory a training run needs per rank, from ``config.json`` and
the safetensors headers alone (no torch: ``esft-rs plan`` is a byte-level command).

The layout is the trainer's (``esft_rs.training``), tensor by tensor:

- frozen tensors keep the checkpoint's dtype (block FP8 is dequantised to bf16 on
  load, its scale tensors dropped); a fused expert tensor with trained slices stays
  whole in the frozen storage (the slices are written into its rows);
- trained tensors (fused: the selected slices) are fp32 master weights, with fp32
  gradients and AdamW's two fp32 moments plus a 4-byte step count per tensor;
- transformers families fuse each MoE layer's routed experts in memory into
  ``gate_up_proj`` (gate and up; Mixtral's w1 and w3) and ``down_proj`` (w2);
- with N > 1 ranks, FSDP2 (``parallelism="fsdp"``) shards every tensor on dim 0 as
  ``torch.chunk`` does: rank 0 holds ceil(rows / N) rows of each, the most of any rank,
  and the figures are its (FSDP pads every rank's shard to that size); it all-gathers
  one decoder layer (or the embeddings and head) at a time, in the compute dtype, and
  with ``fsdp_prefetch`` (the default) the next one meanwhile: twice the largest such
  group is added (once without prefetch). DDP (``parallelism="ddp"``) keeps everything
  whole on every rank (its gradient buckets are the gradients: the trainer makes them
  views);
- expert parallelism (``parallelism="ep"``) gives each rank its share of every MoE
  layer's routed experts (``esft_rs.training.placement``, as training places them) and
  keeps everything else whole; the figures are those of the rank that holds the most;
- activations: an estimate for one micro-batch (see ``activation_estimate``);
- ``comm_bytes``: what one rank sends plus receives per optimizer step, at the
  collectives: FSDP's all-gathers of every layer (forward and backward, the last layer
  once) and reduce-scatters of the trained gradients at every micro-step; DDP's ring
  all-reduce of the trained gradients once per step; EP's all-to-alls of the routed
  token rows (and their expert ids) to and from their experts' ranks in every MoE layer,
  forward, backward and the recomputed forward under checkpointing, for tokens routed
  evenly (a share (N-1)/N of them leave the rank), plus the ring all-reduce of the trained
  tensors that are replicated. ``parallelism="auto"`` takes, of those that fit, the one
  that moves the fewest bytes (the least memory when none fits).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esft_rs.errors import InvalidFileError
from esft_rs.files.dtypes import itemsize
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.files.inputs import load_json
from esft_rs.files.naming import classify, projection
from esft_rs.formatting import byte_unit, human_bytes
from esft_rs.training.placement import Placement, place_experts
from esft_rs.training.trained import moe_layout, resolve_experts, tensor_plan

#: block-FP8 tensors are dequantised to bf16 in memory (2 bytes per element)
DEQUANTISED = {"F8_E4M3": 2}
#: tensors a checkpoint holds that are no trainable parameters in memory
NOT_PARAMETERS = ("weight_scale_inv", "e_score_correction_bias")
#: the built-in model keeps every expert as its own tensors
BUILTIN_MODEL_TYPE = "esft_rs_moe"
#: config.json keys the activation estimate cannot do without
REQUIRED = ("hidden_size", "num_hidden_layers", "vocab_size")
MASTER = 4  # fp32 master weights and gradients
ADAM = 8  # AdamW's two fp32 moments
STEP = 4  # AdamW's step count, one fp32 scalar per tensor


PARALLELISMS = ("fsdp", "ddp", "ep")
INDEX = 8  # bytes of an expert id, sent beside each routed row under EP


@dataclass
class _Tensor:
    """One in-memory parameter: ``rows`` along dim 0, ``row`` elements each."""

    layer: int | None
    kind: str  # esft_rs.files.naming's role of the tensor
    rows: int
    row: int
    nbytes: int  # per element, in memory
    trained_rows: int  # 0: frozen; rows: trained whole; between: fused slices
    expert: int | None = None  # a per-expert tensor's expert
    trained_ids: frozenset[int] = frozenset()  # fused: the trained experts (rows)
    inner: int = 0  # fused: an expert's size along dim 1, which FSDP splits its slices on


@dataclass
class _Figures:
    """One parallelism's bytes per rank (its largest rank's) and per step."""

    frozen: int
    masters: int
    optimizer: int
    gather: int
    comm: int

    def total(self, activations: int) -> int:
        return self.frozen + 2 * self.masters + self.optimizer + self.gather + activations


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    mode: str
    nproc: int
    parallelism: str  # fsdp | ddp | ep (with nproc 1 the same); auto: the one chosen
    seq_length: int
    per_device_batch_size: int
    gradient_checkpointing: bool
    device: str
    trained_params: int  # all ranks together, as the run reports it
    frozen_params: int  # of the tensors not wholly trained (a fused tensor's trained rows too)
    total_params: int  # the model's
    frozen_bytes: int  # the rest: per rank
    master_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    gather_bytes: int
    activation_bytes: int
    total_bytes: int
    adapter_bytes: int  # the trained tensors in the checkpoint's dtype: the adapter's size
    gpu_memory: int | None
    fits: bool | None
    comm_bytes: int = 0  # one rank sends plus receives per optimizer step
    gradient_accumulation_steps: int = 16
    # with more than one rank: every parallelism's total_bytes, comm_bytes and fits
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was changed, as train changes it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '81920MiB', '1.5TiB', '123' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 80GiB, 80GB, 81920MiB)")
    unit = m.group(2).upper().removesuffix("B")
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    binary = unit.endswith("I")
    base = 1024 if binary else 1000
    size = int(float(m.group(1)) * base ** powers[unit.removesuffix("I")])
    if size <= 0:
        raise ValueError(f"not a size: {text!r} is no memory at all")
    return size


def plan(
    model: str | os.PathLike[str],
    experts: ExpertConfig | None = None,
    mode: str = "esft",
    *,
    nproc: int = 1,
    parallelism: str = "auto",
    seq_length: int = 4096,
    per_device_batch_size: int = 1,
    gradient_accumulation_steps: int = 16,
    gradient_checkpointing: bool = True,
    fsdp_prefetch: bool = True,
    gpu_memory: int | None = None,
    device: str = "cuda",
    origin: str = "expert config",
    lora_rank: int = 0,
    lora_targets: Sequence[str] = (),
) -> MemoryPlan:
    """The memory per rank of training ``model`` (a checkpoint directory) as configured
    (the largest rank's), and the bytes a rank communicates per optimizer step. Rows longer
    than the model's context are cut to it, as train cuts them (``notes`` says so).
    ``lora_rank``: ESFT-LoRA of that rank on ``lora_targets`` (empty: every projection)."""
    from esft_rs.data.preflight import fit_to_context
    from esft_rs.files.inspection import inspect

    if parallelism not in (*PARALLELISMS, "auto"):
        raise ValueError(f"parallelism must be one of {', '.join(PARALLELISMS)} or auto,"
                         f" not {parallelism!r}")
    if lora_rank and parallelism not in ("ddp", "auto"):
        raise ValueError(f"parallelism {parallelism}: ESFT-LoRA trains under ddp (or auto)"
                         " only")
    root = Path(model)
    config = _config(root)
    context = config.get("max_position_embeddings")
    seq_length, note = fit_to_context(
        seq_length, context if type(context) is int and context > 0 else None)
    info = inspect(root)
    params = {n: t for n, t in info.tensors.items() if not n.endswith(NOT_PARAMETERS)}
    layout = moe_layout((n, t.shape) for n, t in params.items())
    resolved = resolve_experts(layout, experts, mode, 0, origin)
    builtin = config.get("model_type") == BUILTIN_MODEL_TYPE
    lora = None
    if lora_rank:
        lora = _lora(((n, t.dtype, t.shape) for n, t in params.items()), resolved, lora_rank,
                     lora_targets, fuse=not builtin)
        resolved = ExpertConfig({}, resolved.shared_experts, resolved.non_expert_modules)
        parallelism = "ddp"
    tensors = _in_memory(((n, t.dtype, t.shape) for n, t in params.items()), resolved,
                         fuse=not builtin)
    compute = 4 if device == "cpu" and all(
        memory_bytes(t.dtype) == 4 for t in params.values()) else 2
    activations = activation_estimate(
        config, _trained_parts(tensors), tokens=seq_length * per_device_batch_size,
        compute_bytes=compute, checkpointing=gradient_checkpointing)
    traffic = _Traffic(config, layout, nproc, seq_length * per_device_batch_size,
                       gradient_accumulation_steps, compute, gradient_checkpointing)

    def figures(how: str) -> _Figures:
        if lora is not None:
            return lora.figures(tensors, traffic if nproc > 1 else None)
        if nproc > 1 and how == "fsdp":
            return _sharded(tensors, nproc, compute, fsdp_prefetch, traffic)
        if nproc > 1 and how == "ep":
            return _expert_parallel(tensors, place_experts(layout, resolved.experts, nproc),
                                    traffic)
        return _whole(tensors, traffic if nproc > 1 else None)

    options = _options(figures, PARALLELISMS if lora is None else ("ddp",), activations, nproc,
                       gpu_memory)
    chosen = choose(options) if parallelism == "auto" else parallelism
    f = figures(chosen)
    sharded = nproc > 1 and chosen == "fsdp"
    trained, frozen_params, adapter = _parameter_counts(tensors, lora)
    total = f.total(activations)
    fits = None if gpu_memory is None else total <= gpu_memory
    advice = [] if gpu_memory is None or fits else _advice_to_fit(
        f, total, gpu_memory, activations, nproc, gradient_checkpointing, sharded, fsdp_prefetch)
    return MemoryPlan(
        model=str(root), mode=mode, nproc=nproc, parallelism=chosen, seq_length=seq_length,
        per_device_batch_size=per_device_batch_size,
        gradient_checkpointing=gradient_checkpointing, device=device,
        trained_params=trained, frozen_params=frozen_params,
        total_params=sum(t.rows * t.row for t in tensors), frozen_bytes=f.frozen,
        master_bytes=f.masters, grad_bytes=f.masters, optimizer_bytes=f.optimizer,
        gather_bytes=f.gather, activation_bytes=activations, total_bytes=total,
        adapter_bytes=adapter, gpu_memory=gpu_memory, fits=fits, comm_bytes=f.comm,
        gradient_accumulation_steps=gradient_accumulation_steps, options=options,
        advice=advice, notes=[] if note is None else [note],
    )


def _options(figures: Callable[[str], _Figures], hows: Sequence[str], activations: int,
             nproc: int, gpu_memory: int | None) -> dict[str, dict[str, Any]]:
    """Each parallelism's memory per rank and bytes communicated a step, and whether it fits
    (none on one process: nothing to choose)."""
    options: dict[str, dict[str, Any]] = {}
    if nproc > 1:
        for how in hows:
            f = figures(how)
            total = f.total(activations)
            options[how] = {"total_bytes": total, "comm_bytes": f.comm,
                            "fits": None if gpu_memory is None else total <= gpu_memory}
    return options


def _parameter_counts(tensors: Sequence[_Tensor], lora: _Lora | None) -> tuple[int, int, int]:
    """(trained parameters, parameters of tensors not wholly trained, adapter bytes)."""
    trained = sum(t.trained_rows * t.row for t in tensors)
    frozen_params = sum(t.rows * t.row for t in tensors if t.trained_rows < t.rows)
    adapter = sum(t.trained_rows * t.row * t.nbytes for t in tensors)
    if lora is not None:
        trained += lora.params
        adapter += lora.params * MASTER  # the factors are stored in fp32
    return trained, frozen_params, adapter


def _advice_to_fit(f: _Figures, total: int, gpu_memory: int, activations: int, nproc: int,
                   gradient_checkpointing: bool, sharded: bool, fsdp_prefetch: bool
                   ) -> list[str]:
    """What would make a run that does not fit ``gpu_memory`` fit (``_advice``); under FSDP
    with prefetch, first gathering one layer at a time where that is enough."""
    advice = _advice(total, gpu_memory, f.frozen + 2 * f.masters + f.optimizer, activations,
                     nproc, gradient_checkpointing, sharded)
    if advice and sharded and fsdp_prefetch and total - f.gather // 2 <= gpu_memory:
        advice.insert(0, "gather one layer at a time (--no-fsdp-prefetch): slower, one"
                         " gathered layer less")
    return advice


def choose(options: dict[str, dict[str, Any]]) -> str:
    """``auto``: of the parallelisms that fit, the one that moves the fewest bytes; when none
    fits, the one that needs the least memory (ties: the order of ``PARALLELISMS``)."""
    if not options:
        return "fsdp"
    fitting = [p for p in PARALLELISMS if options[p]["fits"] is not False]
    if fitting:
        return min(fitting, key=lambda p: options[p]["comm_bytes"])
    return min(PARALLELISMS, key=lambda p: options[p]["total_bytes"])


@dataclass
class _Traffic:
    """What a step's collectives carry, before the parallelism decides who sends what."""

    config: dict[str, Any]
    layout: dict[int, int]
    nproc: int
    tokens: int  # per rank per micro-step
    micro_steps: int
    compute: int  # bytes per element of activations and gathered weights
    checkpointing: bool

    @property
    def away(self) -> float:
        """The share of a rank's data that a collective exchanges with the others."""
        return (self.nproc - 1) / self.nproc

    def all_reduce(self, nbytes: float) -> int:
        """Ring all-reduce: a reduce-scatter and an all-gather, each sending and receiving
        (N-1)/N of the tensor."""
        return int(4 * self.away * nbytes)

    def tokens_to_experts(self) -> int:
        """EP: every MoE layer sends its routed rows (and their expert ids) out and back, in
        the forward, the backward and (checkpointing) the recomputed forward."""
        h = int(self.config["hidden_size"])
        k = int(self.config.get("num_experts_per_tok") or 1)
        rows = self.tokens * k * self.away
        forwards = 2 if self.checkpointing else 1
        per_layer = (2 * forwards + 2) * rows * h * self.compute + forwards * rows * INDEX
        return int(2 * per_layer * len(self.layout) * self.micro_steps)  # sent and received


def _whole(tensors: list[_Tensor], traffic: _Traffic | None) -> _Figures:
    """Every tensor whole on the rank: one process, or DDP (``traffic``: its all-reduce)."""
    frozen = sum(t.rows * t.row * t.nbytes for t in tensors if t.trained_rows < t.rows)
    masters = sum(t.trained_rows * t.row for t in tensors) * MASTER
    n_trained = sum(1 for t in tensors if t.trained_rows)
    comm = traffic.all_reduce(masters) if traffic is not None else 0
    return _Figures(frozen, masters, masters // MASTER * ADAM + STEP * n_trained, 0, comm)


def _sharded(tensors: list[_Tensor], nproc: int, compute: int, prefetch: bool,
             traffic: _Traffic) -> _Figures:
    """FSDP2: every tensor split on dim 0, rank 0 holding ceil(rows / N) rows of each."""
    def share(rows: int) -> int:
        return math.ceil(rows / nproc)

    def trained(t: _Tensor) -> int:
        """Elements of ``t``'s trained part on rank 0: a fused tensor's slices are split on
        dim 1 (``training.sharding``), anything else on dim 0."""
        if t.kind == "fused_experts" and 0 < t.trained_rows < t.rows:
            return t.trained_rows * share(t.inner) * (t.row // t.inner)
        return share(t.trained_rows) * t.row

    frozen = sum(share(t.rows) * t.row * t.nbytes for t in tensors if t.trained_rows < t.rows)
    masters = sum(trained(t) for t in tensors) * MASTER
    n_trained = sum(1 for t in tensors if t.trained_rows)
    groups: dict[int | None, int] = {}
    for t in tensors:
        groups[t.layer] = groups.get(t.layer, 0) + t.rows * t.row * min(t.nbytes, compute)
    # the running layer, and with prefetch the next one, gathered meanwhile
    gather = (2 if prefetch else 1) * max(groups.values(), default=0)
    layers = [n for layer, n in groups.items() if layer is not None]
    # forward and backward gather every group; the last layer stays gathered in between
    gathered = 2 * sum(groups.values()) - (layers[-1] if layers else 0)
    grads = sum(t.trained_rows * t.row for t in tensors) * MASTER
    comm = int(2 * traffic.away * (gathered + grads)) * traffic.micro_steps
    return _Figures(frozen, masters, masters // MASTER * ADAM + STEP * n_trained, gather, comm)


def _expert_parallel(tensors: list[_Tensor], placement: Placement,
                     traffic: _Traffic) -> _Figures:
    """EP: each rank its experts (``placement``), the rest whole; the largest rank's."""
    best: _Figures | None = None
    replicated = sum(t.trained_rows * t.row for t in tensors
                     if t.kind not in ("routed_expert", "fused_experts")) * MASTER
    comm = traffic.tokens_to_experts() + traffic.all_reduce(replicated)
    for rank in range(placement.world):
        frozen = masters = n_trained = 0
        for t in tensors:
            if t.kind == "fused_experts" and t.layer in placement.owners:
                owned = placement.experts_of(t.layer, rank)
                trained = [e for e in owned if e in t.trained_ids]
                if len(trained) < len(owned):
                    frozen += len(owned) * t.row * t.nbytes
                masters += len(trained) * t.row
                n_trained += bool(trained)
                continue
            if t.kind == "routed_expert" and t.expert is not None and \
                    placement.owners.get(t.layer, ())[t.expert] != rank:
                continue
            if t.trained_rows < t.rows:
                frozen += t.rows * t.row * t.nbytes
            masters += t.trained_rows * t.row
            n_trained += bool(t.trained_rows)
        f = _Figures(frozen, masters * MASTER, masters * ADAM + STEP * n_trained, 0, comm)
        if best is None or f.total(0) > best.total(0):
            best = f
    assert best is not None
    return best


@dataclass
class _Lora:
    """ESFT-LoRA's factors: ``params`` elements in ``tensors`` fp32 tensors (the per-expert
    count; fused in memory they are fewer, stacked, which changes only AdamW's step
    counts), and ``copy`` bytes: the frozen copy of the selected experts' fused rows."""

    params: int
    tensors: int
    copy: int

    def figures(self, tensors: list[_Tensor], traffic: _Traffic | None) -> _Figures:
        """DDP (or one process): the model whole and frozen (but what the expert config
        trains in full), the factors, their gradients and AdamW state whole on each rank."""
        f = _whole(tensors, traffic)
        masters = self.params * MASTER
        comm = f.comm + (traffic.all_reduce(masters) if traffic is not None else 0)
        return _Figures(f.frozen + self.copy, f.masters + masters,
                        f.optimizer + self.params * ADAM + STEP * self.tensors, 0, comm)


def _lora(tensors: Iterable[tuple[str, str, tuple[int, ...]]], experts: ExpertConfig,
          rank: int, targets: Sequence[str], *, fuse: bool) -> _Lora:
    """The factors of the selected experts' ``targets`` (checkpoint projection names;
    empty: all): A [rank, in] and B [out, rank] per [out, in] tensor. Raises
    ``InvalidFileError`` for a target the experts do not have."""
    params = count = copy = 0
    found: set[str] = set()
    chosen = []
    for name, dtype, shape in tensors:
        role = classify(name)
        ids = experts.experts.get(role.layer, ()) if role.layer is not None else ()
        if role.kind == "routed_expert" and role.expert in ids and len(shape) == 2:
            chosen.append((projection(name), 1, shape, memory_bytes(dtype)))
        elif role.kind == "fused_experts" and ids and len(shape) == 3:
            chosen.append((projection(name), len(ids), shape[1:], memory_bytes(dtype)))
        found |= {c[0] for c in chosen[-1:]}
    unknown = [t for t in targets if t not in found]
    if unknown:
        raise InvalidFileError(f"--lora-targets: the selected experts have no projection"
                               f" {unknown[0]!r} (they have: {', '.join(sorted(found))})")
    for proj, n, (out, inp), _ in chosen:
        if targets and proj not in targets:
            continue
        params += n * rank * (out + inp)
        count += 2
    if fuse:  # LoraSlices keeps the selected rows of both fused tensors
        copy = sum(n * math.prod(shape) * size for _, n, shape, size in chosen)
    return _Lora(params, count, copy)


def _config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    try:
        raw = load_json(path)  # strict: no pipe that blocks, no duplicate keys
    except FileNotFoundError:
        raise InvalidFileError(f"{path}: not found (plan reads the model's config.json)") from None
    if not isinstance(raw, dict):
        raise InvalidFileError(f"{path}: not a JSON object")
    for key in REQUIRED:
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidFileError(f"{path}: {key} must be a positive integer, not {value!r}")
    return raw


def memory_bytes(dtype: str) -> int:
    """Bytes per element in memory of a tensor of safetensors ``dtype``."""
    return DEQUANTISED.get(dtype) or itemsize(dtype)


def _in_memory(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], experts: ExpertConfig, *, fuse: bool
) -> list[_Tensor]:
    """The parameters the trainer holds. ``fuse``: per-expert tensors on disk become the
    two fused tensors per layer transformers keeps in memory."""
    out = []
    fused: dict[tuple[int, str], dict[str, Any]] = {}
    for name, dtype, shape in tensors:
        numel = math.prod(shape)
        rows = shape[0] if shape else 1
        size = memory_bytes(dtype)
        role = classify(name)
        plan = tensor_plan(name, experts)
        if fuse and role.kind == "routed_expert":
            part = "down" if re.search(r"\.(down_proj|w2)\.", name) else "gate_up"
            group = fused.setdefault((role.layer, part), {"row": {}, "trained": set(),
                                                          "nbytes": size, "inner": {}})
            group["row"][role.expert] = group["row"].get(role.expert, 0) + numel
            group["inner"][role.expert] = group["inner"].get(role.expert, 0) + rows
            if plan is True:
                group["trained"].add(role.expert)
            continue
        trained = rows if plan is True else len(plan) if isinstance(plan, list) else 0
        out.append(_Tensor(role.layer, role.kind, rows, numel // max(rows, 1), size, trained,
                           role.expert if role.kind == "routed_expert" else None))
    for (layer, _), g in sorted(fused.items()):
        row = max(g["row"].values())
        out.append(_Tensor(layer, "fused_experts", len(g["row"]), row, g["nbytes"],
                           len(g["trained"]), trained_ids=frozenset(g["trained"]),
                           inner=max(g["inner"].values())))
    return out


@dataclass
class _Parts:
    """What trains in one decoder layer (or, layer None, outside them)."""

    dense: bool = True  # attention, norms and router (non-expert modules)
    experts: float = 0.0  # share of the routed experts' tokens whose expert trains
    shared: bool = False


def _trained_parts(tensors: list[_Tensor]) -> dict[int | None, _Parts]:
    parts: dict[int | None, _Parts] = {}
    routed: dict[int | None, list[int]] = {}  # per-expert tensors: [trained, all] elements
    for t in tensors:
        p = parts.setdefault(t.layer, _Parts(dense=False))
        if t.kind == "routed_expert":
            counts = routed.setdefault(t.layer, [0, 0])
            counts[0] += t.trained_rows * t.row
            counts[1] += t.rows * t.row
        elif not t.trained_rows:
            continue
        elif t.kind == "fused_experts":
            p.experts = 1.0  # a fused tensor computes weight gradients for every token
        elif t.kind in ("shared_expert", "shared_expert_gate"):
            p.shared = True
        else:
            p.dense = True
    for layer, (trained, total) in routed.items():
        parts[layer].experts = trained / total  # per-expert: their own tokens
    return parts


def activation_estimate(
    config: dict[str, Any], parts: dict[int | None, _Parts], *, tokens: int,
    compute_bytes: int, checkpointing: bool,
) -> int:
    """Bytes autograd keeps for backward during one micro-batch of ``tokens`` tokens.

    Per token, from the first decoder layer that trains anything (before it no
    gradient flows): what every layer keeps to pass gradients back (norm inputs in
    fp32, attention's q, k, v and output for flash attention, no seq x seq term;
    router scores; each of the top-K experts' gate/up outputs, activation and
    output), and the inputs of linear layers whose weights train; the loss keeps
    the fp32 log-probabilities. With checkpointing each layer keeps its input, and
    one layer is recomputed at a time. An estimate: see docs/scale.md for its error.
    """
    h = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or config.get("v_head_dim") or h // heads)
    kv = int(config.get("num_key_value_heads") or heads)
    k = int(config.get("num_experts_per_tok") or 1)
    moe_i = int(config.get("moe_intermediate_size") or config.get("intermediate_size") or h)
    dense_i = int(config.get("intermediate_size") or moe_i)
    shared_i = int(config.get("shared_expert_intermediate_size")
                   or (config.get("n_shared_experts") or 0) * moe_i)
    dense_layers = int(config.get("first_k_dense_replace") or 0)
    experts = int(config.get("n_routed_experts") or config.get("num_experts")
                  or config.get("num_local_experts") or 1)
    vocab = int(config["vocab_size"])
    fp32 = 4 / compute_bytes  # norms, router scores and the loss are computed in fp32

    def mlp(i: int, slots: float, trained: float) -> float:
        return slots * (3 * i + h + trained * (h + i))

    kept: list[float] = []
    flowing = parts.get(None, _Parts(dense=False)).dense  # embeddings train
    for n in range(layers):
        p = parts.get(n, _Parts(dense=False))
        if not (flowing or p.dense or p.experts > 0 or p.shared):
            continue
        size = 0.0
        if flowing or p.dense:  # gradients flow through attention and the router
            size += 2 * 2 * h * fp32 + 2 * heads * head_dim + 2 * kv * head_dim
            size += 2 * experts * fp32 if n >= dense_layers else 0
        if p.dense:
            size += h + heads * head_dim + h  # q/k/v, o_proj and router inputs
        if n < dense_layers:
            size += mlp(dense_i, 1, float(p.dense))
        else:
            size += mlp(moe_i, k, p.experts)
            if shared_i:
                size += mlp(shared_i, 1, float(p.shared))
        flowing = True
        kept.append(size)
    head = vocab * fp32 + (2 * h * fp32 + h if parts.get(None, _Parts()).dense else 0)
    if checkpointing:
        body = len(kept) * h + max(kept, default=0)
    else:
        body = sum(kept)
    return int(tokens * (body + head) * compute_bytes)


def _advice(total: int, budget: int, weights: int, activations: int, nproc: int,
            checkpointing: bool, sharded: bool) -> list[str]:
    """What to change so that it fits. ``weights``: this rank's weights, gradients and
    optimizer state, which more ranks divide (under FSDP: ``sharded``)."""
    out = []
    over = total - budget
    if not checkpointing:
        out.append("turn on gradient checkpointing (--gradient-checkpointing)")
    rest = total - weights
    if activations >= over or rest >= budget:
        out.append(f"shorten the sequences or the per-device batch (activations take"
                   f" {human_bytes(activations, byte_unit(budget))})")
    if rest < budget:
        now = nproc if sharded else 1
        need = max(now, 2)
        while weights * now / need + rest > budget:
            need *= 2
        shard = "" if sharded else " with --parallelism fsdp"
        out.append(f"use {need} or more ranks (--nproc {need}){shard}: weights, gradients"
                   " and optimizer state divide among them")
    return out

"""``esft_rs.plan``: the memory a training run needs per rank, from ``config.json`` and the
safetensors headers alone (no torch: ``esft-rs plan`` is a byte-level command).

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
- activations: an estimate for one micro-batch (see ``activation_estimate``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esft_rs.errors import InvalidFileError
from esft_rs.expert_config import ExpertConfig
from esft_rs.inputs import load_json
from esft_rs.naming import classify
from esft_rs.training.trained import moe_layout, resolve_experts, tensor_plan
from esft_rs.units import byte_unit, human_bytes

#: safetensors dtype -> bytes per element in memory (F8_E4M3 is dequantised to bf16).
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 2, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
#: tensors a checkpoint holds that are no trainable parameters in memory
NOT_PARAMETERS = ("weight_scale_inv", "e_score_correction_bias")
#: the built-in model keeps every expert as its own tensors
BUILTIN_MODEL_TYPE = "esft_rs_moe"
#: config.json keys the activation estimate cannot do without
REQUIRED = ("hidden_size", "num_hidden_layers", "vocab_size")
MASTER = 4  # fp32 master weights and gradients
ADAM = 8  # AdamW's two fp32 moments
STEP = 4  # AdamW's step count, one fp32 scalar per tensor


@dataclass
class _Tensor:
    """One in-memory parameter: ``rows`` along dim 0, ``row`` elements each."""

    layer: int | None
    kind: str  # esft_rs.naming's role of the tensor
    rows: int
    row: int
    nbytes: int  # per element, in memory
    trained_rows: int  # 0: frozen; rows: trained whole; between: fused slices


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    mode: str
    nproc: int
    parallelism: str  # fsdp | ddp (with nproc 1 the same)
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
    advice: list[str] = field(default_factory=list)

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
    parallelism: str = "fsdp",
    seq_length: int = 4096,
    per_device_batch_size: int = 1,
    gradient_checkpointing: bool = True,
    fsdp_prefetch: bool = True,
    gpu_memory: int | None = None,
    device: str = "cuda",
    origin: str = "expert config",
) -> MemoryPlan:
    """The memory per rank of training ``model`` (a checkpoint directory) as configured
    (the largest rank's: rank 0's)."""
    from esft_rs import inspect

    if parallelism not in ("fsdp", "ddp"):
        raise ValueError(f"parallelism must be fsdp or ddp, not {parallelism!r}")
    root = Path(model)
    config = _config(root)
    info = inspect(root)
    params = {n: t for n, t in info.tensors.items() if not n.endswith(NOT_PARAMETERS)}
    layout = moe_layout((n, t.shape) for n, t in params.items())
    resolved = resolve_experts(layout, experts, mode, 0, origin)
    builtin = config.get("model_type") == BUILTIN_MODEL_TYPE
    tensors = _in_memory(((n, t.dtype, t.shape) for n, t in params.items()), resolved,
                         fuse=not builtin)
    compute = 4 if device == "cpu" and all(
        DTYPE_BYTES.get(t.dtype, 4) == 4 for t in params.values()) else 2

    sharded = nproc > 1 and parallelism == "fsdp"

    def share(rows: int) -> int:
        return math.ceil(rows / nproc) if sharded else rows

    trained = sum(t.trained_rows * t.row for t in tensors)
    frozen_params = sum(t.rows * t.row for t in tensors if t.trained_rows < t.rows)
    frozen = sum(share(t.rows) * t.row * t.nbytes for t in tensors if t.trained_rows < t.rows)
    masters = sum(share(t.trained_rows) * t.row for t in tensors) * MASTER
    n_trained = sum(1 for t in tensors if t.trained_rows)
    optimizer = masters // MASTER * ADAM + STEP * n_trained
    gather = 0
    if sharded:
        groups: dict[int | None, int] = {}
        for t in tensors:
            groups[t.layer] = groups.get(t.layer, 0) + t.rows * t.row * min(t.nbytes, compute)
        # the running layer, and with prefetch the next one, gathered meanwhile
        gather = (2 if fsdp_prefetch else 1) * max(groups.values(), default=0)
    activations = activation_estimate(
        config, _trained_parts(tensors), tokens=seq_length * per_device_batch_size,
        compute_bytes=compute, checkpointing=gradient_checkpointing)
    total = frozen + 2 * masters + optimizer + gather + activations
    adapter = sum(t.trained_rows * t.row * t.nbytes for t in tensors)
    fits = None if gpu_memory is None else total <= gpu_memory
    advice = [] if gpu_memory is None or fits else _advice(
        total, gpu_memory, frozen + 2 * masters + optimizer, activations, nproc,
        gradient_checkpointing, sharded)
    if advice and sharded and fsdp_prefetch and total - gather // 2 <= gpu_memory:
        advice.insert(0, "gather one layer at a time (--no-fsdp-prefetch): slower, one"
                         " gathered layer less")
    return MemoryPlan(
        model=str(root), mode=mode, nproc=nproc, parallelism=parallelism, seq_length=seq_length,
        per_device_batch_size=per_device_batch_size,
        gradient_checkpointing=gradient_checkpointing, device=device,
        trained_params=trained, frozen_params=frozen_params,
        total_params=sum(t.rows * t.row for t in tensors), frozen_bytes=frozen,
        master_bytes=masters, grad_bytes=masters, optimizer_bytes=optimizer, gather_bytes=gather,
        activation_bytes=activations, total_bytes=total, adapter_bytes=adapter,
        gpu_memory=gpu_memory, fits=fits, advice=advice,
    )


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
        size = DTYPE_BYTES.get(dtype, 4)
        role = classify(name)
        plan = tensor_plan(name, experts)
        if fuse and role.kind == "routed_expert":
            part = "down" if re.search(r"\.(down_proj|w2)\.", name) else "gate_up"
            group = fused.setdefault((role.layer, part), {"row": {}, "trained": set(),
                                                          "nbytes": size})
            group["row"][role.expert] = group["row"].get(role.expert, 0) + numel
            if plan is True:
                group["trained"].add(role.expert)
            continue
        trained = rows if plan is True else len(plan) if isinstance(plan, list) else 0
        out.append(_Tensor(role.layer, role.kind, rows, numel // max(rows, 1), size, trained))
    for (layer, _), g in sorted(fused.items()):
        row = max(g["row"].values())
        out.append(_Tensor(layer, "fused_experts", len(g["row"]), row, g["nbytes"],
                           len(g["trained"])))
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

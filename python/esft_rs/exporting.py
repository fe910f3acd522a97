"""``esft_rs.export``: an ESFT adapter as a PEFT LoRA adapter directory, which PEFT
(``PeftModel.from_pretrained``) and vLLM (``--lora-modules``) load onto the base.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (keys
``base_model.model.<module>.lora_A.weight`` [r, in] / ``.lora_B.weight`` [out, r], in the
checkpoint's naming), plus ``export_report.json``. From an ESFT-LoRA adapter the pairs are
copied (exact); from a full-weight adapter each trained tensor's change from the base is
factored by a truncated SVD. Every expert of a layer the adapter touches gets a pair, zeros
for the experts it leaves alone, because vLLM stacks the experts of a layer and needs each
one (``PackedLoRALayerWeights.pack_moe``); merge skips all-zero pairs. The safetensors
``__metadata__`` keeps the adapter's expert config and the base fingerprint, so
``esft-rs merge`` checks the directory as it checks the adapter. Facts in docs/serving.md.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esft_rs.errors import EsftValueError, MismatchError, option
from esft_rs.files import naming
from esft_rs.files.adapter import (
    ADAPTER_KEYS,
    KEY_BASE_FINGERPRINT,
    adapter_metadata,
    fingerprint,
    read_adapter,
)
from esft_rs.files.inspection import inspect

if TYPE_CHECKING:
    import torch

    from esft_rs.models.rows import Rows

PEFT_CONFIG = ADAPTER_KEYS["peft_config"]
PEFT_WEIGHTS = ADAPTER_KEYS["peft_weights"]
PEFT_PREFIX = ADAPTER_KEYS["peft_prefix"]
LORA_A, LORA_B = ADAPTER_KEYS["lora_a"], ADAPTER_KEYS["lora_b"]
REPORT_NAME = "export_report.json"
_EXPERT_KINDS = ("routed_expert", "fused_experts")


@dataclass(frozen=True)
class TensorExport:
    """One exported tensor: its checkpoint name, the rank of its change (the exact rank
    for a full-weight tensor, the adapter's rank for a LoRA pair) and the relative
    Frobenius error ||delta - s*B@A|| / ||delta|| of the export (0 when exact)."""

    tensor: str
    rank: int
    error: float


@dataclass(frozen=True)
class ExportReport:
    output: str
    source: str  # "lora" (pairs copied) or "full" (SVD of the change from the base)
    rank: int
    lora_alpha: float
    base_fingerprint: str
    tensors: list[TensorExport] = field(default_factory=list)
    #: Relative Frobenius error over all exported tensors together.
    error: float = 0.0
    #: Zero pairs written for experts the adapter leaves alone (vLLM needs every expert).
    zero_pairs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Write ``adapter`` (an esft-rs adapter trained from ``base``) as a PEFT LoRA adapter
    directory ``output``, whole or not at all.

    ESFT-LoRA adapters are copied exactly (``r`` and ``lora_alpha`` from their
    ``esft.lora`` metadata). Full-weight adapters: each tensor's change from the base is
    factored by an SVD truncated at ``rank`` (default: the largest exact rank of any
    change, so the export is exact up to float32); the relative errors are returned and
    written to ``export_report.json``. Refused: an adapter from another base
    (fingerprint), a ``rank`` above a tensor's smallest dimension, an output inside an input.
    """
    from esft_rs.files.outputs import check_kind, check_outputs, check_target, staged
    from esft_rs.files.tensor_stream import write_tensors
    from esft_rs.models.rows import Rows

    base_p, adapter_p, out = Path(base), Path(adapter), Path(output)
    check_outputs([out], [base_p, adapter_p])
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise EsftValueError(f"{option('rank', rank)}: must be a positive integer")
    info = read_adapter(adapter_p)
    if info.kind not in ("esft", "lora", "plain"):
        what = "a PEFT adapter" if info.kind == "peft" else "an official ESFT adapter folder"
        raise EsftValueError(
            f"{adapter_p}: is {what}; export takes an esft-rs adapter file (an official folder:"
            " merge it, then `esft-rs split --base` it)", adapter_p)
    fp = fingerprint(base_p)
    if info.base_fingerprint is not None and info.base_fingerprint != fp:
        raise MismatchError(
            f"{adapter_p}: trained from a different base (fingerprint {info.base_fingerprint})"
            f" than {base_p} (fingerprint {fp})")
    if info.base_fingerprint is None:
        warnings.warn(f"{adapter_p}: no base fingerprint, so it cannot be checked that it was"
                      f" trained from {base_p}", UserWarning, stacklevel=2)
    check_target(out, overwrite=overwrite)
    check_kind(out, directory=True)
    base_info = inspect(base_p)
    adapter_info = inspect(adapter_p)
    base_root = base_p if base_p.is_dir() else base_p.parent
    metadata = dict(info.metadata)
    lora = metadata.get(ADAPTER_KEYS["lora"])
    with Rows(base_root, base_info.tensors) as base_rows, \
            Rows(adapter_p.parent, adapter_info.tensors) as rows:
        plan = _Plan(base_info.tensors, base_rows, rows, adapter_p)
        names = list(adapter_info.tensors)  # as stored: esft-rs adapters use checkpoint names
        if lora is not None:
            tensors, report = plan.from_lora(lora, names, rank)
        else:
            tensors, report = plan.from_full(names, rank)
    zero = plan.zero_pairs(tensors, report["rank"])
    tensors.update(zero)
    if info.expert_config is not None:
        st_meta = adapter_metadata(info.expert_config, fp)
    else:
        st_meta = {"format": "pt", KEY_BASE_FINGERPRINT: fp}
    result = ExportReport(output=os.fspath(out), base_fingerprint=fp,
                          zero_pairs=len(zero) // 2, **report)
    config = _peft_config(base_p, tensors, result.rank, result.lora_alpha)
    with staged(out, directory=True, overwrite=overwrite) as tmp:
        write_tensors(tmp / PEFT_WEIGHTS, dict(sorted(tensors.items())), st_meta)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / REPORT_NAME).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


class _Plan:
    """The exported pairs, read from the adapter and the base."""

    def __init__(self, base: dict[str, Any], base_rows: Rows, rows: Rows,
                 adapter: Path) -> None:
        self.base, self.base_rows, self.rows, self.adapter = base, base_rows, rows, adapter

    def target(self, name: str) -> tuple[str, int | None]:
        """The base tensor ``name`` (a checkpoint name) changes, and the expert when it is
        a fused tensor's slice."""
        if name in self.base:
            return name, None
        parent = naming.fused_slice_parent(name)
        if parent is not None and parent[0] in self.base:
            # vLLM loads fused experts as one stacked pair per tensor (lora_A [E*r, in]),
            # which this export does not write yet; per-slice keys would load nowhere.
            raise EsftValueError(
                f"{self.adapter}: tensor {name!r} is a slice of the fused tensor"
                f" {parent[0]!r}; export writes per-expert LoRA keys only, and a base with"
                " fused experts on disk needs the stacked layout (not supported yet)",
                self.adapter)
        raise MismatchError(f"{self.adapter}: tensor {name!r} is not in the base")

    def base_weight(self, name: str) -> torch.Tensor:
        return self.base_rows.read(self.target(name)[0])

    def from_lora(self, text: str, names: list[str], rank: int | None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        spec = json.loads(text)
        r, alpha = int(spec["rank"]), float(spec["alpha"])
        if rank is not None and rank != r:
            raise EsftValueError(
                f"{option('rank', rank)}: {self.adapter} is an ESFT-LoRA adapter of rank {r},"
                " exported exactly at its own rank")
        tensors: dict[str, torch.Tensor] = {}
        rows: list[TensorExport] = []
        full = [n for n in names if not n.endswith((LORA_A, LORA_B))]
        for name in names:
            if name.endswith(LORA_A):
                module = name[: -len(LORA_A)]
                self.target(self._weight_name(module))
                tensors[PEFT_PREFIX + name] = self.rows.read(name)
                tensors[PEFT_PREFIX + module + LORA_B] = self.rows.read(module + LORA_B)
                rows.append(TensorExport(self._weight_name(module), r, 0.0))
        # Tensors the run trained in full (shared experts, non-expert modules): an SVD at r.
        sq_err, sq_norm = 0.0, 0.0
        for name in full:
            pair, row, (e2, n2) = self.factor(name, r, scale=alpha / r)
            tensors.update(pair)
            rows.append(row)
            sq_err, sq_norm = sq_err + e2, sq_norm + n2
        error = math.sqrt(sq_err / sq_norm) if sq_norm else 0.0
        return tensors, {"source": "lora", "rank": r, "lora_alpha": alpha, "tensors": rows,
                         "error": error}

    def _weight_name(self, module: str) -> str:
        return module + ".weight" if module + ".weight" in self.base else module

    def from_full(self, names: list[str], rank: int | None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        import torch

        deltas = {n: self.delta(n) for n in names}
        for name, d in deltas.items():
            if d.dim() != 2:
                raise EsftValueError(
                    f"{self.adapter}: tensor {name!r} is {d.dim()}-D; a LoRA adapter carries"
                    " changes of 2-D weights only", self.adapter)
            if rank is not None and rank > min(d.shape):
                raise EsftValueError(
                    f"{option('rank', rank)}: above the smallest dimension ({min(d.shape)}) of"
                    f" {name!r} {list(d.shape)}")
        exact = {n: int(torch.linalg.matrix_rank(d)) for n, d in deltas.items()}
        r = rank if rank is not None else max([*exact.values(), 1])
        tensors: dict[str, torch.Tensor] = {}
        rows: list[TensorExport] = []
        sq_err, sq_norm = 0.0, 0.0
        for name, d in deltas.items():
            pair, row, (e2, n2) = self.factor(name, r, scale=1.0, delta=d, exact=exact[name])
            tensors.update(pair)
            rows.append(row)
            sq_err, sq_norm = sq_err + e2, sq_norm + n2
        error = math.sqrt(sq_err / sq_norm) if sq_norm else 0.0
        return tensors, {"source": "full", "rank": r, "lora_alpha": float(r), "tensors": rows,
                         "error": error}

    def delta(self, name: str) -> torch.Tensor:
        import torch

        return self.rows.read(name).to(torch.float64) - self.base_weight(name).to(torch.float64)

    def factor(self, name: str, r: int, *, scale: float, delta: torch.Tensor | None = None,
               exact: int | None = None
               ) -> tuple[dict[str, torch.Tensor], TensorExport, tuple[float, float]]:
        """``name``'s change as a rank-``r`` pair (float32) with ``scale * B @ A`` ~ delta;
        the report row and (squared error, squared norm)."""
        import torch

        d = self.delta(name) if delta is None else delta
        if d.dim() != 2:
            raise EsftValueError(f"{self.adapter}: tensor {name!r} is {d.dim()}-D; a LoRA"
                                 " adapter carries changes of 2-D weights only", self.adapter)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = min(r, s.numel())
        root = s[:k].sqrt()
        b = torch.zeros(d.shape[0], r, dtype=torch.float64)
        a = torch.zeros(r, d.shape[1], dtype=torch.float64)
        b[:, :k] = u[:, :k] * root / scale
        a[:k] = root[:, None] * vh[:k]
        b32, a32 = b.to(torch.float32), a.to(torch.float32)
        e2 = float((d - scale * (b32.double() @ a32.double())).square().sum())
        n2 = float(d.square().sum())
        module = name.removesuffix(".weight")
        pair = {PEFT_PREFIX + module + LORA_A: a32, PEFT_PREFIX + module + LORA_B: b32}
        rank = exact if exact is not None else int(torch.linalg.matrix_rank(d))
        return pair, TensorExport(name, rank, math.sqrt(e2 / n2) if n2 else 0.0), (e2, n2)

    def zero_pairs(self, tensors: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        """Zero pairs for every routed expert tensor of the layers that ``tensors`` touch."""
        import torch

        modules = {k[len(PEFT_PREFIX): -len(LORA_A)] for k in tensors if k.endswith(LORA_A)}
        layers = set()
        for m in modules:
            role = naming.classify(self._weight_name(m))
            if role.kind in _EXPERT_KINDS and role.layer is not None:
                layers.add(role.layer)
        zero: dict[str, torch.Tensor] = {}
        for name, t in self.base.items():
            role = naming.classify(name)
            if role.kind != "routed_expert" or role.layer not in layers:
                continue
            module = name.removesuffix(".weight")
            if module in modules or len(t.shape) != 2:
                continue
            out_dim, in_dim = t.shape
            zero[PEFT_PREFIX + module + LORA_A] = torch.zeros(r, in_dim)
            zero[PEFT_PREFIX + module + LORA_B] = torch.zeros(out_dim, r)
        return zero


def _peft_config(base: Path, tensors: dict[str, Any], r: int, alpha: float) -> dict[str, Any]:
    """adapter_config.json: plain LoRA (PEFT's LoraConfig fields) on the modules named by
    the keys' last component (gate_proj, w1, q_proj, ...)."""
    targets = sorted({k[len(PEFT_PREFIX): -len(LORA_A)].rsplit(".", 1)[-1]
                      for k in tensors if k.endswith(LORA_A)})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.fspath(base),
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


__all__ = ["ExportReport", "TensorExport", "export"]

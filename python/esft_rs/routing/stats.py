"""Routing statistics and ``aggregate``: how often each expert was picked, per layer.

Counting, log parsing and the file format live in the Rust core
(``rust/core/src/routing``); this module holds the arrays and sums them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import numpy as np

from esft_rs import _core
from esft_rs.errors import EsftValueError, MismatchError
from esft_rs.files.outputs import Kind, read_by
from esft_rs.routing import scoring
from esft_rs.routing.scoring import OFFICIAL_TOP_K

#: What ``aggregate`` sums: stats objects, routing-stats files, official log folders.
Source = Union["RoutingStats", str, os.PathLike]



@dataclass(eq=False)
class RoutingStats:
    """Per-layer routing histograms.

    ``counts[l, e]``: tokens of layer ``layers[l]`` that picked expert e in their
    top-K; ``gate_sum[l, e]``: the routing weights they gave it; ``tokens[l]``:
    tokens through the layer. ``sample_token_sum`` / ``sample_gate_sum`` hold the
    per-sample token and gate scores summed over ``num_samples`` samples (for
    ``average="samples"``).
    """

    layers: list[int]
    counts: np.ndarray  # [L, E] int64
    gate_sum: np.ndarray  # [L, E] float64
    tokens: np.ndarray  # [L] int64
    top_k: int
    num_samples: int
    sample_token_sum: np.ndarray  # [L, E] float64
    sample_gate_sum: np.ndarray  # [L, E] float64
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def token_scores(
        self, average: scoring.Average = "tokens", decimals: int | None = None
    ) -> np.ndarray:
        """Token selection ratios [L, E]: per layer they sum to 1."""
        return scoring.scores(self, "token", average, decimals)

    def gate_scores(
        self, average: scoring.Average = "tokens", decimals: int | None = None
    ) -> np.ndarray:
        """Average routing weight per token [L, E]."""
        return scoring.scores(self, "gate", average, decimals)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes one safetensors file (atomically; see DESIGN.md, "Files we write")."""
        _core.save_routing_stats(os.fspath(path), self._to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingStats:
        return cls._from_dict(_core.load_routing_stats(os.fspath(path)))

    @classmethod
    def from_official_logs(
        cls,
        path: str | os.PathLike[str],
        top_k: int = OFFICIAL_TOP_K,
        num_experts: int | None = None,
    ) -> RoutingStats:
        """Reads an official log folder (``expert_weights_{layer}.txt``, directly or
        in ``rank_*`` folders); each line is one forward pass (one sample)."""
        d = _core.read_official_logs(os.fspath(path), top_k, num_experts)
        d["metadata"]["data"] = os.fspath(path)
        return cls._from_dict(d)

    @classmethod
    def sum(cls, items: Sequence[RoutingStats], names: Sequence[str] | None = None) -> RoutingStats:
        """Sums statistics over the same layers, experts and top-K; ``names``
        label the items in errors. Metadata keeps the keys all items agree on."""
        if not items:
            raise EsftValueError("nothing to sum")
        names = list(names) if names is not None else [f"input {i}" for i in range(len(items))]
        check_same_model(items, names)
        first = items[0]
        if len(items) == 1:
            return first
        meta = {
            k: v for k, v in first.metadata.items() if all(i.metadata.get(k) == v for i in items)
        }
        return replace(
            first,
            layers=list(first.layers),
            counts=sum((i.counts for i in items[1:]), first.counts.copy()),
            gate_sum=_fsum(i.gate_sum for i in items),
            tokens=sum((i.tokens for i in items[1:]), first.tokens.copy()),
            num_samples=sum(i.num_samples for i in items),
            sample_token_sum=_fsum(i.sample_token_sum for i in items),
            sample_gate_sum=_fsum(i.sample_gate_sum for i in items),
            metadata=meta,
        )

    def __repr__(self) -> str:
        span = f"{self.layers[0]}..{self.layers[-1]}" if self.layers else "none"
        tokens = sorted({int(t) for t in self.tokens})
        return (
            f"RoutingStats(layers={self.num_layers} [{span}], experts={self.num_experts},"
            f" top_k={self.top_k}, tokens={tokens[0] if len(tokens) == 1 else tokens},"
            f" samples={self.num_samples})"
        )

    def __add__(self, other: RoutingStats) -> RoutingStats:
        return RoutingStats.sum([self, other], ["left", "right"])

    def _to_dict(self) -> dict[str, Any]:
        return {
            "layers": [int(x) for x in self.layers],
            "top_k": int(self.top_k),
            "num_samples": int(self.num_samples),
            "counts": np.ascontiguousarray(self.counts, dtype=np.int64),
            "gate_sum": np.ascontiguousarray(self.gate_sum, dtype=np.float64),
            "tokens": np.ascontiguousarray(self.tokens, dtype=np.int64),
            "sample_token_sum": np.ascontiguousarray(self.sample_token_sum, dtype=np.float64),
            "sample_gate_sum": np.ascontiguousarray(self.sample_gate_sum, dtype=np.float64),
            "metadata": {str(k): str(v) for k, v in self.metadata.items()},
        }

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> RoutingStats:
        return cls(**d)


#: Metadata key of the profiled model's fingerprint (``esft_rs.files.adapter.fingerprint``).
MODEL_FINGERPRINT = "model_fingerprint"


def check_same_model(items: Sequence[RoutingStats], names: Sequence[str]) -> None:
    """Statistics to be summed or compared must come from one model: the same layers,
    experts and top-K, and the same model fingerprint where both files record one."""
    first = items[0]
    for item, name in zip(items[1:], names[1:], strict=True):
        for what, a, b in (
            ("layers", first.layers, item.layers),
            ("experts per layer", first.num_experts, item.num_experts),
            ("top-k", first.top_k, item.top_k),
        ):
            if a != b:
                raise MismatchError(f"{name}: {what} {b} differ from {names[0]}: {a}")
        a, b = first.metadata.get(MODEL_FINGERPRINT), item.metadata.get(MODEL_FINGERPRINT)
        if a and b and a != b:
            models = f" ({item.metadata.get('model')} vs {first.metadata.get('model')})"
            raise MismatchError(
                f"{name}: profiled on a different model than {names[0]}"
                + (models if "model" in item.metadata and "model" in first.metadata else "")
            )


def _fsum(arrays: Iterable[np.ndarray]) -> np.ndarray:
    it = iter(arrays)
    out = next(it).copy()
    for a in it:
        out += a
    return out


def aggregate(
    hist: Any,
    weights: Any = None,
    num_experts: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    lengths: Sequence[int] | np.ndarray | None = None,
    top_k: int = OFFICIAL_TOP_K,
) -> RoutingStats:
    """Routing statistics from per-token records, or the sum of many histograms.

    1. **Records**: ``hist`` is an integer array of expert ids shaped [tokens, K]
       or [layers, tokens, K] (any integer dtype; numpy, or anything
       ``np.asarray`` takes, such as a CPU torch tensor), ``weights`` the matching
       routing weights (float16/32/64; convert bfloat16 first) or None. Counting reads the arrays in
       place, releases the GIL and uses all cores; a non-C-contiguous array is
       copied once first. ``num_experts`` bounds the ids (default: max id + 1,
       one more pass over the ids). ``layers`` names the rows (default 0..L-1);
       ``lengths`` splits the tokens into samples for per-sample averages
       (default: one sample).
    2. **Many histograms**: ``hist`` is a RoutingStats, a routing-stats file, an
       official log folder, or a list of them; they are summed into one.
       ``top_k`` and ``num_experts`` apply to the official logs.

    Bad input raises: an id < 0 or >= num_experts (naming the first position),
    NaN / negative / infinite weights, mismatched shapes, an unparsable log line
    (file:line), inputs disagreeing on layers, experts or top-K.
    """
    _check_counting_args(num_experts, layers, lengths)
    if isinstance(hist, list | tuple) and not hist:
        raise EsftValueError("nothing to aggregate")
    if _is_source(hist) or (
        isinstance(hist, list | tuple) and hist and all(_is_source(h) for h in hist)
    ):
        items = list(hist) if isinstance(hist, list | tuple) else [hist]
        if weights is not None or lengths is not None or layers is not None:
            raise EsftValueError("weights, lengths and layers apply only to per-token records")
        loaded = [load_source(s, top_k=top_k, num_experts=num_experts) for s in items]
        return RoutingStats.sum(loaded, [source_name(s) for s in items])
    ids = np.ascontiguousarray(hist)
    w = None if weights is None else np.ascontiguousarray(weights)
    lens = None if lengths is None else [int(n) for n in np.asarray(lengths).ravel()]
    d = _core.count_routing(
        ids, w, num_experts, lens, None if layers is None else [int(x) for x in layers]
    )
    return RoutingStats._from_dict(d)


#: The most routed experts per layer esft-rs counts (the core's MAX_EXPERTS, the CLI's
#: --num-experts bound).
MAX_EXPERTS = 1 << 20


def _check_counting_args(num_experts: object, layers: Sequence[int] | None,
                         lengths: Sequence[int] | np.ndarray | None) -> None:
    """``aggregate``'s numbers, as ValueErrors before the core sees them (an out-of-range
    integer was an OverflowError there, and repeated layers went through)."""
    if num_experts is not None and (isinstance(num_experts, bool)
                                    or not isinstance(num_experts, int | np.integer)
                                    or not 1 <= num_experts <= MAX_EXPERTS):
        raise EsftValueError(f"num_experts must be between 1 and {MAX_EXPERTS},"
                             f" got {num_experts!r}")
    if layers is not None:
        seen: set[int] = set()
        for x in layers:
            if not 0 <= int(x) < 2**31:
                raise EsftValueError(f"layers must be layer numbers in 0..{2**31 - 1}, got {x}")
            if int(x) in seen:
                raise EsftValueError(f"layers names layer {int(x)} twice")
            seen.add(int(x))
    if lengths is not None:
        bad = [int(n) for n in np.asarray(lengths).ravel() if not 0 <= int(n) < 2**63]
        if bad:
            raise EsftValueError(f"lengths must be token counts (>= 0), got {bad[0]}")


def _is_source(x: object) -> bool:
    return isinstance(x, RoutingStats | str | os.PathLike)


def source_name(source: Source) -> str:
    """How a source is named in errors and reports."""
    if isinstance(source, RoutingStats):
        return source.metadata.get("data", "routing stats")
    return os.fspath(source)


def load_source(
    source: Source, *, top_k: int = OFFICIAL_TOP_K, num_experts: int | None = None
) -> RoutingStats:
    """A RoutingStats as is; a folder as official logs; a file as routing stats."""
    if isinstance(source, RoutingStats):
        return source
    path = Path(source)
    if path.is_dir():
        return RoutingStats.from_official_logs(path, top_k, num_experts)
    return RoutingStats.load(path)


#: A routing-stats file as an output (``esft_rs.files.outputs.check_target``).
OUTPUT_KIND = Kind("a routing-stats file", read_by(RoutingStats.load))

"""Routing profiler: forward passes of a frozen MoE model with hooks on its routers.

Works with any model that implements ``esft_rs.models.interface.MoEModel``
(``routers()`` -> forward hooks that see the top-K ids and weights of the
flattened batch). The hooks copy them into per-batch buffers; after the forward
pass two ``scatter_add_`` calls over a combined (sample, layer, expert) bin add
them to accumulators on the model's device: no per-token transfer to the host
and no host synchronisation. Padding (attention mask 0) goes to bins that are
dropped, so it is never counted. Each batch row is one sample for the
per-sample averages.

Under ``torch.distributed`` each rank profiles a disjoint shard of the batches
(batch i goes to rank i mod world size), the sums are all-reduced, and every
rank returns the same totals.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esft_rs.distributed import is_sharded_model
from esft_rs.errors import EsftValueError, MismatchError
from esft_rs.models import as_moe_model, hf
from esft_rs.routing.stats import RoutingStats

if TYPE_CHECKING:
    import torch

    from esft_rs.models.interface import MoEModel

#: Accumulator planes, each [layers, experts]: selections, routing weight, and the
#: per-sample token and gate scores summed over samples.
_COUNT, _GATE, _SAMPLE_TOKEN, _SAMPLE_GATE = range(4)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids [B, S], attention_mask [B, S] or None) from a tensor, a tuple
    (ids, mask) or a mapping with ``input_ids`` / ``attention_mask``."""
    import torch

    if isinstance(batch, Mapping):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, tuple | list):
        ids, mask = batch[0], batch[1] if len(batch) > 1 else None
    else:
        ids, mask = batch, None
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        mask = None if mask is None else torch.as_tensor(mask).unsqueeze(0)
    if ids.dim() != 2:
        raise EsftValueError(
            f"input ids must be [batch, seq] or [seq], got shape {list(ids.shape)}"
        )
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.shape != ids.shape:
            raise EsftValueError(
                f"attention mask shape {list(mask.shape)} differs from ids {list(ids.shape)}"
            )
    return ids, mask


class _Recorder:
    """Forward hooks that collect each router's decisions; ``end`` folds them into
    device accumulators with two ``scatter_add_`` calls per batch (all layers at once)."""

    def __init__(self, model: MoEModel, device: torch.device, keep_records: bool) -> None:
        import torch

        routers = model.routers()
        self.layers = sorted(routers)
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        self.e, self.k = int(model.num_experts), int(model.top_k)
        # [4, L, E] float64 (counts are exact up to 2^53): one all-reduce when distributed.
        self.acc = torch.zeros(4, len(self.layers), self.e, dtype=torch.float64, device=device)
        self.samples = torch.zeros((), dtype=torch.float64, device=device)
        # The current batch: (samples, tokens); router ids and float64 weights
        # [L, tokens, K]; bin of (sample, layer) per token [L, tokens, 1]; 1 / real
        # tokens per sample [B, 1, 1] (0 for a sample of pure padding).
        self.shape = (0, 0)
        self.fired: set[int] = set()  # layers whose router ran in the current batch
        self.ids = self.weights = self.offset = self.inv_n = torch.empty(0, device=device)
        self.valid: torch.Tensor | None = None  # [tokens] bool, for records
        self.records: dict[int, list[tuple[np.ndarray, np.ndarray]]] | None = (
            {layer: [] for layer in self.layers} if keep_records else None
        )
        self.handles = [
            module.register_forward_hook(self._hook(layer)) for layer, module in routers.items()
        ]

    def begin(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Bins and per-sample weights of the next batch (rows are samples); no host sync.

        Selection (sample b, layer l, expert e) goes to bin (b * L + l) * E + e; padding
        goes past the B * L * E real bins and is dropped.
        """
        import torch

        b, s = ids.shape
        layers, e, dev = len(self.layers), self.e, ids.device
        sample_bin = torch.arange(b, device=dev).mul_(layers * e)[:, None].expand(b, s)
        if mask is None:
            valid = None
            n = torch.full((b,), float(s), dtype=torch.float64, device=dev)
        else:
            valid = mask != 0
            sample_bin = torch.where(valid, sample_bin, b * layers * e)
            n = valid.sum(dim=1, dtype=torch.float64)
        layer_bin = torch.arange(layers, device=dev).mul_(e)
        self.offset = sample_bin.reshape(1, -1, 1) + layer_bin[:, None, None]
        self.inv_n = torch.where(n > 0, 1.0 / n.clamp(min=1), 0.0).view(b, 1, 1)
        self.samples += (n > 0).sum()
        self.shape = (b, b * s)
        self.fired = set()
        self.ids = torch.empty(layers, b * s, self.k, dtype=torch.long, device=dev)
        self.weights = torch.empty(layers, b * s, self.k, dtype=torch.float64, device=dev)
        self.valid = None
        if self.records is not None:
            self.valid = (torch.ones(b * s, dtype=torch.bool, device=dev) if valid is None
                          else valid.reshape(-1))

    def end(self) -> None:
        """Adds the batch's selections to the accumulators."""
        import torch

        if missing := [layer for layer in self.layers if layer not in self.fired]:
            raise MismatchError(f"the routers of layers {missing} did not run in the forward pass")
        b, layers = self.shape[0], len(self.layers)
        bins = self.ids.add_(self.offset).view(-1)
        # scatter_add_, not bincount: on a GPU, bincount reads the largest bin on the host.
        per = torch.zeros(2, (b + 1) * layers * self.e, dtype=torch.float64, device=bins.device)
        one = torch.ones((), dtype=torch.float64, device=bins.device)
        per[0].scatter_add_(0, bins, one.expand_as(bins))
        per[1].scatter_add_(0, bins, self.weights.view(-1))
        per = per[:, : b * layers * self.e].view(2, b, layers, self.e)  # drop the padding bins
        self.acc[_COUNT : _GATE + 1] += per.sum(dim=1)
        per_sample = (per * self.inv_n).sum(dim=1)
        per_sample[0] /= self.k
        self.acc[_SAMPLE_TOKEN:] += per_sample
        self.shape = (0, 0)

    def _hook(self, layer: int) -> Any:
        row = self.row[layer]

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if not self.shape[1]:
                return  # a forward outside begin/end (a sharded model's spare one) counts nothing
            ids, weights = output[0], output[1]
            if tuple(ids.shape) != (self.shape[1], self.k):
                raise MismatchError(
                    f"router of layer {layer} returned ids of shape {list(ids.shape)};"
                    f" expected [{self.shape[1]}, {self.k}] (the flattened batch, top-K)"
                )
            self.ids[row].copy_(ids)
            self.weights[row].copy_(weights)  # to float64 in the same copy
            self.fired.add(layer)
            if self.records is not None and self.valid is not None:
                keep = self.valid.cpu().numpy()
                self.records[layer].append(
                    (ids.cpu().numpy()[keep], weights.float().cpu().numpy()[keep])
                )

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def stats(self, metadata: dict[str, str]) -> RoutingStats:
        acc = self.acc.cpu().numpy()
        counts = np.rint(acc[_COUNT]).astype(np.int64)
        return RoutingStats(
            layers=list(self.layers),
            counts=counts,
            gate_sum=acc[_GATE].copy(),
            tokens=counts.sum(axis=1) // self.k,
            top_k=self.k,
            num_samples=round(float(self.samples)),
            sample_token_sum=acc[_SAMPLE_TOKEN].copy(),
            sample_gate_sum=acc[_SAMPLE_GATE].copy(),
            metadata=metadata,
        )


def profile(
    model: MoEModel | torch.nn.Module,
    batches: Iterable[Any],
    *,
    max_tokens: int | None = None,
    records: str | os.PathLike[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: bool | Callable[[int], object] = False,
) -> RoutingStats:
    """Routing statistics of ``model`` over ``batches``.

    ``model``: the built-in model, any ``MoEModel``, or a transformers MoE model
    (hooked through ``esft_rs.models.as_moe_model`` for this call only).

    ``batches``: input-id tensors [B, S] (or [S]), optionally as ``(ids, mask)``
    or ``{"input_ids", "attention_mask"}`` with mask 1 = token, 0 = padding.
    ``max_tokens``: stop after the batch that reaches this many real tokens (per
    rank: its share). ``records``: also write the real tokens' top-K ids and
    weights, a ``layer_{L}_ids.npy`` / ``layer_{L}_weights.npy`` pair per layer
    (in ``rank_{r}`` subfolders when distributed; a host copy per layer and
    batch, so slower; ``esft_rs.aggregate`` reads them back). ``progress``:
    True shows a tqdm bar in tokens on rank 0 (its total: the rank's budget); a
    callable is instead called with each batch's real-token count on every rank
    (so a caller that knows its total can drive its own bar). The model runs
    under ``torch.inference_mode()`` on its own device.
    """
    if hf.is_hf(model):
        with hf.MoEView(model) as view:
            return profile(view, batches, max_tokens=max_tokens, records=records,
                           metadata=metadata, progress=progress)
    model = as_moe_model(model)  # a TypeError for anything else
    stats, kept = profile_model(model, batches, max_tokens=max_tokens,
                                keep_records=records is not None, metadata=metadata,
                                progress=progress)
    if kept is not None and records is not None:
        folder = Path(records)
        if kept.world > 1:  # each rank puts its own folder in place
            folder.mkdir(parents=True, exist_ok=True)
            folder = folder / f"rank_{kept.rank}"
        from esft_rs.files.outputs import staged

        folder.parent.mkdir(parents=True, exist_ok=True)
        with staged(folder, directory=True) as tmp:
            kept.write(tmp)
    return stats


class Records:
    """This rank's routing records: each layer's (ids, weights) parts, batch by batch."""

    def __init__(self, parts: dict[int, list[tuple[np.ndarray, np.ndarray]]], rank: int,
                 world: int) -> None:
        self.parts, self.rank, self.world = parts, rank, world

    def write(self, folder: Path) -> None:
        """The ``layer_{L}_ids.npy`` / ``layer_{L}_weights.npy`` files, into ``folder``."""
        for layer, parts in self.parts.items():
            ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 0), np.int64)
            weights = (np.concatenate([p[1] for p in parts]) if parts
                       else np.zeros((0, 0), np.float32))
            np.save(folder / f"layer_{layer}_ids.npy", ids)
            np.save(folder / f"layer_{layer}_weights.npy", weights)


def profile_model(
    model: MoEModel,
    batches: Iterable[Any],
    *,
    max_tokens: int | None = None,
    keep_records: bool = False,
    metadata: Mapping[str, str] | None = None,
    progress: bool | Callable[[int], object] = False,
) -> tuple[RoutingStats, Records | None]:
    """``profile`` of an ``MoEModel``, with the records kept in memory rather than
    written, for a caller that commits them together with its other outputs."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    budget = None if max_tokens is None else max(1, max_tokens // world)
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = torch.device("cpu") if param is None else param.device
    rec = _Recorder(model, device, keep_records=keep_records)
    bar = None
    if progress is True and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=budget, unit="tok", desc="profile", dynamic_ncols=True)
    on_tokens = bar.update if bar is not None else progress if callable(progress) else None
    done = 0
    # A sharded model (FSDP) gathers each layer from every rank: all ranks run each
    # round's forward together, a rank out of batches running one it does not count.
    lockstep = distributed and is_sharded_model(model)
    try:
        with torch.inference_mode():
            for i, batch in enumerate(_padded(batches) if lockstep else batches):
                if i % world != rank:
                    continue
                if lockstep and (batch is None or (budget is not None and done >= budget)):
                    if not _any_rank(False, device):
                        break
                    model(torch.zeros((1, 1), dtype=torch.long, device=device))
                    continue
                ids, mask = _split_batch(batch)
                real = int(ids.numel() if mask is None else (mask != 0).sum())
                ids = ids.to(device, non_blocking=True)
                mask = None if mask is None else mask.to(device, non_blocking=True)
                if lockstep:
                    _any_rank(True, device)
                rec.begin(ids, mask)
                model(ids, attention_mask=mask)
                rec.end()
                done += real
                if on_tokens is not None:
                    on_tokens(real)
                if not lockstep and budget is not None and done >= budget:
                    break
    finally:
        rec.close()
        if bar is not None:
            bar.close()
    if distributed:
        acc = rec.acc if dist.get_backend() != "gloo" else rec.acc.cpu()
        dist.all_reduce(acc)
        samples = rec.samples.reshape(1).to(acc.device)
        dist.all_reduce(samples)
        rec.acc, rec.samples = acc, samples.reshape(())
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    stats = rec.stats(meta)
    return stats, None if rec.records is None else Records(rec.records, rank, world)


def _padded(batches: Iterable[Any]) -> Iterator[Any]:
    """``batches``, then None for ever."""
    yield from batches
    while True:
        yield None


def _any_rank(busy: bool, device: torch.device) -> bool:
    """Whether any rank still has a batch to run this round (every rank calls, once a round)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(busy)], device=device if dist.get_backend() != "gloo" else "cpu")
    dist.all_reduce(flag)
    return bool(flag.item())

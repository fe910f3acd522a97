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

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esft_rs.errors import EsftError, EsftValueError, MismatchError
from esft_rs.routing.stats import RoutingStats
from esft_rs.training.config import DEFAULT_SEED, TrainConfig

if TYPE_CHECKING:
    import torch

    from esft_rs.data import Packed, TaskData
    from esft_rs.data.tokenizer import Tokenizer
    from esft_rs.distributed import Dist
    from esft_rs.models.interface import MoEModel

log = logging.getLogger("esft_rs.routing.profiling")

PathLike = str | os.PathLike[str]

#: What the official ESFT scripts profile (``--n_sample_tokens=131072``).
DEFAULT_TOKENS = 131072
#: Packed row length when the model allows it: training's default.
DEFAULT_SEQ_LEN = TrainConfig.seq_length

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
    from esft_rs.models import as_moe_model, hf

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

    from esft_rs.distributed import is_sharded_model

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


@dataclass
class TaskProfile:
    """What ``profile_task`` wrote, and of what."""

    output: Path
    stats: RoutingStats
    tokens: int  # real tokens profiled
    available: int  # real tokens the packed data holds
    seq_length: int
    world: int
    device: torch.device
    main: bool  # this process wrote the outputs (rank 0)
    seconds: float  # from the model's load to the outputs written


def profile_task(
    model: PathLike,
    data: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    records: PathLike | None = None,
    tokens: int = DEFAULT_TOKENS,
    batch_size: int = 4,
    seq_length: int | None = None,
    device: str | torch.device | None = "auto",
    parallelism: str = "auto",
    skip_bad: bool = False,
    seed: int = DEFAULT_SEED,
    chat_template: str = "auto",
    progress: bool = True,
) -> TaskProfile:
    """Routing statistics of the model in directory ``model`` on chat data files ``data``,
    written to ``output`` (a routing-stats safetensors file; ``records``: also every real
    token's top-K ids and weights, as ``profile`` writes them).

    The data is encoded (``chat_template``) and packed into rows of ``seq_length`` tokens
    (default 4096), cut to the model's context as ``train`` cuts them, with a note
    (``preflight.fit_to_context``); rows are taken in order until they hold ``tokens``
    real tokens, ``batch_size`` rows a forward pass. Under torchrun every process calls
    this: each profiles a disjoint share of the rows (the model spread as ``parallelism``
    says), and rank 0 writes the outputs. Notes and skipped lines (``skip_bad``) are
    logged to ``esft_rs.routing.profiling``.
    """
    from esft_rs.distributed import device_for, process_group
    from esft_rs.models import as_moe_model
    from esft_rs.training.sharded_load import load_for_inference

    model, output = Path(model), Path(output)
    files = [Path(data)] if isinstance(data, str | os.PathLike) else [Path(d) for d in data]
    records = Path(records) if records is not None else None
    _check_outputs(model, files, output, records)
    dev = device if not isinstance(device, str | None) else device_for(device)
    tokenizer, task = _read_inputs(model, files, chat_template, skip_bad)
    with process_group(dev) as place:
        t0 = time.perf_counter()
        net, note = load_for_inference(model, place, dev, parallelism)
        if note is not None and place.main:  # once the model has loaded: no note before an error
            log.warning("%s", note)
        moe = as_moe_model(net)
        seq_length = _row_length(seq_length, moe)
        packed = task.pack(tokenizer, seq_length=seq_length, seed=seed)
        batches, profiled = _take_rows(packed, moe, files, tokens, batch_size)
        metadata = {"model": str(model), "data": ",".join(map(str, files)),
                    "tokens": str(profiled), "seq_len": str(seq_length), "seed": str(seed),
                    **_fingerprint(model)}
        stats, kept = _run(moe, batches, records is not None, metadata, progress, place)
        _write(output, stats, records, kept, place)
        return TaskProfile(output, stats, profiled, int(packed.attention_mask.sum()),
                           seq_length, place.world, dev, place.main,
                           time.perf_counter() - t0)


def _check_outputs(model: Path, data: list[Path], output: Path, records: Path | None) -> None:
    """The outputs are no input nor inside one, and may be written (before anything loads)."""
    from esft_rs.files.outputs import check_outputs, check_target
    from esft_rs.routing.stats import OUTPUT_KIND as ROUTING

    check_outputs([output, records], [model, *data])
    check_target(output, kind=ROUTING)
    if records is not None and records.parent.is_dir():  # else made (with parents) at the end
        check_target(records)


def _read_inputs(model: Path, data: list[Path], chat_template: str, skip_bad: bool
                 ) -> tuple[Tokenizer, TaskData]:
    """The tokenizer and the task data: everything that can be wrong with the inputs fails
    here, before the model loads. Each skipped line is logged."""
    from esft_rs.data import read_task_data
    from esft_rs.data.tokenizer import load_tokenizer
    from esft_rs.errors import InvalidFileError
    from esft_rs.files.inputs import check_file

    if not (model / "config.json").exists():
        raise InvalidFileError(f"{model}: no config.json (not a model directory)")
    check_file(model / "config.json")
    tokenizer = load_tokenizer(model, chat_template)
    task = read_task_data(data, skip_bad=skip_bad)
    for line in task.skipped:
        log.warning("skipped %s", line, extra={"skipped": True})
    return tokenizer, task


def _row_length(seq_length: int | None, model: MoEModel) -> int:
    """The packed row length: ``seq_length`` cut to the model's context with a note, as
    train and plan cut it; unset, 4096 or the context if shorter (no note: nothing asked
    was changed)."""
    from esft_rs.data.preflight import context_length, fit_to_context

    limit = context_length(model)
    if seq_length is None:
        return fit_to_context(DEFAULT_SEQ_LEN, limit)[0]
    seq_length, note = fit_to_context(seq_length, limit)
    if note is not None:
        log.warning("%s", note)
    return seq_length


def _take_rows(packed: Packed, model: MoEModel, data: list[Path], tokens: int,
               batch_size: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """The batches to profile: packed rows in order until they hold ``tokens`` real tokens
    (the row that reaches it stays), their ids checked against the model's vocabulary;
    and the real tokens they hold."""
    from esft_rs.data.preflight import check_token_ids

    ids, mask = packed.input_ids, packed.attention_mask
    check_token_ids(int(ids.min()), int(ids.max()), model, ",".join(map(str, data)))
    real = mask.sum(dim=1)
    rows = min(int((real.cumsum(0) < tokens).sum()) + 1, len(real))
    ids, mask = ids[:rows], mask[:rows]
    batches = [(ids[i:i + batch_size], mask[i:i + batch_size])
               for i in range(0, rows, batch_size)]
    return batches, int(real[:rows].sum())


def _run(model: MoEModel, batches: list[tuple[torch.Tensor, torch.Tensor]], keep_records: bool,
         metadata: dict[str, str], progress: bool, place: Dist
         ) -> tuple[RoutingStats, Records | None]:
    """``profile_model`` over ``batches``, with a bar in tokens on rank 0 (its total: the
    real tokens of the batches that rank runs)."""
    bar = None
    if progress and place.rank == 0:
        from tqdm import tqdm

        mine = sum(int(m.sum()) for _, m in batches[::place.world])
        bar = tqdm(total=mine, unit="tok", unit_scale=True, desc="profile", dynamic_ncols=True)
    try:
        return profile_model(model, batches, keep_records=keep_records, metadata=metadata,
                             progress=bar.update if bar is not None else False)
    finally:
        if bar is not None:
            bar.close()


def _write(output: Path, stats: RoutingStats, records: Path | None, kept: Records | None,
           place: Dist) -> None:
    """The stats file and the records folder, committed together by rank 0 (every rank
    calls): a failure leaves neither, and an earlier pair as it was."""
    from esft_rs.distributed import from_rank0
    from esft_rs.files.outputs import staged_together

    with ExitStack() as stack:
        tmp: dict[Path | None, Path] = {}
        if place.main:
            if records is not None:
                records.parent.mkdir(parents=True, exist_ok=True)
            targets = {p: p == records for p in (output, records) if p is not None}
            tmp = stack.enter_context(staged_together(targets))
            stats.save(tmp[output])
        if kept is not None:
            folder = from_rank0(tmp.get(records))
            if place.world > 1:  # rank_<r>/ folders, as profile() writes them
                folder = folder / f"rank_{place.rank}"
                folder.mkdir()
            kept.write(folder)
        place.barrier()  # every rank's records are in; rank 0 commits as the block ends


def _fingerprint(model: Path) -> dict[str, str]:
    """The model's fingerprint for the stats metadata, so that select and routing-report
    can refuse statistics of different models; none for a model without safetensors."""
    from esft_rs.files.adapter import fingerprint
    from esft_rs.routing.stats import MODEL_FINGERPRINT

    try:
        return {MODEL_FINGERPRINT: fingerprint(model)}
    except EsftError:
        return {}

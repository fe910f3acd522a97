"""``esft_rs.train``: the whole job, from a model and task data to an adapter in OUT_DIR."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esft_rs.errors import EsftError, EsftValueError, InvalidFileError, MismatchError, option
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.training.config import TrainConfig, config_path, load_config
from esft_rs.training.run_dir import ADAPTER, write_outputs

if TYPE_CHECKING:
    import torch

    from esft_rs.files.inspection import TensorInfo
    from esft_rs.files.tensor_stream import Layout
    from esft_rs.training.freeze import Trainable
    from esft_rs.training.loop import FitResult

log = logging.getLogger("esft_rs.training")

PathLike = str | os.PathLike[str]


@dataclass
class TrainResult:
    out_dir: Path
    adapter: Path
    experts: ExpertConfig  # what was trained (random mode: the drawn experts)
    config: TrainConfig
    fit: FitResult
    model: torch.nn.Module  # the trained model, holding the adapter's weights
    merged: Path | None = None


def train(
    model: PathLike | torch.nn.Module,
    data: PathLike | Mapping[str, torch.Tensor],
    output: PathLike,
    experts: PathLike | ExpertConfig | None = None,
    config: PathLike | TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    save_merged: PathLike | None = None,
    requantize_fp8: bool = False,
    base: PathLike | None = None,
    skip_bad: bool = False,
    device: str | None = "auto",
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train the selected experts of ``model`` on ``data``; write ``output/adapter.safetensors``.

    ``model`` is a checkpoint directory or an in-memory model whose parameter
    names are checkpoint names (then ``base`` names its checkpoint, for the
    fingerprint and ``save_merged``; ``requantize_fp8`` lets that merge quantise
    trained tensors into a block-FP8 base). ``data`` is a chat JSONL file or packed
    tensors (``input_ids``, ``labels`` [, ``attention_mask``]). ``config`` is a
    YAML file (official ESFT keys), a starter config's name (``base``, ``small``) or a
    ``TrainConfig``; ``overrides`` set keys (ESFT-LoRA: ``lora_rank``, ``lora_alpha``,
    ``lora_targets`` as a list or a comma-separated string). An earlier run in ``output``
    is continued with ``resume``, or replaced with ``overwrite`` (kept until the new run
    has finished).
    Under torchrun, every process calls this; rank 0 writes the outputs.
    """
    import torch

    from esft_rs.distributed import device_for, process_group
    from esft_rs.files.adapter import fingerprint as fingerprint_of
    from esft_rs.training.freeze import freeze
    from esft_rs.training.loop import Loop

    out = Path(output)
    config = _check_paths(out, model, data, experts, config, base, save_merged, overwrite)
    cfg = _config(config, overrides)
    dev = device_for(device)
    with run_lock(out), process_group(dev) as place:
        if not isinstance(model, torch.nn.Module):
            base = model
        expert_cfg, origin = _experts(experts)
        cfg, fsdp, ep, auto_note = _choose_parallelism(model, base, expert_cfg, cfg, place, dev)
        resume_from, replacing = _check_out_dir(out, resume, overwrite)
        net, lazy = _build_model(model, fsdp or ep)
        resolved, placement = _select_experts(net, expert_cfg, cfg, origin, ep, base, place)
        spec, lora_trainables, extra = _attach_lora(net, resolved, cfg)
        cfg, tensors, bos, notes = _read_data(data, base, cfg, skip_bad, net)
        fingerprint = fingerprint_of(base) if base is not None else None
        train_idx, val_idx = _check_rows(net, tensors, bos, data, cfg, place, notes, auto_note)
        trainables = lora_trainables if spec is not None else freeze(net, resolved)
        on_disk, adapter_layout = _check_base(net, trainables, spec, base, ep, place, dev,
                                              fp8_ok=save_merged is None or requantize_fp8)
        trainables = _place_model(net, trainables, model, lazy, cfg, fsdp, ep, place, dev)
        identity = _identity(tensors, fingerprint, resolved, cfg, place.world)
        if resume and (out / ADAPTER).exists():
            _refuse_finished(out, resume_from, identity)
        aside, created = _open_run_dir(out, place, replacing, placement, resolved)
        try:
            place.barrier()
            fit, adapter, merged = _fit_and_write(
                Loop(net, trainables, tensors, train_idx, val_idx, cfg, out, device=dev,
                     place=place, identity=identity),
                resume_from, progress, on_step, net, trainables, on_disk, adapter_layout, place,
                dev, resolved, fingerprint, cfg, base, save_merged, requantize_fp8, extra)
        except BaseException:  # Ctrl-C in Loop's set-up too
            _restore_run_dir(out, aside, created)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        place.barrier()
        return TrainResult(out, adapter, resolved, cfg, fit, net, merged)


def _check_paths(out: Path, model: object, data: object, experts: object,
                 config: PathLike | TrainConfig | None, base: PathLike | None,
                 save_merged: PathLike | None, overwrite: bool) -> PathLike | TrainConfig | None:
    """Outputs checked before anything loads: none is an input or inside one, ``out`` is (or
    can become) a writable run directory, ``save_merged`` is new. Returns ``config`` with a
    starter config's name resolved to its file."""
    from esft_rs.files.outputs import check_kind, check_outputs, check_target, check_writable

    def given(x: object) -> PathLike | None:
        return x if isinstance(x, str | os.PathLike) else None

    if given(config) is not None:
        config = config_path(given(config))  # type: ignore[arg-type]
    check_outputs([out, save_merged], [given(model), given(data), given(experts), given(config),
                                       base])
    check_kind(out, directory=True)
    if os.environ.get("RANK", "0") == "0":  # the process that writes the run
        check_writable(out)
        if overwrite and out.is_dir():  # the earlier run is set aside beside it
            check_writable(out.parent.resolve())
    if save_merged is not None:
        check_target(save_merged, overwrite=False)
    return config


def _choose_parallelism(model: PathLike | torch.nn.Module, base: PathLike | None,
                        experts: ExpertConfig | None, cfg: TrainConfig, place: Any,
                        dev: torch.device) -> tuple[TrainConfig, bool, bool, str | None]:
    """``cfg`` with ``parallelism: auto`` resolved (``parallelism.for_training``), whether
    the run uses FSDP and EP, and the note that says what auto chose (shown with the
    others, once the data has passed its checks)."""
    import torch

    from esft_rs.training import expert_parallel, sharding
    from esft_rs.training.parallelism import for_training

    chosen, auto_note = for_training(
        base if not isinstance(model, torch.nn.Module) else None, experts, cfg, place, dev)
    cfg = cfg.with_overrides({"parallelism": chosen}, "parallelism auto")
    fsdp = sharding.uses_fsdp(cfg.parallelism, place.world)
    ep = expert_parallel.uses_ep(cfg.parallelism, place.world)
    return cfg, fsdp, ep, auto_note


def _build_model(model: PathLike | torch.nn.Module, sharded: bool
                 ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(the model, the same model when it is built on the meta device, else None): under
    FSDP and EP a checkpoint is read shard by shard once the model is sharded
    (``sharded_load.fill``), so that no rank holds it whole."""
    import torch

    from esft_rs.training import sharded_load

    if sharded and not isinstance(model, torch.nn.Module):
        lazy = sharded_load.meta_model(model)
        return lazy, lazy
    return _load_model(model), None


def _select_experts(net: torch.nn.Module, experts: ExpertConfig | None, cfg: TrainConfig,
                    origin: str, ep: bool, base: PathLike | None, place: Any
                    ) -> tuple[ExpertConfig, Any]:
    """The experts to train (``resolve_experts``: random mode draws them), and under EP
    where each lives (``None`` otherwise): each rank keeps its own experts only, before
    anything is read."""
    from esft_rs.training import expert_parallel
    from esft_rs.training.freeze import moe_layout, resolve_experts

    layout = moe_layout((n, tuple(p.shape)) for n, p in net.named_parameters())
    resolved = resolve_experts(layout, experts, cfg.mode, cfg.seed, origin)
    placement = None
    if ep:
        expert_parallel.check_model(net, base if base is not None else type(net).__name__)
        placement = expert_parallel.place_experts(layout, resolved.experts, place.world)
        expert_parallel.localize(net, placement, place.rank)
    return resolved, placement


def _attach_lora(net: torch.nn.Module, resolved: ExpertConfig, cfg: TrainConfig
                 ) -> tuple[Any, list[Trainable] | None, dict[str, str]]:
    """ESFT-LoRA (``cfg.lora_rank``): the adapters attached, their trainables and the
    adapter's metadata; (None, None, {}) without LoRA. Before the data, so that a target
    the model lacks is named first."""
    from esft_rs.training import lora

    spec = lora.LoraSpec.of(cfg)
    if spec is None:
        return None, None, {}
    trainables, targets = lora.attach(net, resolved, spec, cfg.seed)
    return spec, trainables, lora.metadata(spec, targets)


def _read_data(data: PathLike | Mapping[str, torch.Tensor], base: PathLike | None,
               cfg: TrainConfig, skip_bad: bool, net: torch.nn.Module
               ) -> tuple[TrainConfig, dict[str, torch.Tensor], int | None, list[str]]:
    """The packed rows (``_load_data``) with ``cfg.seq_length`` cut to the model's context
    for chat data, and the notes to show once the rows have passed their checks."""
    notes: list[str] = []
    if not isinstance(data, Mapping):
        cfg, notes = _fit_context(cfg, net)
    tensors, bos = _load_data(data, base, cfg, skip_bad)
    return cfg, tensors, bos, notes


def _check_rows(net: torch.nn.Module, tensors: Mapping[str, torch.Tensor], bos: int | None,
                data: object, cfg: TrainConfig, place: Any, notes: list[str],
                auto_note: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and validation split, checked (rows to train on, token ids the model
    knows, answer tokens to learn from); then the notes are shown, from the main process:
    a run that fails says only what is wrong."""
    from esft_rs.training.batches import split

    train_idx, val_idx = split(len(tensors["input_ids"]), cfg.val_ratio, cfg.seed)
    notes = notes + _check_enough(len(train_idx), tuple(tensors["input_ids"].shape), cfg,
                                  place.world)
    _check_data(net, tensors, train_idx, data, bos)
    if place.world > 1:
        notes.append(batch_note(cfg, place.world, int(tensors["input_ids"].shape[-1])))
    if auto_note is not None and place.main:
        notes.append(auto_note)
    for note in notes:
        log.warning("%s", note)
    return train_idx, val_idx


def _check_base(net: torch.nn.Module, trainables: list[Trainable], spec: Any,
                base: PathLike | None, ep: bool, place: Any, dev: torch.device, *,
                fp8_ok: bool) -> tuple[dict[str, TensorInfo], Layout]:
    """The base checkpoint's tensors (headers) and the adapter's layout (name, dtype, shape
    of each tensor it will hold), known before any sharding (under EP, of every rank's
    experts); every trained tensor is checked against the base, so that the adapter
    can be merged into it (``_check_against_base``)."""
    from esft_rs.training import expert_parallel, lora
    from esft_rs.training.freeze import checkpoint_layout, checkpoint_shapes

    on_disk = _base_tensors(base) if base is not None else {}
    layout = (expert_parallel.adapter_layout(net, trainables, on_disk, place, dev)
              if ep else lora.layout(net, trainables, on_disk) if spec
              else checkpoint_layout(net, trainables, on_disk))
    if base is not None:
        shapes = (lora.base_shapes(net, trainables, on_disk) if spec
                  else checkpoint_shapes(net, trainables, on_disk))
        _check_against_base(base, on_disk, shapes, fp8_ok=fp8_ok)
    return on_disk, layout


def _place_model(net: torch.nn.Module, trainables: list[Trainable],
                 model: PathLike | torch.nn.Module, lazy: torch.nn.Module | None,
                 cfg: TrainConfig, fsdp: bool, ep: bool, place: Any, dev: torch.device
                 ) -> list[Trainable]:
    """The model on its device(s): trained tensors as fp32 master weights (``_prepare``),
    then sharded (FSDP: the trainables become the shards), read shard by shard into a meta
    model, and the EP exchange installed. Returns the trainables to optimise."""
    from esft_rs.training import expert_parallel, sharded_load, sharding

    # Under FSDP, or for a meta model, the tensors are moved or read shard by shard.
    _prepare(net, trainables, dev, cfg, move=not fsdp and lazy is None)
    if fsdp:
        trainables = sharding.shard(net, trainables, place, dev, prefetch=cfg.fsdp_prefetch)
    if lazy is not None:
        sharded_load.fill(net, model, dev)
    if ep:
        expert_parallel.install(net, place, dev)
    return trainables


def _identity(tensors: Mapping[str, torch.Tensor], fingerprint: str | None,
              resolved: ExpertConfig, cfg: TrainConfig, world: int) -> dict[str, Any]:
    """What a checkpoint of this run records of its inputs: a resume from other inputs
    is refused (``checkpoint.check_identity``)."""
    from esft_rs.training.loop import global_batch_size

    return {"base": fingerprint, "seq_length": int(tensors["input_ids"].shape[-1]),
            "data": _digest(tensors), "experts": resolved.to_json(),
            "config": cfg.identity(), "global_batch": global_batch_size(cfg, world)}


def _open_run_dir(out: Path, place: Any, replacing: bool, placement: Any,
                  resolved: ExpertConfig) -> tuple[Path | None, bool]:
    """The run directory made (main process): an earlier run being replaced is set aside
    first, and under EP the expert placement is written. Returns (the earlier run set
    aside, whether this run created ``out``), for ``_restore_run_dir``."""
    from esft_rs.training import expert_parallel

    aside = _set_aside(out) if place.main and replacing else None
    created = place.main and not out.exists()
    if place.main:
        out.mkdir(parents=True, exist_ok=True)
        if placement is not None:
            from esft_rs.files.outputs import write_file

            write_file(out / expert_parallel.PLACEMENT,
                       json.dumps(placement.describe(resolved.experts), indent=1) + "\n")
    return aside, created


def _restore_run_dir(out: Path, aside: Path | None, created: bool) -> None:
    """After a failed (or stopped) run: the earlier run comes back and the new one's files
    go; a directory this run created goes if it holds nothing to resume."""
    if aside is not None:
        shutil.rmtree(out, ignore_errors=True)
        aside.rename(out)
    elif created:
        _remove_if_nothing_to_resume(out)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Holds the run directory ``out`` for this run (the main process of a torchrun job):
    a second ``train`` onto it meanwhile is refused, not left to overwrite the first's
    checkpoints and adapter. The lock is a hidden file beside ``out``, gone after the run."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    lock = out.with_name(f".{out.name}.esft-lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # the parent is read-only (check_writable has vetted the run directory)
        yield
        return
    try:
        if not _try_lock(fd):
            try:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "another"
            except OSError:  # Windows: the holder's locked byte cannot be read
                holder = "another"
            raise EsftError(f"{out}: another train is writing to it now (process {holder});"
                            " wait for it, or choose another directory") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """An exclusive lock on open file ``fd`` without waiting: flock where there is one,
    msvcrt's byte lock on Windows; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _fit_and_write(
    loop: Any, resume_from: Path | None, progress: bool,
    on_step: Callable[[int, dict[str, Any]], None] | None, net: torch.nn.Module,
    trainables: list[Trainable], on_disk: Mapping[str, TensorInfo], layout: Layout,
    place: Any, dev: torch.device, resolved: ExpertConfig, fingerprint: str | None,
    cfg: TrainConfig, base: PathLike | None, save_merged: PathLike | None,
    requantize_fp8: bool, extra: dict[str, str],
) -> tuple[FitResult, Path, Path | None]:
    """Run the loop to its end and write OUT (and ``save_merged``); ``layout``: the adapter's
    tensors (name, dtype, shape), known before the first is gathered; ``extra``: metadata
    (ESFT-LoRA's ``esft.lora``)."""
    from esft_rs.training import expert_parallel, lora, sharding
    from esft_rs.training.freeze import checkpoint_tensors

    out = loop.out_dir
    fit = loop.fit(resume_from=resume_from, progress=progress, on_step=on_step)
    if fit.unchanged:
        log.warning(
            "%d trained tensors did not change (experts that no token reached?): %s",
            len(fit.unchanged), ", ".join(fit.unchanged[:5]),
        )
    adapter = out / ADAPTER
    merged = Path(save_merged) if save_merged is not None else None
    # One trained tensor's worth at a time: under --mode full they are the model.
    weights = (sharding.adapter_tensors(net, trainables, on_disk, place) if loop.fsdp
               else expert_parallel.adapter_tensors(net, trainables, on_disk, place, dev)
               if loop.ep
               else lora.tensors(net, trainables, on_disk) if extra
               else (kv for t in trainables
                     for kv in checkpoint_tensors(net, [t], on_disk).items())
               if place.main else iter(()))
    try:
        if place.main:
            write_outputs(out, weights, layout, resolved, fingerprint, cfg.to_dict(),
                          fit.metrics(), extra)
    finally:
        collections.deque(weights, maxlen=0)  # the gathers the other ranks wait in
    if place.main and merged is not None:
        _merge(base, adapter, merged, requantize_fp8)
    return fit, adapter, merged


#: What a run writes into its directory: all that ``overwrite`` may replace.
RUN_FILES = frozenset({ADAPTER, "expert_cfg.json", "train_config.yaml", "metrics.jsonl",
                       "checkpoints", "tensorboard", "placement.json"})


def _set_aside(out: Path) -> Path:
    """The earlier run in ``out``, renamed to a hidden sibling until the new one finishes."""
    aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    out.rename(aside)
    return aside


def _remove_if_nothing_to_resume(out: Path) -> None:
    """A run directory this run created, failed before its first checkpoint (or stopped by
    Ctrl-C while it set up): it holds nothing to resume and no adapter (only metrics), so it
    goes, and the run leaves nothing behind."""
    from esft_rs.training import checkpoint

    if checkpoint.latest(out) is None and not (out / ADAPTER).exists():
        shutil.rmtree(out, ignore_errors=True)


def _config(config: PathLike | TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    """The run's settings: ``config`` (a file, a starter's name, a ``TrainConfig`` or the
    defaults) with ``overrides`` applied; ``lora_targets`` may be a list in Python."""
    if isinstance(overrides.get("lora_targets"), list | tuple):
        overrides["lora_targets"] = ",".join(overrides["lora_targets"])
    if isinstance(config, TrainConfig):
        cfg = config
    elif config is None:
        cfg = TrainConfig()
    else:
        cfg, notes = load_config(config)
        for note in notes:
            log.warning("%s", note)
    return cfg.with_overrides(overrides, "arguments") if overrides else cfg


def _experts(experts: PathLike | ExpertConfig | None) -> tuple[ExpertConfig | None, str]:
    if experts is None or isinstance(experts, ExpertConfig):
        return experts, "expert config"
    return ExpertConfig.load(experts), os.fspath(experts)


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> tuple[Path | None, bool]:
    """(the checkpoint to resume from, whether an earlier run is to be replaced); an earlier
    run is refused unless resumed or, with ``overwrite``, replaced (if it holds only what a
    run writes)."""
    from esft_rs.training import checkpoint

    if resume and overwrite:
        raise EsftValueError(f"{option('resume', True)} continues the run in {out},"
                             f" {option('overwrite', True)} replaces it: pass one of them")
    found = checkpoint.latest(out)
    if resume:
        if found is None and not (out / ADAPTER).exists():
            log.warning("%s: no checkpoint to resume from; starting at step 0", out)
        return found, False
    if found is None and not (out / ADAPTER).exists():
        return None, False
    if not overwrite:
        raise EsftError(
            f"{out}: holds an earlier run; pass {option('resume', True)} to continue it,"
            f" {option('overwrite', True)} to replace it, or choose another directory"
        )
    others = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES)
    if others:
        raise EsftError(f"{out}: holds {others[0]!r}, which no run writes; not replaced"
                        " (choose another directory)")
    return None, True


def _refuse_finished(out: Path, last: Path | None, identity: dict[str, Any]) -> None:
    """``--resume`` of a run that wrote its adapter: nothing to do, and nothing is changed.
    A checkpoint made from other inputs is named as such first (the usual resume check)."""

    from esft_rs.training import checkpoint

    if last is not None:
        checkpoint.check_identity(last, checkpoint.read_state(last), identity)
    raise EsftError(
        f"{out}: the run is already finished ({ADAPTER} is written); nothing to resume"
        " (choose another directory to train again)"
    )


def _load_model(model: PathLike | torch.nn.Module) -> torch.nn.Module:
    import torch

    if isinstance(model, torch.nn.Module):
        return model
    from esft_rs.models import load_model

    return load_model(model)


def _load_data(
    data: PathLike | Mapping[str, torch.Tensor],
    base: PathLike | None,
    cfg: TrainConfig,
    skip_bad: bool,
) -> tuple[dict[str, torch.Tensor], int | None]:
    """Packed rows from chat data (``cfg.chat_template`` with the tokenizer of ``base``)
    or as given, and the tokenizer's BOS id (None for rows given)."""
    import torch

    if isinstance(data, Mapping):
        tensors = dict(data)
        if "attention_mask" not in tensors:
            tensors["attention_mask"] = torch.ones_like(tensors["input_ids"])
        if not len(tensors["input_ids"]):
            raise InvalidFileError("data: no training examples")
        return tensors, None
    from esft_rs.data import read_task_data
    from esft_rs.data.tokenizer import load_tokenizer

    if base is None:
        raise EsftError(f"{data}: chat JSONL needs the model directory, for its tokenizer")
    task = read_task_data(data, skip_bad=skip_bad)
    if task.skipped:
        log.warning("skipped %d bad lines, the first: %s", len(task.skipped), task.skipped[0])
    tokenizer = load_tokenizer(base, cfg.chat_template)
    packed = task.pack(tokenizer, seq_length=cfg.seq_length,
                       random_concat_ratio=cfg.random_concat_ratio, seed=cfg.seed)
    return packed._asdict(), tokenizer.bos


def _check_data(net: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
                train_idx: torch.Tensor, data: object, bos: int | None) -> None:
    """Packed rows against the model, before the first step: ids in its vocabulary, and
    answer tokens to learn from in the training split: tokens the loss counts other than
    the BOS that starts each example (the official format labels it, so a row of fully
    masked conversations still held loss tokens, BOS mid-row, and "trained" on them)."""
    from esft_rs.data import IGNORE_INDEX
    from esft_rs.data.preflight import check_answer_tokens, check_token_ids

    origin = "data" if isinstance(data, Mapping) else os.fspath(data)  # type: ignore[arg-type]
    ids = tensors["input_ids"]
    check_token_ids(int(ids.min()), int(ids.max()), net, origin)
    counted = tensors["labels"][train_idx][:, 1:]  # as the loss counts them (shifted)
    answers = (counted != IGNORE_INDEX) & (counted != bos if bos is not None else True)
    check_answer_tokens(int(answers.sum()), origin,
                        f"in the training split after packing into rows of {ids.shape[-1]}")


def _fit_context(cfg: TrainConfig, net: torch.nn.Module) -> tuple[TrainConfig, list[str]]:
    """Rows no longer than the model's context (``preflight.fit_to_context``), and the note
    that says so (returned)."""
    from dataclasses import replace

    from esft_rs.data.preflight import context_length, fit_to_context

    seq_length, note = fit_to_context(cfg.seq_length, context_length(net))
    return replace(cfg, seq_length=seq_length), [] if note is None else [note]


def batch_note(cfg: TrainConfig, world: int, row: int) -> str:
    """The global batch of a run on ``world`` processes, as its parts multiply."""
    from esft_rs.training.loop import global_batch_size

    n = global_batch_size(cfg, world)
    return (f"global batch {n} rows of {row} tokens a step = {world} processes x"
            f" per_device_batch_size {cfg.per_device_batch_size} x gradient_accumulation_steps"
            f" {cfg.gradient_accumulation_steps}")


def _check_enough(n_train: int, rows: tuple[int, ...], cfg: TrainConfig, world: int
                  ) -> list[str]:
    """Some training rows after the validation split; fewer than one global batch are
    cycled through (several epochs a step), with a note (returned)."""
    from esft_rs.training.loop import global_batch_size

    if n_train == 0:
        raise EsftError(
            f"no rows left to train on after the {cfg.val_ratio:g} validation split of {rows[0]}"
            f" packed row{'s' if rows[0] != 1 else ''} of {rows[-1]} tokens: pass"
            f" {option('val_ratio', 0)} (no validation), lower {option('seq_length')}, or add"
            " data"
        )
    need = global_batch_size(cfg, world)
    if n_train >= need:
        return []
    return [
        f"{n_train} training sequences (after the {cfg.val_ratio:g} validation split) are fewer"
        f" than one global batch of {need} (per_device_batch_size {cfg.per_device_batch_size} x"
        f" {world} process{'es' if world > 1 else ''} x gradient_accumulation_steps"
        f" {cfg.gradient_accumulation_steps}): each step cycles through them,"
        f" {need / n_train:.3g} epochs a step"
    ]


def _base_tensors(base: PathLike) -> dict[str, TensorInfo]:
    """The base checkpoint's tensors (headers only)."""
    from esft_rs.files.inspection import inspect as inspect_checkpoint

    return dict(inspect_checkpoint(base).tensors)


def _check_against_base(base: PathLike, known: Mapping[str, TensorInfo],
                        shapes: Mapping[str, tuple[int, ...] | None], *, fp8_ok: bool) -> None:
    """Every trained tensor must exist in the base checkpoint, or the adapter cannot merge;
    ``--save-merged`` into block-FP8 slots needs ``--requantize-fp8`` (checked before training)."""
    for name, shape in shapes.items():
        info = known.get(name)
        if info is None:
            raise MismatchError(f"{base}: has no tensor {name!r}, which the model trains")
        if shape is not None and tuple(info.shape) != shape:
            raise MismatchError(
                f"{base}: {name} has shape {list(info.shape)}, the model's is {list(shape)}"
            )
        if info.dtype == "F8_E4M3" and not fp8_ok:
            raise MismatchError(
                f"{base}: stores {name} in block FP8 (F8_E4M3), so {option('save_merged')} must"
                f" quantise the trained weights: pass {option('requantize_fp8', True)}, or leave"
                f" out {option('save_merged')} and merge later"
            )


def _prepare(model: torch.nn.Module, trainables: list[Trainable], dev: torch.device,
             cfg: TrainConfig, *, move: bool = True) -> None:
    """Place the model: frozen tensors keep the checkpoint's dtype; trained ones become fp32
    master weights (bf16 would round most 1e-5 updates away), which are the parameters
    themselves: no second copy. The forward computes in the checkpoint's dtype
    (``loop.autocast``); full mode holds 4 bytes of master, 4 of gradient and 8 of AdamW
    state per parameter, which FSDP2 divides among the ranks. Without ``move`` (FSDP,
    which moves each rank's shards) the model stays where it is."""
    if move:
        model.to(dev)
    for t in trainables:
        t.param.data = t.param.data.float()
    if cfg.gradient_checkpointing and not enable_checkpointing(model):
        log.warning("gradient_checkpointing: the model does not offer it; training without")


def enable_checkpointing(model: torch.nn.Module, *, use_reentrant: bool = False) -> bool:
    """Turn on activation checkpointing by the model's own method; False if it has none.

    transformers >= 5.23 names it ``activation_checkpointing_enable`` (the older
    ``gradient_checkpointing_enable`` warns that it goes in v6); earlier 5.x and the
    built-in model offer only the older name."""
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        enable = getattr(model, f"{name}_enable", None)
        if enable is None:
            continue
        key = f"{name}_kwargs"
        if key in inspect.signature(enable).parameters:
            enable(**{key: {"use_reentrant": use_reentrant}})
        else:
            enable()
        return True
    return False


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in ("input_ids", "labels", "attention_mask"):
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _merge(base: PathLike | None, adapter: Path, out: Path, requantize_fp8: bool) -> None:
    """The full fine-tuned model: the adapter merged into the base by the Rust streaming merge."""
    if base is None:
        raise EsftError("--save-merged needs the base checkpoint the model was loaded from")
    from esft_rs.files.merging import merge

    merge(base, adapter, out, requantize_fp8=requantize_fp8)

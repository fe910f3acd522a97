"""The training loop: plain torch, small enough to read in one sitting.

AdamW (no decay on 1-D tensors), warm-up then constant or cosine LR, gradient
accumulation, grad-norm clipping, bf16 autocast on CUDA, eval on a held-out
split keeping the best weights, resumable checkpoints, and under torchrun a
model sharded by FSDP2 (``esft_rs.training.sharding``), with its experts spread over the
ranks (``esft_rs.training.expert_parallel``) or replicated by DDP.

The loss of a step is the mean over all label tokens of the global batch
(every micro-step on every process): each process backpropagates its token-loss
sum divided by the global token count (times the world size, which the
gradient averaging of DDP and FSDP, and EP's ``finish_grads``, divides out), so 1
process and N processes with the same global batch compute the same gradient.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from esft_rs.data import causal_lm_loss, loss_tokens
from esft_rs.distributed import Dist, sum_over_batches
from esft_rs.files.outputs import write_file
from esft_rs.training import checkpoint, expert_parallel, sharding
from esft_rs.training.batches import GlobalBatches, rank_part
from esft_rs.training.config import TrainConfig
from esft_rs.training.freeze import Trainable
from esft_rs.training.grad_presence import GradPresence
from esft_rs.training.guards import StopRequest, check_finite

log = logging.getLogger("esft_rs.training")

METRICS = "metrics.jsonl"


@dataclass
class FitResult:
    steps: int
    train_loss: float | None
    eval_loss: float | None  # of the weights kept (the best by eval loss)
    best_step: int | None
    trainable_params: int
    optimizer_state_bytes: int
    grad_bytes: int  # of the gradients at an optimizer step (what ``esft-rs plan`` predicts)
    unchanged: list[str]  # trained tensors that ended equal to the base
    history: list[dict[str, Any]] = field(default_factory=list)
    # bytes this process holds (rank 0 under torchrun): frozen, trained, optimizer
    rank_bytes: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("history", "unchanged")}


def lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from 0, then constant or a cosine decay to 0 at ``cfg.steps`` (the
    Hugging Face schedules the official ESFT trains with)."""
    from torch.optim import lr_scheduler as sched

    if cfg.lr_scheduler == "constant":
        after: sched.LRScheduler = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        after = sched.CosineAnnealingLR(optimizer, T_max=max(1, cfg.steps - cfg.warmup_steps))
    if not cfg.warmup_steps:
        return after
    # LinearLR needs a positive start: one this small is 0 in the optimizer's arithmetic
    # (the first update of a warm-up moves no weight), as Hugging Face's start at 0.
    warmup = sched.LinearLR(optimizer, start_factor=1e-300, total_iters=cfg.warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, after], milestones=[cfg.warmup_steps])


def global_batch_size(cfg: TrainConfig, world: int) -> int:
    return cfg.per_device_batch_size * world * cfg.gradient_accumulation_steps


def make_optimizer(trainables: list[Trainable], cfg: TrainConfig) -> torch.optim.AdamW:
    # A rank that owns no trained expert (expert parallelism) has nothing to step: an empty
    # tensor stands in, which never gets a gradient and so never any state.
    params = [t.param for t in trainables] or [torch.nn.Parameter(torch.zeros(0))]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop.
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8, fused=True,
    )


def autocast(model: torch.nn.Module, device: torch.device) -> Any:
    """bf16 autocast on CUDA; on CPU, autocast to the frozen tensors' dtype when it is not
    fp32, so that fp32 masters of trained tensors meet the frozen bf16 ones."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    low = {p.dtype for p in model.parameters() if p.is_floating_point()} - {torch.float32}
    return torch.autocast("cpu", dtype=min(low, key=str)) if low else contextlib.nullcontext()


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this process holds (its shards, under FSDP2)."""
    return sum(
        _local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the label tokens of ``batch``, plus the
    model's auxiliary (expert-balance) loss per label token when it has one."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = causal_lm_loss(getattr(out, "logits", out), batch["labels"], reduction="sum")
    aux = getattr(getattr(model, "module", model), "aux_loss", None)
    extra = aux() if callable(aux) else None
    if extra is not None:
        loss = loss + extra * loss_tokens(batch["labels"])
    return loss


class _Anchored(torch.nn.Module):
    """``model`` for DDP, its output tied to a parameter of its own at zero weight: a rank
    whose tokens reach no trained expert then still runs backward, which is where DDP
    joins the gradient all-reduce of the other ranks (its share counting as zero);
    without it, that rank's backward raised (nothing required grad) or skipped the
    collective (the other ranks hung). The anchor is in no optimizer."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.module = model
        self.anchor = torch.nn.Parameter(torch.zeros((), device=device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        zero = self.anchor * 0
        if torch.is_tensor(out):
            return out + zero
        out.logits = out.logits + zero  # a transformers ModelOutput
        return out

    def aux_loss(self) -> torch.Tensor | None:
        aux = getattr(self.module, "aux_loss", None)
        return aux() if callable(aux) else None


class Loop:
    """One training run over packed data; ``fit`` runs it to ``cfg.steps``."""

    def __init__(
        self,
        model: torch.nn.Module,
        trainables: list[Trainable],
        data: dict[str, torch.Tensor],
        train_idx: torch.Tensor,
        val_idx: torch.Tensor,
        cfg: TrainConfig,
        out_dir: Path,
        *,
        device: torch.device,
        place: Dist,
        identity: dict[str, Any],
    ) -> None:
        self.model, self.trainables, self.data = model, trainables, data
        self.val_idx, self.cfg, self.out_dir = val_idx, cfg, out_dir
        self.device, self.place, self.identity = device, place, identity
        self.batches = GlobalBatches(train_idx, global_batch_size(cfg, place.world), cfg.seed)
        self.params = [t.param for t in trainables]
        self.optimizer = make_optimizer(trainables, cfg)
        self.scheduler = lr_schedule(self.optimizer, cfg)
        self.autocast = autocast(model, device)
        self.fsdp = sharding.uses_fsdp(cfg.parallelism, place.world)
        self.ep = place.world > 1 and expert_parallel.placement_of(model) is not None
        # FSDP gives every trained tensor a gradient; which ones one process would have
        # stepped is recorded here (DDP leaves the others' unset itself).
        self.presence = GradPresence(trainables) if self.fsdp else None
        self.ddp = model
        if place.world > 1 and not self.fsdp and not self.ep:
            # Experts that get no tokens in a micro-batch have no gradient on that rank.
            # Gradients are views into DDP's all-reduce buckets, not a second copy of them.
            # Buffers are not broadcast at each forward: every rank loads the same ones and
            # training changes none (rotary tables, routing biases, the trained slices' ids,
            # ESFT-LoRA's copy of the selected experts' rows, which is their whole size).
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                _Anchored(model, device),
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True, gradient_as_bucket_view=True,
                broadcast_buffers=False,
            )
        self.best: dict[str, torch.Tensor] | None = None
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.window = _empty_window()
        self.history: list[dict[str, Any]] = []
        self.grad_bytes = 0
        self._warned_empty_eval = False

    # --- data -----------------------------------------------------------------------------

    def _batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: self.data[k][idx].to(self.device, non_blocking=True)
                for k in ("input_ids", "labels", "attention_mask")}

    # --- one optimizer step -------------------------------------------------------------

    def step(self, step: int) -> tuple[float, int, float, int]:
        """Run optimizer step ``step`` (0-based); returns loss, label tokens, grad norm, tokens."""
        cfg, place = self.cfg, self.place
        batch = self.batches(step)
        n_label = loss_tokens(self.data["labels"][batch])
        scale = place.world / max(1, n_label)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(cfg.gradient_accumulation_steps):
            part = rank_part(batch, micro, place.rank, place.world, cfg.per_device_batch_size)
            last = micro == cfg.gradient_accumulation_steps - 1
            # DDP all-reduces at the last micro-step only (its buckets hold the sum); FSDP
            # reduce-scatters at each, so that no rank ever holds unsharded gradients.
            sync = (contextlib.nullcontext() if last or place.world == 1 or self.fsdp or self.ep
                    else self.ddp.no_sync())
            with sync:
                with self.autocast:
                    loss = loss_sum(self.ddp, self._batch(part))
                # No token reached a trained expert (only experts train): a zero gradient.
                # One process alone may skip backward; under torchrun every rank must run it.
                if loss.requires_grad or place.world > 1:
                    (loss * scale).backward()
            total += loss.detach()
        if self.presence is not None:
            self.presence.drop_unused(place)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        if self.ep:
            expert_parallel.finish_grads(self.model, self.trainables, place)
            norm = expert_parallel.clip_grad_norm(self.model, self.trainables, max_norm, place,
                                                  self.device)
        else:
            norm = sharding.full(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        loss_value = float(place.sum(total)) / max(1, n_label)
        check_finite(step + 1, loss_value, float(norm))  # before the update reaches the weights
        self.grad_bytes = max(self.grad_bytes, sum(
            _local_bytes(p.grad) for p in self.params if p.grad is not None))
        self.optimizer.step()
        if self.fsdp:
            sharding.sync_fused_slices(self.model)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(self.data["attention_mask"][batch].sum())
        return loss_value, n_label, float(norm), tokens

    def _trained_count(self) -> int:
        """Trained parameters of the whole run (under EP each rank holds its experts')."""
        if not self.ep:
            return sum(p.numel() for p in self.params)
        local = sum(t.param.numel() for t in self.trainables
                    if expert_parallel.is_local(self.model, t))
        total = torch.tensor(local, dtype=torch.float64, device=self.device)
        return int(self.place.sum(total)) + sum(
            t.param.numel() for t in self.trainables
            if not expert_parallel.is_local(self.model, t))

    # --- eval -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Loss over the held-out rows, in batches of ``per_device_batch_size`` spread over
        the ranks as ``esft_rs.evaluate`` spreads them (``sum_over_batches``)."""
        if not len(self.val_idx):
            return None
        self.model.eval()
        parts = self.val_idx.split(self.cfg.per_device_batch_size)

        def run(i: int) -> torch.Tensor:
            batch = self._batch(parts[i])
            return torch.stack([loss_sum(self.model, batch).double(),
                                torch.tensor(loss_tokens(batch["labels"]), dtype=torch.float64,
                                             device=self.device)])

        with self.autocast:
            loss, n = sum_over_batches(self.model, len(parts), run, 2, self.device,
                                       self.place).tolist()
        if self.fsdp:
            sharding.reshard(self.model)
        self.model.train()
        if not n:  # no answer token among the held-out rows: there is no loss to report
            if not self._warned_empty_eval:
                log.warning("the validation rows hold no answer tokens: no eval loss, and the"
                            " last weights are kept")
                self._warned_empty_eval = True
            return None
        return loss / n

    def _keep_if_best(self, step: int, loss: float) -> None:
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            # a shard per rank under FSDP (on the device); else a host copy
            self.best = {t.name: t.param.detach().clone() if sharding.is_sharded(t.param)
                         else t.param.detach().cpu().clone() for t in self.trainables}

    # --- checkpoints -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {**self.identity, "window": self.window, "best_loss": self.best_loss,
                "best_step": self.best_step, "world": self.place.world}

    def save(self, step: int) -> None:
        checkpoint.write(
            self.out_dir, step, model=self.model, trainables=self.trainables, best=self.best,
            optimizer=self.optimizer, scheduler=self.scheduler, state=self._state(),
            place=self.place,
        )

    def restore(self, path: Path) -> int:
        state = checkpoint.read_state(path, self.cfg.steps)
        checkpoint.check_identity(path, state, self.identity)
        try:
            window = {k: type(v)(state["window"][k]) for k, v in _empty_window().items()}
            best_step, best_loss = state["best_step"], state["best_loss"]
            if best_step is not None:
                best_step, best_loss = int(best_step), float(best_loss)
        except (KeyError, TypeError, ValueError) as e:
            raise checkpoint.damaged(path, e) from None
        if best_step is not None:
            self._keep_if_best(best_step, best_loss)  # tensors to load into
        checkpoint.read(
            path, model=self.model, trainables=self.trainables, optimizer=self.optimizer,
            scheduler=self.scheduler, best=self.best, place=self.place,
        )
        if self.fsdp:
            sharding.sync_fused_slices(self.model)
        self.window = window
        self.best_loss, self.best_step = best_loss, best_step
        return int(state["step"])

    # --- the run ------------------------------------------------------------------------------

    def fit(
        self,
        *,
        resume_from: Path | None = None,
        progress: bool = True,
        on_step: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> FitResult:
        cfg, place = self.cfg, self.place
        initial = _checksums(self.trainables)  # every rank calls: it gathers sharded tensors
        start = self.restore(resume_from) if resume_from is not None else 0
        metrics = _Metrics(self.out_dir, start, enabled=place.main)
        bar = _progress(cfg.steps, start, enabled=progress and place.main)
        self.model.train()
        train_loss = None
        stop = StopRequest(place.sum if place.world > 1 else None, self.device)
        try:
            tick = time.perf_counter()
            for step in range(start, cfg.steps):
                if stop():
                    raise KeyboardInterrupt
                loss, n_label, norm, tokens = self.step(step)
                done = step + 1
                w = self.window
                w["loss"] += loss * n_label
                w["tokens"] += n_label
                w["seen"] += tokens
                record: dict[str, Any] = {"step": done, "loss": loss}
                if done % cfg.logging_steps == 0 or done == cfg.steps:
                    elapsed = time.perf_counter() - tick
                    train_loss = w["loss"] / max(1, w["tokens"])
                    record = {
                        "step": done, "loss": train_loss, "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": norm, "epoch": round(self.batches.epoch(done), 4),
                        "tokens_per_s": round(w["seen"] / max(elapsed, 1e-9), 1),
                    }
                    metrics.write(record)
                    self.history.append(record)
                    self.window = _empty_window()
                    tick = time.perf_counter()
                    bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if done % cfg.eval_steps == 0 or done == cfg.steps:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        self._keep_if_best(done, eval_loss)
                        ev = {"step": done, "eval_loss": eval_loss}
                        metrics.write(ev)
                        self.history.append(ev)
                if done % cfg.save_steps == 0:
                    self.save(done)
                bar.update(1)
                if on_step is not None:
                    on_step(done, record)
        finally:
            stop.close()
            bar.close()
            metrics.close()
        if self.best is not None:
            with torch.no_grad():
                for t in self.trainables:
                    t.param.copy_(self.best[t.name])
        if self.fsdp:
            sharding.sync_fused_slices(self.model)
        unchanged = [n for n, c in _checksums(self.trainables).items() if c == initial[n]]
        return FitResult(
            steps=cfg.steps,
            train_loss=train_loss,
            eval_loss=self.best_loss,
            best_step=self.best_step,
            trainable_params=self._trained_count(),
            optimizer_state_bytes=optimizer_state_bytes(self.optimizer),
            grad_bytes=self.grad_bytes,
            unchanged=unchanged,
            history=self.history,
            rank_bytes=sharding.rank_bytes(self.model, self.optimizer),
        )


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of ``t`` (its shard, for a sharded tensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _checksums(trainables: list[Trainable]) -> dict[str, int]:
    """Sum of each trained tensor's bit patterns (in its checkpoint dtype): any update to a
    tensor changes it, and unlike a copy it costs no memory, even in full mode (sharded
    tensors are gathered one at a time)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return {
        n: int(v.contiguous().view(ints[v.element_size()]).sum(dtype=torch.int64))
        for t in trainables for n, v in t.current(sharding.full(t.param.detach())).items()
    }


def _empty_window() -> dict[str, float]:
    # Sums since the last log: loss x label tokens, label tokens, tokens seen (all processes).
    return {"loss": 0.0, "tokens": 0, "seen": 0}


class _Metrics:
    """``metrics.jsonl`` (records after the resumed step dropped) and TensorBoard if installed.

    The file is replaced whole at each record (``esft_rs.files.outputs``): it never ends
    in half a line, whatever stops the run."""

    def __init__(self, out_dir: Path, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = out_dir / METRICS
        self.lines: list[str] = []
        if self.path.is_file():
            self.lines = [line + "\n" for line in self.path.read_text().splitlines()
                          if line.strip() and json.loads(line)["step"] <= start]
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return

        self.lines.append(json.dumps(record) + "\n")
        write_file(self.path, "".join(self.lines))
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            if self.tb is not None:
                self.tb.close()


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="train",
                dynamic_ncols=True)

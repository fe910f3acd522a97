"""The training loop: plain torch, small enough to read in one sitting.

AdamW (no decay on 1-D tensors), warm-up then constant or cosine LR, gradient
accumulation, grad-norm clipping, bf16 autocast on CUDA, eval on a held-out
split keeping the best weights, resumable checkpoints, and DDP under torchrun.

The loss of a step is the mean over all label tokens of the global batch
(every micro-step on every process): each process backpropagates its token-loss
sum divided by the global token count (times the world size, which DDP's
gradient averaging divides out), so 1 process and N processes with the same
global batch compute the same gradient.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from esft_rs.data import causal_lm_loss, loss_tokens
from esft_rs.training import checkpoint
from esft_rs.training.batches import GlobalBatches, rank_part
from esft_rs.training.config import TrainConfig
from esft_rs.training.freeze import Trainable

log = logging.getLogger("esft_rs.training")

METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


def init_distributed(device_type: str) -> tuple[Dist, bool]:
    """Join the torchrun process group if there is one: gloo on CPU, nccl on CUDA.

    Returns the placement and whether this call created the group (and must destroy it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return Dist(dist.get_rank(), dist.get_world_size(), local), created


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

    def metrics(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("history", "unchanged")}


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """LR factor after ``step`` optimizer steps (the Hugging Face schedules' formulas)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return step / max(1, cfg.warmup_steps)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def global_batch_size(cfg: TrainConfig, world: int) -> int:
    return cfg.per_device_batch_size * world * cfg.gradient_accumulation_steps


def make_optimizer(trainables: list[Trainable], cfg: TrainConfig) -> torch.optim.AdamW:
    params = [t.param for t in trainables]
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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.autocast = autocast(model, device)
        self.ddp = model
        if place.world > 1:
            # Experts that get no tokens in a micro-batch have no gradient on that rank.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.best: dict[str, torch.Tensor] | None = None
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.window = _empty_window()
        self.history: list[dict[str, Any]] = []
        self.grad_bytes = 0

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
            sync = contextlib.nullcontext() if last or place.world == 1 else self.ddp.no_sync()
            with sync:
                with self.autocast:
                    loss = loss_sum(self.ddp, self._batch(part))
                (loss * scale).backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(
            self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        )
        self.grad_bytes = max(self.grad_bytes, sum(
            _local_bytes(p.grad) for p in self.params if p.grad is not None))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = float(place.sum(total)) / max(1, n_label)
        tokens = int(self.data["attention_mask"][batch].sum())
        return loss_value, n_label, float(norm), tokens

    # --- eval -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not len(self.val_idx):
            return None
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        mine = self.val_idx[self.place.rank :: self.place.world]
        # A process may hold no validation rows; it still joins the sum below.
        for part in mine.split(self.cfg.per_device_batch_size) if len(mine) else ():
            batch = self._batch(part)
            with self.autocast:
                sums[0] += loss_sum(self.model, batch)
            sums[1] += loss_tokens(batch["labels"])
        self.model.train()
        loss, n = self.place.sum(sums).tolist()
        return loss / max(1.0, n)

    def _keep_if_best(self, step: int, loss: float) -> None:
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            self.best = {t.name: t.param.detach().cpu().clone() for t in self.trainables}

    # --- checkpoints -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {**self.identity, "window": self.window, "best_loss": self.best_loss,
                "best_step": self.best_step}

    def save(self, step: int) -> None:
        checkpoint.write(
            self.out_dir, step, trainables=self.trainables, best=self.best,
            optimizer=self.optimizer, scheduler=self.scheduler, state=self._state(),
            rank=self.place.rank, barrier=self.place.barrier,
        )

    def restore(self, path: Path) -> int:
        state = json.loads((path / "state.json").read_text())
        checkpoint.check_identity(path, state, self.identity)
        state, best = checkpoint.read(
            path, trainables=self.trainables, optimizer=self.optimizer,
            scheduler=self.scheduler, rank=self.place.rank,
        )
        self.window = state["window"]
        self.best, self.best_loss, self.best_step = best, state["best_loss"], state["best_step"]
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
        initial = _checksums(self.trainables)
        start = self.restore(resume_from) if resume_from is not None else 0
        metrics = _Metrics(self.out_dir, start, enabled=place.main)
        bar = _progress(cfg.steps, start, enabled=progress and place.main)
        self.model.train()
        train_loss = None
        try:
            tick = time.perf_counter()
            for step in range(start, cfg.steps):
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
            bar.close()
            metrics.close()
        if self.best is not None:
            with torch.no_grad():
                for t in self.trainables:
                    t.param.copy_(self.best[t.name])
        unchanged = [n for n, c in _checksums(self.trainables).items() if c == initial[n]]
        return FitResult(
            steps=cfg.steps,
            train_loss=train_loss,
            eval_loss=self.best_loss,
            best_step=self.best_step,
            trainable_params=sum(p.numel() for p in self.params),
            optimizer_state_bytes=optimizer_state_bytes(self.optimizer),
            grad_bytes=self.grad_bytes,
            unchanged=unchanged,
            history=self.history,
        )


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of ``t`` (its shard, for a sharded tensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _checksums(trainables: list[Trainable]) -> dict[str, int]:
    """Sum of each trained tensor's bit patterns (in its checkpoint dtype): any update to a
    tensor changes it, and unlike a copy it costs no memory, even in full mode."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return {
        n: int(v.contiguous().view(ints[v.element_size()]).sum(dtype=torch.int64))
        for t in trainables for n, v in t.current().items()
    }


def _empty_window() -> dict[str, float]:
    # Sums since the last log: loss x label tokens, label tokens, tokens seen (all processes).
    return {"loss": 0.0, "tokens": 0, "seen": 0}


class _Metrics:
    """``metrics.jsonl`` (records after the resumed step dropped) and TensorBoard if installed."""

    def __init__(self, out_dir: Path, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        path = out_dir / METRICS
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="train",
                dynamic_ncols=True)

"""``parallelism: auto``: the parallelism a torchrun job uses, decided from the checkpoint's
headers (``esft_rs.training.planner``) and the memory of one device (every rank decides alike), and
said in one line once the inputs have passed their checks."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from esft_rs.distributed import Dist

if TYPE_CHECKING:
    import torch

    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.training.config import TrainConfig

def device_memory(device: torch.device, place: Dist) -> int | None:
    """Memory one rank may use: its GPU's, or on CPU the host's physical memory shared by
    the ranks of this node (None where the platform does not say)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX (Windows)
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", place.world))
    return total // max(1, local)


def for_training(model: str | os.PathLike[str] | None, experts: ExpertConfig | None,
                 cfg: TrainConfig, place: Dist, device: torch.device) -> tuple[str, str | None]:
    """``cfg.parallelism``, with ``auto`` resolved: of fsdp, ep and ddp, the one that fits
    and moves the fewest bytes per step (an in-memory model: fsdp); and the note that says
    so (None when nothing was chosen), for the caller to show once its inputs are checked."""
    if cfg.lora_rank:
        return lora_parallelism(cfg, place)
    if cfg.parallelism != "auto" or place.world == 1:
        return (cfg.parallelism if cfg.parallelism != "auto" else "fsdp"), None
    if model is None:
        return "fsdp", _note("fsdp", "an in-memory model has no checkpoint to plan from")
    from esft_rs.errors import EsftError
    from esft_rs.training.planner import plan

    try:
        result = plan(model, experts, cfg.mode, nproc=place.world, parallelism="auto",
                      seq_length=cfg.seq_length, per_device_batch_size=cfg.per_device_batch_size,
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                      gradient_checkpointing=cfg.gradient_checkpointing,
                      fsdp_prefetch=cfg.fsdp_prefetch, gpu_memory=device_memory(device, place),
                      device=device.type)
    except EsftError as e:  # the run itself names what is wrong with its inputs
        return "fsdp", _note("fsdp", f"no plan: {e}")
    return result.parallelism, _note(result.parallelism,
                                     _trade(result.options, result.parallelism))


def lora_parallelism(cfg: TrainConfig, place: Dist) -> tuple[str, str | None]:
    """ESFT-LoRA trains under ddp: its factors are small, so every rank holds them and their
    AdamW state whole and all-reduces their gradients; the frozen model is replicated."""
    from esft_rs.errors import EsftValueError, option

    if cfg.parallelism in ("fsdp", "ep"):
        raise EsftValueError(
            f"{option('parallelism', cfg.parallelism)}: ESFT-LoRA ({option('lora_rank')})"
            f" trains under {option('parallelism', 'ddp')} (or auto) only")
    if cfg.parallelism == "auto" and place.world > 1:
        return "ddp", _note("ddp", "ESFT-LoRA: the adapters are replicated, their gradients"
                                   " all-reduced")
    return "ddp", None


def for_inference(model: Path, parallelism: str, place: Dist, device: torch.device
                  ) -> tuple[str, str | None]:
    """``parallelism`` for profile and eval, with ``auto`` resolved, and the note that says
    why (None when nothing was chosen): a copy per rank (ddp, nothing moves) when the
    weights fit a device, else the experts spread (ep) when the model has MoE layers, else
    fsdp."""
    if parallelism != "auto" or place.world == 1:
        return (parallelism if parallelism != "auto" else "ddp"), None
    from esft_rs.files.inspection import inspect
    from esft_rs.training.planner import memory_bytes
    from esft_rs.training.trained import moe_layout

    info = inspect(model)
    weights = sum(math.prod(t.shape) * memory_bytes(t.dtype)
                  for t in info.tensors.values())
    size = f"the weights ({weights / 2**30:.2f} GiB)"
    budget = device_memory(device, place)
    if budget is None or weights <= 0.9 * budget:
        return "ddp", _note("ddp", f"{size} fit one device: nothing moves")
    if moe_layout((n, t.shape) for n, t in info.tensors.items()):
        return "ep", _note("ep", f"{size} do not fit one device; the experts are spread,"
                                 " tokens move")
    return "fsdp", _note("fsdp", f"{size} do not fit one device and there are no experts to"
                                 " spread")


def _trade(options: dict[str, dict], chosen: str) -> str:
    def gib(n: int) -> str:
        return f"{n / 2**30:.2f} GiB"

    o = options[chosen]
    others = ", ".join(
        f"{k} {gib(v['comm_bytes'])}" + ("" if v["fits"] is not False else " (does not fit)")
        for k, v in options.items() if k != chosen)
    room = "" if o["fits"] is None else " fits," if o["fits"] else " fits nowhere; least memory,"
    return f"{gib(o['total_bytes'])} per rank,{room} moves {gib(o['comm_bytes'])} per step" \
           f" ({others})"


def _note(choice: str, why: str) -> str:
    return f"parallelism auto: {choice} ({why})"

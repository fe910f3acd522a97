"""Training configuration: the keys of the official ESFT ``configs/base.yaml`` plus a few of ours.

One dataclass is the single source of truth: YAML files are checked against its
fields, and the CLI generates one flag per field from it. Defaults are the
official base.yaml values, so an official config file means the same here.
"""

from __future__ import annotations

import difflib
import errno
import math
import os
import reprlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from esft_rs.data import DEFAULT_SEED, MAX_SEED
from esft_rs.errors import EsftFileNotFoundError, InvalidFileError

MODES = ("esft", "full", "random")
SCHEDULERS = ("constant", "cosine")
PARALLELISMS = ("auto", "fsdp", "ddp", "ep")

# Keys of the official base.yaml that have no meaning here: accepted, with a note why.
IGNORED_KEYS = {
    "optim": "esft-rs always uses torch AdamW (fused on CUDA)",
    "n_device": "the number of processes comes from torchrun",
    "ep_size": "with parallelism: ep the experts are spread over all ranks (the official"
               " expert-parallel group size is the world size)",
}

#: Longer than any model's context; a larger seq_length is a typo that would exhaust memory.
MAX_SEQ_LENGTH = 1 << 24

# Keys that change neither the data order nor the arithmetic: a resumed run may differ in them.
# (The batch shape per process may change too, with the world size, if the global batch stays.)
BOOKKEEPING_KEYS = frozenset(
    {"logging_steps", "eval_steps", "save_steps", "gradient_checkpointing", "parallelism",
     "fsdp_prefetch",
     "per_device_batch_size", "gradient_accumulation_steps"}
)


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run (see ``configs/base.yaml`` of the official code)."""

    seed: int = _opt(DEFAULT_SEED, "Seed of data order, validation split, random-mode experts.")
    seq_length: int = _opt(4096, "Tokens per packed training sequence.")
    per_device_batch_size: int = _opt(1, "Sequences per process per micro-step.")
    steps: int = _opt(500, "Optimizer steps.")
    learning_rate: float = _opt(1e-5, "Peak learning rate.")
    weight_decay: float = _opt(0.1, "AdamW weight decay (never on 1-D tensors).")
    warmup_steps: int = _opt(0, "Linear warm-up steps.")
    logging_steps: int = _opt(10, "Log the training loss every N steps.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.95, "AdamW beta2.")
    random_concat_ratio: float = _opt(
        0.2, "Chance that an example joining a packed row drops its first token."
    )
    eval_steps: int = _opt(100, "Evaluate on the validation split every N steps.")
    save_steps: int = _opt(100, "Write a resumable checkpoint every N steps.")
    gradient_checkpointing: bool = _opt(
        True, "Recompute activations in backward, if the model can."
    )
    gradient_accumulation_steps: int = _opt(16, "Micro-steps per optimizer step.")
    max_grad_norm: float = _opt(1.0, "Clip the gradient norm to this (0: no clipping).")
    # Ours.
    mode: str = _opt("esft", "esft: the configured experts; full: everything; "
                             "random: as many experts per layer as configured, chosen by seed.")
    lora_rank: int = _opt(
        0, "ESFT-LoRA: train rank-R adapters (B @ A) on the selected experts' projections"
        " instead of their full weights (0: ESFT, full weights).")
    lora_alpha: float = _opt(
        8.0, "ESFT-LoRA scale numerator: the update is lora_alpha / lora_rank * B @ A"
        " (PEFT's convention and default).")
    lora_targets: str = _opt(
        "", "ESFT-LoRA: the experts' projections to adapt, comma-separated, as the checkpoint"
        " names them (e.g. gate_proj,up_proj,down_proj; Mixtral w1,w2,w3); empty: all.")
    lr_scheduler: str = _opt("constant", "Learning-rate schedule after warm-up.")
    val_ratio: float = _opt(0.02, "Share of packed sequences held out for validation.")
    parallelism: str = _opt("auto", "Under torchrun: fsdp shards weights, gradients and optimizer"
                                     " state over the processes (FSDP2); ep gives each process"
                                     " its share of every MoE layer's experts (tokens travel"
                                     " to them by all-to-all) and replicates the rest; ddp"
                                     " replicates the model; auto takes, of those that fit,"
                                     " the one that moves the fewest bytes (esft-rs plan).")
    fsdp_prefetch: bool = _opt(
        True, "Under FSDP, gather each decoder layer while the one before computes: faster,"
        " and a rank holds two gathered layers at a time instead of one.")
    chat_template: str = _opt(
        "auto", "How conversations become tokens: model (the tokenizer's chat template; only"
        " assistant tokens are learned), official (the official ESFT format), a template file,"
        " or auto: model when the tokenizer has a template (not DeepSeek-V2), else official."
    )

    def problems(self) -> list[str]:
        """What is impossible about these values (empty when they are fine)."""
        out = []
        for k, v in self.to_dict().items():
            if isinstance(v, float) and not math.isfinite(v):
                out.append(f"{k} must be a finite number, got {v}")
        if not 0 <= self.seed <= MAX_SEED:
            out.append(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.seq_length == 1:
            out.append("seq_length must be at least 2 (a token predicts the next one)")
        if self.seq_length > MAX_SEQ_LENGTH:
            out.append(f"seq_length must be at most {MAX_SEQ_LENGTH}, got {self.seq_length}")
        if self.learning_rate == 0:
            out.append("learning_rate must be positive, got 0 (nothing would train)")
        for k in ("seq_length", "per_device_batch_size", "steps", "logging_steps", "eval_steps",
                  "save_steps", "gradient_accumulation_steps"):
            if getattr(self, k) <= 0:
                out.append(f"{k} must be positive, got {getattr(self, k)}")
        for k in ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm"):
            if getattr(self, k) < 0:
                out.append(f"{k} must not be negative, got {getattr(self, k)}")
        for k in ("adam_beta1", "adam_beta2"):  # torch's AdamW refuses 1.0
            if not 0 <= getattr(self, k) < 1:
                out.append(f"{k} must be in [0, 1), got {getattr(self, k)}")
        if not 0 <= self.random_concat_ratio <= 1:
            out.append(f"random_concat_ratio must be in [0, 1], got {self.random_concat_ratio}")
        if not 0 <= self.val_ratio < 1:
            out.append(f"val_ratio must be in [0, 1), got {self.val_ratio}")
        if self.mode not in MODES:
            out.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.lora_rank < 0:
            out.append(f"lora_rank must not be negative, got {self.lora_rank}")
        if self.lora_rank and self.lora_alpha <= 0:
            out.append(f"lora_alpha must be positive, got {self.lora_alpha:g}")
        if not self.lora_rank and self.lora_targets:
            out.append("lora_targets needs lora_rank (ESFT-LoRA)")
        if self.lora_rank and self.mode == "full":
            out.append("lora_rank trains the selected experts (mode esft or random), not"
                       " mode full")
        if self.lr_scheduler not in SCHEDULERS:
            out.append(
                f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}"
            )
        if self.parallelism not in PARALLELISMS:
            out.append(f"parallelism must be one of {', '.join(PARALLELISMS)},"
                       f" got {self.parallelism!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, overrides: dict[str, Any], origin: str = "options") -> TrainConfig:
        """These values with ``overrides`` (None values skipped), checked as a file would be."""
        merged = {**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
        return from_mapping(merged, origin)[0]

    def identity(self) -> dict[str, Any]:
        """The values a resumed run must share with the checkpoint (bookkeeping keys aside)."""
        return {k: v for k, v in self.to_dict().items() if k not in BOOKKEEPING_KEYS}


def option_fields() -> list[tuple[str, type, Any, str, tuple[str, ...] | None]]:
    """(name, type, default, help, choices) per key, for generating CLI flags."""
    choices = {"mode": MODES, "lr_scheduler": SCHEDULERS, "parallelism": PARALLELISMS}
    return [
        (f.name, _FIELD_TYPES[f.name], f.default, f.metadata["help"], choices.get(f.name))
        for f in fields(TrainConfig)
    ]


_FIELD_TYPES: dict[str, type] = {
    f.name: {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
    for f in fields(TrainConfig)
}


def from_mapping(raw: object, origin: str) -> tuple[TrainConfig, list[str]]:
    """Check a parsed config against the known keys; returns the config and notes to show."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidFileError(f"{origin}: expected a mapping of keys to values")
    notes = []
    values: dict[str, Any] = {}
    known = list(_FIELD_TYPES)
    for key, value in raw.items():
        key = str(key)
        if key in IGNORED_KEYS:
            notes.append(f"{origin}: {key} is ignored: {IGNORED_KEYS[key]}")
            continue
        if key not in _FIELD_TYPES:
            close = difflib.get_close_matches(key, known + list(IGNORED_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidFileError(f"{origin}: unknown key {key!r}{hint}")
        values[key] = _typed(value, _FIELD_TYPES[key], key, origin)
    cfg = replace(TrainConfig(), **values)
    if problems := cfg.problems():
        raise InvalidFileError(f"{origin}: {'; '.join(problems)}")
    return cfg, notes


#: The starter configs shipped inside the package (``esft_rs/configs/NAME.yaml``; a clone's
#: ``configs/`` links to them): ``-c small`` works for a pip-installed user too.
STARTER_CONFIGS = ("base", "small")


def starter_config(name: str) -> Path:
    """The packaged file of starter config ``name`` (one of ``STARTER_CONFIGS``)."""
    return Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"


def config_path(config: str | os.PathLike[str]) -> Path:
    """``config`` as a file: a path, or the name of a starter config (``base``, ``small``)
    when no file of that name exists here."""
    path = Path(config)
    if not os.path.lexists(path) and os.fspath(config) in STARTER_CONFIGS:
        return starter_config(os.fspath(config))
    if not os.path.lexists(path):
        raise EsftFileNotFoundError(
            errno.ENOENT, "No such file or directory (nor a starter config: "
            + ", ".join(STARTER_CONFIGS) + ")", os.fspath(config))
    return path


def load_config(path: str | os.PathLike[str]) -> tuple[TrainConfig, list[str]]:
    """Read a YAML training config (an official ESFT one works unchanged): a file, or a
    starter config shipped with esft-rs by name (``base``: the official values; ``small``: a
    first run in minutes on a CPU)."""
    from esft_rs.files.inputs import load_yaml

    return from_mapping(load_yaml(config_path(path)), os.fspath(path))


# A value shown in an error: a YAML alias can make it a list of millions of items.
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring = 2, 4, 4, 60


def _typed(value: object, kind: type, key: str, origin: str) -> Any:
    # YAML reads 1e-5 as a string (YAML 1.1 wants a dot): accept numeric strings for floats.
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise InvalidFileError(f"{origin}: {key} must be {kind.__name__},"
                               f" got {_BRIEF.repr(value)}")
    return float(value) if kind is float else value  # type: ignore[arg-type]


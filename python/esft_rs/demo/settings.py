"""The demo's settings: one full run (about 5 minutes on 2 CPU cores) and a quick one."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from esft_rs import __version__

#: Method name -> learning rate. Each method gets its own, as the paper tuned them:
#: full fine-tuning moves every weight and needs a smaller step than ESFT.
LEARNING_RATES = {"fft": 3e-4, "esft_token": 1e-3, "esft_gate": 1e-3, "random": 1e-3}


@dataclass(frozen=True)
class Settings:
    preset: str = "small"
    seed: int = 0
    seq_length: int = 128
    batch_size: int = 8
    pretrain_steps: int = 200
    pretrain_lr: float = 2e-3
    pretrain_aux_alpha: float = 0.01  # expert balance during pretraining, as DeepSeek trains
    pretrain_items: int = 1500  # per general task
    finetune_task: str = "binary"
    finetune_steps: int = 60
    finetune_items: int = 1000
    test_items: int = 200  # downstream, held out
    general_test_items: int = 40  # per general task, held out
    profile_items: int = 300  # per task
    learning_rates: dict[str, float] = field(default_factory=lambda: dict(LEARNING_RATES))

    def base_key(self) -> str:
        """Cache key of the pretrained base: everything that shapes it."""
        base = {k: v for k, v in asdict(self).items() if k.startswith(("pretrain", "preset"))}
        base |= {"seed": self.seed, "seq": self.seq_length, "batch": self.batch_size,
                 "version": __version__}
        return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:16]


FULL = Settings()
QUICK = replace(
    FULL, preset="tiny", pretrain_steps=30, pretrain_items=200, finetune_steps=8,
    finetune_items=100, test_items=20, general_test_items=5, profile_items=20,
)


def cache_dir() -> Path:
    """The user's cache directory for esft-rs (XDG), created on demand."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "esft-rs"

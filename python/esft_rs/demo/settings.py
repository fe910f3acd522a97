"""The demo's settings: one full run (a few minutes on 2 CPU cores) and a quick one."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from esft_rs import __version__
from esft_rs.demo.vocabulary import BOS_ID, EOS_ID, PAD_ID, VOCAB
from esft_rs.models.config import ModelConfig

#: The learning rates tried, the same for every method; each method gets the one with
#: the best score on the downstream validation split (``tuning.choose_rate``), as the
#: paper tuned each method's rate. One grid for all: a grid per method would decide in
#: advance how hard each method trains (with ESFT's grid starting at 3e-3 and FFT's at
#: 1e-4, validation picked rates that forgot according to the grids, docs/demo.md).
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
#: ESFT-LoRA on ESFT-Token's experts at these ranks (the experts' projections are 16 x 64:
#: rank 8 is half of full rank, rank 2 an eighth), alpha 2 x rank as is common with PEFT.
LORA_RANKS = {"lora_r2": 2, "lora_r8": 8}
#: ESFT-Token's full adapter exported as PEFT LoRA (truncated SVD) at these ranks.
SVD_RANKS = (2, 8)
LEARNING_RATES = {"fft": GRID, "esft_token": GRID, "esft_gate": GRID, "random": GRID,
                  **dict.fromkeys(LORA_RANKS, GRID)}

#: The demo's model: DeepSeek-V2-Lite's expert layout (64 fine-grained routed experts,
#: 6 active, 2 shared) at hidden 64 and 0.7M parameters, so that pretraining on one CPU
#: thread learns the general tasks in a minute or two. The paper (section 6) finds that
#: finer experts favour ESFT; with 32 experts top-4 ESFT lagged further behind FFT.
#: Every layer is MoE: with a dense first layer (DeepSeek-V2's choice at 27 layers) a
#: third of this model's MLP capacity is outside the experts, the letter maps are
#: learned there, and ESFT, which cannot train it, fails the task.
DEMO_MODEL = ModelConfig(
    vocab_size=len(VOCAB), tokenizer="tokenizer.json", bos_token_id=BOS_ID,
    eos_token_id=EOS_ID, pad_token_id=PAD_ID, hidden_size=64, intermediate_size=256,
    moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, first_k_dense_replace=0, max_position_embeddings=256,
)


@dataclass(frozen=True)
class Settings:
    model: ModelConfig = DEMO_MODEL
    seed: int = 0
    # A smoke run (--quick): every step runs, on a model and data too small to measure
    # anything, so its report judges no claim.
    smoke: bool = False
    batch_size: int = 64  # items (one per row) per optimizer step
    pretrain_steps: int = 800
    pretrain_lr: float = 1e-2
    pretrain_aux_alpha: float = 0.01  # expert balance during pretraining, as DeepSeek trains
    pretrain_items: int = 4000  # per general task (fewer if a task has fewer)
    finetune_task: str = "shift"
    # The downstream task's share of the pretraining mix: 8 of its training items among
    # 20,000, so that the base has met the skill (as a real base has met math or code)
    # without learning it (exact match 0.07); see docs/demo.md.
    downstream_pretrain_items: int = 8
    finetune_steps: int = 100
    finetune_items: int = 3000
    # Fine-tuning seeds (data order, random experts): seed, seed + 1, ... Five: random
    # experts' accuracy depends on the draw (sd 0.24), and their mean needs more than the
    # issue's minimum of three to be told from ESFT-Token's (docs/demo.md).
    seeds: int = 5
    # Above the official 0.2 / 0.1, which select 5.7% / 4.7% of this model's 192 experts:
    # these select 8% / 10%, within the 5-15% the paper trains. At 0.2 ESFT-Token does not
    # learn the task; at 0.35 (12%) random sets of that size learn it in 3 draws of 5, so
    # which experts train no longer matters; 0.25 was chosen on validation (docs/demo.md).
    token_top_p: float = 0.25
    gate_top_p: float = 0.2
    val_items: int = 200  # downstream, held out, for choosing learning rates
    test_items: int = 200  # downstream, held out
    general_test_items: int = 50  # per general task, held out
    profile_items: int = 200  # per task
    learning_rates: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: dict(LEARNING_RATES))

    def base_key(self, data_digest: str, tokenizer_digest: str) -> str:
        """Cache key of the pretrained base: everything that shapes it, its data and
        tokenizer included."""
        base = {k: v for k, v in asdict(self).items() if k.startswith(("pretrain", "model"))}
        base |= {"seed": self.seed, "batch": self.batch_size, "data": data_digest,
                 "tokenizer": tokenizer_digest, "version": __version__}
        return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:16]


FULL = Settings()
QUICK = replace(
    FULL, smoke=True,
    model=replace(DEMO_MODEL, hidden_size=32, intermediate_size=64, n_routed_experts=16,
                  num_experts_per_tok=4),
    batch_size=16, pretrain_steps=30, pretrain_items=100, finetune_steps=8, finetune_items=100,
    val_items=20, test_items=20, general_test_items=5, profile_items=20, seeds=3,
    learning_rates={"fft": (1e-3,), "esft_token": (1e-2,), "esft_gate": (1e-2,),
                    "random": (1e-2,), "lora_r2": (1e-2,), "lora_r8": (1e-2,)},
)


def cache_dir() -> Path:
    """The user's cache directory for esft-rs (XDG), created on demand."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "esft-rs"

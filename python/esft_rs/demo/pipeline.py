"""``esft-rs demo``: ESFT end to end on a built-in MoE, the paper's findings in miniature.

1. pretrain a base on a mix of general tasks (and a trace of the downstream task), with the
   demo's word-level tokenizer (cached under the user's cache dir);
2. profile routing on every task and select experts for the downstream task;
3. choose each method's learning rate on a validation split: FFT, ESFT-Token, ESFT-Gate,
   random experts at ESFT-Token's budget, and ESFT-LoRA on ESFT-Token's experts at two ranks;
4. fine-tune each method over several seeds; measure downstream accuracy, general accuracy
   before/after, trainable share, adapter bytes; judge the paper's claims on the means;
5. merge the ESFT adapter with the Rust merge and check the reloaded model scores the same.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from esft_rs.demo import tasks as T
from esft_rs.demo.claims import mean_runs
from esft_rs.demo.runs import default_jobs, fine_tune
from esft_rs.demo.settings import LORA_RANKS, SVD_RANKS, Settings, cache_dir
from esft_rs.demo.vocabulary import FILES as TOKENIZER_FILES
from esft_rs.demo.vocabulary import write_tokenizer
from esft_rs.evaluation import exact_match, item_rows
from esft_rs.files.outputs import staged, write_file

if TYPE_CHECKING:
    import torch

    from esft_rs.data.tokenizer import Tokenizer
    from esft_rs.routing.stats import RoutingStats

@dataclass
class Data:
    """Training rows (one item per row) and held-out items of every task."""

    general_train: dict[str, torch.Tensor]
    finetune_train: dict[str, torch.Tensor]
    downstream_val: list[tuple[str, str]]  # for choosing learning rates
    downstream_test: list[tuple[str, str]]
    general_test: dict[str, list[tuple[str, str]]]
    profile_rows: dict[str, dict[str, torch.Tensor]]

    def digest(self) -> str:
        """Fingerprint of the pretraining rows: the base's cache key covers the task design."""
        h = hashlib.sha256()
        for k in sorted(self.general_train):
            h.update(self.general_train[k].numpy().tobytes())
        return h.hexdigest()


def build_data(s: Settings, out: Path, tok: Tokenizer) -> Data:
    """Generate every task's items, write them as chat JSONL under ``out/data`` (the files
    ``esft-rs train`` takes) and format them one item per row: the items are a dozen
    tokens, so packing them into long rows would only cut some in two."""
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    general_train: list[tuple[str, str]] = []
    general_test: dict[str, list[tuple[str, str]]] = {}
    for task in T.GENERAL:
        train, test = T.split(task, s.pretrain_items, s.general_test_items, s.seed)
        general_train += train
        general_test[task.name] = test
    ft_task = T.TASKS[s.finetune_task]
    ft_train, held_out = T.split(ft_task, s.finetune_items, s.val_items + s.test_items, s.seed)
    ft_val, ft_test = held_out[: s.val_items], held_out[s.val_items :]
    general_train += ft_train[: s.downstream_pretrain_items]
    random.Random(s.seed).shuffle(general_train)
    T.write_jsonl(general_train, folder / "general-train.jsonl")
    T.write_jsonl(ft_train, folder / f"{ft_task.name}-train.jsonl")
    profile_rows = {}
    for task in T.GENERAL + T.DOWNSTREAM:
        items = T.examples(task, s.profile_items, s.seed + 1)
        T.write_jsonl(items, folder / f"profile-{task.name}.jsonl")
        profile_rows[task.name] = item_rows(items, tok)
    return Data(
        general_train=item_rows(general_train, tok),
        finetune_train=item_rows(ft_train, tok),
        downstream_val=ft_val,
        downstream_test=ft_test,
        general_test=general_test,
        profile_rows=profile_rows,
    )


def pretrained_base(s: Settings, data: Data, tokenizer_dir: Path, progress: bool) -> Path:
    """The base model directory, with the demo's tokenizer files, pretrained once per
    settings, data and tokenizer, and cached."""
    from esft_rs.models import init_model, save_model
    from esft_rs.training import train

    key = s.base_key(data.digest(), _digest(tokenizer_dir / f for f in TOKENIZER_FILES))
    final = cache_dir() / "demo" / f"base-{key}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    config = s.model.replace(aux_loss_alpha=s.pretrain_aux_alpha)
    with (TemporaryDirectory(dir=final.parent, prefix=".work-") as work,
          staged(final, directory=True) as model_dir):
        init = save_model(init_model(config, seed=s.seed), Path(work) / "init")
        result = train(
            init, data.general_train, Path(work) / "run", mode="full", steps=s.pretrain_steps,
            learning_rate=s.pretrain_lr, warmup_steps=s.pretrain_steps // 20,
            lr_scheduler="cosine", **_run_options(s, data.general_train, progress),
        )
        save_model(result.model, model_dir, overwrite=True)  # the empty staging folder
        for f in TOKENIZER_FILES:
            write_file(model_dir / f, (tokenizer_dir / f).read_bytes())
    return final


def _digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _run_options(s: Settings, train_rows: dict[str, torch.Tensor], progress: bool
                 ) -> dict[str, Any]:
    """Short in-memory runs: no validation split, no resumable checkpoints, one
    micro-step of ``batch_size`` rows per step, rows as wide as the data's longest."""
    return {"per_device_batch_size": s.batch_size, "seq_length": train_rows["input_ids"].shape[1],
            "weight_decay": 0.0, "seed": s.seed, "device": "cpu", "progress": progress,
            "val_ratio": 0.0, "eval_steps": 10**9, "save_steps": 10**9,
            "gradient_accumulation_steps": 1, "gradient_checkpointing": False}


def profile_tasks(model: torch.nn.Module, data: Data, s: Settings, progress: bool
                  ) -> dict[str, RoutingStats]:
    from esft_rs.routing.profiling import profile

    out = {}
    for name, task_rows in tqdm(data.profile_rows.items(), desc="profile", disable=not progress,
                           unit="task"):
        ids, mask = task_rows["input_ids"], task_rows["attention_mask"]
        batches = [(ids[i : i + s.batch_size], mask[i : i + s.batch_size])
                   for i in range(0, len(ids), s.batch_size)]
        out[name] = profile(model, batches, metadata={"task": name})
    return out


def general_accuracy(model: torch.nn.Module, tok: Tokenizer, data: Data
                     ) -> tuple[float, dict[str, float]]:
    """Mean exact match over the general tasks (each task weighs the same), and per task."""
    accs = {name: exact_match(model, tok, items) for name, items in data.general_test.items()}
    return sum(accs.values()) / len(accs), accs


#: What a demo writes into its output directory (an earlier demo's output may be replaced).
OUTPUTS = ("data", "tokenizer", "runs", "merged-esft-token", "report.json", "report.md",
           "routing-heatmap.png", "accuracy-vs-share.png")


def run(out: Path, s: Settings, *, progress: bool = True, final: Path | None = None,
        jobs: int | None = None) -> dict[str, Any]:
    """Run the whole demo; write ``report.json``, ``report.md`` and plots to ``out``.
    ``final``: where ``out`` will be once committed (the report's paths point there).
    ``jobs``: fine-tuning runs at a time (default: the CPUs available); the figures do
    not depend on it. The runs go to spawned worker processes, so a script that calls this
    does so under ``if __name__ == "__main__":``."""
    import torch

    from esft_rs.data.tokenizer import load_tokenizer
    from esft_rs.demo.report import routing_figures, share_on_selected, write_report
    from esft_rs.files.merging import merge
    from esft_rs.models import load_model
    from esft_rs.routing.selection import select

    # One intra-op thread: the figures then do not depend on the machine's core count, and
    # on a busy 2-core machine it is faster than two threads that wait on each other.
    torch.set_num_threads(1)
    torch.manual_seed(s.seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_tokenizer(out / "tokenizer")
    tok = load_tokenizer(tokenizer_dir)
    data = build_data(s, out, tok)
    t0 = time.perf_counter()
    base_dir = pretrained_base(s, data, tokenizer_dir, progress)
    pretrain_seconds = time.perf_counter() - t0
    base = load_model(base_dir)
    base.eval()

    stats = profile_tasks(base, data, s, progress)
    selections = {
        "token": select(stats[s.finetune_task], score="token", top_p=s.token_top_p),
        "gate": select(stats[s.finetune_task], score="gate", top_p=s.gate_top_p),
    }
    routing = routing_figures(stats, top_p=s.token_top_p)
    routing["share_on_selected"] = share_on_selected(stats, selections["token"])
    general_before, general_before_by_task = general_accuracy(base, tok, data)
    ft = FineTune(s, data, tok, base_dir, out / "runs", general_before,
                   {"fft": None, "esft_token": selections["token"].config(),
                    "esft_gate": selections["gate"].config(),
                    "random": selections["token"].config(),
                    **dict.fromkeys(LORA_RANKS, selections["token"].config())})
    shutil.rmtree(out / "runs", ignore_errors=True)

    # Each method's learning rate: the grid point with the best downstream validation score
    # at the first seed (``tuning.choose_rate``); test items are scored only for the chosen
    # runs. Then the chosen rates at the other seeds. Runs go to ``jobs`` worker processes.
    tuning, runs = fine_tune(ft, [s.seed + k for k in range(s.seeds)], jobs or default_jobs(),
                             progress)
    first = runs[0]["methods"]

    merged_dir = out / "merged-esft-token"
    shutil.rmtree(merged_dir, ignore_errors=True)
    merge(base_dir, out / first["esft_token"]["adapter"], merged_dir)
    where = final or out  # the report's paths point where the output will be
    for r in runs:
        for m in r["methods"].values():
            m["adapter"] = str(where / m["adapter"])
    merged_acc = exact_match(load_model(merged_dir).eval(), tok, data.downstream_test)

    report = {
        "settings": asdict(s),
        "base": {"path": str(base_dir), "pretrain_seconds": pretrain_seconds,
                 "downstream_acc": exact_match(base, tok, data.downstream_test),
                 "downstream_val_acc": exact_match(base, tok, data.downstream_val),
                 "general_acc": general_before, "general_acc_by_task": general_before_by_task},
        "finetune_task": s.finetune_task,
        "learning_rates": tuning,
        "methods": mean_runs(runs),
        "runs": runs,
        "routing": routing,
        "merge": {"path": str((final or out) / merged_dir.name), "downstream_acc": merged_acc,
                  "in_memory_acc": first["esft_token"]["downstream_acc"],
                  "equal": merged_acc == first["esft_token"]["downstream_acc"]},
    }
    write_report(report, stats, selections, out)
    return report


@dataclass
class FineTune:
    """One fine-tuning run of a method at a learning rate and seed, and its figures."""

    s: Settings
    data: Data
    tok: Tokenizer
    base_dir: Path
    runs_dir: Path
    general_before: float
    experts: dict[str, Any]

    def train(self, name: str, lr: float, seed: int) -> tuple[Any, float]:
        from esft_rs.training import train

        modes = {"fft": "full", "esft_token": "esft", "esft_gate": "esft", "random": "random",
                 **dict.fromkeys(LORA_RANKS, "esft")}
        rank = LORA_RANKS.get(name, 0)
        lora = {"lora_rank": rank, "lora_alpha": 2.0 * rank} if rank else {}
        # A short run leaves experts no token reached unchanged: expected here, and the
        # trainer's warning about them would bury the progress bars.
        trainer_log = logging.getLogger("esft_rs.training")
        level = trainer_log.level
        trainer_log.setLevel(logging.ERROR)
        t = time.perf_counter()
        try:
            result = train(
                self.base_dir, self.data.finetune_train,
                self.runs_dir / f"seed{seed}" / f"{name}-lr{lr:g}",
                experts=self.experts[name], mode=modes[name], steps=self.s.finetune_steps,
                learning_rate=lr, warmup_steps=0, **lora,
                **_run_options(replace(self.s, seed=seed), self.data.finetune_train, False),
            )
        finally:
            trainer_log.setLevel(level)
        return result, time.perf_counter() - t

    def measure(self, name: str, result: Any, seconds: float) -> dict[str, Any]:
        from esft_rs.files.inspection import inspect

        model = result.model.eval()
        adapter = inspect(result.adapter)
        general_after, general_after_by_task = general_accuracy(model, self.tok, self.data)
        svd = {"svd_export": self.svd_exports(result.adapter)} if name == "esft_token" else {}
        return svd | {
            "downstream_acc": exact_match(model, self.tok, self.data.downstream_test),
            "general_acc_before": self.general_before,
            "general_acc_after": general_after,
            "general_acc_after_by_task": general_after_by_task,
            "trainable_params": sum(_numel(t.shape) for t in adapter.tensors.values()),
            "total_params": sum(p.numel() for p in model.parameters()),
            "adapter_bytes": adapter.total_bytes,
            "train_seconds": seconds,
            "experts_trained": result.experts.num_experts if name != "fft" else None,
            "learning_rate": result.config.learning_rate,
            "adapter": str(result.adapter.relative_to(self.runs_dir.parent)),
        }


    def svd_exports(self, adapter: Path) -> dict[str, dict[str, float]]:
        """``adapter`` exported as PEFT LoRA at each of ``SVD_RANKS`` (``esft-rs export
        --rank``) and merged back into the base: downstream exact match and the export's
        relative error against the full adapter."""
        from esft_rs import export, merge
        from esft_rs.models import load_model

        out = {}
        for rank in SVD_RANKS:
            folder = adapter.parent / f"svd-r{rank}"
            folder.mkdir(exist_ok=True)
            report = export(self.base_dir, adapter, folder / "peft", rank=rank, overwrite=True)
            merge(self.base_dir, folder / "peft", folder / "merged", overwrite=True)
            model = load_model(folder / "merged").eval()
            out[f"r{rank}"] = {
                "downstream_acc": exact_match(model, self.tok, self.data.downstream_test),
                "relative_error": report.error,
            }
        return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

"""The training loop on a small fake MoE: what changes, the adapter, resume, DDP, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import esft_rs
from esft_rs.errors import EsftError, InvalidFileError, MismatchError
from esft_rs.files.expert_config import ExpertConfig
from train_fakes import FakeMoE, effective, fake_data, snapshot

EXPERTS = ExpertConfig({1: [0, 2], 2: [1]})
FAST = dict(steps=6, per_device_batch_size=2, gradient_accumulation_steps=2, logging_steps=1,
            eval_steps=2, save_steps=3, learning_rate=1e-2, gradient_checkpointing=False)


def run(out: Path, model: torch.nn.Module | None = None, data: dict | None = None,
        experts: ExpertConfig | None = EXPERTS, **kw) -> esft_rs.TrainResult:
    return esft_rs.train(model or FakeMoE(), data or fake_data(), out, experts,
                         progress=False, **{**FAST, **kw})


def dcp_shapes(checkpoint: Path) -> dict[str, torch.Size]:
    """Tensor name -> shape in a checkpoint's DCP folder (its metadata alone)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(checkpoint / "dcp").read_metadata().state_dict_metadata
    return {k: v.size for k, v in meta.items() if hasattr(v, "size")}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_only_selected_experts_change(tmp_path: Path) -> None:
    model = FakeMoE()
    base = snapshot(model)
    result = run(tmp_path / "out", model)
    now = effective(model, list(base))
    trained = {f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
               for layer, e in [(1, 0), (1, 2), (2, 1)] for p in ("gate", "up", "down")}
    changed = {n for n in base if not torch.equal(base[n], now[n])}
    assert changed == trained  # every trained tensor moved, everything else is bit-identical
    assert result.fit.unchanged == []

    adapter = load_file(result.adapter)
    assert set(adapter) == trained
    for name, t in adapter.items():
        assert torch.equal(t, now[name])  # the adapter holds what the model ended with
    with safe_open(result.adapter, "pt") as f:
        meta = f.metadata()
    assert ExpertConfig.parse(meta["esft.expert_config"]) == EXPERTS
    assert json.loads(meta["esft.training_config"])["learning_rate"] == 1e-2
    assert json.loads(meta["esft.metrics"])["best_step"] == result.fit.best_step
    assert "esft.base_fingerprint" not in meta  # an in-memory model without its checkpoint
    assert ExpertConfig.load(tmp_path / "out" / "expert_cfg.json") == EXPERTS

    # Optimizer state exists for the trained tensors only: 2 fp32 moments + a step count each.
    n = sum(base[name].numel() for name in trained)
    assert result.fit.trainable_params == n
    assert result.fit.optimizer_state_bytes == 8 * n + 4 * len(trained)
    saved = dcp_shapes(next((tmp_path / "out" / "checkpoints").iterdir()))
    moments = {k.removeprefix("optimizer.state.").removesuffix(".exp_avg"): v
               for k, v in saved.items() if k.endswith(".exp_avg")}
    assert moments == {name: base[name].shape for name in trained}


def test_keeps_best_weights_by_eval_loss(tmp_path: Path) -> None:
    result = run(tmp_path / "out", learning_rate=0.05)
    evals = [r for r in metrics(tmp_path / "out") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert (result.fit.best_step, result.fit.eval_loss) == (best["step"], best["eval_loss"])


def test_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    whole = run(tmp_path / "whole")

    def crash_after_4(step: int, record: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", on_step=crash_after_4)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-3"]
    resumed = run(tmp_path / "cut", resume=True)

    def losses(out: Path) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in metrics(out)]

    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # exactly, not approximately
    a, b = load_file(whole.adapter), load_file(resumed.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_data(tmp_path: Path) -> None:
    empty = {k: v[:0] for k, v in fake_data().items()}
    with pytest.raises(InvalidFileError, match="no training examples"):
        run(tmp_path / "a", data=empty)
    with pytest.raises(EsftError, match=r"no rows left to train on after the 0\.5 validation"
                       r" split of 1 packed row of 12 tokens: pass val_ratio=0"):
        run(tmp_path / "b", data=fake_data(n=1), val_ratio=0.5)
    assert not (tmp_path / "b").exists()


def test_data_smaller_than_a_global_batch_is_cycled(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """5 training rows, global batch 8: each step takes the next 8 of the epochs' shuffles,
    with a note, instead of a refusal."""
    with caplog.at_level("WARNING", logger="esft_rs.training"):
        run(tmp_path / "b", data=fake_data(n=6), per_device_batch_size=4)
    assert ("5 training sequences (after the 0.02 validation split) are fewer than one global"
            " batch of 8" in caplog.text and "each step cycles through them, 1.6 epochs a step"
            in caplog.text)
    assert (tmp_path / "b" / "adapter.safetensors").exists()
    assert [r["epoch"] for r in metrics(tmp_path / "b") if "loss" in r][-1] == 9.6


def test_global_batches_cycle_a_small_split() -> None:
    from esft_rs.training.batches import GlobalBatches

    idx = torch.tensor([10, 11, 12, 13, 14])
    batches = GlobalBatches(idx, 8, seed=3)
    stream = torch.cat([batches(s) for s in range(5)])  # 40 = 8 epochs of 5
    assert all(len(batches(s)) == 8 for s in range(5))
    for e in range(8):
        assert sorted(stream[5 * e : 5 * e + 5].tolist()) == idx.tolist()
    assert batches.epoch(5) == 8
    assert torch.equal(batches(2), GlobalBatches(idx, 8, seed=3)(2))  # a function of the step


def test_refuses_earlier_run_and_foreign_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out, steps=3)
    with pytest.raises(EsftError, match=r"holds an earlier run; pass resume=True"):
        run(out, steps=3)
    with pytest.raises(MismatchError, match=r"learning_rate=0\.01 there, 0\.02 here"):
        run(out, steps=3, resume=True, learning_rate=2e-2)
    with pytest.raises(MismatchError, match="a different expert selection"):
        run(out, steps=3, resume=True, experts=ExpertConfig({1: [1]}))
    with pytest.raises(MismatchError, match="different training data"):
        run(out, steps=3, resume=True, data=fake_data(seed=1))
    with pytest.raises(MismatchError, match=r"sequences of 12 tokens \(this run cuts them to 8"):
        run(out, steps=3, resume=True, data={k: v[:, :8] for k, v in fake_data().items()})


def test_warns_when_trained_tensors_do_not_change(tmp_path: Path, caplog) -> None:
    result = run(tmp_path / "out", learning_rate=1e-30)  # each update is below an ulp
    assert len(result.fit.unchanged) == 9
    assert "9 trained tensors did not change" in caplog.text


def test_full_and_random_modes(tmp_path: Path) -> None:
    model = FakeMoE()
    base = snapshot(model)
    full = run(tmp_path / "full", model, experts=None, mode="full")
    now = effective(model, list(base))
    assert {n for n in base if not torch.equal(base[n], now[n])} == set(base)
    assert set(load_file(full.adapter)) == set(base)

    random = run(tmp_path / "random", experts=EXPERTS, mode="random", seed=3)
    drawn = random.experts.experts
    assert {k: len(v) for k, v in drawn.items()} == {1: 2, 2: 1} and drawn != EXPERTS.experts
    assert set(load_file(random.adapter)) == {
        f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
        for layer, ids in drawn.items() for e in ids for p in ("gate", "up", "down")}


def test_fused_experts_adapter_merges_into_the_fused_base(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = FakeMoE(fused=True)
    base = snapshot(model)
    save_file(base, tmp_path / "base.safetensors")
    result = run(tmp_path / "out", model, experts=ExpertConfig({1: [1, 3]}),
                 base=tmp_path / "base.safetensors", save_merged=tmp_path / "merged.safetensors")
    # One tensor per trained expert slice, named as naming.fused_slice_name says.
    assert set(load_file(result.adapter)) == {
        f"model.layers.1.mlp.experts.{e}.{p}"
        for e in (1, 3) for p in ("gate_up_proj", "down_proj")}
    merged = load_file(tmp_path / "merged.safetensors")
    now = effective(model, list(base))
    for name, t in merged.items():
        assert torch.equal(t, now[name]), name
        if ".experts." in name and name.startswith("model.layers.1."):
            assert torch.equal(t[[0, 2]], base[name][[0, 2]])  # frozen slices bit-identical
            assert not torch.equal(t[1], base[name][1]) and not torch.equal(t[3], base[name][3])
        else:
            assert torch.equal(t, base[name]), name


@pytest.mark.parametrize(("scheduler", "warmup"), [("constant", 0), ("constant", 3),
                                                    ("cosine", 0), ("cosine", 4)])
def test_lr_schedule_is_hugging_faces(scheduler: str, warmup: int) -> None:
    """torch's LinearLR + CosineAnnealingLR give the Hugging Face formulas the official ESFT
    trains with: linear warm-up from 0, then constant or cosine to 0 at the last step."""
    import math

    from esft_rs.training.config import TrainConfig
    from esft_rs.training.loop import lr_schedule

    cfg = TrainConfig(steps=12, warmup_steps=warmup, lr_scheduler=scheduler, learning_rate=0.1)

    def hf(step: int) -> float:
        if step < warmup:
            return step / warmup
        if scheduler == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (cfg.steps - warmup)))

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.learning_rate)
    sched = lr_schedule(opt, cfg)
    seen = []
    for _ in range(cfg.steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * hf(s) for s in range(cfg.steps)], rel=1e-12, abs=1e-15)


def test_checkpoint_gives_no_optimizer_state_to_tensors_not_yet_trained(tmp_path: Path) -> None:
    """A tensor with no gradient so far has no AdamW state; after a resume it must still have
    none (a state with step 1 would change its bias correction when it first trains)."""
    from esft_rs.distributed import Dist
    from esft_rs.training import checkpoint
    from esft_rs.training.config import TrainConfig
    from esft_rs.training.freeze import freeze
    from esft_rs.training.loop import lr_schedule, make_optimizer

    cfg = TrainConfig(steps=3)

    def setup() -> tuple:
        model = FakeMoE()
        trainables = freeze(model, EXPERTS)
        opt = make_optimizer(trainables, cfg)
        return model, trainables, opt, lr_schedule(opt, cfg)

    model, trainables, opt, sched = setup()
    model(fake_data()["input_ids"][:2]).sum().backward()
    trainables[0].param.grad = None  # as if no token reached it
    opt.step()
    kw = dict(model=model, trainables=trainables, optimizer=opt, scheduler=sched, place=Dist())
    path = checkpoint.write(tmp_path, 1, best=None, state={}, **kw)
    model, trainables, fresh, sched = setup()
    checkpoint.read(path, model=model, trainables=trainables, optimizer=fresh, scheduler=sched,
                    best=None, place=Dist())
    assert trainables[0].param not in fresh.state
    assert len(fresh.state) == len(trainables) - 1
    saved = [opt.state[p]["exp_avg_sq"] for g in opt.param_groups for p in g["params"]
             if p in opt.state]
    loaded = [fresh.state[p]["exp_avg_sq"] for g in fresh.param_groups for p in g["params"]
              if p in fresh.state]
    assert all(torch.equal(a, b) for a, b in zip(saved, loaded, strict=True))


def test_overwrite_replaces_an_earlier_run_only_when_it_finishes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = load_file(run(out, steps=2).adapter)

    def crash(done: int, record: dict) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):  # the earlier run comes back whole
        run(out, steps=2, learning_rate=2e-2, overwrite=True, on_step=crash)
    kept = load_file(out / "adapter.safetensors")
    assert all(torch.equal(first[k], kept[k]) for k in first)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    second = load_file(run(out, steps=2, learning_rate=2e-2, overwrite=True).adapter)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(esft_rs.EsftValueError,
                       match=r"resume=True continues the run in .*, overwrite=True replaces it"):
        run(out, steps=2, resume=True, overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EsftError, match=r"holds 'notes\.txt', which no run writes; not replaced"):
        run(out, steps=2, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_global_batch_note_under_torchrun() -> None:
    from esft_rs.training.api import batch_note
    from esft_rs.training.config import TrainConfig

    cfg = TrainConfig(per_device_batch_size=2, gradient_accumulation_steps=4)
    assert batch_note(cfg, 3, 512) == ("global batch 24 rows of 512 tokens a step = 3 processes"
                                       " x per_device_batch_size 2 x gradient_accumulation_steps 4")


def test_no_loss_over_zero_validation_tokens(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Held-out rows without answer tokens: no eval loss (it was 0.0 and kept as best)."""
    from esft_rs.training.batches import split

    data = fake_data()
    _, val = split(len(data["input_ids"]), 0.02, 5934875)
    data["labels"][val] = -100
    with caplog.at_level("WARNING", logger="esft_rs.training"):
        result = run(tmp_path / "out", data=data)
    assert result.fit.eval_loss is None and result.fit.best_step is None
    assert not any("eval_loss" in r for r in metrics(tmp_path / "out"))
    assert caplog.text.count("the validation rows hold no answer tokens") == 1


@pytest.mark.parametrize("damage", ["state.json", "state-step", "dcp", "rng-0.pt",
                                    "scheduler.pt"])
def test_resume_on_a_damaged_checkpoint_is_one_line(tmp_path: Path, damage: str) -> None:
    """Garbage state.json, a step beyond `steps`, a truncated .distcp, garbage rng or
    scheduler files: one line naming the checkpoint, no traceback, nothing changed."""
    out = tmp_path / "out"

    def crash(done: int, record: dict) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(out, on_step=crash)
    last = out / "checkpoints" / "step-3"
    if damage == "state-step":
        state = json.loads((last / "state.json").read_text())
        (last / "state.json").write_text(json.dumps({**state, "step": 600}))
    elif damage == "dcp":
        shard = next((last / "dcp").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (last / damage).write_bytes(b"\x00garbage{")
    with pytest.raises(InvalidFileError,
                       match=r"step-3: damaged checkpoint, cannot resume \(") as e:
        run(out, resume=True)
    assert "\n" not in str(e.value) and "remove" in str(e.value)
    assert not (out / "adapter.safetensors").exists()


def test_a_second_train_onto_a_run_directory_in_use_is_refused(tmp_path: Path) -> None:
    """Two trains onto one directory at once: the second is refused (both ran to the end and
    the first's result was lost); the lock goes with the run."""
    import os

    from esft_rs.training.api import run_lock

    out = tmp_path / "out"
    with run_lock(out):
        with pytest.raises(EsftError, match=rf"out: another train is writing to it now"
                                            rf" \(process {os.getpid()}\)"):
            run(out, steps=2)
    assert not out.exists()
    run(out, steps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_while_the_loop_sets_up_leaves_no_run_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esft_rs.training import loop

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Loop, "__init__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

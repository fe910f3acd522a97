"""``esft-rs train`` on the built-in tiny model and chat JSONL: end to end, CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import esft_rs
import forked_ranks
from conftest import free_port, run_cli
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.models import init_model, load_model, save_model
from test_train_config import OFFICIAL_BASE
from train_fakes import ddp_rank, plus_chat

EXPERTS = {"experts": {"1": [0, 5], "2": [3], "3": [7, 8, 9]},
           "shared_experts": False, "non_expert_modules": False}
QUICK = ["--steps", "4", "--seq-length", "64", "--per-device-batch-size", "2",
         "--gradient-accumulation-steps", "1", "--eval-steps", "2", "--save-steps", "2",
         "--logging-steps", "1", "--learning-rate", "1e-3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_model")
    save_model(init_model("tiny", seed=0), root / "base")
    (root / "task.jsonl").write_text(plus_chat(10, 6))
    (root / "experts.json").write_text(json.dumps(EXPERTS))
    (root / "base.yaml").write_text(OFFICIAL_BASE)
    return {"base": root / "base", "data": root / "task.jsonl",
            "experts": root / "experts.json", "yaml": root / "base.yaml", "root": root}


def expert_tensors(cfg: dict) -> set[str]:
    return {f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
            for layer, ids in cfg["experts"].items() for e in ids for p in ("gate", "up", "down")}


def test_cli_trains_and_writes_adapter(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("train", files["base"], files["data"], "--experts", files["experts"],
                   "-o", out, "--config", files["yaml"], *QUICK, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    # The official base.yaml works unchanged: its unused keys are notes, not errors.
    assert "esft-rs: note: " in proc.stderr and "n_device is ignored" in proc.stderr
    assert "6 routed experts in 3 layers" in proc.stdout
    adapter = load_file(out / "adapter.safetensors")
    assert set(adapter) == expert_tensors(EXPERTS)
    base = load_file(files["base"] / "model.safetensors")
    assert all(not torch.equal(t, base[n]) for n, t in adapter.items())  # each one trained
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert ExpertConfig.load(out / "expert_cfg.json") == ExpertConfig.parse(json.dumps(EXPERTS))


def test_quickstart_on_a_short_context_model(tmp_path: Path) -> None:
    """The README's train line with only --steps lowered, on a model whose context (64) is
    shorter than the default row (4096) and data smaller than one global batch (16): rows
    are cut to the context and the data cycled, each with a note, instead of a refusal."""
    from esft_rs.models.config import PRESETS

    base = save_model(init_model(PRESETS["tiny"].replace(max_position_embeddings=64)),
                      tmp_path / "base")
    (tmp_path / "task.jsonl").write_text(plus_chat(4, 4))
    (tmp_path / "experts.json").write_text(json.dumps(EXPERTS))
    out = tmp_path / "run"
    proc = run_cli("train", base, tmp_path / "task.jsonl", "-e", tmp_path / "experts.json",
                   "-o", out, "--steps", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stderr
    assert ("esft-rs: note: rows are cut to the model's context of 64 tokens"
            " (max_position_embeddings), not seq_length 4096 (--seq-length)") in notes
    assert "are fewer than one global batch of 16" in notes and "cycles through them" in notes
    from safetensors import safe_open

    with safe_open(out / "adapter.safetensors", "pt") as f:
        assert json.loads(f.metadata()["esft.training_config"])["seq_length"] == 64


def test_cli_starter_config_by_name(files: dict[str, Path], tmp_path: Path) -> None:
    """``-c small`` is the config shipped in the package, from a directory without configs/."""
    proc = run_cli("train", files["base"], files["data"], "-e", files["experts"], "-o", "run",
                   "-c", "small", "--steps", "1", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / "adapter.safetensors", "pt") as f:
        cfg = json.loads(f.metadata()["esft.training_config"])
    assert (cfg["steps"], cfg["seq_length"], cfg["lr_scheduler"]) == (1, 512, "cosine")


def test_merged_model_equals_trained_model(files: dict[str, Path], tmp_path: Path) -> None:
    result = esft_rs.train(
        files["base"], files["data"], tmp_path / "out", files["experts"], progress=False,
        steps=3, seq_length=64, per_device_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, gradient_checkpointing=False, device="cpu",
        save_merged=tmp_path / "merged",
    )
    info = esft_rs.read_adapter(result.adapter)
    assert info.kind == "esft" and info.base_fingerprint == esft_rs.fingerprint(files["base"])
    assert info.expert_config == ExpertConfig.parse(json.dumps(EXPERTS))
    base = load_file(files["base"] / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    trained = expert_tensors(EXPERTS)
    assert set(info.tensors) == trained
    for name, t in result.model.state_dict().items():
        assert torch.equal(t, merged[name]), name  # the merge holds what the model trained
        if name in trained:
            assert not torch.equal(t, base[name]), name  # every trained tensor moved
        else:
            assert torch.equal(t, base[name]), name  # everything else bit-identical to base
    # The merged checkpoint, loaded, gives the trained model's logits.
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "merged")(x), result.model.eval()(x))


def test_gradient_checkpointing_changes_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    kw = dict(progress=False, steps=2, seq_length=64, per_device_batch_size=2,
              gradient_accumulation_steps=1, learning_rate=1e-3, device="cpu")
    plain = esft_rs.train(files["base"], files["data"], tmp_path / "a", files["experts"],
                          gradient_checkpointing=False, **kw)
    recomputed = esft_rs.train(files["base"], files["data"], tmp_path / "b", files["experts"],
                               gradient_checkpointing=True, **kw)
    assert recomputed.model.gradient_checkpointing
    a, b = load_file(plain.adapter), load_file(recomputed.adapter)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


@pytest.mark.multiprocess
def test_two_processes_equal_one(files: dict[str, Path], tmp_path: Path) -> None:
    """Same global batch (4 sequences x 2 micro-steps) on 1 process and on 2 (gloo, DDP;
    FSDP: test_train_fsdp.py)."""
    kw = dict(experts=files["experts"], parallelism="ddp", steps=4, seq_length=64,
              gradient_accumulation_steps=2, eval_steps=2, save_steps=2, logging_steps=1,
              learning_rate=1e-3, device="cpu")
    args = (files["base"], files["data"])
    one = esft_rs.train(*args, tmp_path / "one", per_device_batch_size=4, progress=False, **kw)
    port = free_port()
    two = tmp_path / "two"
    forked_ranks.spawn(
        ddp_rank, args=(2, port, (*args, two), dict(per_device_batch_size=2, **kw)), nprocs=2)
    a, b = load_file(one.adapter), load_file(two / "adapter.safetensors")
    assert set(a) == set(b) == expert_tensors(EXPERTS)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)

    def losses(out: Path) -> torch.Tensor:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return torch.tensor([r.get("loss", r.get("eval_loss")) for r in rows])

    assert len(losses(two)) == 6  # 4 steps, 2 evals (the 2nd process holds no validation row)
    assert torch.allclose(losses(one.out_dir), losses(two), rtol=1e-5, atol=1e-6)
    state = json.loads(next((two / "checkpoints").iterdir()).joinpath("state.json").read_text())
    assert state["world"] == 2


BAD_FILES = {
    "bad.yaml": "learning_rat: 0.1\n",
    "dense.json": '{"experts": {"0": [1]}}',
    "range.json": '{"experts": {"2": [16]}}',
    "empty.json": '{"experts": {"1": []}}',
    "bad.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n'
                 '{"messages": [{"role": "bot", "content": "x"}]}\n',
    "one.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n',
    "nothing.jsonl": "\n",
    # every assistant turn masked: only each example's BOS is labelled (official format),
    # mid-row once packed, which the loss would count
    "masked.jsonl": "".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                 {"role": "assistant", "content": "a", "mask": 1}]}) + "\n"
        for i in range(120)),
}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "bad.yaml"], "bad.yaml: unknown key 'learning_rat' (did you mean"),
        (["--steps", "0"], "command line: steps must be positive, got 0"),
        (["--experts", "dense.json"],
         "dense.json: layer 0 is not an MoE layer of the model (MoE layers: 1-3)"),
    ],
)
def test_cli_bad_input(files: dict[str, Path], tmp_path: Path, args: list[str],
                       message: str) -> None:
    """One line on stderr, exit code 2, nothing written (more cases in-process, below)."""
    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    args = [str(tmp_path / a) if a in BAD_FILES else a for a in args]
    if "--experts" not in args:
        args += ["--experts", str(files["experts"])]
    out = tmp_path / "out"
    proc = run_cli("train", files["base"], files["data"], "-o", out, *args, "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esft-rs: error: "), proc.stderr
    assert message in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("data", "experts", "message"),
    [
        (None, "range.json", "range.json: layer 2: expert 16 is out of range"
                             " (the model has 16 routed experts per layer)"),
        (None, "empty.json", "empty.json: selects nothing to train"),
        ("bad.jsonl", None, "bad.jsonl:2: message 0 has unknown role"),
        ("nothing.jsonl", None, "nothing.jsonl: no conversations"),
        ("masked.jsonl", None, "masked.jsonl: no answer tokens left in the training split"),
        ("one.jsonl", None, "no rows left to train on after the 0.02 validation split of 1"
                            " packed row of 1024 tokens: pass val_ratio=0 (no validation),"
                            " lower seq_length=, or add data"),
    ],
)
def test_bad_input(files: dict[str, Path], tmp_path: Path, data: str | None,
                   experts: str | None, message: str) -> None:
    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(esft_rs.EsftError) as e:
        esft_rs.train(files["base"], tmp_path / data if data else files["data"], tmp_path / "out",
                      tmp_path / experts if experts else files["experts"], device="cpu")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_resume_refuses_another_base_model(files: dict[str, Path], tmp_path: Path) -> None:
    other = save_model(init_model("tiny", seed=1), tmp_path / "other")
    kw = dict(progress=False, steps=2, save_steps=2, seq_length=64, per_device_batch_size=2,
              gradient_accumulation_steps=1, device="cpu")
    esft_rs.train(files["base"], files["data"], tmp_path / "out", files["experts"], **kw)
    with pytest.raises(esft_rs.MismatchError, match="written for a different base model"):
        esft_rs.train(other, files["data"], tmp_path / "out", files["experts"], resume=True, **kw)


def test_builtin_model_trains_under_bf16_autocast() -> None:
    """Training on CUDA runs the model under bf16 autocast; the router stays float32."""
    model = init_model("tiny", seed=0)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = model.routers()[1](model.model.embed_tokens(x).flatten(0, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().logsumexp(-1).mean().backward()
        routed = model.routers()[1](model.model.embed_tokens(x).flatten(0, 1))
    assert routed.topk_weights.dtype == torch.float32
    assert torch.equal(routed.topk_ids, plain.topk_ids)
    assert model.model.layers[1].mlp.gate.weight.grad is not None

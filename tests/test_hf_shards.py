"""transformers families loaded shard by shard under FSDP (``esft_rs.models.hf_shards``):
each rank reads and builds only its own rows, through transformers' conversion mapping,
and holds exactly what the whole model loaded in one process holds there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cli_runner
import esft_rs
import forked_ranks
from conftest import free_port
from esft_rs.errors import InvalidFileError
from esft_rs.testing import dequantize_fp8_blocks

transformers = pytest.importorskip("transformers")

from hf_tiny import FAMILIES, build, save  # noqa: E402
from shard_worker import check_shards  # noqa: E402
from test_hf_families import fp8_copy  # noqa: E402

WORLD = 2


def fused_on_disk(family: str, out: Path) -> Path:
    """A checkpoint storing experts fused, as transformers holds them in memory."""
    model = build(family)
    model.save_pretrained(out)
    (out / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


def dequantised(fp8: Path, out: Path, block: int) -> Path:
    """``fp8`` with every block-FP8 weight dequantised by the project's reference (bf16)."""
    tensors = load_file(fp8 / "model.safetensors")
    plain = {n: dequantize_fp8_blocks(t, tensors[n + "_scale_inv"], (block, block))
             .to(torch.bfloat16) if t.dtype == torch.float8_e4m3fn else t
             for n, t in tensors.items() if not n.endswith("_scale_inv")}
    out.mkdir()
    save_file(plain, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (checkpoint, the directory whose one-process load it must equal)."""
    root = tmp_path_factory.mktemp("hf_shards")
    out = {}
    for family in sorted(FAMILIES):
        d = save(family, root / family)
        out[family] = (d, d)
    # several files (an index): each rank opens only those holding its rows' tensors
    build("mixtral").save_pretrained(root / "mixtral-sharded", max_shard_size="60KB")
    out["mixtral-sharded"] = (root / "mixtral-sharded",) * 2
    out["qwen3-fused-on-disk"] = (fused_on_disk("qwen3_moe", root / "fused"),) * 2
    # Block FP8: with 16x16 blocks every weight is whole blocks, as transformers needs (a
    # rank's rows may still end inside a block); 12x12 blocks leave partial ones, which
    # transformers cannot dequantise: there the reference is the project's dequantisation.
    fp8 = fp8_copy(out["deepseek_v3"][0], root / "fp8")
    out["fp8"] = (fp8, fp8)
    odd = fp8_copy(out["deepseek_v3"][0], root / "fp8-12", block=12)
    out["fp8-unaligned"] = (odd, dequantised(odd, root / "fp8-12-ref", 12))
    return out


@pytest.mark.multiprocess
def test_each_rank_holds_and_reads_only_its_shards(
    cases: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """Per rank, for every family (per-expert, fused on disk, several files, block FP8):
    every parameter shard and buffer is bit-identical to the rows of the whole model
    loaded in one process, and the sharded forward gives its logits (asserted in
    ``shard_worker``). The bytes read from disk add up over the ranks to the checkpoint
    exactly once (plus the buffers every rank keeps whole): no rank read another's rows."""
    pairs = [(str(a), str(b)) for a, b in cases.values()]
    forked_ranks.spawn(check_shards, args=(WORLD, free_port(), pairs, str(tmp_path)),
                                nprocs=WORLD)
    reads = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    for name, (ckpt, reference) in cases.items():
        tensors = esft_rs.inspect(ckpt).tensors
        total = sum(t.bytes for t in tensors.values())
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(reference))
        buffers = sum(tensors[n].bytes for n, _ in model.named_buffers() if n in tensors)
        got = [reads[r][str(ckpt)] for r in range(WORLD)]
        assert all(0 < g <= 0.55 * total + buffers for g in got), (name, got, total)
        # FP8: a block of scales whose rows two ranks share is read by both
        scales = sum(t.bytes for n, t in tensors.items() if n.endswith("_scale_inv"))
        once = total + (WORLD - 1) * buffers
        assert once <= sum(got) <= once + (WORLD - 1) * scales, (name, got, once, scales)
        if not scales:
            assert sum(got) == once


def test_meta_model_is_the_one_hf_load_builds(cases: dict[str, tuple[Path, Path]]) -> None:
    from esft_rs.models import hf
    from esft_rs.training.sharded_load import meta_model

    for name, (ckpt, _) in cases.items():
        if name == "fp8-unaligned":
            continue
        model, whole = meta_model(ckpt), hf.load(ckpt)
        assert type(model) is type(whole), name
        for key in ("_experts_implementation", "_attn_implementation", "use_cache"):
            assert getattr(model.config, key) == getattr(whole.config, key), (name, key)
        shapes = {n: (t.shape, t.dtype) for n, t in model.state_dict().items()}
        assert shapes == {n: (t.shape, t.dtype) for n, t in whole.state_dict().items()}, name
        assert all(t.is_meta for t in model.parameters())


def broken(src: Path, out: Path, edit) -> Path:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_bytes((src / "config.json").read_bytes())
    return out


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"),
     "the checkpoint has no tensor model.layers.1.post_attention_layernorm.weight"),
    (lambda t: t.pop("model.layers.2.block_sparse_moe.experts.3.w1.weight"),
     "tensor model.layers.2.mlp.experts.gate_up_proj is made of 8 tensors experts.*.w1.weight"
     " (one per expert); the checkpoint has 7"),
    (lambda t: t.update({"model.layers.1.block_sparse_moe.experts.2.w2.weight":
                         torch.zeros(32, 15)}),
     "cannot convert the tensors of model.layers.1.mlp.experts.down_proj: stack expects each"
     " tensor to be equal size"),
    (lambda t: t.update({"model.norm.weight": torch.ones(31)}),
     "tensor model.norm.weight has shape [31], config.json needs [32]"),
])
def test_a_checkpoint_that_does_not_fit_is_refused(
    cases: dict[str, tuple[Path, Path]], tmp_path: Path, edit, message: str
) -> None:
    from esft_rs.training.sharded_load import meta_model

    bad = broken(cases["mixtral"][0], tmp_path / "bad", edit)
    with pytest.raises(InvalidFileError) as e:
        meta_model(bad)
    want = f"{bad}: {message}" + (
        " (a tensor missing from a fused expert group shortens it)" if "has shape" in message
        else "")
    # torch's stack error, quoted, names the sizes in words that change across releases
    assert str(e.value).startswith(want) if message.endswith("equal size") else \
        str(e.value) == want


def test_unsupported_inputs_are_refused(cases: dict[str, tuple[Path, Path]],
                                        tmp_path: Path) -> None:
    from esft_rs.training.sharded_load import meta_model

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InvalidFileError, match="model_type 'llama' is not a supported MoE"):
        meta_model(llama)
    other = tmp_path / "bnb"
    other.mkdir()
    config = json.loads((cases["mixtral"][0] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidFileError, match="quantization 'bitsandbytes' cannot be loaded"):
        meta_model(other)


@pytest.mark.multiprocess
def test_cli_under_torchrun_refuses_in_one_line(cases: dict[str, tuple[Path, Path]],
                                                tmp_path: Path) -> None:
    """``esft-rs profile`` on 2 ranks (the environment torchrun gives each): a tensor missing
    from the checkpoint is one line and exit code 2 on every rank, and no output."""
    bad = broken(cases["mixtral"][0], tmp_path / "bad",
                 lambda t: t.pop("model.layers.1.block_sparse_moe.gate.weight"))
    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    port = free_port()
    envs = [{**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(WORLD)}
            for r in range(WORLD)]
    for p in cli_runner.run_each(["profile", str(bad), str(data), "-o",
                                  str(tmp_path / "r.safetensors"), "--parallelism", "fsdp"],
                                 envs, timeout=300):
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().count("\n") == 0, p.stderr
        assert f"{bad}: the checkpoint has no tensor model.layers.1.mlp.gate.weight" in p.stderr
    assert not (tmp_path / "r.safetensors").exists()


def test_a_conversion_that_cannot_run_per_shard_reads_whole_tensors(
    cases: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Converters other than stack-then-concatenate are applied to the whole tensor, then
    this rank's rows taken; the log names each such tensor."""
    from esft_rs.models import hf, hf_shards

    ckpt = cases["mixtral"][0]
    monkeypatch.setattr(hf_shards.Plan, "per_slice",
                        lambda self, group: group.converter is None)
    model = hf_shards.meta(ckpt)
    with caplog.at_level("WARNING", logger="esft_rs.models.hf_shards"):
        read = hf_shards.fill(model, ckpt, torch.device("cpu"))
    whole = hf.load(ckpt).state_dict()
    assert all(torch.equal(t, whole[n]) for n, t in model.state_dict().items())
    assert read == sum(t.bytes for t in esft_rs.inspect(ckpt).tensors.values())
    warned = {r.getMessage().split(":")[0] for r in caplog.records}
    assert warned == {f"model.layers.{i}.mlp.experts.{p}" for i in range(3)
                      for p in ("gate_up_proj", "down_proj")}


@pytest.mark.multiprocess
@pytest.mark.floor  # ran on the floor before it was marked multiprocess
def test_fsdp_training_on_experts_fused_on_disk(
    cases: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """2 ranks train slices of fused tensors read as single rows of the fused tensors on
    disk: the adapter is one process's."""
    from test_train_fsdp import HF_EXPERTS, assert_same_adapter, train
    from train_fakes import plus_chat

    root = tmp_path / "run"
    root.mkdir()
    (root / "base").symlink_to(cases["qwen3-fused-on-disk"][0])
    (root / "task.jsonl").write_text(plus_chat(10, 4))
    HF_EXPERTS.save(root / "experts.json")
    assert_same_adapter(train(root, tmp_path / "one", 1), train(root, tmp_path / "two", 2))


@pytest.mark.multiprocess
@pytest.mark.floor  # ran on the floor before it was marked multiprocess
def test_fsdp_training_on_a_block_fp8_base(
    cases: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """2 ranks on a block-FP8 DeepSeek-V3 (bf16 compute), shared experts trained whole: the
    losses are one process's. (Adapters are not compared: in bf16, AdamW's normalised
    step turns the rounding of a near-zero gradient into a learning-rate-sized change.)"""
    from esft_rs.files.expert_config import ExpertConfig
    from test_train_fsdp import HF_EXPERTS, losses, train
    from train_fakes import plus_chat

    root = tmp_path / "run"
    root.mkdir()
    (root / "base").symlink_to(cases["fp8"][0])
    (root / "task.jsonl").write_text(plus_chat(10, 4))
    ExpertConfig(HF_EXPERTS.experts, True, False).save(root / "experts.json")
    one, two = train(root, tmp_path / "one", 1), train(root, tmp_path / "two", 2)
    x, y = load_file(one / "adapter.safetensors"), load_file(two / "adapter.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in x.items()} == \
        {k: (v.dtype, v.shape) for k, v in y.items()}
    # bf16 compute: two ranks sum in another order, and how far that moves a loss depends
    # on the CPU's bf16 kernels (2.2e-5 on an AMD EPYC without AVX-512; within 1e-5 on the
    # CI machine)
    torch.testing.assert_close(losses(one), losses(two), rtol=1e-4, atol=0)


def test_trained_masters_start_from_what_one_process_loads(
    cases: dict[str, tuple[Path, Path]]
) -> None:
    """Frozen and trained tensors (fused slices, whole fp32 masters) filled into a meta model
    after freezing equal those of the model loaded whole, then frozen: on a block-FP8
    base the masters are the model-dtype values, not a finer dequantisation."""
    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.models import hf
    from esft_rs.training.freeze import freeze
    from esft_rs.training.sharded_load import fill, meta_model

    ckpt = cases["fp8"][0]
    cfg = ExpertConfig({1: [1, 5], 2: list(range(8))}, True, False)
    nets = [meta_model(ckpt), hf.load(ckpt)]
    for net in nets:
        for t in freeze(net, cfg):
            t.param.data = t.param.data.float()
    fill(nets[0], ckpt, torch.device("cpu"))
    got, want = (dict(n.named_parameters()) for n in nets)
    assert got.keys() == want.keys()
    assert sum(p.dtype == torch.float32 for p in want.values()) >= 10
    for name, p in want.items():
        assert got[name].dtype == p.dtype and torch.equal(got[name], p), name

"""A safetensors file written one tensor at a time (by the core) has the layout safetensors
gives; rows read by offset (by the core) are the checkpoint's bytes."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esft_rs.files.tensor_stream import tensor_stream, write_tensors


def header(path: Path) -> tuple[list[tuple[str, object]], bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return list(json.loads(raw[8:8 + n]).items()), raw[8 + n:]


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"model.layers.{i}.w": torch.randn(3, 5, generator=g).to(d) for i, d in enumerate(
        [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
         torch.float8_e5m2])}
    out.update({"b": torch.tensor([True, False, True]), "i": torch.arange(7),
                "u": torch.arange(5, dtype=torch.uint8), "s": torch.tensor(2.5),
                "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
                "strided": torch.randn(4, 6, generator=g).t(),
                "Z": torch.ones(2, dtype=torch.int16),
                "a.z": torch.ones(1, dtype=torch.int32), "a.a": torch.ones(2)})
    return out


def test_layout_equals_safetensors(tmp_path: Path) -> None:
    ts = tensors()
    save_file({k: v.contiguous() for k, v in ts.items()}, tmp_path / "ref.safetensors",
              metadata={"format": "pt", "b": "2", "a": "1"})
    names = list(ts)
    random.Random(0).shuffle(names)  # the order tensors arrive in does not matter
    layout = [(n, t.dtype, t.shape) for n, t in ts.items()]
    with tensor_stream(tmp_path / "out.safetensors", layout,
                       {"format": "pt", "b": "2", "a": "1"}) as out:
        for name in names:
            out.add(name, ts[name])
    ours, our_data = header(tmp_path / "out.safetensors")
    ref, ref_data = header(tmp_path / "ref.safetensors")
    assert ours[0] == ("__metadata__", {"a": "1", "b": "2", "format": "pt"})  # sorted
    assert ours[1:] == [kv for kv in ref if kv[0] != "__metadata__"]  # names, order, offsets
    assert our_data == ref_data
    assert (tmp_path / "out.safetensors").stat().st_size == (tmp_path / "ref.safetensors").stat(
        ).st_size
    loaded = load_file(tmp_path / "out.safetensors")
    for name, t in ts.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8),
                           t.contiguous().reshape(-1).view(torch.uint8))


def test_no_metadata_and_no_tensors(tmp_path: Path) -> None:
    write_tensors(tmp_path / "a.safetensors", {"x": torch.ones(3)})
    save_file({"x": torch.ones(3)}, tmp_path / "ref.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with tensor_stream(tmp_path / "b.safetensors", []):
        pass
    save_file({}, tmp_path / "ref.safetensors")
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_a_failure_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"earlier")
    x = [("x", torch.float32, (3,))]
    with pytest.raises(RuntimeError, match="boom"), \
            tensor_stream(tmp_path / "a.safetensors", x) as out:
        out.add("x", torch.ones(3))
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    assert (tmp_path / "a.safetensors").read_bytes() == b"earlier"
    for wrong, message in [(lambda out: [out.add("x", torch.ones(3)) for _ in range(2)],
                            "x: given twice"),
                           (lambda out: out.add("x", torch.ones(3, 1)), "declared as"),
                           (lambda out: out.add("x", torch.ones(3, dtype=torch.float16)),
                            "declared as 12 bytes of F32"),
                           (lambda out: out.add("y", torch.ones(3)), "y: not among"),
                           (lambda out: None, "never written: x")]:
        with pytest.raises(ValueError, match=message), \
                tensor_stream(tmp_path / "b.safetensors", x) as out:
            wrong(out)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_a_trainer_adapter_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    """``write_outputs`` takes the gathered tensors one by one and keeps none of them (rank 0
    of a --mode full run held the whole model's worth before writing)."""
    import weakref

    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.training.run_dir import write_outputs

    seen: list[weakref.ref] = []

    def gathered():
        for i in range(4):
            assert all(r() is None for r in seen), i  # every earlier tensor is gone
            t = torch.full((64, 64), float(i))
            seen.append(weakref.ref(t))
            yield f"model.layers.1.mlp.experts.{i}.down_proj.weight", t
            del t

    layout = [(f"model.layers.1.mlp.experts.{i}.down_proj.weight", torch.float32, (64, 64))
              for i in range(4)]
    path = write_outputs(tmp_path, gathered(), layout, ExpertConfig({1: [0, 1, 2, 3]}), None,
                         {}, {})
    loaded = load_file(path)
    assert [float(loaded[f"model.layers.1.mlp.experts.{i}.down_proj.weight"][0, 0])
            for i in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_rows_are_read_by_offset_into_the_tensor(tmp_path: Path) -> None:
    """``esft_rs.models.rows``: the core reads any rows of any tensor into the tensor given
    (no copy when it fits, cast when it does not)."""
    from esft_rs import inspect
    from esft_rs.models.rows import Rows

    ts = {k: v.contiguous() for k, v in tensors().items()}
    save_file(ts, tmp_path / "model.safetensors")
    info = inspect(tmp_path).tensors
    with Rows(tmp_path, info) as rows:
        for name, t in ts.items():
            got = rows.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        w = ts["model.layers.0.w"]
        assert torch.equal(rows.read("model.layers.0.w", slice(1, 3)), w[1:3])
        assert rows.read("model.layers.0.w", slice(3, 1)).shape == (0, 5)
        into = torch.empty(2, 5)
        assert rows.read("model.layers.0.w", slice(1, None), out=into[:2]) is not None
        cast = torch.empty(3, 5, dtype=torch.float64)
        assert rows.read("model.layers.0.w", out=cast) is cast
        assert torch.equal(cast, w.double())
        assert rows.bytes == sum(t.numel() * t.element_size() for t in ts.values()) + 5 * 4 \
            * (2 + 2 + 3)


def test_pipeline_without_linux_only_calls(tmp_path: Path) -> None:
    """Train, merge and load the merged model with ``os.preadv`` and ``os.copy_file_range``
    gone, as on Windows (macOS lacks copy_file_range): every checkpoint byte goes through
    the core. Before, loading a model failed with AttributeError: os has no preadv."""
    import os
    import subprocess
    import sys
    import textwrap

    root = Path(__file__).parents[1]
    words = ["expert", "router", "gate", "token", "shard", "adapter", "merge", "split"] * 3
    (tmp_path / "task.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]}) + "\n"
        for w in words))
    script = textwrap.dedent(f"""
        import os
        del os.preadv, os.copy_file_range
        import torch
        import esft_rs
        from esft_rs.data import read_task_data
        from esft_rs.models import init_model, load_model, save_model
        from esft_rs.data.tokenizer import load_tokenizer
        os.chdir({str(tmp_path)!r})
        save_model(init_model("tiny"), "base")
        rows = read_task_data("task.jsonl").pack(load_tokenizer("base"), seq_length=64)
        stats = esft_rs.profile(load_model("base"), [(rows.input_ids, rows.attention_mask)])
        experts = esft_rs.select_experts(stats, top_p=0.2)
        result = esft_rs.train("base", "task.jsonl", "run", experts,
                               {str(root / "configs" / "small.yaml")!r}, steps=1,
                               seq_length=64, device="cpu", progress=False)
        esft_rs.merge("base", result.adapter, "merged")
        from safetensors.torch import load_file
        adapter = load_file(result.adapter)
        merged, base = load_model("merged").state_dict(), load_model("base").state_dict()
        assert adapter and all(torch.equal(merged[n], t) for n, t in adapter.items())
        assert all(torch.equal(base[n], t) for n, t in merged.items() if n not in adapter)
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]

"""A safetensors file written one tensor at a time has the layout safetensors gives."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esft_rs.tensor_stream import tensor_stream


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
    with tensor_stream(tmp_path / "out.safetensors", {"format": "pt", "b": "2", "a": "1"}) as out:
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
    with tensor_stream(tmp_path / "a.safetensors") as out:
        out.add("x", torch.ones(3))
    save_file({"x": torch.ones(3)}, tmp_path / "ref.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with tensor_stream(tmp_path / "b.safetensors"):
        pass
    save_file({}, tmp_path / "ref.safetensors")
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_a_failure_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"earlier")
    with pytest.raises(RuntimeError, match="boom"), \
            tensor_stream(tmp_path / "a.safetensors") as out:
        out.add("x", torch.ones(3))
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    assert (tmp_path / "a.safetensors").read_bytes() == b"earlier"
    with pytest.raises(ValueError, match="x: given twice"), \
            tensor_stream(tmp_path / "b.safetensors") as out:
        out.add("x", torch.ones(3))
        out.add("x", torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_a_trainer_adapter_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    """``write_outputs`` takes the gathered tensors one by one and keeps none of them (rank 0
    of a --mode full run held the whole model's worth before writing)."""
    import weakref

    from esft_rs.expert_config import ExpertConfig
    from esft_rs.training.outputs import write_outputs

    seen: list[weakref.ref] = []

    def gathered():
        for i in range(4):
            assert all(r() is None for r in seen), i  # every earlier tensor is gone
            t = torch.full((64, 64), float(i))
            seen.append(weakref.ref(t))
            yield f"model.layers.1.mlp.experts.{i}.down_proj.weight", t
            del t

    path = write_outputs(tmp_path, gathered(), ExpertConfig({1: [0, 1, 2, 3]}), None, {}, {})
    loaded = load_file(path)
    assert [float(loaded[f"model.layers.1.mlp.experts.{i}.down_proj.weight"][0, 0])
            for i in range(4)] == [0.0, 1.0, 2.0, 3.0]

"""inspect: agreement with the safetensors package, MoE structure, and every malformed header."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import esft_rs
from conftest import run_cli
from esft_rs.testing import MoEShape, random_tensors, write_checkpoint


def reference(path: Path) -> dict[str, tuple[str, list[int]]]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(f, "np") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                out[name] = (sl.get_dtype(), sl.get_shape())
    return out


@pytest.mark.parametrize("which", ["single_ckpt", "sharded_ckpt"])
def test_agrees_with_safetensors(which: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    info = esft_rs.inspect(path)
    ref = reference(path)
    assert {n: (t.dtype, list(t.shape)) for n, t in info.tensors.items()} == ref
    assert info.total_bytes == sum(t.bytes for t in info.tensors.values())
    assert info.metadata == {"format": "pt"}
    if which == "sharded_ckpt":
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert {n: t.file for n, t in info.tensors.items()} == index["weight_map"]
        assert len(info.files) == 3


def test_single_file_and_json_cli(single_ckpt: Path) -> None:
    f = single_ckpt / "model.safetensors"
    proc = run_cli("inspect", f, "--json", check=True)
    out = json.loads(proc.stdout)
    ref = reference(f)
    assert {n: (t["dtype"], t["shape"]) for n, t in out["tensors"].items()} == ref
    assert set(out) >= {"tensors", "metadata", "moe"}
    assert out["tensors"]["model.embed_tokens.weight"]["file"] == "model.safetensors"
    human = run_cli("inspect", single_ckpt, check=True).stdout
    assert "MoE: 2 of 3 layers" in human


def test_moe_structure(tiny_shape: MoEShape, single_ckpt: Path) -> None:
    moe = esft_rs.inspect(single_ckpt).moe
    assert moe.moe_layers == (1, 2)
    assert moe.dense_layers == (0,)
    assert moe.experts_per_layer == tiny_shape.experts
    assert all(layer.shared_experts and layer.router for layer in moe.layers.values())
    assert {layer.layout for layer in moe.layers.values()} == {"per-expert"}
    per_expert = 3 * tiny_shape.hidden * tiny_shape.intermediate * 4
    assert moe.routed_expert_bytes == 2 * tiny_shape.experts * per_expert


def test_fused_and_bf16(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file  # bf16 needs torch

    t = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(6, 8, 4, dtype=torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj": torch.zeros(6, 4, 4, dtype=torch.bfloat16),
        "model.layers.0.mlp.gate.weight": torch.zeros(6, 4),
    }
    save_file(t, tmp_path / "f.safetensors")
    info = esft_rs.inspect(tmp_path / "f.safetensors")
    assert info.moe.layers[0].layout == "fused"
    assert info.moe.experts_per_layer == 6
    assert info.tensors["model.layers.0.mlp.experts.down_proj"].dtype == "BF16"


def test_adapter_subset(tmp_path: Path, tiny_shape: MoEShape) -> None:
    full = random_tensors(tiny_shape)
    sub = {n: a for n, a in full.items() if ".experts.1." in n or ".experts.3." in n}
    write_checkpoint(tmp_path / "ad", sub)
    info = esft_rs.inspect(tmp_path / "ad" / "model.safetensors")
    assert {k: v.experts for k, v in info.moe.layers.items()} == {1: (1, 3), 2: (1, 3)}


def test_valid_oddities(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({}, tmp_path / "empty.safetensors")
    assert esft_rs.inspect(tmp_path / "empty.safetensors").total_tensors == 0
    save_file(
        {"s": np.array(3.0, np.float32), "z": np.zeros((0, 5), np.float16)},
        tmp_path / "odd.safetensors",
    )
    info = esft_rs.inspect(tmp_path / "odd.safetensors")
    assert info.tensors["s"].shape == () and info.tensors["z"].bytes == 0
    # An unpadded header (the reference pads to 8 bytes, but need not).
    raw = b'{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}'
    (tmp_path / "unpadded.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"xyz")
    assert esft_rs.inspect(tmp_path / "unpadded.safetensors").tensors["a"].bytes == 3


def header_file(header: object, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {
    "empty": (b"", "shorter than the 8-byte header length"),
    "short": (b"\x01\x02\x03", "shorter than the 8-byte header length"),
    "past_end": (struct.pack("<Q", 1000) + b"{}", "points past the end"),
    "too_large": (struct.pack("<Q", 100_000_001) + b"{}", "exceeds the 100000000-byte limit"),
    "not_utf8": (header_file(b'{"\xff": 1}'), "not valid UTF-8"),
    "not_object": (header_file(b"[1, 2]"), "not a JSON object"),
    "bad_json": (header_file(b'{"a": '), "not valid JSON"),
    "unknown_dtype": (header_file({"a": {**T, "dtype": "F128"}}, bytes(8)), "unknown dtype"),
    "negative_shape": (header_file({"a": {**T, "shape": [-2]}}, bytes(8)), '"a"'),
    "float_shape": (header_file({"a": {**T, "shape": [2.5]}}, bytes(8)), '"a"'),
    "missing_offsets": (
        header_file({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
        "data_offsets",
    ),
    "size_mismatch": (header_file({"a": {**T, "shape": [3]}}, bytes(8)), "needs 12 bytes"),
    "gap": (
        header_file({"a": {**T, "data_offsets": [4, 12]}}, bytes(12)),
        "not contiguous",
    ),
    "overlap": (
        header_file({"a": T, "b": {**T, "data_offsets": [4, 12]}}, bytes(12)),
        "not contiguous",
    ),
    "reversed": (header_file({"a": {**T, "data_offsets": [8, 0]}}, bytes(8)), "not contiguous"),
    "trailing": (header_file({"a": T}, bytes(9)), "data section is 9 bytes"),
    "truncated_data": (header_file({"a": T}, bytes(7)), "data section is 7 bytes"),
    "overflow": (
        header_file({"a": {**T, "shape": [2**32, 2**32, 2**4]}}, bytes(8)),
        "overflows",
    ),
    "metadata_not_str": (header_file({"__metadata__": {"n": 1}}), "__metadata__"),
    "duplicate": (
        header_file(
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            bytes(8),
        ),
        "duplicate tensor name",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_exit_2_one_line(tmp_path: Path, case: str) -> None:
    data, expected = MALFORMED[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(esft_rs.InvalidFileError, match=str(path).replace(".", r"\.")):
        esft_rs.inspect(path)
    proc = run_cli("inspect", path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(path) in lines[0] and expected in lines[0], lines[0]
    assert path.read_bytes() == data  # never touched


def test_reference_rejects_the_same(tmp_path: Path) -> None:
    """Everything we reject, the safetensors package rejects too (it is the reference)."""
    for case, (data, _) in MALFORMED.items():
        if case == "duplicate":  # the reference's map keeps the last entry silently
            continue
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(data)
        with pytest.raises(Exception):  # noqa: B017 (the reference raises various types)
            with safe_open(path, "np") as h:
                list(h.keys())


def test_bad_index_and_missing(tmp_path: Path, sharded_ckpt: Path) -> None:
    proc = run_cli("inspect", tmp_path / "nope")
    assert proc.returncode == 2 and "No such file" in proc.stderr
    index = sharded_ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    proc = run_cli("inspect", sharded_ckpt)
    assert proc.returncode == 2
    assert "model-00009-of-00009.safetensors" in proc.stderr
    index.write_text("{not json")
    proc = run_cli("inspect", sharded_ckpt)
    assert proc.returncode == 2 and "index" in proc.stderr
    empty = tmp_path / "emptydir"
    empty.mkdir()
    proc = run_cli("inspect", empty)
    assert proc.returncode == 2 and "no .safetensors files" in proc.stderr

"""Block-FP8 (DeepSeek-V3) base checkpoints: inspect, split and merge, against torch."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import esft_rs
from conftest import run_cli
from esft_rs.errors import InvalidFileError, MismatchError
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.files.naming import classify
from esft_rs.testing import (
    MoEShape,
    dequantize_fp8_blocks,
    fp8_config,
    fp8_tensors,
    quantize_fp8_blocks,
    write_checkpoint,
)

# Plain adapter files carry no base fingerprint: merge warns, as it should.
pytestmark = pytest.mark.filterwarnings("ignore:.*no base fingerprint")

SHAPE = MoEShape(
    layers=3, experts=4, shared_experts=1, hidden=40, intermediate=24, dense_intermediate=32,
    vocab=16,
)
BLOCK = (16, 32)  # from config.json; [24, 40] weights get 2x2 scales, partial blocks both ways
CHOSEN = {1: [0, 2], 2: [3]}
UP = "model.layers.1.mlp.experts.2.up_proj.weight"


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def chosen(name: str) -> bool:
    role = classify(name)
    return role.kind == "routed_expert" and role.expert in CHOSEN.get(role.layer, [])


@pytest.fixture
def base_tensors() -> dict[str, torch.Tensor]:
    return fp8_tensors(SHAPE, seed=1, block=BLOCK)


@pytest.fixture
def base(tmp_path: Path, base_tensors: dict[str, torch.Tensor]) -> Path:
    return write_checkpoint(tmp_path / "base", base_tensors, shards=3, config=fp8_config(BLOCK))


def new_weights(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fine-tuned values of the chosen experts' projections, as training writes them."""
    g = torch.Generator().manual_seed(7)
    return {
        n: (torch.randn(t.shape, generator=g) * 0.05).to(dtype)
        for n, t in tensors.items()
        if chosen(n) and t.dtype == torch.float8_e4m3fn
    }


def test_inspect(base: Path, base_tensors: dict[str, torch.Tensor], tmp_path: Path) -> None:
    info = esft_rs.inspect(base)
    assert info.tensors[UP].dtype == "F8_E4M3"
    assert info.tensors[UP + "_scale_inv"].dtype == "F32"
    assert info.tensors[UP + "_scale_inv"].shape == (2, 2)
    fp8 = info.fp8
    assert fp8 is not None
    assert (fp8.block_size, fp8.block_size_from) == (BLOCK, "config.json")
    assert fp8.scaled_weights == sum(t.dtype == torch.float8_e4m3fn for t in base_tensors.values())
    assert fp8.scale_bytes == sum(
        t.nbytes for n, t in base_tensors.items() if n.endswith("_scale_inv")
    )
    assert fp8.unscaled == ()
    # One expert: 3 fp8 projections of 24x40 bytes, scales [2, 2], [2, 2] and [3, 1] F32.
    prefix = "model.layers.1.mlp.experts.2."
    per_expert = sum(t.nbytes for n, t in base_tensors.items() if n.startswith(prefix))
    assert per_expert == 3 * 24 * 40 + (4 + 4 + 3) * 4
    assert info.moe.bytes_per_expert == per_expert
    assert info.moe.experts_per_layer == 4

    out = run_cli("inspect", base, "--no-tensors", check=True).stdout
    assert "FP8: block-quantised F8_E4M3 base, 16x32 blocks (config.json)" in out
    assert "per expert incl. block scales" in out

    single = tmp_path / "single.safetensors"
    save_file(fp8_tensors(MoEShape(layers=2, experts=2, hidden=8, intermediate=4)), single)
    fp8 = esft_rs.inspect(single).fp8
    assert fp8 is not None and (fp8.block_size, fp8.block_size_from) == ((128, 128), "default")


def test_split_keeps_scales_byte_exact(
    base: Path, base_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    cfg = tmp_path / "experts.json"
    ExpertConfig(experts=CHOSEN).save(cfg)
    report = esft_rs.split(base, tmp_path / "ad.safetensors", experts=cfg)
    got = load_file(tmp_path / "ad.safetensors")
    expected = {n: t for n, t in base_tensors.items() if chosen(n)}
    assert len(expected) == 3 * 6  # 3 weights + 3 scale tensors per expert
    assert set(got) == set(expected)
    for n, t in expected.items():
        assert got[n].dtype == t.dtype and raw(got[n]) == raw(t), n
    assert report.bytes == sum(t.nbytes for t in expected.values())


def test_split_by_diff_takes_the_scale_along(
    base: Path, base_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # Fine-tuning moved one fp8 code of one weight; its scale stayed the same.
    ft_t = dict(base_tensors)
    w = ft_t[UP].view(torch.uint8).clone()
    w[0, 0] ^= 1
    ft_t[UP] = w.view(torch.float8_e4m3fn)
    ft = write_checkpoint(tmp_path / "ft", ft_t, shards=3, config=fp8_config(BLOCK))
    ad = tmp_path / "ad.safetensors"
    report = esft_rs.split(ft, ad, base=base)
    assert {t.tensor for t in report.tensors} == {UP, UP + "_scale_inv"}
    esft_rs.merge(base, ad, tmp_path / "out")
    for f in ft.glob("*.safetensors"):
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()


def test_merge_refuses_bf16_into_fp8(
    base: Path, base_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    ad = tmp_path / "ad.safetensors"
    save_file({UP: new_weights(base_tensors, torch.bfloat16)[UP]}, ad)
    before = digest(base)
    out = tmp_path / "out"
    proc = run_cli("merge", base, ad, "-o", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert (
        f"{ad}: adapter tensor {UP} is BF16 but the base stores F8_E4M3 with 16x32 block "
        "scales; pass --requantize-fp8 (Python: requantize_fp8=True) to quantise it "
        "(rewrites its weight_scale_inv), or dequantise the base first"
    ) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad.safetensors", "base"]
    assert digest(base) == before
    # from Python the keyword, once
    with pytest.raises(MismatchError, match=r"block scales; pass requantize_fp8=True to quantise"):
        esft_rs.merge(base, ad, out, dry_run=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_requantize_matches_torch(
    base: Path, base_tensors: dict[str, torch.Tensor], tmp_path: Path, dtype: torch.dtype
) -> None:
    new = new_weights(base_tensors, dtype)
    ad = tmp_path / "ad.safetensors"
    save_file(new, ad)
    before = digest(base)

    dry = esft_rs.merge(base, ad, tmp_path / "out", requantize_fp8=True, dry_run=True)
    assert len(dry.requantized) == 9 and not (tmp_path / "out").exists()
    proc = run_cli("merge", base, ad, "-o", tmp_path / "out", "--requantize-fp8", check=True)
    assert "requantised 9 tensors to block FP8" in proc.stdout

    got = load_dir(tmp_path / "out")
    for n, x in new.items():
        q, scale = quantize_fp8_blocks(x, BLOCK)
        assert got[n].dtype == torch.float8_e4m3fn and raw(got[n]) == raw(q), n
        assert raw(got[n + "_scale_inv"]) == raw(scale), n
        deq = dequantize_fp8_blocks(got[n], got[n + "_scale_inv"], BLOCK)
        atol = float(scale.max()) * 2**-9  # e4m3: 3 mantissa bits, subnormals 2^-9 apart
        torch.testing.assert_close(deq, x.float(), rtol=2**-4, atol=atol)
    for n in base_tensors.keys() - new.keys() - {n + "_scale_inv" for n in new}:
        assert raw(got[n]) == raw(base_tensors[n]), n
    for f in base.glob("*.safetensors"):  # same header bytes, so same layout and size
        head = f.read_bytes()
        size = 8 + int.from_bytes(head[:8], "little")
        assert (tmp_path / "out" / f.name).read_bytes()[:size] == head[:size]
        assert (tmp_path / "out" / f.name).stat().st_size == f.stat().st_size
    assert digest(base) == before
    assert set(dry.requantized) == set(new)
    assert {r.tensor for r in dry.replaced if r.requantized} == set(new) | {
        n + "_scale_inv" for n in new
    }


def test_fp8_adapter_merges_byte_exact(
    base: Path, base_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    ft_t = dict(base_tensors)
    adapter = {}
    for n, x in new_weights(base_tensors, torch.bfloat16).items():
        q, scale = quantize_fp8_blocks(x, BLOCK)
        ft_t[n], ft_t[n + "_scale_inv"] = q, scale
        adapter[n], adapter[n + "_scale_inv"] = q, scale
    ad = tmp_path / "ad.safetensors"
    save_file(adapter, ad)
    report = esft_rs.merge(base, ad, tmp_path / "out")
    assert report.requantized == () and len(report.replaced) == 18
    expected = write_checkpoint(tmp_path / "ft", ft_t, shards=3, config=fp8_config(BLOCK))
    assert digest(tmp_path / "out") == digest(expected)


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype up to 448 in magnitude (ties included)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(dtype).float()
    return v[v.isfinite() & (v.abs() <= 448)]


@pytest.mark.parametrize(
    ("dtype", "values"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                          (torch.float32, torch.bfloat16), (torch.float32, None)],
    ids=["bf16", "f16", "f32-bf16-values", "f32-random"],
)
def test_conversion_is_torchs_bit_for_bit(
    tmp_path: Path, dtype: torch.dtype, values: torch.dtype | None
) -> None:
    """Each 128x128 block holds 448, so scale_inv is 1 and the fp8 codes are those of
    the values themselves: every 16-bit value (or random f32s) against torch."""
    if values is None:
        g = torch.Generator().manual_seed(3)
        v = (torch.rand(60000, generator=g) * 2 - 1) * 448 * torch.rand(60000, generator=g) ** 8
    else:
        v = _all_values(values)
    cols = 128
    rows = -(-(v.numel() + 2 * cols) // cols // 128) * 128
    x = torch.zeros(rows * cols)
    x[: v.numel()] = v
    x = x.view(rows, cols)
    x[::128, 0] = 448.0  # one 448 per block
    x = x.to(dtype)
    name = "model.layers.0.mlp.experts.0.up_proj.weight"
    q0, s0 = quantize_fp8_blocks(torch.zeros(rows, cols))
    write_checkpoint(tmp_path / "base", {name: q0, name + "_scale_inv": s0})
    save_file({name: x}, tmp_path / "ad.safetensors")
    esft_rs.merge(tmp_path / "base", tmp_path / "ad.safetensors", tmp_path / "out",
                  requantize_fp8=True)
    got = load_dir(tmp_path / "out")
    assert torch.equal(got[name + "_scale_inv"], torch.ones(rows // 128, 1))
    assert raw(got[name]) == raw(x.float().to(torch.float8_e4m3fn))


def test_requantize_refusals(base: Path, base_tensors: dict[str, torch.Tensor],
                             tmp_path: Path) -> None:
    ad = tmp_path / "ad.safetensors"
    bad = new_weights(base_tensors, torch.float32)
    bad[UP][3, 5] = float("nan")
    save_file(bad, ad)
    out = tmp_path / "out"
    with pytest.raises(InvalidFileError, match=r"non-finite value \(row 3, column 5\)"):
        esft_rs.merge(base, ad, out, requantize_fp8=True)
    assert not out.exists()

    # A block size that does not fit the scale tensors' shapes.
    (base / "config.json").write_text('{"quantization_config": {"weight_block_size": [128, 128]}}')
    save_file({UP: new_weights(base_tensors, torch.float32)[UP]}, ad)
    with pytest.raises(MismatchError, match=r"128x128 block scales .* are F32 \[1, 1\]"):
        esft_rs.merge(base, ad, out, requantize_fp8=True)
    # An integer tensor cannot be quantised.
    save_file({UP: torch.zeros(24, 40, dtype=torch.int8)}, ad)
    with pytest.raises(MismatchError, match="only a BF16, F16 or F32 tensor"):
        esft_rs.merge(base, ad, out, requantize_fp8=True)
    assert not out.exists()


def test_conflicts_keep_weight_and_scale_together(
    base: Path, base_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    x = new_weights(base_tensors, torch.bfloat16)[UP]
    q, scale = quantize_fp8_blocks(x * 2, BLOCK)
    fp8_ad, fp8_only, bf16_ad = (tmp_path / f"{n}.safetensors" for n in ("fp8", "only", "bf16"))
    save_file({UP: q, UP + "_scale_inv": scale}, fp8_ad)
    save_file({UP: q}, fp8_only)
    save_file({UP: x}, bf16_ad)
    out = tmp_path / "out"

    # first: the FP8 adapter's weight and scale both win; the requantisation is dropped.
    r = esft_rs.merge(base, [fp8_ad, bf16_ad], out, on_conflict="first", requantize_fp8=True)
    got = load_dir(out)
    assert r.requantized == () and raw(got[UP]) == raw(q)
    assert raw(got[UP + "_scale_inv"]) == raw(scale)
    # last: the BF16 adapter's requantised weight and scale both win.
    r = esft_rs.merge(base, [fp8_ad, bf16_ad], out, on_conflict="last", requantize_fp8=True,
                      overwrite=True)
    got = load_dir(out)
    ref_q, ref_scale = quantize_fp8_blocks(x, BLOCK)
    assert r.requantized == (UP,) and raw(got[UP]) == raw(ref_q)
    assert raw(got[UP + "_scale_inv"]) == raw(ref_scale)
    # A weight from one adapter with a scale requantised for another's: refused.
    with pytest.raises(MismatchError, match="scale tensor would come from another adapter"):
        esft_rs.merge(base, [fp8_only, bf16_ad], tmp_path / "out2", on_conflict="first",
                      requantize_fp8=True)
    assert not (tmp_path / "out2").exists()

"""Synthetic MoE checkpoints in Hugging Face layout, for tests, benches and examples.

Weights are random bytes from numpy (no torch), written with the safetensors
package, so the files are exactly what the reference writer produces. The
block-FP8 (DeepSeek-V3) helpers need torch, imported when they are called.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class MoEShape:
    """A DeepSeek-V2-style layout: dense first layers, routed + shared experts after."""

    layers: int = 4
    first_k_dense: int = 1
    experts: int = 8
    shared_experts: int = 2
    hidden: int = 32
    intermediate: int = 16  # per routed expert
    dense_intermediate: int = 64
    vocab: int = 64
    fused: bool = False  # experts as [E, ...] tensors instead of one tensor per expert


def moe_tensor_shapes(s: MoEShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes in checkpoint order (DeepSeek-V2 naming)."""
    h, i = s.hidden, s.intermediate
    yield "model.embed_tokens.weight", (s.vocab, h)
    for layer in range(s.layers):
        p = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}.self_attn.{proj}.weight", (h, h)
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        if layer < s.first_k_dense:
            d = s.dense_intermediate
            yield f"{p}.mlp.gate_proj.weight", (d, h)
            yield f"{p}.mlp.up_proj.weight", (d, h)
            yield f"{p}.mlp.down_proj.weight", (h, d)
            continue
        yield f"{p}.mlp.gate.weight", (s.experts, h)
        if s.fused:
            yield f"{p}.mlp.experts.gate_up_proj", (s.experts, 2 * i, h)
            yield f"{p}.mlp.experts.down_proj", (s.experts, h, i)
        else:
            for e in range(s.experts):
                yield f"{p}.mlp.experts.{e}.gate_proj.weight", (i, h)
                yield f"{p}.mlp.experts.{e}.up_proj.weight", (i, h)
                yield f"{p}.mlp.experts.{e}.down_proj.weight", (h, i)
        if s.shared_experts:
            si = i * s.shared_experts
            yield f"{p}.mlp.shared_experts.gate_proj.weight", (si, h)
            yield f"{p}.mlp.shared_experts.up_proj.weight", (si, h)
            yield f"{p}.mlp.shared_experts.down_proj.weight", (h, si)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (s.vocab, h)


def random_tensors(
    s: MoEShape, seed: int = 0, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        for name, shape in moe_tensor_shapes(s)
    }


def write_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    shards: int = 1,
    config: dict[str, object] | None = None,
) -> Path:
    """Write ``tensors`` as ``model.safetensors`` or as ``shards`` files plus an index.

    Tensors are numpy arrays, or torch tensors (for dtypes numpy lacks, such as
    float8). They are split into shards in insertion order with roughly equal
    bytes, named ``model-0000k-of-0000n.safetensors`` as ``save_pretrained`` does.
    """
    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2))
    if shards <= 1:
        save_file(tensors, out / "model.safetensors", metadata=meta)
        return out
    total = sum(t.nbytes for t in tensors.values())
    budget = total / shards
    groups: list[dict[str, Any]] = [{}]
    filled = 0
    for name, t in tensors.items():
        if groups[-1] and filled >= budget * len(groups) and len(groups) < shards:
            groups.append({})
        groups[-1][name] = t
        filled += t.nbytes
    weight_map = {}
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, out / fname, metadata=meta)
        weight_map.update(dict.fromkeys(group, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return out


def official_data_dir(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The official ESFT conformance data (routing logs, summary.json, configs):
    ``$ESFT_OFFICIAL``, else ``shared/esft-official`` beside the repository
    (``../shared``) or beside any of its parents. None when absent."""
    if env := os.environ.get("ESFT_OFFICIAL"):
        return Path(env)
    here = Path(start or __file__).resolve()
    for base in (here, *here.parents):
        candidate = base / "shared" / "esft-official"
        if (candidate / "expert_scores").is_dir():
            return candidate
    return None
def _expert_parts(
    tensors: Mapping[str, np.ndarray], experts: Mapping[int, Iterable[int]]
) -> Iterator[tuple[str, str, int | None]]:
    """(tensor name, adapter name, fused slice index or None) of the given experts' tensors."""
    from esft_rs.files.naming import classify, fused_slice_name

    chosen = {layer: set(ids) for layer, ids in experts.items()}
    for name, arr in tensors.items():
        role = classify(name)
        ids = chosen.get(role.layer, set()) if role.layer is not None else set()
        if role.kind == "routed_expert" and role.expert in ids:
            yield name, name, None
        elif role.kind == "fused_experts":
            for e in sorted(i for i in ids if i < arr.shape[0]):
                yield name, fused_slice_name(name, e) or name, e


def expert_tensors(
    tensors: Mapping[str, np.ndarray], experts: Mapping[int, Iterable[int]]
) -> dict[str, np.ndarray]:
    """The given experts' tensors (layer -> expert ids), as an adapter holds them:
    per-expert tensors under their names, fused-tensor slices under slice names."""
    return {
        adapter_name: (tensors[name] if e is None else tensors[name][e])
        for name, adapter_name, e in _expert_parts(tensors, experts)
    }


def perturb_experts(
    tensors: Mapping[str, np.ndarray], experts: Mapping[int, Iterable[int]], seed: int = 0
) -> dict[str, np.ndarray]:
    """A copy of ``tensors`` in which the given experts got new values, as training them would."""
    rng = np.random.default_rng(seed)
    out = dict(tensors)
    for name, _, e in _expert_parts(tensors, experts):
        arr = out[name].copy()
        target = arr if e is None else arr[e]
        target[...] = rng.standard_normal(target.shape).astype(arr.dtype)
        out[name] = arr
    return out


# --- block-FP8 (DeepSeek-V3) checkpoints ---

E4M3_MAX = 448.0


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of block-FP8 quantisation: per block of ``w`` [out, in],
    ``scale_inv = amax / 448`` (1 for an all-zero block) and
    ``fp8 = (w.float() / scale_inv).to(torch.float8_e4m3fn)``.
    Returns (F8_E4M3 weight, F32 weight_scale_inv [ceil(out/b0), ceil(in/b1)])."""
    import torch

    rows, cols = w.shape
    b0, b1 = block
    nr, nc = -(-rows // b0), -(-cols // b1)
    x = torch.zeros(nr * b0, nc * b1, dtype=torch.float32)
    x[:rows, :cols] = w.float()
    blocks = x.view(nr, b0, nc, b1)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(nr * b0, nc * b1)[:rows, :cols].contiguous(), scale


def dequantize_fp8_blocks(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """F32 values of a block-FP8 weight: each fp8 value times its block's scale_inv."""
    rows, cols = q.shape
    full = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * full[:rows, :cols]


def is_fp8_linear(name: str, shape: tuple[int, ...]) -> bool:
    """Whether DeepSeek-V3 stores this tensor in block FP8: the projections of
    attention and MLPs (routed, shared and dense); not embeddings, norms, the
    router or lm_head."""
    return len(shape) == 2 and name.endswith("_proj.weight")


def fp8_tensors(
    s: MoEShape, seed: int = 0, block: tuple[int, int] = (128, 128)
) -> dict[str, torch.Tensor]:
    """A tiny DeepSeek-V3-style state dict: projections as F8_E4M3 plus their
    ``weight_scale_inv``, everything else BF16, in checkpoint order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in moe_tensor_shapes(s):
        w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if is_fp8_linear(name, shape):
            out[name], out[name + "_scale_inv"] = quantize_fp8_blocks(w, block)
        else:
            out[name] = w
    return out


def fp8_config(block: tuple[int, int] = (128, 128)) -> dict[str, object]:
    """The ``quantization_config`` part of a DeepSeek-V3 config.json."""
    return {
        "model_type": "deepseek_v3",
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block),
        },
    }

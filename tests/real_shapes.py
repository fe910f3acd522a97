"""Header-only checkpoints with the exact tensor shapes of published MoE models (no weights:
the data region is a sparse file), for what reads headers only (``esft-rs plan``)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

#: DeepSeek-V2-Lite: 27 layers (the first dense), 64 routed experts top-6, 2 shared, MLA.
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "hidden_size": 2048, "num_hidden_layers": 27,
    "vocab_size": 102400, "num_attention_heads": 16, "num_key_value_heads": 16,
    "first_k_dense_replace": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_experts_per_tok": 6, "moe_intermediate_size": 1408, "intermediate_size": 10944,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
    "v_head_dim": 128, "torch_dtype": "bfloat16",
}
#: Qwen3-30B-A3B: 48 layers, 128 routed experts top-8, no shared experts, GQA.
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
    "vocab_size": 151936, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
    "intermediate_size": 6144, "torch_dtype": "bfloat16",
}


def shapes(config: dict) -> dict[str, list[int]]:
    """Checkpoint name -> shape, as the published safetensors files have them."""
    h, v = config["hidden_size"], config["vocab_size"]
    out: dict[str, list[int]] = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h],
                                 "lm_head.weight": [v, h]}
    deepseek = config["model_type"] == "deepseek_v2"
    experts = config.get("n_routed_experts") or config["num_experts"]
    moe_i = config["moe_intermediate_size"]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = [h]
        out[p + "post_attention_layernorm.weight"] = [h]
        heads = config["num_attention_heads"]
        if deepseek:
            qk = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
            kv = config["kv_lora_rank"]
            out[p + "self_attn.q_proj.weight"] = [heads * qk, h]
            out[p + "self_attn.kv_a_proj_with_mqa.weight"] = [kv + config["qk_rope_head_dim"], h]
            out[p + "self_attn.kv_a_layernorm.weight"] = [kv]
            out[p + "self_attn.kv_b_proj.weight"] = [
                heads * (config["qk_nope_head_dim"] + config["v_head_dim"]), kv]
            out[p + "self_attn.o_proj.weight"] = [h, heads * config["v_head_dim"]]
        else:
            d, kvh = config["head_dim"], config["num_key_value_heads"]
            out[p + "self_attn.q_proj.weight"] = [heads * d, h]
            out[p + "self_attn.k_proj.weight"] = [kvh * d, h]
            out[p + "self_attn.v_proj.weight"] = [kvh * d, h]
            out[p + "self_attn.o_proj.weight"] = [h, heads * d]
            out[p + "self_attn.q_norm.weight"] = [d]
            out[p + "self_attn.k_norm.weight"] = [d]
        if deepseek and layer < config["first_k_dense_replace"]:
            i = config["intermediate_size"]
            out.update({p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
                        p + "mlp.down_proj.weight": [h, i]})
            continue
        out[p + "mlp.gate.weight"] = [experts, h]
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            out.update({q + "gate_proj.weight": [moe_i, h], q + "up_proj.weight": [moe_i, h],
                        q + "down_proj.weight": [h, moe_i]})
        if deepseek:
            i = moe_i * config["n_shared_experts"]
            q = p + "mlp.shared_experts."
            out.update({q + "gate_proj.weight": [i, h], q + "up_proj.weight": [i, h],
                        q + "down_proj.weight": [h, i]})
    return out


def write(config: dict, directory: Path) -> Path:
    """config.json and one model.safetensors whose header is real and whose data region is
    a hole of the right size."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, shape in sorted(shapes(config).items()):
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = directory / "model.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return directory

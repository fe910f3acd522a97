"""Tiny random checkpoints of the transformers MoE families (no downloads), for tests.

Each family keeps what makes its routing and layout its own: DeepSeek's shared
experts, dense first layer, group-limited routing and scaling (V3: sigmoid scores
with a non-zero ``e_score_correction_bias``); Qwen2-MoE's gated shared expert;
Mixtral's ``block_sparse_moe`` names. The byte tokenizer (ids 256-258 special) is
named in config.json, so the esft-rs data pipeline works on these directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BYTE_TOKENS = {"vocab_size": 259, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
               "tokenizer": "byte"}
COMMON = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False,
          **BYTE_TOKENS}
_MLA = {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": None,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
        "v_head_dim": 8, "first_k_dense_replace": 1, "n_shared_experts": 1,
        "moe_intermediate_size": 16, "intermediate_size": 48}

#: family (model_type) -> (config class name, model class name, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", {
        **_MLA, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.0}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        **_MLA, "q_lora_rank": 16, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4,
        "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32, "intermediate_size": 48, "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "head_dim": 8,
        "intermediate_size": 48, "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {
        "num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16}),
}


def build(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random model of ``family`` (float32); ``overrides`` change config keys."""
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # spread the routers, so that top-K choices have no near-ties
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.linspace(-0.3, 0.3, b.numel()))
    return model.eval()


def save(family: str, directory: Path, seed: int = 0) -> Path:
    """``build`` then ``save_pretrained`` (per-expert names on disk, as published)."""
    build(family, seed).save_pretrained(directory)
    return directory

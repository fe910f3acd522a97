"""Configuration of the built-in reference MoE model, stored as a Hugging Face ``config.json``.

Keys carry DeepSeek-V2's names, so anyone who knows that family reads it at a glance.
``model_type`` names our own model, not ``deepseek_v2``: attention here is plain
multi-head attention, not DeepSeek's MLA, so transformers must not mistake it for one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from esft_rs.errors import InvalidFileError
from esft_rs.files.inputs import load_json

MODEL_TYPE = "esft_rs_moe"
ARCHITECTURE = "EsftRsMoEForCausalLM"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ModelConfig:
    """Shape and routing of a DeepSeek-V2-style decoder (see ``PRESETS``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense (first_k_dense_replace) layers
    moe_intermediate_size: int  # one routed expert; shared experts use n_shared_experts x this
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.0  # DeepSeek's expert-balance loss weight (training only)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    tokenizer: str = "byte"  # "byte" (built-in) or "tokenizer.json"
    bos_token_id: int = 256
    eos_token_id: int = 257
    pad_token_id: int = 258
    torch_dtype: str = "float32"
    model_type: str = MODEL_TYPE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    def problems(self) -> list[str]:
        """What makes this configuration impossible to build (empty when it is fine)."""
        out = []
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                    "num_experts_per_tok", "max_position_embeddings")
        out += [f"{k} must be positive" for k in positive if getattr(self, k) <= 0]
        if out:
            return out
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            out.append("hidden_size / num_attention_heads must be an even integer (rotary)")
        if self.num_experts_per_tok > self.n_routed_experts:
            out.append("num_experts_per_tok exceeds n_routed_experts")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            out.append("first_k_dense_replace must be in 0..num_hidden_layers")
        if self.n_shared_experts < 0:
            out.append("n_shared_experts must be >= 0")
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, k) < self.vocab_size:
                out.append(f"{k} must be in 0..vocab_size-1")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                out.append(f"{f.name} must be a finite number, not {value}")
        for k in ("rms_norm_eps", "rope_theta"):
            if math.isfinite(getattr(self, k)) and getattr(self, k) <= 0:
                out.append(f"{k} must be positive")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            out.append(f"torch_dtype {self.torch_dtype!r} is not float32, bfloat16 or float16")
        if self.model_type != MODEL_TYPE:
            out.append(f"model_type {self.model_type!r} is not the built-in model ({MODEL_TYPE})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": [ARCHITECTURE], **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "config") -> ModelConfig:
        """Build from a parsed ``config.json``; unknown keys are ignored as HF does."""
        kwargs = {}
        for f in fields(cls):
            if f.name not in d:
                if f.default is MISSING:
                    raise InvalidFileError(f"{origin}: missing key {f.name!r}")
                continue
            kwargs[f.name] = _typed(d[f.name], f.type, f.name, origin)
        cfg = cls(**kwargs)
        if problems := cfg.problems():
            raise InvalidFileError(f"{origin}: {'; '.join(problems)}")
        return cfg

    def save(self, directory: str | os.PathLike[str]) -> Path:
        from esft_rs.files.outputs import write_file

        text = json.dumps(self.to_dict(), indent=2) + "\n"
        return write_file(Path(directory) / CONFIG_NAME, text)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ModelConfig:
        path = Path(directory) / CONFIG_NAME
        raw = load_json(path)
        if not isinstance(raw, dict):
            raise InvalidFileError(f"{path}: not a JSON object", path)
        return cls.from_dict(raw, str(path))

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


def _typed(value: object, type_name: object, key: str, origin: str) -> object:
    """Check a JSON value against a field's annotation (a string under PEP 563)."""
    t = str(type_name)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[t]
    if not ok:
        raise InvalidFileError(f"{origin}: {key} must be {t}, got {json.dumps(value)}")
    return float(value) if t == "float" else value  # type: ignore[arg-type]


PRESETS: dict[str, ModelConfig] = {
    # ~1M parameters: tests run forward and backward in milliseconds.
    "tiny": ModelConfig(
        vocab_size=259, hidden_size=96, intermediate_size=256, moe_intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, first_k_dense_replace=1, max_position_embeddings=1024,
    ),
    # DeepSeek-V2-Lite's routing (64 fine-grained experts, top-6, 2 shared, dense
    # layer 0, norm_topk_prob off) at ~20M parameters: benches and the demo.
    "small": ModelConfig(
        vocab_size=259, hidden_size=256, intermediate_size=1024, moe_intermediate_size=48,
        num_hidden_layers=6, num_attention_heads=8, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, max_position_embeddings=4096,
    ),
}

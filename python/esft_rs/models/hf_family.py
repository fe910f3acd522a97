"""The transformers families esft-rs supports, and what it reads of them before building
a model: the supported versions, config.json's family, its config object, the routers.
``hf`` (loading, the profiler's view, saving) and ``hf_shards`` (meta build, per-rank
reads) both start here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from esft_rs.errors import EsftError, InvalidFileError, MismatchError
from esft_rs.files.inputs import load_json
from esft_rs.files.naming import classify

#: model_type in config.json -> family name; the families tested against transformers.
FAMILIES = {
    "deepseek_v2": "DeepSeek-V2",
    "deepseek_v3": "DeepSeek-V3",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3_moe": "Qwen3-MoE",
    "mixtral": "Mixtral",
    "olmoe": "OLMoE",
}
#: The transformers versions esft-rs supports (pyproject's ``hf`` extra says the same).
TRANSFORMERS_RANGE = (">=5.20", "<6")


def model_type(directory: str | os.PathLike[str]) -> str | None:
    """config.json's ``model_type``; None when there is no config.json."""
    path = Path(directory) / "config.json"
    if not path.exists():
        return None
    raw = load_json(path)
    value = raw.get("model_type") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None


def config(root: Path) -> Any:
    """config.json as transformers' config object, as ``AutoConfig.from_pretrained`` makes
    it but read by esft-rs: strictly, and with a byte-order mark (which transformers'
    reader refuses) dropped. Raises KeyError for a model_type transformers lacks."""
    raw = load_json(root / "config.json")
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    return require_transformers().CONFIG_MAPPING[kind].from_dict(raw)


def require_transformers() -> Any:
    """The transformers module, or one line saying how to get a supported one."""
    try:
        import transformers
    except ImportError:
        raise EsftError(
            "transformers models need the optional extra: pip install 'esft-rs[hf]'"
        ) from None
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    low = tuple(int(x) for x in TRANSFORMERS_RANGE[0].removeprefix(">=").split("."))
    high = int(TRANSFORMERS_RANGE[1].removeprefix("<"))
    if not low <= (major, minor) or major >= high:
        raise EsftError(
            f"transformers {transformers.__version__} is not supported (esft-rs needs"
            f" transformers{','.join(TRANSFORMERS_RANGE)}): pip install 'esft-rs[hf]'"
        )
    return transformers


def check_family(root: Path) -> None:
    """Refuses (one line) a directory whose config.json names no supported family."""
    kind = model_type(root)
    if kind not in FAMILIES:
        raise InvalidFileError(
            f"{root / 'config.json'}: model_type {kind!r} is not a supported MoE family"
            f" (supported: {', '.join(FAMILIES)})"
        )


def is_hf(model: object) -> bool:
    """Whether ``model`` is a transformers model (checked without importing transformers)."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layer -> router module, found by its weight name (``esft_rs.files.naming``)."""
    out = {}
    for name, _ in model.named_parameters():
        role = classify(name)
        if role.kind == "router" and name.endswith(".weight") and role.layer is not None:
            out[role.layer] = model.get_submodule(name.removesuffix(".weight"))
    if not out:
        raise MismatchError(f"{type(model).__name__}: no MoE router found in the model")
    return dict(sorted(out.items()))

"""safetensors dtype names and the torch dtypes that hold them: the one table.

Sizes come from the Rust core's dtype table (``_core.DTYPE_BITS``), which knows every
safetensors dtype; this module adds only what the core cannot know, which torch
dtype holds each. torch is imported when a torch dtype is first asked for.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from esft_rs import _core

if TYPE_CHECKING:
    import torch

#: safetensors dtype name -> name of the torch dtype that holds it
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
#: the float dtypes a model's weights are kept in (the built-in model's)
FLOAT = ("F32", "BF16", "F16")


def itemsize(name: str) -> int:
    """Bytes per element of safetensors dtype ``name`` (sub-byte dtypes round up)."""
    bits = _core.DTYPE_BITS.get(name)
    if bits is None:
        raise ValueError(f"{name!r} is not a safetensors dtype")
    return -(-bits // 8)


@cache
def _table() -> dict[str, torch.dtype]:
    import torch

    return {k: getattr(torch, v) for k, v in _TORCH_NAMES.items()}


def to_torch(name: str) -> torch.dtype | None:
    """The torch dtype that holds safetensors dtype ``name``; None where torch has none."""
    return _table().get(name)


def from_torch(dtype: torch.dtype) -> str:
    """The safetensors name of torch ``dtype``; TypeError where safetensors has none."""
    for name, d in _table().items():
        if d == dtype:
            return name
    raise TypeError(f"safetensors holds no {dtype}")

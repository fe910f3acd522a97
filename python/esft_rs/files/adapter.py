"""ESFT adapters: describe one, or write one from in-memory tensors.

An adapter is a safetensors file holding only the trained tensors, named as in
the base checkpoint, with ``__metadata__`` keys defined once in the Rust core
(``ADAPTER_KEYS``): ``format`` = ``pt``, ``esft.expert_config`` (the official
expert config JSON), ``esft.base_fingerprint`` (see ``fingerprint``), and any
number of free-form ``esft.*`` keys (training config, metrics) that merge
ignores. An expert's slice of a fused tensor ``P.experts.NAME`` is stored as
``P.experts.E.NAME`` (``naming.fused_slice_name``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esft_rs import _core
from esft_rs._core import AdapterInfo
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.files.outputs import Kind, read_by

if TYPE_CHECKING:
    import torch

    from esft_rs.files.tensor_stream import Layout

ADAPTER_KEYS: dict[str, str] = dict(_core.ADAPTER_KEYS)
KEY_EXPERT_CONFIG = ADAPTER_KEYS["expert_config"]
KEY_BASE_FINGERPRINT = ADAPTER_KEYS["base_fingerprint"]


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Fingerprint of a checkpoint (file or directory): cheap, content-sensitive.

    XXH3-128 over every tensor's name, dtype, shape and sampled bytes (first
    and last 4 KiB of each tensor, or of each expert's slice of a fused
    tensor); independent of sharding. Recorded in adapters so that merging
    into a different base is refused.
    """
    return _core.fingerprint(os.fspath(path))


def read_adapter(path: str | os.PathLike[str]) -> AdapterInfo:
    """Describe an adapter: ours, a plain safetensors file, or an official folder."""
    return _core.adapter_info(os.fspath(path))


def adapter_metadata(
    expert_config: ExpertConfig,
    base_fingerprint: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``__metadata__`` of an adapter; ``extra`` keys must start with ``esft.``."""
    pairs = _core.adapter_metadata(
        expert_config.to_json(), base_fingerprint, list((extra or {}).items())
    )
    return dict(pairs)


def save_adapter(
    tensors: Mapping[str, Any],
    path: str | os.PathLike[str],
    expert_config: ExpertConfig | str | os.PathLike[str] | Mapping[str, Any],
    *,
    base: str | os.PathLike[str] | None = None,
    base_fingerprint: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (a dict of name -> torch tensor or numpy array, under the
    checkpoint's names) as an adapter at ``path``.

    ``expert_config``: an ``ExpertConfig``, the path of an expert-config JSON, or
    its content as a dict (``{"experts": {"<layer>": [ids]}, ...}``). The base
    fingerprint is taken from ``base_fingerprint``, or computed from the ``base``
    checkpoint. The file is written under a temporary name and renamed into place
    (``esft_rs.files.outputs``), so ``path`` never holds a partial adapter.
    """
    from esft_rs.files.tensor_stream import write_tensors

    tensors = _tensor_dict(tensors)
    expert_config = _expert_config(expert_config)
    if base_fingerprint is None and base is not None:
        base_fingerprint = fingerprint(base)
    metadata = adapter_metadata(expert_config, base_fingerprint, extra_metadata)
    return write_tensors(path, tensors, metadata)


def stream_adapter(
    tensors: Iterable[tuple[str, torch.Tensor]],
    path: str | os.PathLike[str],
    expert_config: ExpertConfig,
    *,
    layout: Layout,
    base_fingerprint: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """``save_adapter`` of (name, tensor) pairs that arrive one at a time, none of them
    kept once written (``esft_rs.files.tensor_stream``): a trainer's gathered tensors.
    ``layout``: (name, dtype, shape) of every tensor, known before the first arrives."""
    from esft_rs.files.tensor_stream import tensor_stream

    metadata = adapter_metadata(expert_config, base_fingerprint, extra_metadata)
    with tensor_stream(path, layout, metadata) as out:
        for name, tensor in tensors:
            out.add(name, tensor)
            del tensor  # before the next one is made
    return Path(path)


def _tensor_dict(tensors: object) -> dict[str, Any]:
    """``tensors`` checked to be a mapping of names to torch tensors or numpy arrays."""
    if not isinstance(tensors, Mapping):
        raise TypeError(
            "save_adapter expects a dict of tensors (checkpoint name -> torch.Tensor or numpy"
            f" array), got {type(tensors).__name__}"
        )
    for name, value in tensors.items():
        kind = type(value)
        if not isinstance(name, str) or not (
            (kind.__module__ == "numpy" and kind.__name__ == "ndarray")
            or (kind.__module__.startswith("torch") and hasattr(value, "contiguous"))
        ):
            raise TypeError(
                "save_adapter expects a dict of tensors (checkpoint name -> torch.Tensor or"
                f" numpy array); {name!r} is {kind.__name__}"
            )
    return dict(tensors)


def _expert_config(value: object) -> ExpertConfig:
    """An ``ExpertConfig`` from itself, a JSON file path or the JSON's dict."""
    if isinstance(value, ExpertConfig):
        return value
    if isinstance(value, (str, os.PathLike)):
        return ExpertConfig.load(value)
    if isinstance(value, Mapping):
        return ExpertConfig.parse(json.dumps(value))
    raise TypeError(
        "expert_config must be an ExpertConfig, an expert-config JSON path or its dict"
        f" ({{'experts': {{'<layer>': [ids]}}, ...}}), got {type(value).__name__}"
    )


def _ours(path: Path) -> None:
    if read_adapter(path).kind != "esft":  # the metadata esft-rs writes
        raise ValueError(f"{path}: not an esft-rs adapter")


#: An adapter as an output (``esft_rs.files.outputs.check_target``).
OUTPUT_KIND = Kind("an adapter", read_by(_ours))

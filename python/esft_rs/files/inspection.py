"""``esft_rs.inspect``: tensors, metadata and MoE structure of a checkpoint, from headers only.

The report classes are the Rust core's (``esft_rs._core``), frozen, with
tuples for sequences; ``Inspection.to_dict()`` is what ``inspect --json`` prints.
"""

from __future__ import annotations

import os

from esft_rs import _core
from esft_rs._core import FP8Info, Inspection, MoEInfo, MoELayer, TensorInfo


def inspect(path: str | os.PathLike[str]) -> Inspection:
    """Read the headers of a ``.safetensors`` file, checkpoint directory or adapter.

    Raises ``InvalidFileError`` naming the file for anything the safetensors
    reference would reject, and ``EsftIOError`` (``OSError``) subclasses for I/O failures.
    """
    return _core.inspect(os.fspath(path))


__all__ = ["FP8Info", "Inspection", "MoEInfo", "MoELayer", "TensorInfo", "inspect"]

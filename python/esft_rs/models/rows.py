"""Rows of checkpoint tensors, read by offset: a rank reads its shard's bytes and no others.

safetensors' slices are views of a memory map of the whole file. Reading a few rows
through one faults in the page-cache pages around them (about 256 KiB per tensor on
Linux 6, whatever the rows), and the process keeps them resident while the map is
open: a rank of an FSDP run that reads its 1/N of a checkpoint of small tensors
(per-expert weights) touches most of the file. The Rust core (``_core.FileReader``)
reads exactly the rows' bytes, at the offset the checkpoint's header gives
(``esft_rs.inspect``), into the tensor that keeps them, through no map, with the GIL
released; this module only allocates the tensors and casts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from esft_rs import _core
from esft_rs.errors import InvalidFileError
from esft_rs.files.dtypes import to_torch
from esft_rs.private_api import local_shape_and_offset


class Rows:
    """Reads rows (dim 0) of the tensors of one checkpoint directory; a context manager
    that closes its files. ``bytes`` counts what it has read."""

    def __init__(self, root: Path, tensors: Mapping[str, Any]) -> None:
        self.root, self.tensors = root, tensors  # name -> esft_rs.inspect's TensorInfo
        self.bytes = 0
        self._files: dict[str, _core.FileReader] = {}

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def read(self, name: str, rows: slice = slice(None),
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` in its checkpoint dtype, on the CPU; written
        into ``out`` (any dtype and device, cast on copy) and returned as ``out`` if given."""
        info = self.tensors[name]
        dtype = to_torch(info.dtype)
        if dtype is None:
            raise InvalidFileError(f"{self.root / info.file}: tensor {name} has dtype"
                                   f" {info.dtype}, which torch cannot hold")
        shape = tuple(info.shape)
        start, stop, step = rows.indices(shape[0]) if shape else (0, 1, 1)
        if step != 1:
            raise ValueError(f"rows of {name}: a step of {step}")
        stop = max(start, stop)
        part = (stop - start, *shape[1:]) if shape else ()
        direct = (out is not None and out.dtype == dtype and out.device.type == "cpu"
                  and out.is_contiguous() and tuple(out.shape) == part)
        buf = out if direct else torch.empty(part, dtype=dtype)
        assert buf is not None
        row_bytes = info.bytes // shape[0] if shape and shape[0] else info.bytes
        file = self._files.get(info.file)
        if file is None:
            file = self._files[info.file] = _core.FileReader(os.fspath(self.root / info.file))
        self.bytes += file.read_into(info.offset + start * row_bytes,
                                     buf.reshape(-1).view(torch.uint8).numpy())
        if out is None or direct:
            return buf
        out.copy_(buf)
        return out


def local_rows(t: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
    """(this rank's part of ``t``, the rows of ``t`` it holds); none when it holds none.
    FSDP2 shards dim 0 only."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return [(t, slice(0, t.shape[0]))] if t.dim() and t.numel() else \
            ([(t, slice(None))] if t.numel() else [])
    local = t.to_local()
    if not local.numel():
        return []
    if any(isinstance(p, Shard) and p.dim != 0 for p in t.placements):
        raise NotImplementedError(f"sharding on dim other than 0: {t.placements}")
    shape, offset = local_shape_and_offset(t)
    return [(local, slice(offset[0], offset[0] + shape[0]))]

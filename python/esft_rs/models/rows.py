"""Rows of checkpoint tensors, read by offset: a rank reads its shard's bytes and no others.

safetensors' slices are views of a memory map of the whole file. Reading a few rows
through one faults in the page-cache pages around them (about 256 KiB per tensor on
Linux 6, whatever the rows), and the process keeps them resident while the map is
open: a rank of an FSDP run that reads its 1/N of a checkpoint of small tensors
(per-expert weights) touches most of the file. Positional reads (``os.preadv``) copy
exactly the rows' bytes into the tensor that keeps them, through no map.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from esft_rs.errors import InvalidFileError

#: safetensors dtype names -> torch dtypes (the ones torch holds)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Rows:
    """Reads rows (dim 0) of the tensors of one checkpoint directory; a context manager
    that closes its files. ``bytes`` counts what it has read."""

    def __init__(self, root: Path, tensors: Mapping[str, Any]) -> None:
        self.root, self.tensors = root, tensors  # name -> esft_rs.inspect's TensorInfo
        self.bytes = 0
        self._fds: dict[str, int] = {}

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, name: str, rows: slice = slice(None),
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` in its checkpoint dtype, on the CPU; written
        into ``out`` (any dtype and device, cast on copy) and returned as ``out`` if given."""
        info = self.tensors[name]
        dtype = DTYPES.get(info.dtype)
        if dtype is None:
            raise InvalidFileError(f"{self.root / info.file}: tensor {name} has dtype"
                                   f" {info.dtype}, which torch cannot hold")
        shape = tuple(info.shape)
        start, stop, step = rows.indices(shape[0]) if shape else (0, 1, 1)
        if step != 1:
            raise ValueError(f"rows of {name}: a step of {step}")
        part = (max(0, stop - start), *shape[1:]) if shape else ()
        direct = (out is not None and out.dtype == dtype and out.device.type == "cpu"
                  and out.is_contiguous() and tuple(out.shape) == part)
        buf = out if direct else torch.empty(part, dtype=dtype)
        assert buf is not None
        row_bytes = info.bytes // shape[0] if shape and shape[0] else info.bytes
        self._pread(info, buf, info.offset + start * row_bytes)
        if out is None or direct:
            return buf
        out.copy_(buf)
        return out

    def _pread(self, info: Any, buf: torch.Tensor, offset: int) -> None:
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(self.root / info.file, os.O_RDONLY)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:
                raise InvalidFileError(f"{self.root / info.file}: ends inside tensor"
                                       f" {info.name} (the file is truncated)")
            done += n
        self.bytes += done


def local_rows(t: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
    """(this rank's part of ``t``, the rows of ``t`` it holds); none when it holds none.
    FSDP2 shards dim 0 only."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return [(t, slice(0, t.shape[0]))] if t.dim() and t.numel() else \
            ([(t, slice(None))] if t.numel() else [])
    local = t.to_local()
    if not local.numel():
        return []
    if any(isinstance(p, Shard) and p.dim != 0 for p in t.placements):
        raise NotImplementedError(f"sharding on dim other than 0: {t.placements}")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return [(local, slice(offset[0], offset[0] + shape[0]))]

"""A safetensors file written one tensor at a time, so the writer never holds them all.

``safetensors.torch.save_file`` needs every tensor in memory at once. Rank 0 of a
sharded run writes the adapter from tensors gathered one by one, and in ``--mode full``
they are the whole model. So this is hand-written, for that memory: each tensor's bytes
go to an unnamed spool file as it arrives; at the end the header (whose size depends on
every name) is written, then the spooled bytes are copied after it in safetensors' own
order (dtype, widest first, then name), by the kernel where it can
(``os.copy_file_range``). The file has the layout ``save_file`` gives the same tensors
(``tests/test_tensor_stream.py``); ``__metadata__`` keys are sorted (safetensors writes
them in hash order).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from esft_rs.outputs import staged

if TYPE_CHECKING:
    import torch

#: safetensors' dtype order (its ``Dtype`` enum); data is laid out widest first
ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
         "F32", "F64", "I64", "U64")
_PIECE = 1 << 24  # bytes per copy where the kernel cannot copy between the files


@dataclass(frozen=True)
class _Spooled:
    dtype: str
    shape: tuple[int, ...]
    start: int  # in the spool
    size: int


class TensorStream:
    """Tensors spooled by ``add``; see ``tensor_stream``."""

    def __init__(self, spool: IO[bytes]) -> None:
        self._spool = spool
        self._tensors: dict[str, _Spooled] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Spool ``tensor`` (any device; kept in its dtype and shape) under ``name``."""
        import torch

        from esft_rs.models.rows import DTYPES

        dtype = next((k for k, v in DTYPES.items() if v == tensor.dtype), None)
        if dtype is None:
            raise TypeError(f"{name}: safetensors holds no {tensor.dtype}")
        if name in self._tensors or name == "__metadata__":
            raise ValueError(f"{name}: given twice")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        start = self._spool.tell()
        self._spool.write(memoryview(data.numpy()))
        self._tensors[name] = _Spooled(dtype, tuple(tensor.shape), start, data.numel())

    def write(self, path: Path, metadata: Mapping[str, str]) -> None:
        """The safetensors file of the spooled tensors, at ``path``."""
        laid = sorted(self._tensors.items(), key=lambda t: (-ORDER.index(t[1].dtype), t[0]))
        header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} \
            if metadata else {}
        offset = 0
        for name, t in laid:
            header[name] = {"dtype": t.dtype, "shape": list(t.shape),
                            "data_offsets": [offset, offset + t.size]}
            offset += t.size
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self._spool.flush()
        with open(path, "wb") as out:
            out.write(len(text).to_bytes(8, "little") + text)
            out.flush()
            for _, t in laid:
                _copy(self._spool.fileno(), out.fileno(), t.start, t.size)


@contextmanager
def tensor_stream(path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
                  ) -> Iterator[TensorStream]:
    """``with tensor_stream(path, metadata) as out: out.add(name, tensor) ...``: ``path``
    appears, whole, when the block ends without an error (``esft_rs.outputs.staged``);
    nothing is left behind otherwise, a killed process included (the spool has no name)."""
    target = Path(path)
    with staged(target) as tmp, tempfile.TemporaryFile(dir=target.parent) as spool:
        stream = TensorStream(spool)
        yield stream
        stream.write(tmp, metadata or {})


def _copy(src: int, dst: int, start: int, size: int) -> None:
    """``size`` bytes of ``src`` from ``start`` appended to ``dst``."""
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src, dst, size - done, start + done)
        except OSError:  # a filesystem or kernel without it
            n = os.write(dst, os.pread(src, min(size - done, _PIECE), start + done))
        if not n:
            raise OSError(f"the spool ended {size - done} bytes early")
        done += n

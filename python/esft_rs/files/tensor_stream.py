"""Every safetensors file esft-rs writes from torch tensors goes through here, and here
to the Rust core, which owns the format: ``_core.SafetensorsWriter`` writes the header
first, from the names, dtypes and shapes declared up front, then each tensor's bytes
at their offset as they are handed over (in any order), so the writer never holds them
all: rank 0 of a sharded run writes the adapter from tensors gathered one by one, and
in ``--mode full`` they are the whole model. The layout is the one
``safetensors.torch.save_file`` gives the same tensors (``tests/test_tensor_stream.py``);
``__metadata__`` keys are sorted. The file is staged under a hidden name and takes its
own only when every tensor was written (``esft_rs.files.outputs``' rules, in the core).

- ``tensor_stream(path, layout, metadata)``: a context manager; ``add`` each tensor.
- ``write_tensors(path, tensors, metadata)``: a dict of tensors held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esft_rs import _core
from esft_rs.files.dtypes import from_torch

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import torch

#: (name, torch dtype, shape) of each tensor a file will hold
Layout = Iterable[tuple[str, "torch.dtype", Sequence[int]]]


class TensorStream:
    """Tensors written by ``add``; see ``tensor_stream``."""

    def __init__(self, writer: _core.SafetensorsWriter, shapes: dict[str, tuple[int, ...]]
                 ) -> None:
        self._writer, self._shapes = writer, shapes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (any device; kept in its dtype) under ``name``, which the
        layout declared with this dtype and shape."""
        shape = self._shapes.get(name)
        if shape is not None and shape != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {list(tensor.shape)}, declared as {list(shape)}")
        self._writer.write(name, from_torch(tensor.dtype), _bytes(tensor))


@contextmanager
def tensor_stream(path: str | os.PathLike[str], layout: Layout,
                  metadata: Mapping[str, str] | None = None, *, overwrite: bool = True
                  ) -> Iterator[TensorStream]:
    """``with tensor_stream(path, layout, metadata) as out: out.add(name, tensor) ...``:
    ``path`` appears, whole, when the block ends without an error and every tensor of
    ``layout`` was added; nothing is left behind otherwise. An existing ``path`` is
    replaced only with ``overwrite`` and if esft-rs could have written it."""
    declared = [(name, from_torch(dtype), [int(n) for n in shape])
                for name, dtype, shape in layout]
    writer = _core.SafetensorsWriter(os.fspath(path), declared,
                                     sorted((metadata or {}).items()))
    try:
        yield TensorStream(writer, {name: tuple(shape) for name, _, shape in declared})
    except BaseException:
        writer.discard()
        raise
    writer.commit(overwrite)


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, Any],
                  metadata: Mapping[str, str] | None = None, *, overwrite: bool = True
                  ) -> Path:
    """Write torch tensors or numpy arrays as one safetensors file, whole or not at all."""
    held = {name: _torch(t) for name, t in tensors.items()}
    with tensor_stream(path, ((n, t.dtype, t.shape) for n, t in held.items()), metadata,
                       overwrite=overwrite) as out:
        for name, t in held.items():
            out.add(name, t)
    return Path(path)


def _torch(value: Any) -> torch.Tensor:
    """A torch tensor of ``value`` (a numpy array's memory, shared where it can be)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    import numpy as np

    array = np.ascontiguousarray(value)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _bytes(tensor: torch.Tensor) -> npt.NDArray[np.uint8]:
    """The bytes of ``tensor`` as a uint8 numpy array (its memory, when on the CPU and
    contiguous)."""
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()

"""The C allocator's setting for FSDP on the CPU: freed layer buffers go back to the system.

FSDP gathers each layer's weights before its forward and its backward and frees them
after; on the CPU these (and gloo's copies of them) are ordinary ``malloc`` blocks.
glibc raises its mmap threshold to the size of the largest mapped block freed (up to
32 MiB), so after the first few frees such blocks come from the heap, where the freed
space between blocks still in use stays resident: a rank kept about 400 MiB more after
one step of a 316 MiB model at 2 ranks (``benches/bench_scale.py --phases``), more than
the whole model. A fixed threshold turns that adjustment off: each block of 128 KiB or
more is mapped on its own and returned to the system when freed. The price is a page
fault per page of each such block at every gather: CPU FSDP steps took 1.2-1.6x as long
in the same bench (docs/distributed.md#performance).
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD = 128 * 1024  # glibc's initial value


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 128 KiB, unless the environment sets it
    (``MALLOC_MMAP_THRESHOLD_``); False where the C library has no ``mallopt``."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))

"""esft-rs: Expert-Specialized Fine-Tuning for Mixture-of-Experts models.

The byte-bound work (safetensors, merging, routing histograms) runs in the Rust
core ``esft_rs._core``; tensor work (forward passes, training) uses torch, which
is imported only by the functions that need it.
"""

import importlib
from typing import TYPE_CHECKING

from esft_rs._core import __version__
from esft_rs.errors import (
    EsftError,
    EsftIOError,
    EsftValueError,
    InvalidFileError,
    MismatchError,
)
from esft_rs.files.adapter import fingerprint, read_adapter, save_adapter
from esft_rs.files.inspection import Inspection, inspect
from esft_rs.files.merging import MergeReport, SplitReport, merge, split

if TYPE_CHECKING:
    from esft_rs.evaluation import EvalResult, evaluate
    from esft_rs.exporting import ExportReport, export
    from esft_rs.routing import RoutingStats, aggregate
    from esft_rs.routing.profiling import TaskProfile, profile, profile_task
    from esft_rs.routing.selection import select_experts
    from esft_rs.training import TrainConfig, TrainResult, train

# The numpy- and torch-backed API is imported on first use, so that
# byte-level commands (inspect, merge, split) do not pay for numpy.
_LAZY = {
    "EvalResult": "esft_rs.evaluation",
    "evaluate": "esft_rs.evaluation",
    "ExportReport": "esft_rs.exporting",
    "export": "esft_rs.exporting",
    "profile": "esft_rs.routing.profiling",
    "profile_task": "esft_rs.routing.profiling",
    "TaskProfile": "esft_rs.routing.profiling",
    "RoutingStats": "esft_rs.routing",
    "aggregate": "esft_rs.routing",
    "select_experts": "esft_rs.routing.selection",
    "TrainConfig": "esft_rs.training",
    "TrainResult": "esft_rs.training",
    "train": "esft_rs.training",
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'esft_rs' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "EsftError",
    "EsftIOError",
    "EsftValueError",
    "EvalResult",
    "ExportReport",
    "Inspection",
    "InvalidFileError",
    "MergeReport",
    "MismatchError",
    "RoutingStats",
    "SplitReport",
    "TaskProfile",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "aggregate",
    "evaluate",
    "export",
    "fingerprint",
    "inspect",
    "merge",
    "profile",
    "profile_task",
    "read_adapter",
    "save_adapter",
    "select_experts",
    "split",
    "train",
]

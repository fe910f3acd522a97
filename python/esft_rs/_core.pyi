# Type stubs for the Rust extension; tests/test_stubs.py keeps them in sync.
import os
from collections.abc import Callable
from typing import Any

__version__: str

class EsftError(Exception): ...
class InvalidFileError(EsftError): ...
class MismatchError(EsftError): ...

def inspect_json(path: str) -> str: ...
def classify_tensor(name: str) -> tuple[str, int | None, int | None]: ...
def canonical_name(name: str) -> str: ...
def parse_expert_config(
    text: str, origin: str
) -> tuple[dict[int, list[int]], bool, bool]: ...
def dump_expert_config(
    experts: dict[int, list[int]], shared_experts: bool, non_expert_modules: bool
) -> str: ...

# --- routing ---
# Routing stats travel as a dict: layers, top_k, num_samples, counts, gate_sum,
# tokens, sample_token_sum, sample_gate_sum (numpy arrays), metadata.
def count_routing(
    ids: Any,
    weights: Any | None = None,
    num_experts: int | None = None,
    lengths: list[int] | None = None,
    layers: list[int] | None = None,
) -> dict[str, Any]: ...
def read_official_logs(
    path: str, top_k: int = 6, num_experts: int | None = None
) -> dict[str, Any]: ...
def load_routing_stats(path: str) -> dict[str, Any]: ...
def save_routing_stats(path: str, stats: dict[str, Any]) -> None: ...
# --- merge / split / adapters ---
ADAPTER_KEYS: dict[str, str]

def merge_json(
    base: str,
    adapters: list[str],
    out: str | None = None,
    on_conflict: str = "error",
    force: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: Callable[[str, int, int], object] | None = None,
    on_warning: Callable[[str], object] | None = None,
    requantize_fp8: bool = False,
) -> str: ...
def split_json(
    model: str,
    out: str,
    experts: str | None = None,
    base: str | None = None,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: Callable[[str, int, int], object] | None = None,
    on_warning: Callable[[str], object] | None = None,
) -> str: ...
def fingerprint(path: str) -> str: ...
def adapter_info_json(path: str) -> str: ...
def adapter_metadata(
    expert_config: str,
    base_fingerprint: str | None = None,
    extra: list[tuple[str, str]] = ...,
) -> list[tuple[str, str]]: ...
def fused_slice_name(fused: str, expert: int) -> str | None: ...
def fused_slice_parent(name: str) -> tuple[str, int] | None: ...

STAGING_MARK: str

def check_output_paths(outputs: list[str], inputs: list[str]) -> None: ...
def check_output_target(target: str, overwrite: bool, keep: list[str] = ...) -> None: ...

class Staging:
    def __init__(self, target: str | os.PathLike[str], directory: bool = False) -> None: ...
    @property
    def path(self) -> str: ...
    def commit(self, overwrite: bool, keep: list[str] = ...) -> None: ...
    def discard(self) -> None: ...

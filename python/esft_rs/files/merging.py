"""``esft_rs.merge`` and ``esft_rs.split``: streaming merge of adapters into a
base checkpoint, and extraction of expert weights into an adapter.

Both run in the Rust core with the GIL released: only the inputs' headers are
read into memory, bytes are copied in the kernel, outputs appear only when
complete, and memory stays constant whatever the model size. ``progress`` is
called as ``progress(stage, done, total)`` about every 20 ms from the calling
thread; Ctrl-C cancels and removes partial outputs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

from esft_rs import _core
from esft_rs._core import AdapterSummary, Extracted, MergeReport, Replacement, SplitReport

ProgressFn = Callable[[str, int, int], None]
WarningFn = Callable[[str], None]
PathLike = str | os.PathLike[str]


def _warn(message: str) -> None:
    from esft_rs.errors import spelled

    warnings.warn(spelled(message), UserWarning, stacklevel=3)


def merge(
    base: PathLike,
    adapters: PathLike | Sequence[PathLike],
    output: PathLike | None = None,
    *,
    on_conflict: Literal["error", "first", "last"] = "error",
    force: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    requantize_fp8: bool = False,
    progress: ProgressFn | None = None,
    on_warning: WarningFn | None = None,
) -> MergeReport:
    """Merge adapters into ``base`` (a .safetensors file or a checkpoint directory).

    ``output`` mirrors ``base`` (same shards, header bytes and tensor order; other
    files of a directory copied); by default a new sibling ``BASE-merged``.
    Every adapter tensor must replace a base tensor of the same name, dtype and
    shape, or one expert's slice of a fused tensor. Adapters touching the same
    bytes are an error unless ``on_conflict`` is ``first`` or ``last``. An
    adapter trained from another base (fingerprint), or holding tensors its own expert
    config does not select (other experts; shared experts or non-expert tensors when the
    config's ``shared_experts`` / ``non_expert_modules`` is false), is refused unless ``force``.
    A BF16/F16/F32 tensor aimed at a block-FP8 (F8_E4M3 + ``weight_scale_inv``)
    base weight is refused unless ``requantize_fp8``: then it is quantised with
    per-block scales (scale_inv = amax / 448, round to nearest even), bit for
    bit as torch's ``(x.float() / scale_inv).to(torch.float8_e4m3fn)``, and
    both the weight and its ``weight_scale_inv`` are rewritten.
    LoRA adapters (an ESFT-LoRA file, or a PEFT adapter directory such as ``export``
    writes) change each target as ``W + scale * B @ A``, summed in float32 and rounded
    once to W's dtype (nearest even): torch's ``(W.float() + s * (B.float() @
    A.float())).to(W.dtype)`` up to the order of the float32 sums (docs/serving.md).
    Raises ``MismatchError``/``InvalidFileError``/``EsftValueError``/``EsftIOError``
    (all ``EsftError``); nothing is written then.
    """
    paths = [adapters] if isinstance(adapters, str | os.PathLike) else list(adapters)
    return _core.merge(
        os.fspath(base),
        [os.fspath(p) for p in paths],
        os.fspath(output) if output is not None else None,
        on_conflict,
        force,
        dry_run,
        overwrite,
        progress,
        on_warning or _warn,
        requantize_fp8=requantize_fp8,
    )


def split(
    model: PathLike,
    output: PathLike,
    *,
    experts: PathLike | None = None,
    base: PathLike | None = None,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    on_warning: WarningFn | None = None,
) -> SplitReport:
    """Extract expert weights of ``model`` into an adapter file ``output``.

    With ``experts`` (an expert config file): exactly the configured experts'
    tensors, plus shared experts / non-expert modules when the config says so.
    With ``base`` only: the routed-expert tensors (or fused-tensor slices) whose
    bytes differ from ``base``, and the derived expert config; differing shared
    experts / non-expert tensors are included only with ``shared_experts`` /
    ``non_expert_modules``. With ``base``, the adapter records its fingerprint,
    and ``merge(base, output)`` reproduces ``model``'s extracted tensors exactly.
    ``overwrite`` replaces an adapter, never another kind of file.
    """
    if overwrite and not dry_run:
        from esft_rs.files.adapter import OUTPUT_KIND as ADAPTER
        from esft_rs.files.outputs import check_outputs, check_target

        # the guard first: an output that is or holds an input is refused as such
        check_outputs([output], [p for p in (model, experts, base) if p is not None])
        check_target(output, kind=ADAPTER)
    return _core.split(
        os.fspath(model),
        os.fspath(output),
        os.fspath(experts) if experts is not None else None,
        os.fspath(base) if base is not None else None,
        shared_experts,
        non_expert_modules,
        dry_run,
        overwrite,
        progress,
        on_warning or _warn,
    )


__all__ = [
    "AdapterSummary",
    "Extracted",
    "MergeReport",
    "Replacement",
    "SplitReport",
    "merge",
    "split",
]

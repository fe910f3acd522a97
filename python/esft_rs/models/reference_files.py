"""Save and load the built-in model as a Hugging Face directory: config.json + safetensors.

Loading checks every header (through ``esft_rs.inspect``) and every tensor name,
shape and dtype against config.json before any data is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from esft_rs.errors import InvalidFileError
from esft_rs.files.dtypes import FLOAT
from esft_rs.files.inspection import inspect
from esft_rs.files.outputs import staged
from esft_rs.files.tensor_stream import write_tensors
from esft_rs.models.config import CONFIG_NAME, ModelConfig
from esft_rs.models.reference import ReferenceMoE, skeleton
from esft_rs.models.rows import Rows

WEIGHTS_NAME = "model.safetensors"


def save_model(
    model: ReferenceMoE, directory: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (DeepSeek-V2 tensor names).

    The directory is built aside and put in place whole (``esft_rs.files.outputs``): an
    existing one is replaced only with ``overwrite``, and only if it holds a
    checkpoint, so no file of an earlier model (an index, shards) stays beside the new.
    """
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dtype = next(iter(tensors.values())).dtype
    cfg = model.config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    with staged(out, directory=True, overwrite=overwrite) as tmp:
        write_tensors(tmp / WEIGHTS_NAME, tensors, {"format": "pt"})
        cfg.save(tmp)
    return out


def load_model(
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> ReferenceMoE:
    """Load a directory written by ``save_model`` (or sharded, with an index, by ``merge``).

    Tensors are cast to ``dtype`` (default: config.json's ``torch_dtype``). Raises
    ``InvalidFileError`` naming the file and tensors when they do not fit config.json.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a model directory")
    cfg = ModelConfig.load(root)
    info = inspect(root)
    target = dtype or getattr(torch, cfg.torch_dtype)
    try:
        model = skeleton(cfg)
        _check(root, info.tensors, {k: tuple(v.shape) for k, v in model.state_dict().items()})
        state = {k: torch.empty(v.shape, dtype=target, device=device)
                 for k, v in model.state_dict().items()}
    except (RuntimeError, MemoryError) as e:  # sizes the allocator refuses: a config typo
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidFileError(
            f"{root / CONFIG_NAME}: its sizes give a model that cannot be built here ({why})",
            root / CONFIG_NAME,
        ) from None
    with Rows(root, info.tensors) as rows:  # read into the tensors kept: no file map
        for name, t in state.items():
            rows.read(name, out=t)
    model.load_state_dict(state, assign=True)
    return model.eval()


def _check(root: Path, found: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """One error line listing every tensor that does not fit config.json."""
    problems = []
    missing = [n for n in expected if n not in found]
    if missing:
        problems.append(f"missing {_few(missing)}")
    for name, t in found.items():
        where = root / t.file
        if name not in expected:
            problems.append(f"{where}: unexpected tensor {name}")
        elif t.shape != expected[name]:
            problems.append(
                f"{where}: {name} has shape {list(t.shape)}, config.json implies"
                f" {list(expected[name])}"
            )
        elif t.dtype not in FLOAT:
            problems.append(f"{where}: {name} has dtype {t.dtype}, not a float type")
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise InvalidFileError(
            f"{root}: tensors do not match config.json: {'; '.join(problems[:3])}{more}",
            root,
        )


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

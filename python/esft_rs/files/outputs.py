"""Every output esft-rs writes goes through here: the guard and staged writes.

The rules are implemented once, in the Rust core (``staging.rs``), and shared
with ``merge`` and ``split``; see ``docs/outputs.md`` for the guarantees.

- ``check_outputs(outputs, inputs)``: before any work, refuses an output that is,
  contains or lies inside an input, or two outputs that collide (``EsftError``,
  one line naming both paths); symlinks and ``..`` are resolved.
- ``check_target(path, overwrite=...)``: refuses an existing output unless it may
  be replaced: with ``overwrite`` and only if esft-rs could have written it.
- ``check_kind(path, directory=...)``: refuses a file where a directory belongs, or back.
- ``check_writable(folder)``: refuses an output directory this process cannot write in
  (read-only, another user's, a read-only mount), found by writing, before any work.
- ``staged(path)``: write under a hidden name unique to the run, beside ``path``;
  on success the result takes its final name in one rename (a directory is
  swapped with the old one in one step); on any error or Ctrl-C nothing appears.
  ``staged_together`` does so for several outputs of one command: all or none.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esft_rs import _core
from esft_rs.errors import EsftError, EsftIOError, EsftValueError

PathLike = str | os.PathLike[str]


def _paths(paths: Iterable[PathLike | None]) -> list[str]:
    return [os.fspath(p) for p in paths if p is not None]


def check_outputs(outputs: Iterable[PathLike | None], inputs: Iterable[PathLike | None]) -> None:
    """Refuse outputs that are, contain or lie inside an input, or collide (``None``s skipped)."""
    _core.check_output_paths(_paths(outputs), _paths(inputs))


def check_kind(target: PathLike, *, directory: bool) -> None:
    """Refuse an existing ``target`` that is a file where the output is a directory, or back."""
    _core.check_output_kind(os.fspath(target), directory)


def check_writable(folder: PathLike) -> None:
    """Refuse output directory ``folder`` (or, until it exists, the nearest folder above it
    that does) when no file can be created in it: a long job then fails at once, not when
    it first writes. A probe file is created and removed, as permission bits, ACLs and
    read-only mounts all decide (``os.access`` misses some)."""
    import tempfile

    target = Path(folder)
    where = target
    while not where.exists() and where.parent != where:
        where = where.parent
    if not where.is_dir():
        return  # a file in the way: check_kind names it
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=f".probe{_core.STAGING_MARK}")
    except OSError as e:
        inside = "" if where == target else f" in {where}"
        raise EsftValueError(f"{target}: cannot be written ({e.strerror or e}{inside});"
                             " choose another directory", target) from None
    os.close(fd)
    os.unlink(probe)


def check_target(
    target: PathLike, *, overwrite: bool = True, keep: Iterable[str] = (), models: bool = False,
    kind: Kind | None = None,
) -> None:
    """Refuse an existing ``target`` unless ``overwrite`` and esft-rs could have written it.

    ``overwrite=True`` is what commands without an ``--overwrite`` flag use: they
    replace their own earlier output, never a file of another kind, and never a model
    (a checkpoint directory, or a file in one) unless ``models`` (an explicit flag) says so.
    ``kind``: the existing file must be that kind of output (``Kind``), recognised
    by its content (an adapter is not a routing file, a hand-written JSON not eval figures).
    """
    _core.check_output_target(os.fspath(target), overwrite, list(keep))
    if models or not os.path.lexists(target):
        return
    path = Path(target)
    if _is_checkpoint(path):
        raise EsftError(f"{path}: is a model checkpoint (config.json and safetensors);"
                        " not replaced (choose another output)")
    if _is_checkpoint(path.parent) and _MODEL_FILE.fullmatch(path.name):
        raise EsftError(f"{path}: is part of the model checkpoint {path.parent};"
                        " not replaced (choose another output)")
    if kind is not None and path.is_file() and not kind.recognises(path):
        raise EsftError(f"{path}: is not {kind.what} written by esft-rs; not replaced (remove"
                        " it or choose another output)")


@dataclass(frozen=True)
class Kind:
    """An output that a command recognises as its own earlier one by content: ``what`` it
    is (for the refusal) and ``recognises(path)``, false for any other file. Each format
    defines its kind where the format lives (``routing``, ``expert_config``, ``adapter``),
    so that this module imports none of them."""

    what: str
    recognises: Callable[[Path], bool]


def read_by(load: Callable[[Path], object]) -> Callable[[Path], bool]:
    """A ``Kind.recognises`` that holds where ``load`` reads the file without error."""
    def recognises(path: Path) -> bool:
        try:
            load(path)
        except (EsftError, OSError, ValueError):
            return False
        return True
    return recognises


def _json_keys(exact: set[str] | None = None, least: set[str] = frozenset()) -> Callable[
        [Path], bool]:
    def recognises(path: Path) -> bool:
        from esft_rs.files.inputs import load_json

        try:
            data = load_json(path)
        except (EsftError, OSError, ValueError):
            return False
        return isinstance(data, dict) and (set(data) == exact if exact else least <= set(data))
    return recognises


def _plot(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return PLOT_MARK in f.read(1 << 25)  # a PDF says it in its trailer
    except OSError:
        return False


#: What esft-rs writes into the plots it saves (``esft_rs.routing.plot.save_figure``).
PLOT_MARK = b"esft-rs"
SUMMARY = Kind("a summary.json of scores", _json_keys(exact={"token_scores", "gate_scores"}))
EVAL = Kind("eval figures (JSON)", _json_keys(least={"conversations", "label_tokens", "loss"}))
PLOT = Kind("a plot", _plot)


# The files that make a checkpoint directory a model (weights, index, config, tokenizer).
_MODEL_FILE = re.compile(r"config\.json|.*\.safetensors(\.index\.json)?|tokenizer.*")


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


@contextmanager
def staged(
    target: PathLike, *, directory: bool = False, overwrite: bool = True, keep: Iterable[str] = ()
) -> Iterator[Path]:
    """Yield a hidden staging path (a file to create, or an empty directory) for ``target``;
    commit it to ``target`` when the block succeeds, remove it otherwise."""
    with staged_together({target: directory}, overwrite=overwrite, keep=keep) as tmp:
        yield tmp[target]


@contextmanager
def staged_together(
    targets: Mapping[Any, bool], *, overwrite: bool = True, keep: Iterable[str] = ()
) -> Iterator[dict[Any, Path]]:
    """``staged`` for the outputs of one command (each target maps to whether it is a
    directory): yields {target: staging path}; when the block succeeds all are committed
    together, and if one cannot be, none is and every earlier output stays as it was."""
    stagings: dict[Any, _core.Staging] = {}
    try:
        for target, directory in targets.items():
            stagings[target] = _core.Staging(os.fspath(target), directory)
        try:
            yield {target: Path(s.path) for target, s in stagings.items()}
        except Exception as e:
            for target, s in stagings.items():
                if (why := _write_failure(e, os.fspath(s.path))) is not None:
                    named = target if isinstance(e, OSError) or len(stagings) == 1 else (
                        ", ".join(map(os.fspath, stagings)))
                    raise EsftIOError(getattr(e, "errno", None), why, os.fspath(named)) from None
            raise
        _core.commit_together([(s, overwrite, list(keep)) for s in stagings.values()])
    finally:
        for s in stagings.values():
            s.discard()


def _write_failure(e: BaseException, staging: str) -> str | None:
    """What went wrong, when ``e`` is a failed write into ``staging`` (a full disk, a file
    size limit) that names no file or the hidden staging one; None for other errors."""
    text = " ".join(str(e).split())
    if isinstance(e, OSError):  # EsftIOError too: a staged output nested in this one
        name = None if e.filename is None else os.fspath(e.filename)
        if name is not None and not name.startswith(staging):
            return None  # about another file: keep its name
        return e.strerror or text or type(e).__name__
    if isinstance(e, EsftError):
        return None
    # safetensors and torch.save report I/O failures as their own errors
    if type(e).__name__ == "SafetensorError" or any(
        mark in text for mark in ("inline_container", "iostream error", "file write failed")
    ):
        return f"could not be written (disk full or a file size limit?): {text}"
    return None


def write_file(target: PathLike, data: str | bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` (text as UTF-8) to ``target``, whole or not at all."""
    with staged(target, overwrite=overwrite) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(target)

"""The esft-rs exception hierarchy: one base, and the builtin a Python user would catch.

Everything esft-rs raises for bad input or a bad file is an ``EsftError``, and
also the builtin exception that fits (as in polars):

- ``EsftValueError(EsftError, ValueError)``: a bad value or argument.
- ``InvalidFileError(EsftValueError)``: a file is malformed or says something impossible.
- ``MismatchError(EsftValueError)``: inputs that are each valid do not fit together.
- ``EsftIOError(EsftError, OSError)``: an I/O failure, with ``errno``, ``strerror`` and
  ``filename`` set; per-errno subclasses are also the builtin ones
  (``EsftFileNotFoundError`` is a ``FileNotFoundError``, ...).

Errors about a file carry it in ``.path`` (else ``None``). The Rust core's
errors are raised as these classes (``rust/python/src/errors.rs``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: Whether the user reaches esft-rs by the command line (set by ``esft_rs.cli.run``); an
#: error that names the setting that fixes it spells it for the user (``option``).
_FROM_CLI: ContextVar[bool] = ContextVar("esft_rs_from_cli", default=False)


@contextmanager
def from_cli() -> Iterator[None]:
    """Within the block, messages name settings as command-line flags (the CLI's entry point)."""
    token = _FROM_CLI.set(True)
    try:
        yield
    finally:
        _FROM_CLI.reset(token)


def option(key: str, value: object = None) -> str:
    """How the user sets ``key`` (to ``value``): ``--val-ratio 0`` or ``--resume`` on the
    command line, ``val_ratio=0`` or ``resume=True`` in Python."""
    if _FROM_CLI.get():
        flag = "--" + key.replace("_", "-")
        return flag if value is None or value is True else f"{flag} {value}"
    return f"{key}={value!r}" if value is not None else f"{key}="


# Flags the shared messages (many from the Rust core) name, as the Python API spells them.
_API_SPELLING = [
    (re.compile(r" \(Python: [^)]*\)"), ""),  # a message that spelled both says it once
    (re.compile(r"--on-conflict first or last"), 'on_conflict="first" or "last"'),
    (re.compile(r"--(overwrite|force|resume|requantize-fp8|shared-experts|non-expert-modules)"
                r"\b(?!-)"), lambda m: m[1].replace("-", "_") + "=True"),
    (re.compile(r"--(experts|base)\b(?!-)"), lambda m: m[1] + "="),
]


def spelled(message: str) -> str:
    """``message`` with the flags it names spelled as keyword arguments (``--overwrite`` ->
    ``overwrite=True``), unless the user came by the command line."""
    if _FROM_CLI.get():
        return message
    for pattern, repl in _API_SPELLING:
        message = pattern.sub(repl, message)  # type: ignore[arg-type]
    return message


class EsftError(Exception):
    """Base class of all esft-rs errors."""

    path: str | None = None

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):  # a message (not an OSError's errno)
            args = (spelled(args[0]), *args[1:])
        super().__init__(*args)


class EsftValueError(EsftError, ValueError):
    """A bad value or argument."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None


class InvalidFileError(EsftValueError):
    """A file (safetensors, index, config, data) is malformed or says something impossible."""


class MismatchError(EsftValueError):
    """Inputs that are each valid do not fit together (adapter vs base, layers, shapes)."""


class EsftIOError(EsftError, OSError):
    """An I/O failure on ``filename`` (also ``.path``); the message is ``FILE: what``."""

    @property  # type: ignore[override]
    def path(self) -> str | None:
        return None if self.filename is None else os.fspath(self.filename)

    def __str__(self) -> str:
        if self.filename is None:
            return str(self.strerror)
        return f"{self.filename}: {self.strerror}"


class EsftFileNotFoundError(EsftIOError, FileNotFoundError):
    pass


class EsftFileExistsError(EsftIOError, FileExistsError):
    pass


class EsftPermissionError(EsftIOError, PermissionError):
    pass


class EsftIsADirectoryError(EsftIOError, IsADirectoryError):
    pass


class EsftNotADirectoryError(EsftIOError, NotADirectoryError):
    pass


def io_error(e: OSError, path: str | os.PathLike[str]) -> EsftIOError:
    """``e`` as the ``EsftIOError`` subclass for its errno (as the Rust core raises them)."""
    cls = next((c for builtin, c in _BY_BUILTIN if isinstance(e, builtin)), EsftIOError)
    return cls(e.errno, e.strerror or str(e), os.fspath(path))


_BY_BUILTIN: tuple[tuple[type[OSError], type[EsftIOError]], ...] = (
    (FileNotFoundError, EsftFileNotFoundError),
    (FileExistsError, EsftFileExistsError),
    (PermissionError, EsftPermissionError),
    (IsADirectoryError, EsftIsADirectoryError),
    (NotADirectoryError, EsftNotADirectoryError),
)


__all__ = [
    "EsftError",
    "EsftFileExistsError",
    "EsftFileNotFoundError",
    "EsftIOError",
    "EsftIsADirectoryError",
    "EsftNotADirectoryError",
    "EsftPermissionError",
    "EsftValueError",
    "InvalidFileError",
    "MismatchError",
]

"""Reading input files safely: one opener and strict parsers that every reader shares.

- ``check_file`` stats a path before anything opens it: a named pipe, socket, device
  or directory where a regular file belongs is refused at once (opening a pipe
  would block forever).
- ``read_text`` decodes strict UTF-8 and names the byte offset of the first bad byte; a
  byte-order mark at the start is dropped (``without_bom``), here and in ``parse_json``.
- ``parse_json`` refuses duplicate keys, nesting deeper than ``MAX_DEPTH`` and
  strings that are not encodable (lone surrogates such as ``"\\ud800"``).
- ``load_yaml`` refuses duplicate keys too (PyYAML keeps the last silently).

Every problem is an ``InvalidFileError`` naming the file; I/O failures stay ``OSError``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from esft_rs.errors import InvalidFileError, io_error

#: Deepest nesting of arrays and objects a JSON or YAML input may have (ours need 4).
MAX_DEPTH = 64

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
)
# A \uD800-\uDFFF escape: the only way a lone surrogate gets into parsed JSON.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, when it names a readable regular file (symlinks followed)."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except OSError as e:  # an EsftError too, as the core's I/O errors are
        raise io_error(e, p) from None
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
        raise InvalidFileError(f"{p}: is {kind}, not a regular file", p)
    return p


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    return check_file(path).read_bytes()


def read_text(path: str | os.PathLike[str]) -> str:
    """The file's text, which must be UTF-8 (a byte-order mark before it is dropped)."""
    data = read_bytes(path)
    try:
        return without_bom(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidFileError(f"{path}: not valid UTF-8 (byte {e.start})", path) from None


def without_bom(text: str) -> str:
    """``text`` without the UTF-8 byte-order mark Windows editors put first, as Python's
    ``utf-8-sig`` reads it (``json`` refuses it: "Unexpected UTF-8 BOM")."""
    return text.removeprefix("\ufeff")


def describe_text_problem(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"character {e.start} is a lone surrogate (U+{ord(text[e.start]):04X})"
    return None


def json_problem(text: str | bytes, *, bom: bool = True) -> tuple[Any, str | None]:
    """(value, None) for strict JSON; (None, why) otherwise. ``why`` has no file name.
    ``bom``: a byte-order mark may start the text (a file's start; not a JSONL line's).
    NaN and Infinity, which Python's json reads, are not JSON and are refused."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"not valid UTF-8 (byte {e.start})"
    if bom:
        text = without_bom(text)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    except _Duplicate as e:
        return None, f"duplicate key {e.args[0]!r}"
    except _Constant as e:
        return None, f"not valid JSON ({e.args[0]} is not a JSON number)"
    except RecursionError:
        return None, f"nested more than {MAX_DEPTH} levels deep"
    if (why := _depth_problem(value)) is not None:
        return None, why
    if _SURROGATE_ESCAPE.search(text) and (why := _unencodable(value)) is not None:
        return None, why
    return value, None


class _Constant(Exception):
    pass


def _no_constant(name: str) -> Any:
    raise _Constant(name)


def parse_json(text: str | bytes, origin: str | os.PathLike[str]) -> Any:
    """Strict JSON (module docstring); errors name ``origin``."""
    value, why = json_problem(text)
    if why is not None:
        raise InvalidFileError(f"{os.fspath(origin)}: {why}", origin)
    return value


def load_json(path: str | os.PathLike[str]) -> Any:
    return parse_json(read_text(path), path)


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """A YAML file (safe loader) without duplicate keys or deep nesting."""
    import yaml

    text = read_text(path)
    try:
        value = yaml.load(text, Loader=_strict_yaml_loader())
    except _Duplicate as e:
        raise InvalidFileError(f"{path}: duplicate key {e.args[0]!r}", path) from None
    except RecursionError:
        raise InvalidFileError(f"{path}: nested more than {MAX_DEPTH} levels deep", path) from None
    except yaml.YAMLError as e:
        why = " ".join(str(e).split())
        raise InvalidFileError(f"{path}: not valid YAML ({why})", path) from None
    if (why := _depth_problem(value)) is not None:
        raise InvalidFileError(f"{path}: {why}", path)
    return value


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _depth_problem(value: Any) -> str | None:
    # YAML aliases share one object many times ("billion laughs") or hold themselves:
    # each is walked again only when reached deeper than before, so at most MAX_DEPTH times.
    deepest: dict[int, int] = {}
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list) and deepest.get(id(v), 0) < depth:
            if depth > MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} levels deep"
            deepest[id(v)] = depth
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return None


def _unencodable(value: Any) -> str | None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if (why := describe_text_problem(v)) is not None:
                return f"a string is not valid Unicode: {why}"
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


_LOADER: Any = None


def _strict_yaml_loader() -> Any:
    global _LOADER
    if _LOADER is None:
        import yaml

        class StrictLoader(yaml.SafeLoader):
            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                seen = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        duplicate = key in seen
                    except TypeError:  # an unhashable key: SafeLoader says so itself
                        break
                    if duplicate:
                        raise _Duplicate(key)
                    seen.add(key)
                return super().construct_mapping(node, deep=deep)

        _LOADER = StrictLoader
    return _LOADER

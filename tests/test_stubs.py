"""_core.pyi lists exactly what the extension exports, with the same parameter names."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from esft_rs import _core

STUB = Path(_core.__file__).with_name("_core.pyi")


def stub_items() -> dict[str, ast.AST]:
    tree = ast.parse(STUB.read_text())
    out: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def test_stub_names_match() -> None:
    exported = {n for n in dir(_core) if not n.startswith("_") or n == "__version__"}
    assert exported == set(stub_items())


def test_stub_signatures_match() -> None:
    for name, node in stub_items().items():
        obj = getattr(_core, name)
        if isinstance(node, ast.FunctionDef):
            runtime = list(inspect.signature(obj).parameters)
            stub = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
            assert runtime == stub, name
        elif isinstance(node, ast.ClassDef):
            if node.name.endswith("Error"):
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                assert obj.__mro__[1].__name__ == bases[0], name
            else:
                stub_methods = {
                    n.name for n in node.body if isinstance(n, ast.FunctionDef)
                } - {"__init__", "__new__"}
                assert stub_methods <= set(dir(obj)), name

"""_core.pyi matches the extension: mypy's stubtest checks names, parameters and types."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from esft_rs import _core

STUB = Path(_core.__file__).with_name("_core.pyi")

pytest.importorskip("mypy.stubtest")


def test_stubtest_passes(tmp_path: Path) -> None:
    # The package's own directory goes first on the path, so stubtest checks the
    # stub that ships beside the built extension.
    package_root = Path(_core.__file__).resolve().parent.parent
    config = tmp_path / "mypy.ini"
    # The stub names esft_rs types, and mypy would follow the package into torch and
    # transformers (30 of its 40 s): none of theirs is in the stub, so they stay unread.
    config.write_text("[mypy]\n[mypy-torch.*,transformers.*,safetensors.*,tqdm.*]\n"
                      "follow_imports = skip\n")
    env = {**os.environ, "PYTHONPATH": str(package_root), "MYPYPATH": str(package_root)}
    run = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "esft_rs._core", "--mypy-config-file", str(config)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def _conforms(value: Any, t: Any) -> bool:
    """Whether ``value`` is of the (runtime-evaluated) stub annotation ``t``."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is Any:
        return True
    if t is None or t is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_conforms, value, args))
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def _stub_properties() -> dict[str, dict[str, str]]:
    tree = ast.parse(STUB.read_text())
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = {
                f.name: ast.unparse(f.returns)
                for f in node.body
                if isinstance(f, ast.FunctionDef)
                and f.returns is not None
                and any(isinstance(d, ast.Name) and d.id == "property" for d in f.decorator_list)
            }
    return out


def test_report_values_have_the_stub_types(tmp_path: Path, single_ckpt: Path) -> None:
    """stubtest sees the report classes' properties but not their values: check those."""
    import esft_rs
    from esft_rs.files.expert_config import ExpertConfig

    ExpertConfig({1: [0, 2]}).save(tmp_path / "experts.json")
    quiet = {"on_warning": lambda message: None}
    adapter = tmp_path / "ad.safetensors"
    split = esft_rs.split(single_ckpt, adapter, experts=tmp_path / "experts.json", **quiet)
    merged = esft_rs.merge(single_ckpt, tmp_path / "ad.safetensors", tmp_path / "out", **quiet)
    info = esft_rs.inspect(single_ckpt)
    objects = [
        info,
        info.moe,
        next(iter(info.moe.layers.values())),
        next(iter(info.tensors.values())),
        merged,
        merged.replaced[0],
        merged.adapters[0],
        split,
        split.tensors[0],
        esft_rs.read_adapter(tmp_path / "ad.safetensors"),
        _core.Staging(tmp_path / "staged.json"),
        _core.FileReader(next(single_ckpt.glob("*.safetensors"))),  # no properties
        _core.SafetensorsWriter(tmp_path / "written.safetensors", []),
    ]
    namespace = {**vars(_core), "Any": Any, "ExpertConfig": ExpertConfig, "Path": Path}
    properties = _stub_properties()
    assert {type(o).__name__ for o in objects} | {"FP8Info"} == set(properties)
    for obj in objects:
        for name, annotation in properties[type(obj).__name__].items():
            value = getattr(obj, name)
            assert _conforms(value, eval(annotation, namespace)), (type(obj).__name__, name, value)

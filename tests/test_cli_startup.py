"""Byte-level commands and --help never import numpy or torch (they start fast)."""

from __future__ import annotations

import subprocess
import sys


def test_cli_module_imports_neither_numpy_nor_torch() -> None:
    code = ("import sys, esft_rs.cli; heavy = {'numpy', 'torch', 'transformers'}"
            " & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_are_not_shadowed_by_submodules() -> None:
    """Every name of ``esft_rs.__all__`` stays what the docs say once every submodule is
    imported: a submodule named like a lazily exported function (once ``esft_rs.export``)
    replaced the function with itself, depending on import order."""
    code = ("import importlib, pkgutil, types, esft_rs\n"
            "for m in pkgutil.walk_packages(esft_rs.__path__, 'esft_rs.'):\n"
            "    if '.demo' not in m.name and not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "bad = [n for n in esft_rs.__all__\n"
            "       if isinstance(getattr(esft_rs, n), types.ModuleType)]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"

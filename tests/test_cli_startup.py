"""Byte-level commands and --help never import numpy or torch (they start fast)."""

from __future__ import annotations

import subprocess
import sys


def test_cli_module_imports_neither_numpy_nor_torch() -> None:
    code = ("import sys, esft_rs.cli; heavy = {'numpy', 'torch', 'transformers'}"
            " & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)

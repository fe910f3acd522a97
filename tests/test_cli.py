"""The CLI frame: help, version, fast start without torch."""

from __future__ import annotations

import subprocess
import sys

import esft_rs
from conftest import run_cli


def test_help_lists_commands() -> None:
    proc = run_cli("--help", check=True)
    assert "inspect" in proc.stdout


def test_version() -> None:
    assert esft_rs.__version__ in run_cli("--version", check=True).stdout


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from esft_rs.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_usage_error_is_exit_2() -> None:
    proc = run_cli("inspect")
    assert proc.returncode == 2 and "Missing argument" in proc.stderr

"""Imports, in one process, what a pytest worker and the test forkserver import, so that
their bytecode is compiled once. On a fresh clone no module has a ``.pyc`` yet (uv installs
none, Makefile), and pytest's two workers would each compile the same modules at once:
about 20 s of CPU each. ``make test`` runs this for the floor venv (``make test-floor``)
beside the Rust checks, which leave part of a core idle.

Usage: ``python tests/precompile.py [FILES]``: collects FILES (default: the suite)."""

from __future__ import annotations

import importlib
import sys

import pytest

import forkserver

if __name__ == "__main__":
    pytest.main(["--collect-only", "-qq", "-p", "no:xdist", "-p", "no:cacheprovider",
                 *sys.argv[1:]])
    for name in forkserver.PRELOAD:
        importlib.import_module(name)

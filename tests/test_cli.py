"""The CLI frame: help, version, fast start without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def _options() -> list[tuple[str, object]]:
    import click

    from esft_rs.cli import main

    ctx = click.Context(main)
    return [(name, p) for name in main.list_commands(ctx)
            for p in main.get_command(ctx, name).params if isinstance(p, click.Option)]


def test_one_vocabulary_across_commands() -> None:
    """-o is --output, the row length --seq-length, --device defaults to auto, the data seed
    is one default, --chat-template shows its choices: in every command."""
    from esft_rs.data import DEFAULT_SEED

    seen = set()
    for name, p in _options():
        if "-o" in p.opts:
            assert "--output" in p.opts, name
            seen.add(name)
        if p.name == "device" and name != "plan":  # plan's --device names the target hardware
            assert p.default == "auto", name
        if p.name == "seq_length":
            assert "--seq-length" in p.opts, name
        if p.name == "chat_template":
            assert p.metavar == "auto|model|official|PATH", name
        if p.name == "seed" and name in ("train", "profile"):
            assert p.default in (DEFAULT_SEED, None), name  # train's None: the config's
    assert {"train", "merge", "split", "demo", "profile", "select", "eval", "init-model"} <= seen


def test_old_spellings_are_hidden_aliases(tmp_path: Path) -> None:
    """--out and --seq-len still work, and no --help shows them."""
    from esft_rs.testing import MoEShape, random_tensors, write_checkpoint

    for command in ("train", "merge", "split", "demo", "profile"):
        text = run_cli(command, "--help").stdout
        assert "--out " not in text and "--out," not in text and "--seq-len " not in text
    model = write_checkpoint(tmp_path / "m", random_tensors(MoEShape(layers=2, experts=2), 1))
    cfg = tmp_path / "e.json"
    cfg.write_text('{"experts": {"1": [1]}}')
    proc = run_cli("split", model, "--experts", cfg, "--out", tmp_path / "a.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.safetensors").is_file()
    proc = run_cli("profile", "--seq-len")  # parsed as the alias: it wants a value
    assert "Option '--seq-len' requires an argument" in proc.stderr


def test_our_warnings_are_one_line(builtin: Path, tmp_path: Path) -> None:
    """A warning esft-rs raises reaches the terminal as one ``esft-rs: warning:`` line, not as
    Python's two lines naming a source file (an adapter split without --base has no base
    fingerprint, which export warns about)."""
    adapter = tmp_path / "adapter.safetensors"
    with pytest.warns(UserWarning, match="no base fingerprint"):
        esft_rs.split(builtin / "base", adapter, experts=builtin / "experts.json")
    r = run_cli("export", builtin / "base", adapter, "-o", tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        f"esft-rs: warning: {adapter}: no base fingerprint, so it cannot be checked that it"
        f" was trained from {builtin / 'base'}"]

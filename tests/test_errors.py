"""Every error esft_rs raises on bad input is an EsftError and the builtin a user would catch."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import esft_rs
from esft_rs.errors import (
    EsftError,
    EsftFileNotFoundError,
    EsftIOError,
    EsftIsADirectoryError,
    EsftValueError,
    InvalidFileError,
    MismatchError,
)


def test_hierarchy() -> None:
    assert issubclass(EsftValueError, EsftError) and issubclass(EsftValueError, ValueError)
    for cls in (InvalidFileError, MismatchError):
        assert issubclass(cls, EsftValueError)
    assert issubclass(EsftIOError, EsftError) and issubclass(EsftIOError, OSError)
    assert issubclass(EsftFileNotFoundError, FileNotFoundError)
    assert {esft_rs.EsftError, esft_rs.EsftValueError, esft_rs.EsftIOError} == {
        EsftError,
        EsftValueError,
        EsftIOError,
    }


def test_missing_file_is_file_not_found_with_errno_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        esft_rs.inspect(missing)
    e = info.value
    assert isinstance(e, EsftFileNotFoundError) and isinstance(e, EsftError)
    assert e.errno == errno.ENOENT
    assert e.filename == str(missing) and e.path == str(missing)
    assert str(e).startswith(f"{missing}: ")
    assert type(pickle.loads(pickle.dumps(e))) is EsftFileNotFoundError


def test_directory_for_a_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(EsftError) as info:
        esft_rs.inspect(_dir_named_like_a_file(tmp_path))
    # Linux opens a directory and finds it is one; other systems refuse to open it.
    assert isinstance(info.value, InvalidFileError | EsftIsADirectoryError | EsftIOError)
    assert info.value.path == str(tmp_path / "d.safetensors")


def _dir_named_like_a_file(tmp_path: Path) -> Path:
    d = tmp_path / "d.safetensors"
    d.mkdir()
    return d


def test_bad_file_is_invalid_file_and_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError) as info:
        esft_rs.inspect(bad)
    e = info.value
    assert isinstance(e, InvalidFileError) and isinstance(e, EsftError)
    assert e.path == str(bad) and str(e).startswith(f"{bad}: ")


def test_mismatch_is_a_value_error(tmp_path: Path) -> None:
    save_file({"model.norm.weight": np.ones(2, np.float32)}, tmp_path / "base.safetensors")
    save_file({"model.other.weight": np.ones(2, np.float32)}, tmp_path / "ad.safetensors")
    with pytest.raises(ValueError) as info:
        esft_rs.merge(tmp_path / "base.safetensors", tmp_path / "ad.safetensors", on_warning=print)
    assert isinstance(info.value, MismatchError)
    assert "is not in the base" in str(info.value)


def test_core_value_errors_are_esft_value_errors(tmp_path: Path) -> None:
    save_file({"model.norm.weight": np.ones(2, np.float32)}, tmp_path / "base.safetensors")
    with pytest.raises(EsftValueError, match="on_conflict must be"):
        esft_rs.merge(tmp_path / "base.safetensors", [], on_conflict="middle")  # type: ignore[arg-type]
    with pytest.raises(EsftValueError, match="at least one adapter"):
        esft_rs.merge(tmp_path / "base.safetensors", [])
    with pytest.raises(EsftValueError, match="top_k must be between 1 and"):
        esft_rs.aggregate(tmp_path, top_k=0)
    with pytest.raises(EsftValueError, match="top_p must be in"):
        from esft_rs.routing.scoring import check_top_p

        check_top_p(2.0)


def test_python_file_errors_carry_the_path(tmp_path: Path) -> None:
    from esft_rs.data.tokenizer import load_tokenizer

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(InvalidFileError) as info:
        load_tokenizer(tmp_path)
    assert info.value.path == str(tmp_path / "config.json")
    assert str(info.value) == f"{tmp_path / 'config.json'}: not a JSON object"


def test_api_errors_name_the_keyword_the_cli_the_flag(tmp_path) -> None:
    """The core's "pass --overwrite" reads "pass overwrite=True" from Python; the CLI keeps
    its flags."""
    from conftest import run_cli
    from esft_rs.models import init_model, save_model

    save_model(init_model("tiny"), tmp_path / "m")
    with pytest.raises(esft_rs.EsftValueError, match=r"already exists \(pass overwrite=True"):
        save_model(init_model("tiny"), tmp_path / "m")
    (tmp_path / "e.json").write_text('{"experts": {"1": [0]}}')
    esft_rs.split(tmp_path / "m", tmp_path / "a.safetensors", experts=tmp_path / "e.json")
    with pytest.raises(esft_rs.EsftValueError, match=r"already exists \(pass overwrite=True"):
        esft_rs.split(tmp_path / "m", tmp_path / "a.safetensors", experts=tmp_path / "e.json")
    proc = run_cli("split", tmp_path / "m", "-o", tmp_path / "a.safetensors", "--experts",
                   tmp_path / "e.json")
    assert proc.returncode == 2 and "(pass --overwrite to replace it)" in proc.stderr

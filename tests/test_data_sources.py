"""Task data from .jsonl, .jsonl.gz and Parquet (the Hub's datasets format); system turns."""

from __future__ import annotations

import builtins
import gzip
import json

import pytest

from esft_rs.data import Message, read_task_data
from esft_rs.errors import EsftError, InvalidFileError

ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
                  {"role": "assistant", "content": "a1"}]},
    {"messages": [{"role": "user", "content": "q2"},
                  {"role": "assistant", "content": "a2", "mask": 1}]},
]
EXPECTED = [[Message("system", "Be brief."), Message("user", "q1"), Message("assistant", "a1")],
            [Message("user", "q2"), Message("assistant", "a2", mask=True)]]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_jsonl_gz_reads_as_jsonl(tmp_path):
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(jsonl(ROWS)))
    data = read_task_data(tmp_path / "d.jsonl.gz")
    assert data.conversations == EXPECTED
    assert data.sources == [f"{tmp_path / 'd.jsonl.gz'}:1", f"{tmp_path / 'd.jsonl.gz'}:2"]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(InvalidFileError, match=r"bad\.jsonl\.gz: not a valid gzip file"):
        read_task_data(tmp_path / "bad.jsonl.gz")


def test_parquet_messages_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # the Hub's layout: a list of structs; a field missing from a row reads as null
    table = pa.Table.from_pylist([{"id": i, **r} for i, r in enumerate(ROWS)])
    pq.write_table(table, tmp_path / "d.parquet")
    data = read_task_data(tmp_path / "d.parquet")
    assert data.conversations == EXPECTED
    bad = pa.Table.from_pylist([*ROWS, {"messages": [{"role": "robot", "content": "x"}]}])
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(InvalidFileError, match=r"bad\.parquet:3: message 0 has unknown role"):
        read_task_data(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "nomsg.parquet")
    with pytest.raises(InvalidFileError, match=r"nomsg\.parquet: no messages column"):
        read_task_data(tmp_path / "nomsg.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 junk")
    with pytest.raises(InvalidFileError, match=r"junk\.parquet: not a valid Parquet file"):
        read_task_data(tmp_path / "junk.parquet")


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(EsftError, match=r"d\.parquet: reading Parquet needs pyarrow: pip install"):
        read_task_data(tmp_path / "d.parquet")

"""Property tests: the task-data reader and the expert-config parser give a result or
one ``EsftError`` for any input (arbitrary Unicode, nesting, bytes), never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esft_rs.data import ROLES, read_task_data
from esft_rs.errors import EsftError
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.files.inputs import parse_json

# Lone surrogates included: JSON can carry them as \ud800 escapes.
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=30,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", 3]), "content": TEXT | JSON},
    optional={"mask": st.sampled_from([0, 1, 2, True, None, 0.5])},
)
CHAT = st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4) | JSON})
# A line: JSON text (ASCII-escaped or not), deep nesting, or raw bytes.
LINE = st.one_of(
    (CHAT | JSON).flatmap(lambda v: st.sampled_from(
        [json.dumps(v).encode(), json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")]
    )),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.binary(max_size=60),
)
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(st.lists(LINE, min_size=1, max_size=5), st.booleans())
def test_task_data_reader(lines: list[bytes], skip_bad: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "data.jsonl")
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            task = read_task_data(path, skip_bad=skip_bad)
        except EsftError as e:
            assert "\n" not in str(e) and "data.jsonl" in str(e)
            return
        for conv in task.conversations:  # what is accepted is usable downstream
            for m in conv:
                m.content.encode("utf-8")
                assert m.role in ROLES


EXPERTS = st.fixed_dictionaries(
    {"experts": st.dictionaries(TEXT | st.integers(0, 99).map(str),
                                st.lists(JSON | st.integers(-2, 2**33), max_size=4) | JSON,
                                max_size=4)},
    optional={"shared_experts": JSON, "non_expert_modules": JSON, "extra": JSON},
)


@SETTINGS
@given(st.one_of(
    (EXPERTS | JSON).map(lambda v: json.dumps(v, ensure_ascii=False)),
    (EXPERTS | JSON).map(json.dumps),
    st.integers(1, 5000).map(lambda n: '{"experts": ' + "[" * n + "]" * n + "}"),
    TEXT,
))
def test_expert_config_parser(text: str) -> None:
    try:
        cfg = ExpertConfig.parse(text, "cfg.json")
    except EsftError as e:
        assert str(e).startswith("cfg.json: ") and "\n" not in str(e)
        return
    assert ExpertConfig.parse(cfg.to_json(), "again.json") == cfg  # what parses round-trips


@SETTINGS
@given(st.one_of(JSON.map(json.dumps), st.binary(max_size=60), TEXT))
def test_strict_json(text: str | bytes) -> None:
    try:
        parse_json(text, "x.json")
    except EsftError as e:
        assert str(e).startswith("x.json: ")

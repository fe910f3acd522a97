"""Property: for random tensor sets, merging adapters is a dict update, byte for byte."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import esft_rs
from esft_rs.testing import write_checkpoint

DTYPES = ["float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool"]
NAMES = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=16).filter(
    lambda n: n != "__metadata__"
)
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


def array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random bytes of any dtype (NaN patterns included: merge never looks at values)."""
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return rng.integers(0, 256, size=n, dtype=np.uint8).view(dtype).reshape(shape)


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], int]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    names = draw(st.lists(NAMES, min_size=1, max_size=12, unique=True))
    base = {n: array(rng, draw(st.sampled_from(DTYPES)), draw(SHAPES)) for n in names}
    # Up to three adapters over disjoint, non-empty subsets of the names.
    owner = {n: draw(st.integers(-1, 2)) for n in names}
    adapters = []
    for k in range(3):
        mine = [n for n in names if owner[n] == k]
        if mine:
            adapters.append({n: array(rng, str(base[n].dtype), base[n].shape) for n in mine})
    shards = draw(st.integers(1, 3))
    return base, adapters, shards


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_merge_is_a_dict_update(case: tuple[dict[str, np.ndarray], list[dict], int]) -> None:
    base_t, adapters_t, shards = case
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        base = write_checkpoint(tmp / "base", base_t, shards=shards)
        paths = []
        for i, a in enumerate(adapters_t):
            save_file(a, tmp / f"a{i}.safetensors")
            paths.append(tmp / f"a{i}.safetensors")
        if not paths:
            return
        esft_rs.merge(base, paths, tmp / "out", on_warning=lambda m: None)

        expected = dict(base_t)
        for a in adapters_t:
            expected.update(a)
        got: dict[str, np.ndarray] = {}
        for f in sorted((tmp / "out").glob("*.safetensors")):
            got |= load_file(f)
        assert got.keys() == expected.keys()
        for n, arr in expected.items():
            assert got[n].dtype == arr.dtype and got[n].shape == arr.shape
            assert got[n].tobytes() == arr.tobytes(), n
        # And byte for byte what the reference writer produces for the updated dict.
        ref = write_checkpoint(tmp / "ref", expected, shards=shards)
        for f in sorted(ref.iterdir()):
            assert (tmp / "out" / f.name).read_bytes() == f.read_bytes(), f.name

"""esft_rs.aggregate, RoutingStats and its file, and the official log parser."""

from __future__ import annotations

import os

import numpy as np
import pytest

import esft_rs
from esft_rs import InvalidFileError, MismatchError, RoutingStats, aggregate

E = 8


def records(layers: int = 2, tokens: int = 50, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.stack(
        [np.stack([rng.permutation(E)[:k] for _ in range(tokens)]) for _ in range(layers)]
    )
    weights = rng.random(ids.shape)
    return ids, weights


def reference(ids: np.ndarray, weights: np.ndarray | None, e: int = E):
    counts = np.stack([np.bincount(layer.ravel(), minlength=e) for layer in ids])
    gate = np.stack(
        [
            np.bincount(i.ravel(), weights=None if weights is None else w.ravel(), minlength=e)
            * (weights is not None)
            for i, w in zip(ids, ids if weights is None else weights, strict=True)
        ]
    )
    return counts, gate


@pytest.mark.parametrize("id_dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16",
                                      "uint32", "uint64"])
@pytest.mark.parametrize("w_dtype", ["float16", "float32", "float64", None])
def test_records_match_bincount(id_dtype, w_dtype):
    ids, weights = records()
    ids = ids.astype(id_dtype)
    w = None if w_dtype is None else weights.astype(w_dtype)
    stats = aggregate(ids, w, num_experts=E)
    counts, gate = reference(ids.astype(np.int64), None if w is None else w.astype(np.float64))
    assert stats.counts.dtype == np.int64 and stats.gate_sum.dtype == np.float64
    np.testing.assert_array_equal(stats.counts, counts)
    np.testing.assert_allclose(stats.gate_sum, gate, rtol=1e-12)
    np.testing.assert_array_equal(stats.tokens, [50, 50])
    assert (stats.layers, stats.top_k, stats.num_experts, stats.num_samples) == ([0, 1], 3, E, 1)
    np.testing.assert_allclose(stats.token_scores().sum(axis=1), 1.0)


def test_records_shapes_layers_and_inferred_experts():
    ids, w = records(layers=1)
    two_d = aggregate(ids[0], w[0], layers=[5])
    assert two_d.layers == [5] and two_d.num_experts == int(ids.max()) + 1
    # A non-contiguous view is copied once and counted the same.
    fortran = np.asfortranarray(ids[0])
    np.testing.assert_array_equal(aggregate(fortran, num_experts=E).counts, two_d.counts)
    # Lists and other array-likes are accepted.
    assert aggregate(ids[0].tolist(), num_experts=E).counts.sum() == ids.size


def test_per_sample_averages():
    ids, w = records(layers=1, tokens=10, k=2)
    lengths = [3, 7]
    stats = aggregate(ids, w, num_experts=E, lengths=lengths)
    want_tok = np.zeros(E)
    want_gate = np.zeros(E)
    start = 0
    for n in lengths:
        c, g = reference(ids[:, start:start + n], w[:, start:start + n])
        want_tok += c[0] / (2 * n)
        want_gate += g[0] / n
        start += n
    assert stats.num_samples == 2
    np.testing.assert_allclose(stats.token_scores("samples")[0], want_tok / 2)
    np.testing.assert_allclose(stats.gate_scores("samples")[0], want_gate / 2)
    # Token averages are unaffected by the split.
    np.testing.assert_allclose(stats.token_scores()[0], aggregate(ids, w, E).token_scores()[0])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda i, w: i.__setitem__((1, 4, 2), -3), r"expert id -3 at \[1, 4, 2\] is out of range"),
        (lambda i, w: i.__setitem__((0, 9, 0), E), r"expert id 8 at \[0, 9, 0\] is out of range"),
        (lambda i, w: w.__setitem__((1, 0, 1), np.nan), r"routing weight NaN at \[1, 0, 1\]"),
        (lambda i, w: w.__setitem__((0, 2, 0), -0.5), r"routing weight -0.5 at \[0, 2, 0\]"),
    ],
)
def test_bad_records_name_the_first_bad_position(mutate, message):
    ids, w = records()
    mutate(ids, w)
    with pytest.raises(ValueError, match=message):
        aggregate(ids, w, num_experts=E)


def test_bad_record_arguments():
    ids, w = records()
    with pytest.raises(ValueError, match=r"weights have shape \[2, 50, 2\]"):
        aggregate(ids, w[:, :, :2])
    with pytest.raises(ValueError, match="must be \\[tokens, K\\] or \\[layers, tokens, K\\]"):
        aggregate(ids.ravel())
    with pytest.raises(TypeError, match="integer dtype"):
        aggregate(ids.astype(np.float32))
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        aggregate(ids, ids)
    with pytest.raises(ValueError, match="lengths sum to 49 tokens but the records hold 50"):
        aggregate(ids, lengths=[49])
    with pytest.raises(ValueError, match="3 layer indices given for 2 layers"):
        aggregate(ids, layers=[1, 2, 3])


def test_save_load_round_trip(tmp_path):
    ids, w = records()
    stats = aggregate(ids, w.astype(np.float32), num_experts=E, layers=[1, 3])
    stats.metadata["model"] = "tiny"
    path = tmp_path / "routing.safetensors"
    stats.save(path)
    assert os.listdir(tmp_path) == ["routing.safetensors"]
    back = RoutingStats.load(path)
    for name in ("counts", "gate_sum", "tokens", "sample_token_sum", "sample_gate_sum"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    assert (back.layers, back.top_k, back.num_samples, back.metadata) == (
        [1, 3], 3, 1, {"model": "tiny"},
    )
    # The file is plain safetensors, readable by the reference package.
    from safetensors.numpy import load_file

    assert sorted(load_file(path)) == [
        "count", "gate_sum", "sample_gate_sum", "sample_token_sum", "tokens",
    ]


def test_bad_stats_files(tmp_path):
    from safetensors.numpy import save_file

    other = tmp_path / "model.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, other)
    with pytest.raises(InvalidFileError, match=r"model\.safetensors: not a routing-stats file"):
        RoutingStats.load(other)
    ids, _ = records()
    stats = aggregate(ids, num_experts=E)
    stats.tokens = stats.tokens + 1
    with pytest.raises(ValueError, match="layer 0: 150 expert selections for 51 tokens at top-3"):
        stats.save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_summing_sources(tmp_path):
    ids, w = records(tokens=60)
    whole = aggregate(ids, w, num_experts=E)
    a = aggregate(ids[:, :20], w[:, :20], num_experts=E)
    b = aggregate(ids[:, 20:], w[:, 20:], num_experts=E)
    b.save(tmp_path / "b.safetensors")
    total = aggregate([a, tmp_path / "b.safetensors"])
    np.testing.assert_array_equal(total.counts, whole.counts)
    np.testing.assert_allclose(total.gate_sum, whole.gate_sum)
    assert total.num_samples == 2
    np.testing.assert_array_equal((a + b).counts, whole.counts)
    other = aggregate(ids, num_experts=E, layers=[0, 2])
    with pytest.raises(MismatchError, match=r"input 1: layers \[0, 2\] differ from input 0: \[0,"):
        RoutingStats.sum([a, other])


def write_log(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        "\t".join(map(str, ids)) + "\t\t" + "\t".join(map(str, ws)) + "\n" for ids, ws in lines
    )
    path.write_text(text)


def test_official_logs_match_records(tmp_path):
    """A log folder with two ranks counts exactly like the same records."""
    ids, w = records(layers=2, tokens=12, k=3)
    w = np.round(w, 4)
    for rank, part in ((0, slice(0, 5)), (1, slice(5, 12))):
        for row, layer in enumerate((1, 2)):
            lines = [(ids[row, part].ravel().tolist(), w[row, part].ravel().tolist())]
            write_log(tmp_path / f"rank_{rank}" / f"expert_weights_{layer}.txt", lines)
    got = esft_rs.aggregate(tmp_path, top_k=3, num_experts=E)
    want = aggregate(ids, w, num_experts=E, layers=[1, 2], lengths=[5, 7])
    assert got.layers == [1, 2] and got.num_samples == 2
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_allclose(got.gate_sum, want.gate_sum)
    np.testing.assert_allclose(got.sample_token_sum, want.sample_token_sum)
    np.testing.assert_allclose(got.sample_gate_sum, want.sample_gate_sum)
    assert got.metadata["data"] == str(tmp_path)


def test_official_log_errors_name_file_and_line(tmp_path):
    log = tmp_path / "expert_weights_3.txt"
    log.write_text("1\t2\t\t0.5\t0.5\n1\t2\t\t0.5\tx\n")
    with pytest.raises(InvalidFileError, match=r"expert_weights_3\.txt:2: weight \"x\" is not a"):
        aggregate(tmp_path, top_k=2)
    log.write_text("1\t2\t\t0.5\t0.5\n")
    with pytest.raises(ValueError, match="weights, lengths and layers apply only"):
        aggregate(tmp_path, weights=np.zeros(2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidFileError, match="empty: no official routing logs"):
        aggregate(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        aggregate(tmp_path / "missing.safetensors")

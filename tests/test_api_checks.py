"""Python API checks from the second adversarial pass: bad numbers are ValueErrors (never an
OverflowError from the core), and nothing selects from statistics that cannot be scored."""

from __future__ import annotations

import numpy as np
import pytest

import esft_rs
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.routing import RoutingStats


def stats(gate_sum: np.ndarray | None = None, num_samples: int = 1) -> RoutingStats:
    counts = np.array([[6, 3, 2, 1]])
    gate = np.array([[0.6, 0.3, 0.2, 0.1]]) if gate_sum is None else gate_sum
    z = np.zeros((1, 4))
    return RoutingStats([1], counts, gate, np.array([6]), 2, num_samples, z + 0.1, z + 0.1)


@pytest.mark.parametrize("kw", [{"num_experts": -1}, {"num_experts": 2**64},
                                {"num_experts": 0}, {"lengths": [-1, 3]},
                                {"layers": [-1]}, {"layers": [1, 1]}])
def test_aggregate_bad_numbers_are_value_errors(kw: dict) -> None:
    ids = np.zeros((1 if "layers" not in kw else len(kw["layers"]), 2, 1), dtype=np.int64)
    with pytest.raises(esft_rs.EsftValueError):
        esft_rs.aggregate(ids, **kw)


@pytest.mark.parametrize(("gate", "message"), [
    (np.zeros((1, 4)), "no routing weights"),
    (np.array([[np.nan, 0.3, 0.2, 0.1]]), "NaN, infinite or negative"),
    (np.array([[-0.6, 0.3, 0.2, 0.1]]), "NaN, infinite or negative"),
])
def test_gate_scores_need_gate_sums(gate: np.ndarray, message: str) -> None:
    with pytest.raises(esft_rs.EsftValueError, match=message):
        esft_rs.select_experts(stats(gate), score="gate")
    assert esft_rs.select_experts(stats(gate), score="token").experts  # token scores still work


def test_per_sample_average_needs_samples() -> None:
    with pytest.raises(esft_rs.InvalidFileError, match="0 samples for 6 tokens"):
        esft_rs.select_experts(stats(num_samples=0), average="samples")


def test_expert_listed_twice_is_refused() -> None:
    with pytest.raises(esft_rs.EsftValueError, match="layer 1: expert 0 listed twice"):
        ExpertConfig({1: [0, 2, 0]})


@pytest.mark.parametrize(("source", "why"), [
    ("{% for i in range(200000) %}x{% endfor %}", "OverflowError: Range too big"),
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
])
def test_a_failing_chat_template_is_one_error(source: str, why: str) -> None:
    from esft_rs.data.chat_template import render

    with pytest.raises(esft_rs.MismatchError, match=rf"^chat template: {why}"):
        render(source, [{"role": "user", "content": "a"}], {})

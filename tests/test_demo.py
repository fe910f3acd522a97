"""``esft-rs demo --quick``: a complete, self-consistent report (figures are not asserted)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import esft_rs
from conftest import run_cli
from esft_rs.demo.settings import LORA_RANKS
from esft_rs.files.naming import classify

pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _quick_demo(out: Path, cache: Path, jobs: int) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "esft_rs", "demo", "--quick", "-o", str(out), "--jobs", str(jobs)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report.md" in proc.stdout
    # a smoke run says so, and judges no claim
    assert proc.stdout.lstrip().startswith("SMOKE RUN (--quick)")
    assert "hold" not in proc.stdout and "not measurable" not in proc.stdout
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("demo")
    return _quick_demo(out, cache, jobs=2), out


def test_the_demo_tests_share_one_worker(request: pytest.FixtureRequest) -> None:
    """Over pytest-xdist workers (``--dist loadgroup``), this module's tests are one group,
    so the module's demo runs once: xdist marks a grouped test's id with ``@demo``, which
    pytest 9.2 silently dropped (pytest-xdist#1386; the pin in pyproject.toml)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not over pytest-xdist workers with --dist loadgroup")
    assert request.node.nodeid.endswith("@demo"), request.node.nodeid


def test_figures_do_not_depend_on_the_number_of_workers(
        report: tuple[dict, Path], cache: Path, tmp_path: Path) -> None:
    """Runs go to worker processes as they free up; each is seeded and on one thread, so
    one worker gives the same figures, bit for bit (the base comes from the same cache)."""
    def figures(r: dict) -> list:
        return [{name: {k: v for k, v in m.items() if k not in ("train_seconds", "adapter")}
                 for name, m in run["methods"].items()} for run in r["runs"]]

    serial = _quick_demo(tmp_path / "demo", cache, jobs=1)
    assert figures(serial) == figures(report[0])
    assert serial["learning_rates"] == report[0]["learning_rates"]


def test_report_complete(report: tuple[dict, Path]) -> None:
    r, out = report
    assert set(r["methods"]) == {"fft", "esft_token", "esft_gate", "random", "lora_r2",
                                 "lora_r8"}
    keys = {"downstream_acc", "general_acc_before", "general_acc_after", "trainable_params",
            "total_params", "adapter_bytes", "train_seconds"}
    for m in r["methods"].values():
        assert keys <= set(m)
        for k in ("downstream_acc", "general_acc_before", "general_acc_after"):
            assert 0.0 <= m[k] <= 1.0
        assert 0 < m["trainable_params"] <= m["total_params"]
        assert m["train_seconds"] > 0
    assert r["methods"]["fft"]["trainable_params"] == r["methods"]["fft"]["total_params"]
    for accs, mean in [(r["base"]["general_acc_by_task"], r["base"]["general_acc"])] + [
        (m["general_acc_after_by_task"], m["general_acc_after"]) for m in r["methods"].values()
    ]:
        assert sum(accs.values()) / len(accs) == pytest.approx(mean)
    assert r["smoke"] is True and r["claims"] == {}
    assert {"concentration", "overlap", "chance_overlap", "chance_overlap_p95"} <= set(r["routing"])
    md = (out / "report.md").read_text()
    assert md.startswith("# esft-rs demo report\n\n**Smoke run (--quick)")
    assert "hold" not in md and "not measurable" not in md


def test_report_runs_and_their_means(report: tuple[dict, Path]) -> None:
    from esft_rs.demo.claims import NUMERIC
    from esft_rs.demo.tuning import choose_rate

    r, out = report
    runs = r["runs"]
    assert len(runs) == r["settings"]["seeds"] >= 3
    assert len({run["seed"] for run in runs}) == len(runs)
    for run in runs:
        assert set(run["methods"]) == set(r["methods"])
        for name, m in run["methods"].items():
            assert m["learning_rate"] == r["learning_rates"][name]["learning_rate"]
            assert m["general_acc_before"] == r["base"]["general_acc"]
    for name, mean in r["methods"].items():
        for key in NUMERIC:
            values = [run["methods"][name][key] for run in runs]
            if None in values:
                assert mean[key] is None
            else:
                assert mean[key] == pytest.approx(sum(values) / len(values))
        downs = [run["methods"][name]["downstream_acc"] for run in runs]
        assert mean["sd"]["downstream_acc"] == pytest.approx(statistics.stdev(downs))
    for name, t in r["learning_rates"].items():
        grid = r["settings"]["learning_rates"][name]
        assert set(t["validation_acc"]) == {f"{lr:g}" for lr in grid}
        assert max(t["validation_acc"].values()) == t["validation_acc"][f"{t['learning_rate']:g}"]
        assert set(t["validation_loss"]) == set(t["validation_acc"])
        scores = {float(lr): (acc, t["validation_loss"][lr])
                  for lr, acc in t["validation_acc"].items()}
        assert t["learning_rate"] == choose_rate(scores)
    for c in r["claims"].values():
        if "runs" in c:
            assert c["runs"] == len(runs) and 0 <= c["held_in"] <= len(runs)
    md = (out / "report.md").read_text()
    assert "±" in md and f"over {len(runs)} fine-tuning seeds" in md
    # ESFT-Token's SVD exports: the mean over the runs of each rank's figures; a higher rank
    # is never further from the full adapter
    svd = r["methods"]["esft_token"]["svd_export"]
    assert set(svd) == {"r2", "r8"}
    for rank, figures in svd.items():
        for key, mean in figures.items():
            values = [run["methods"]["esft_token"]["svd_export"][rank][key] for run in runs]
            assert mean == pytest.approx(sum(values) / len(values))
        assert 0.0 <= figures["downstream_acc"] <= 1.0
    assert 0.0 <= svd["r8"]["relative_error"] <= svd["r2"]["relative_error"] < 1.0
    assert "exported as PEFT LoRA by truncated SVD" in md


def test_adapter_bytes_are_the_selected_experts(report: tuple[dict, Path]) -> None:
    r, _ = report
    base = esft_rs.inspect(r["base"]["path"])
    per_expert = {}
    for name, t in base.tensors.items():
        role = classify(name)
        if role.kind == "routed_expert":
            key = (role.layer, role.expert)
            per_expert[key] = per_expert.get(key, 0) + t.bytes
    for name in ("esft_token", "esft_gate", "random"):
        m = r["methods"][name]
        adapter = esft_rs.inspect(m["adapter"])
        experts = {(lay, e) for lay, layer in adapter.moe.layers.items() for e in layer.experts}
        assert experts and m["adapter_bytes"] == sum(per_expert[k] for k in experts)
        assert m["experts_trained"] == len(experts)
    # ESFT-LoRA: rank-r factors of ESFT-Token's experts, fewer parameters than their weights
    for name, rank in LORA_RANKS.items():
        m = r["methods"][name]
        factors = load_file(m["adapter"])
        assert all(rank in v.shape for v in factors.values())
        assert m["trainable_params"] == sum(v.numel() for v in factors.values())
        assert m["adapter_bytes"] == 4 * m["trainable_params"]
        assert m["trainable_params"] < r["methods"]["esft_token"]["trainable_params"]


def test_merged_model_scores_like_in_memory(report: tuple[dict, Path]) -> None:
    r, _ = report
    assert r["merge"]["equal"] is True
    assert r["merge"]["downstream_acc"] == r["methods"]["esft_token"]["downstream_acc"]


def test_base_and_merged_carry_the_word_tokenizer(report: tuple[dict, Path]) -> None:
    from esft_rs.data import Message, format_conversation
    from esft_rs.data.tokenizer import load_tokenizer
    from esft_rs.demo.vocabulary import VOCAB

    r, _ = report
    conv = [Message("user", "shift 1 2 3 4"), Message("assistant", "4 5 6 7")]
    for model_dir in (r["base"]["path"], r["merge"]["path"]):
        tok = load_tokenizer(model_dir)
        ids, _ = format_conversation(conv, tok)
        words = ["<bos>", "User:", "shift", "1", "2", "3", "4", "Assistant:", "4", "5", "6", "7",
                 "<eos>"]
        assert ids == [VOCAB.index(w) for w in words]
        assert tok.decode(ids) == "User: shift 1 2 3 4 Assistant: 4 5 6 7"


def test_base_key_covers_the_tokenizer() -> None:
    from esft_rs.demo.settings import FULL

    assert FULL.base_key("data", "tokenizer-a") != FULL.base_key("data", "tokenizer-b")


def test_demo_help() -> None:
    assert "--quick" in run_cli("demo", "--help", check=True).stdout


# The claims' judgement, on synthetic reports.

def _method(down: float, general_after: float, *, experts: int | None = 10) -> dict:
    return {"downstream_acc": down, "general_acc_before": 1.0, "general_acc_after": general_after,
            "general_acc_after_by_task": {"a": general_after, "b": general_after},
            "trainable_params": 100 if experts else 1000, "total_params": 1000,
            "adapter_bytes": 400, "train_seconds": 1.0, "experts_trained": experts,
            "adapter": "x"}


def _report(runs: list[dict[str, tuple[float, float]]], *, overlap: float = 0.05) -> dict:
    from esft_rs.demo.claims import chance_overlap, mean_runs, quantile

    per_run = [{"seed": i, "methods": {
        name: _method(d, g, experts=None if name == "fft" else 10)
        for name, (d, g) in r.items()}} for i, r in enumerate(runs)]
    # Two tasks, 3 layers, 4 of 32 experts selected in each.
    draws = chance_overlap([[(4, 4)] * 3], 32, draws=500)
    return {
        "settings": {"test_items": 200, "general_test_items": 100},
        "base": {"downstream_acc": 0.1, "general_acc": 1.0,
                 "general_acc_by_task": {"a": 1.0, "b": 1.0}},
        "finetune_task": "t",
        "methods": mean_runs(per_run),
        "runs": per_run,
        "routing": {"concentration": {"t": {"cover_50": 5}}, "uniform": {"cover_50": 16},
                    "mean_overlap": overlap, "chance_overlap": sum(draws) / len(draws),
                    "chance_overlap_p95": quantile(draws, 0.95)},
    }


GOOD = {"fft": (0.95, 0.60), "esft_token": (0.94, 0.90), "esft_gate": (0.96, 0.92),
        "random": (0.60, 0.70)}


def test_claims_hold_when_esft_matches_fft_forgets_less_and_beats_random() -> None:
    from esft_rs.demo.claims import judge

    c = judge(_report([GOOD, GOOD, GOOD]))
    for name in ("esft_token_matches_fft_downstream", "esft_gate_matches_fft_downstream",
                 "esft_token_forgets_less_than_fft", "esft_gate_forgets_less_than_fft",
                 "esft_token_beats_random", "routing_concentrated", "tasks_use_different_experts"):
        assert c[name]["holds"] is True, name
    assert c["esft_token_beats_random"]["held_in"] == 3
    assert c["esft_token_beats_random"]["runs"] == 3


def test_claims_fail_beyond_noise_and_count_the_runs() -> None:
    from esft_rs.demo.claims import judge

    bad = GOOD | {"esft_token": (0.50, 0.55), "random": (0.52, 0.70)}
    c = judge(_report([GOOD, bad, bad]))
    # On the means ESFT-Token (0.647) trails FFT (0.95) by more than the tolerance.
    assert c["esft_token_matches_fft_downstream"]["holds"] is False
    assert c["esft_token_matches_fft_downstream"]["held_in"] == 1
    assert c["esft_token_forgets_less_than_fft"]["held_in"] == 1
    assert c["esft_token_beats_random"]["holds"] is False
    assert c["esft_gate_matches_fft_downstream"]["holds"] is True


def test_small_differences_are_within_noise() -> None:
    from esft_rs.demo.claims import judge, tolerance

    # 0.93 vs 0.95 on 200 items is within two standard errors (about 0.047)...
    near = GOOD | {"esft_token": (0.93, 0.90), "random": (0.91, 0.90)}
    c = judge(_report([near]))
    se = ((0.93 * 0.07 + 0.95 * 0.05) / 200) ** 0.5
    assert tolerance(0.93, 0.95, 200) == pytest.approx(2 * se)
    assert c["esft_token_matches_fft_downstream"]["holds"] is True
    # ... so ESFT-Token does not measurably beat random experts at 0.91.
    assert c["esft_token_beats_random"]["holds"] is False


def test_seed_spread_widens_the_tolerance() -> None:
    from esft_rs.demo.claims import judge

    runs = [GOOD | {"esft_token": (d, 0.9)} for d in (0.99, 0.60, 0.99)]  # mean 0.86, sd 0.23
    c = judge(_report(runs))
    assert c["esft_token_matches_fft_downstream"]["holds"] is True
    assert c["esft_token_matches_fft_downstream"]["held_in"] == 2


def test_not_measurable_without_gain_or_forgetting() -> None:
    from esft_rs.demo.claims import judge

    flat = {name: (0.1, 1.0) for name in GOOD}
    c = judge(_report([flat, flat, flat]))
    assert c["esft_token_matches_fft_downstream"]["holds"] is None
    assert c["esft_token_forgets_less_than_fft"]["holds"] is None
    assert c["esft_token_beats_random"]["holds"] is None
    assert c["esft_token_beats_random"]["held_in"] == 0


def test_overlap_is_judged_against_random_sets_of_the_same_sizes() -> None:
    from esft_rs.demo.claims import judge

    r = _report([GOOD])
    # Random 4-of-32 sets: expected Jaccard about (4 * 4 / 32) / (8 - 0.5) = 0.067.
    assert 0.05 < r["routing"]["chance_overlap"] < 0.08
    assert r["routing"]["chance_overlap"] < r["routing"]["chance_overlap_p95"] < 0.3
    assert judge(r)["tasks_use_different_experts"]["holds"] is True
    # 0.299 against chance about 0.05 (what a fixed 0.5 threshold let pass): does not hold.
    assert judge(_report([GOOD], overlap=0.299))["tasks_use_different_experts"]["holds"] is False


def test_chance_overlap_of_full_and_disjoint_sizes() -> None:
    from esft_rs.demo.claims import chance_overlap

    assert set(chance_overlap([[(8, 8)]], 8, draws=20)) == {1.0}
    assert set(chance_overlap([[(4, 4)]], 8, draws=20)) <= {0.0, 1 / 7, 2 / 6, 3 / 5, 1.0}


def test_methods_are_the_means_of_runs() -> None:
    r = _report([GOOD, GOOD | {"fft": (0.85, 0.40)}])
    assert r["methods"]["fft"]["downstream_acc"] == pytest.approx(0.90)
    assert r["methods"]["fft"]["general_acc_after_by_task"]["a"] == pytest.approx(0.50)
    assert r["methods"]["fft"]["sd"]["downstream_acc"] == pytest.approx(0.0707, abs=1e-4)
    assert r["methods"]["fft"]["experts_trained"] is None


def test_rate_choice_takes_the_best_accuracy_then_the_lowest_loss() -> None:
    from esft_rs.demo.tuning import choose_rate

    # Accuracy first, whatever the loss.
    assert choose_rate({1e-4: (0.8, 0.1), 1e-3: (0.9, 0.5)}) == 1e-3
    # Exact match saturated at 1.0: the lower validation loss decides, not the smaller rate.
    assert choose_rate({1e-4: (0.85, 0.1), 3e-4: (1.0, 7e-4), 1e-3: (1.0, 2e-5)}) == 1e-3
    # A diverged run's loss counts as worst; a full tie goes to the smaller rate.
    assert choose_rate({1e-3: (1.0, float("nan")), 1e-2: (1.0, 0.3)}) == 1e-2
    assert choose_rate({1e-2: (1.0, 0.0), 1e-3: (1.0, 0.0)}) == 1e-3
    with pytest.raises(ValueError):
        choose_rate({})


def test_every_method_searches_the_same_rates() -> None:
    from esft_rs.demo.settings import FULL

    grids = {tuple(sorted(g)) for g in FULL.learning_rates.values()}
    assert len(grids) == 1 and len(next(iter(grids))) >= 3


def test_share_on_selected_experts() -> None:
    import numpy as np

    from esft_rs.demo.report import share_on_selected
    from esft_rs.routing import RoutingStats
    from esft_rs.routing.selection import select

    def stats(counts: list[list[int]]) -> RoutingStats:
        c = np.array(counts, dtype=np.int64)
        z = np.zeros(c.shape)
        return RoutingStats([1, 2], c, z, c.sum(1), 1, 1, z, z)

    st = {"a": stats([[3, 1, 0, 0], [0, 0, 2, 2]]), "b": stats([[0, 0, 1, 1], [4, 0, 0, 0]])}
    sel = select(stats([[4, 0, 0, 0], [0, 0, 2, 2]]), score="token", top_p=0.9)
    assert sel.experts == {1: [0], 2: [2, 3]}
    out = share_on_selected(st, sel)
    # a: layer 1 puts 3/4 on expert 0, layer 2 all on 2 and 3 -> (0.75 + 1) / 2.
    assert out["by_task"] == {"a": 0.875, "b": 0.0}
    assert out["uniform"] == pytest.approx(round((1 + 2) / 8, 3))


def test_accuracy_plot_keeps_coinciding_methods_apart(tmp_path: Path) -> None:
    """ESFT-Token and random experts train the same share and may score the same: no text
    labels beside the points (they overlapped), a legend with a distinct marker each."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    from esft_rs.demo import report as demo_report

    methods = {name: {"trainable_params": share, "total_params": 100, "downstream_acc": 0.0}
               for name, share in [("fft", 100), ("esft_token", 9), ("esft_gate", 27),
                                   ("random", 9)]}
    figures = []
    with mock.patch("esft_rs.routing.plot.heatmap"), \
            mock.patch("esft_rs.routing.plot.save_figure", lambda fig, path: figures.append(fig)):
        demo_report._plots({"methods": methods, "finetune_task": "shift", "smoke": True},
                           {"token": None}, tmp_path)
    ax = figures[0].axes[0]
    assert not ax.texts  # no annotations
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["FFT", "ESFT-Token", "ESFT-Gate", "Random experts"]
    assert len({(line.get_marker(), line.get_markersize()) for line in ax.get_lines()}) == 4
    assert "shift" in ax.get_title() and "smoke" in ax.get_title()


def test_heatmap_has_a_legend_and_names_the_task(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from unittest import mock

    import numpy as np

    from esft_rs.routing import RoutingStats
    from esft_rs.routing.plot import heatmap
    from esft_rs.routing.selection import select

    c, z = np.array([[5, 1, 1, 1]]), np.zeros((1, 4))
    stats = RoutingStats([1], c, z + 1, np.array([4]), 2, 1, z, z)
    figures = []
    with mock.patch("esft_rs.routing.plot.save_figure",
                    lambda fig, path, fmt=None: figures.append(fig)):
        heatmap(select(stats, top_p=0.2), tmp_path / "h.png", task="task shift")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["selected"]
    assert ax.get_title(loc="left").startswith("task shift: token scores")


def test_a_failed_run_leaves_no_staging_folder(tmp_path: Path) -> None:
    """A run that fails (a full disk) fails the demo; the others stop before its staging
    folder is removed, so none of them writes into it again (one was left behind): every
    worker process has ended when the demo fails."""
    import errno

    from demo_fakes import DiskFullFineTune
    from esft_rs.demo.runs import fine_tune
    from esft_rs.files.outputs import staged

    pids = tmp_path / "pids"
    pids.mkdir()
    with pytest.raises(OSError) as info, staged(tmp_path / "demo-out", directory=True) as tmp:
        fine_tune(DiskFullFineTune(tmp / "runs", pids), [0, 1], jobs=2, progress=False)
    assert info.value.errno == errno.ENOSPC
    workers = [int(p.name) for p in pids.iterdir()]
    assert len(workers) == 2, workers  # FFT's and the late writer's
    assert not [pid for pid in workers if _alive(pid)], workers
    assert list(tmp_path.iterdir()) == [pids]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

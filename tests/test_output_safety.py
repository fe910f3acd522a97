"""Outputs never land on inputs and appear whole or not at all, in every command (docs/outputs.md).

Interruptions are deterministic: ``ESFT_RS_TEST_INTERRUPT=SIGNAL@commit:NAME`` makes the
process signal itself just before it commits the output named NAME.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
from pathlib import Path

import pytest

import cli_runner
from conftest import CLI
from esft_rs import _core
from esft_rs.files.outputs import staged
from esft_rs.models import init_model, save_model
from train_fakes import plus_chat

EXPERTS = {"experts": {"1": [0, 5], "2": [3]}, "shared_experts": False,
           "non_expert_modules": False}


def quick(steps: int = 4, save_steps: int = 1) -> list[str]:
    """Training flags for a few steps of the tiny model on CPU."""
    return ["--steps", str(steps), "--seq-length", "64", "--per-device-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--eval-steps", "100", "--save-steps",
            str(save_steps), "--logging-steps", "1", "--learning-rate", "1e-3", "--device", "cpu",
            "--no-gradient-checkpointing"]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): file bytes hashed, directories listed."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def cli(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return cli_runner.run(list(map(str, args)), env={**os.environ, **(env or {})}, cwd=cwd)


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.rglob("*") if "esft-staging" in p.name)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace: a tiny model, task data, an expert config, routing stats, an adapter."""
    root = tmp_path_factory.mktemp("ws")
    save_model(init_model("tiny", seed=0), root / "model")
    (root / "data.jsonl").write_text(plus_chat(6, 4))
    (root / "experts.json").write_text(json.dumps(EXPERTS))
    for args in (["profile", "model", "data.jsonl", "-o", "routing.safetensors", "--tokens", "64",
                  "--seq-length", "64", "--device", "cpu"],
                 ["split", "model", "--experts", "experts.json", "-o", "adapter.safetensors"]):
        proc = cli(*args, cwd=root)
        assert proc.returncode == 0, proc.stderr
    return root


# (command line, output as given, input as given); paths relative to the workspace.
TRAIN = ["train", "model", "data.jsonl", "-e", "experts.json"]
GUARD_CASES = {
    "profile-equals": (["profile", "model", "data.jsonl", "-o", "data.jsonl"], "data.jsonl",
                       "data.jsonl"),
    "profile-inside": (["profile", "model", "data.jsonl", "-o", "model/model.safetensors"],
                       "model/model.safetensors", "model"),
    "profile-records-contains": (["profile", "model", "data.jsonl", "-o", "r.safetensors",
                                  "--records", "."], ".", "model"),
    "profile-collide": (["profile", "model", "data.jsonl", "-o", "rec/r.safetensors",
                         "--records", "rec"], "rec", "rec/r.safetensors"),
    "select-equals": (["select", "routing.safetensors", "-o", "routing.safetensors"],
                      "routing.safetensors", "routing.safetensors"),
    "select-inside": (["select", "routing.safetensors", "-o", "routing.safetensors/x.json"],
                      "routing.safetensors/x.json", "routing.safetensors"),
    "select-collide": (["select", "routing.safetensors", "-o", "x.json", "--summary", "x.json"],
                       "x.json", "x.json"),
    "select-collide-dotdot": (["select", "routing.safetensors", "-o", "x.json", "--summary",
                               "model/../x.json"], "x.json", "model/../x.json"),
    "eval-equals": (["eval", "model", "data.jsonl", "-o", "data.jsonl"], "data.jsonl",
                    "data.jsonl"),
    "eval-inside": (["eval", "model", "data.jsonl", "-o", "model/config.json"],
                    "model/config.json", "model"),
    "train-equals": ([*TRAIN, "-o", "model"], "model", "model"),
    "train-inside": ([*TRAIN, "-o", "model/run"], "model/run", "model"),
    "train-contains": (["train", "model", "data.jsonl", "-e", "run/expert_cfg.json", "-o", "run",
                        "--mode", "random"], "run", "run/expert_cfg.json"),
    "train-collide": ([*TRAIN, "-o", "run", "--save-merged", "run/merged"], "run",
                      "run/merged"),
    "train-merged-equals-base": ([*TRAIN, "-o", "run", "--save-merged", "model"], "model",
                                 "model"),
    "merge-equals": (["merge", "model", "adapter.safetensors", "-o", "model", "--overwrite"],
                     "model", "model"),
    "merge-inside": (["merge", "model", "adapter.safetensors", "-o", "model/merged"],
                     "model/merged", "model"),
    "merge-contains": (["merge", "model", "adapter.safetensors", "-o", ".", "--overwrite"], ".",
                       "model"),
    "split-equals": (["split", "model", "--experts", "experts.json", "-o", "experts.json",
                      "--overwrite"], "experts.json", "experts.json"),
    "split-inside": (["split", "model", "--experts", "experts.json", "-o", "model/a.safetensors"],
                     "model/a.safetensors", "model"),
    "split-contains": (["split", "model", "--experts", "experts.json", "-o", ".", "--overwrite"],
                       ".", "model"),
}


@pytest.mark.parametrize("case", GUARD_CASES)
def test_guard_refuses_before_any_work(ws: Path, case: str) -> None:
    (ws / "run").mkdir(exist_ok=True)
    (ws / "run" / "expert_cfg.json").write_text(json.dumps(EXPERTS))
    args, out, inp = GUARD_CASES[case]
    before = snapshot(ws)
    proc = cli(*args, cwd=ws)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esft-rs: error: "), proc.stderr
    assert out in lines[0] and inp in lines[0], lines[0]
    assert snapshot(ws) == before  # inputs byte-identical, nothing new on disk


def test_symlinked_output_into_an_input_is_refused(ws: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(ws)
    before = snapshot(ws)
    proc = cli("select", ws / "routing.safetensors", "-o",
               tmp_path / "link" / "model" / ".." / "routing.safetensors")
    assert proc.returncode == 2 and "lie inside the input" in proc.stderr
    assert snapshot(ws) == before


def test_overwrite_replaces_only_esft_outputs(ws: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.safetensors").write_text("not a tensor file")
    before = snapshot(tmp_path)
    proc = cli("merge", ws / "model", ws / "adapter.safetensors", "-o", mine, "--overwrite")
    assert proc.returncode == 2 and "thesis.tex" in proc.stderr and "did not write" in proc.stderr
    proc = cli("split", ws / "model", "--experts", ws / "experts.json", "-o",
               tmp_path / "notes.safetensors", "--overwrite")
    assert proc.returncode == 2 and "a text file of 17 bytes" in proc.stderr, proc.stderr
    proc = cli("select", ws / "routing.safetensors", "-o", tmp_path / "notes.safetensors")
    assert proc.returncode == 2 and "did not write" in proc.stderr
    assert snapshot(tmp_path) == before
    # Its own earlier output is replaced, with the base's other files beside it.
    out = tmp_path / "merged"
    for _ in range(2):
        proc = cli("merge", ws / "model", ws / "adapter.safetensors", "-o", out, "--overwrite")
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_init_model_force_leaves_no_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert cli("init-model", "-o", out).returncode == 0
    # An earlier sharded model in the same folder: its index and shards must go.
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (out / "model-00001-of-00002.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    proc = cli("init-model", "-o", out)
    assert proc.returncode == 2 and "--force" in proc.stderr
    proc = cli("init-model", "-o", out, "--force", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert hidden(tmp_path) == []
    (out / "notes.txt").write_text("mine")
    proc = cli("init-model", "-o", out, "--force")
    assert proc.returncode == 2 and "notes.txt" in proc.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_outputs_get_the_umask(ws: Path, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert cli("init-model", "-o", tmp_path / "m").returncode == 0
        proc = cli("train", ws / "model", ws / "data.jsonl", "-e", ws / "experts.json", "-o",
                   tmp_path / "run", *quick(steps=2))
        assert proc.returncode == 0, proc.stderr
        assert cli("merge", ws / "model", ws / "adapter.safetensors", "-o",
                   tmp_path / "merged").returncode == 0
        assert cli("select", ws / "routing.safetensors", "-o", tmp_path / "e.json").returncode == 0
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 8
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    for d in (p for p in tmp_path.rglob("*") if p.is_dir()):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d


# --- interruptions: SIGKILL or Ctrl-C just before an output is committed ---

def interrupted(sig: str, point: str, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    proc = cli(*args, env={"ESFT_RS_TEST_INTERRUPT": f"{sig}@commit:{point}"}, cwd=cwd)
    if sig == "KILL":
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    else:
        assert proc.returncode == 130, proc.stderr
        assert "Traceback" not in proc.stderr
    return proc


@pytest.mark.parametrize("sig", ["KILL", "INT"])
@pytest.mark.parametrize("point", ["x.json", "s.json"])
def test_interrupted_select(ws: Path, tmp_path: Path, sig: str, point: str) -> None:
    before = snapshot(ws)
    args = ["select", ws / "routing.safetensors", "-o", "x.json", "--summary", "s.json"]
    interrupted(sig, point, *args, cwd=tmp_path)
    assert not (tmp_path / point).exists()  # nothing under the final name
    if sig == "INT":
        assert hidden(tmp_path) == []  # Ctrl-C cleans up
    assert cli(*args, cwd=tmp_path).returncode == 0  # a re-run succeeds and clears leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "x.json"]
    assert snapshot(ws) == before


@pytest.mark.parametrize("sig", ["KILL", "INT"])
@pytest.mark.parametrize("point", ["r.safetensors", "rec"])
def test_interrupted_profile(ws: Path, tmp_path: Path, sig: str, point: str) -> None:
    args = ["profile", ws / "model", ws / "data.jsonl", "-o", "r.safetensors", "--records", "rec",
            "--tokens", "64", "--seq-length", "64", "--device", "cpu"]
    interrupted(sig, point, *args, cwd=tmp_path)
    assert not (tmp_path / point).exists()
    if sig == "INT":
        assert hidden(tmp_path) == []
    assert cli(*args, cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors", "rec"]


@pytest.mark.parametrize("sig", ["KILL", "INT"])
@pytest.mark.parametrize("point", ["step-2", "metrics.jsonl", "adapter.safetensors"])
def test_interrupted_train_resumes(ws: Path, tmp_path: Path, sig: str, point: str) -> None:
    before = snapshot(ws)
    out = tmp_path / "run"
    args = ["train", ws / "model", ws / "data.jsonl", "-e", ws / "experts.json", "-o", out,
            *quick()]
    interrupted(sig, point, *args, cwd=tmp_path)
    assert not (out / "adapter.safetensors").exists()
    if point == "step-2":  # the checkpoint before stays whole
        assert sorted(p.name for p in (out / "checkpoints").iterdir()
                      if not p.name.startswith(".")) == ["step-1"]
    if (out / "metrics.jsonl").exists():  # absent when its first write was interrupted
        for line in (out / "metrics.jsonl").read_text().splitlines():
            json.loads(line)  # never half a record
    proc = cli(*args, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "adapter.safetensors").is_file() and hidden(tmp_path) == []
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert snapshot(ws) == before


def test_failed_fresh_train_leaves_no_folder(ws: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", ws / "model", ws / "data.jsonl", "-e", ws / "experts.json", "-o", out,
            *quick(save_steps=100)]
    interrupted("INT", "metrics.jsonl", *args, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", ["KILL", "INT"])
def test_interrupted_merge(ws: Path, tmp_path: Path, sig: str) -> None:
    before = snapshot(ws)
    args = ["merge", ws / "model", ws / "adapter.safetensors", "-o", "out", "--overwrite"]
    assert cli(*args, cwd=tmp_path).returncode == 0
    good = snapshot(tmp_path)
    interrupted(sig, "out", *args, cwd=tmp_path)
    # The earlier output is untouched; a killed run leaves only its hidden staging copy.
    assert {k: v for k, v in snapshot(tmp_path).items() if "esft-staging" not in k} == good
    if sig == "INT":
        assert hidden(tmp_path) == []
    assert cli(*args, cwd=tmp_path).returncode == 0
    assert snapshot(tmp_path) == good  # the re-run clears what the killed one left
    assert snapshot(ws) == before


# --- concurrency ---

def test_concurrent_merges_always_leave_a_whole_output(ws: Path, tmp_path: Path) -> None:
    args = ["merge", ws / "model", ws / "adapter.safetensors", "-o", "out", "--overwrite"]
    assert cli(*args, cwd=tmp_path).returncode == 0
    good = snapshot(tmp_path)
    for _ in range(4):
        procs = [subprocess.Popen([*CLI, *map(str, args)], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
        assert snapshot(tmp_path) == good  # complete, and nothing hidden left


def test_concurrent_commits_never_leave_the_target_missing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    stop = threading.Event()
    missing = []

    def writer(n: int) -> None:
        for i in range(200):
            with staged(target, directory=True) as tmp:
                (tmp / "config.json").write_text(json.dumps([n, i]))

    def watcher() -> None:
        while not stop.is_set():
            if target.exists() and not (target / "config.json").is_file():
                missing.append(True)

    with staged(target, directory=True) as tmp:
        (tmp / "config.json").write_text("[]")
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    watch = threading.Thread(target=watcher)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watch.join()
    assert not missing and sorted(os.listdir(tmp_path)) == ["out"]


def test_staging_names_are_unique_per_run(tmp_path: Path) -> None:
    a, b = _core.Staging(tmp_path / "out"), _core.Staging(tmp_path / "out")
    assert a.path != b.path and _core.STAGING_MARK in Path(a.path).name
    a.discard()
    b.discard()


# Each command replaces only its own kind of output, recognised by content.
FOREIGN_CASES = {
    "eval-onto-adapter": (["eval", "model", "data.jsonl", "--device", "cpu", "-o"],
                          "adapter.safetensors", "eval figures"),
    "eval-onto-expert-config": (["eval", "model", "data.jsonl", "--device", "cpu", "-o"],
                                "experts.json", "eval figures"),
    "profile-onto-adapter": (["profile", "model", "data.jsonl", "--tokens", "64",
                              "--seq-length", "64", "--device", "cpu", "-o"],
                             "adapter.safetensors", "a routing-stats file"),
    "select-onto-adapter": (["select", "routing.safetensors", "-o"], "adapter.safetensors",
                            "an expert config"),
    "select-onto-another-routing": (["select", "routing.safetensors", "-o"],
                                    "other-task.safetensors", "an expert config"),
    "select-summary-onto-adapter": (["select", "routing.safetensors", "-o", "e2.json",
                                     "--summary"], "adapter.safetensors", "a summary.json"),
    "select-plot-onto-a-png": (["select", "routing.safetensors", "-o", "e2.json", "--plot"],
                               "mine.png", "a plot"),
    # --overwrite replaces an adapter only, not any safetensors file
    "split-overwrite-onto-routing": (["split", "model", "--experts", "experts.json",
                                      "--overwrite", "-o"], "other-task.safetensors",
                                     "an adapter"),
}


@pytest.mark.parametrize("case", list(FOREIGN_CASES))
def test_a_command_replaces_only_its_own_kind_of_output(ws: Path, tmp_path: Path,
                                                        case: str) -> None:
    args, target, kind = FOREIGN_CASES[case]
    here = tmp_path / "ws"
    shutil.copytree(ws, here)
    (here / "mine.png").write_bytes(b"\x89PNG\r\n\x1a\n a user's picture")
    shutil.copy(here / "routing.safetensors", here / "other-task.safetensors")
    before = snapshot(here)
    proc = cli(*args, target, cwd=here)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"esft-rs: error: {target}: is not {kind}")
    assert "not replaced" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert snapshot(here) == before


def test_own_outputs_are_replaced_on_a_rerun(ws: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    args = ["select", ws / "routing.safetensors", "-o", tmp_path / "e.json", "--summary",
            tmp_path / "s.json", "--plot", tmp_path / "h.png"]
    for _ in range(2):
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr
    for _ in range(2):
        proc = cli("eval", ws / "model", ws / "data.jsonl", "--device", "cpu", "-o",
                   tmp_path / "f.json")
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("length", [215, 240, 255])
def test_output_names_up_to_the_file_name_limit(ws: Path, tmp_path: Path, length: int) -> None:
    """A staging name holds at most 120 bytes of the output's name, so any name the file
    system takes can be written (215-255 bytes failed with 'File name too long', naming
    the hidden staging path)."""
    name = "e" * (length - len(".json")) + ".json"
    for _ in range(2):  # written, then replaced
        proc = cli("select", ws / "routing.safetensors", "-o", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == [name]

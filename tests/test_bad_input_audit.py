"""Bad input found by an adversarial audit of every command: each gives one error line
naming the file, exit code 2, and leaves the inputs and the output folder as they were."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import cli_runner
import esft_rs
import forked_ranks
from conftest import free_port, run_cli
from esft_rs.errors import InvalidFileError
from esft_rs.models import init_model, load_model, save_model
from train_fakes import plus_chat


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    save_model(init_model("tiny"), root / "base")
    (root / "task.jsonl").write_text(plus_chat(4, 4))
    (root / "cfg.json").write_text(json.dumps(
        {"experts": {"1": [0], "2": [1], "3": [2]}, "shared_experts": False,
         "non_expert_modules": False}))
    rng = np.random.default_rng(0)
    esft_rs.aggregate(rng.integers(0, 16, (3, 64, 4)), rng.random((3, 64, 4)),
                      num_experts=16).save(root / "routing.safetensors")
    return root


def model_with(ws: Path, tmp_path: Path, **changes: object) -> Path:
    """A copy of the tiny model whose config.json has ``changes`` (None deletes a key)."""
    out = tmp_path / "m"
    save_model(init_model("tiny"), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def one_error(proc: object, *names: object) -> str:
    """The single stderr line of a failed command (exit 2), naming each of ``names``."""
    assert proc.returncode == 2, proc.stderr  # type: ignore[attr-defined]
    lines = proc.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("esft-rs: error: "), lines
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def listing(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*")) if not p.is_fifo()}


@pytest.mark.parametrize("key, value", [("hidden_size", 10**12), ("vocab_size", 2**62)])
def test_config_sizes_no_allocator_can_meet_are_one_line(ws: Path, tmp_path: Path, key: str,
                                                         value: int) -> None:
    model = model_with(ws, tmp_path, **{key: value})
    with pytest.raises(InvalidFileError) as info:
        load_model(model)
    assert info.value.path == str(model / "config.json")
    assert "\n" not in str(info.value)
    if key == "hidden_size":
        before = listing(tmp_path)
        proc = run_cli("eval", model, ws / "task.jsonl", "--device", "cpu",
                       "-o", tmp_path / "e.json")
        one_error(proc, model / "config.json", "cannot be built")
        assert listing(tmp_path) == before


@pytest.mark.parametrize("key, value", [("rope_theta", math.nan), ("rms_norm_eps", math.inf),
                                        ("rms_norm_eps", 0.0), ("routed_scaling_factor",
                                                                -math.inf)])
def test_config_floats_must_be_finite(ws: Path, tmp_path: Path, key: str, value: float) -> None:
    # json writes NaN and Infinity, and Python's json reads them back: a model that
    # computes NaN (profile wrote stats, eval a NaN loss, train crashed in backward).
    model = model_with(ws, tmp_path, **{key: value})
    # refused as JSON now (NaN and Infinity are not JSON), before the key's own check
    with pytest.raises(InvalidFileError, match=rf"config.json: (not valid JSON \(-?(NaN|Infinity)"
                                               rf" is not a JSON number\)|{key} must be)"):
        load_model(model)


@pytest.mark.parametrize("bad", ["fifo", "duplicate"])
def test_plan_reads_config_json_strictly(ws: Path, tmp_path: Path, bad: str) -> None:
    model = model_with(ws, tmp_path)
    config = model / "config.json"
    if bad == "fifo":  # plan opened it with read_bytes(): blocked forever
        config.unlink()
        os.mkfifo(config)
    else:  # a duplicate key was silently resolved to its last value
        config.write_text(config.read_text().replace('"vocab_size": 259,',
                                                      '"vocab_size": 259, "vocab_size": 3,'))
    proc = run_cli("plan", model, "-e", ws / "cfg.json", timeout=60)  # a hang fails, not blocks
    one_error(proc, config, "named pipe" if bad == "fifo" else "duplicate key 'vocab_size'")


def test_model_config_that_is_a_pipe_is_named_so(ws: Path, tmp_path: Path) -> None:
    model = model_with(ws, tmp_path)
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    proc = run_cli("profile", model, ws / "task.jsonl", "-o", tmp_path / "r.safetensors",
                   "--device", "cpu")
    one_error(proc, model / "config.json", "is a named pipe")
    assert not (tmp_path / "r.safetensors").exists()


def test_corrupt_gzip_data_is_one_line(ws: Path, tmp_path: Path) -> None:
    import gzip

    from esft_rs.data import read_task_data

    packed = bytearray(gzip.compress((ws / "task.jsonl").read_bytes()))
    packed[20:40] = b"\xff" * 20  # a valid gzip header over a broken deflate stream
    data = tmp_path / "d.jsonl.gz"
    data.write_bytes(bytes(packed))
    with pytest.raises(InvalidFileError, match=r"d\.jsonl\.gz: not a valid gzip file") as info:
        read_task_data(data)  # was zlib.error, which no caller catches
    assert info.value.path == str(data)


@pytest.mark.parametrize("flag, value", [("--gpu-memory", "0"), ("--seq-length", str(2**40))])
def test_plan_refuses_sizes_no_run_can_have(ws: Path, flag: str, value: str) -> None:
    # were "does NOT fit in 0 B" and a 6e20-GiB activation estimate; train refuses them too
    one_error(run_cli("plan", ws / "base", "-e", ws / "cfg.json", flag, value), flag)


def alias_bomb(keys: list[str]) -> str:
    """YAML whose every key holds nine aliases of the previous one ("billion laughs")."""
    lines, prev = [], "1"
    for i, key in enumerate(keys):
        lines.append(f"{key}: &a{i} [{', '.join([prev] * 9)}]")
        prev = f"*a{i}"
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_read_once_and_reported_briefly(tmp_path: Path) -> None:
    from esft_rs.training.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(alias_bomb([f"k{i}" for i in range(9)]))  # 9**9 references
    probe = f"from esft_rs.files.inputs import load_yaml; load_yaml({str(path)!r})"
    # the depth check walked every one of them (minutes); a hang fails here
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
    path.write_text(alias_bomb(["optim", "n_device", "ep_size", "seed"]))
    with pytest.raises(InvalidFileError, match="seed must be int") as info:
        load_config(path)
    assert len(str(info.value)) < 300  # shown briefly, not as thousands of items


def test_missing_file_reads_file_colon_problem(ws: Path, tmp_path: Path) -> None:
    proc = run_cli("train", ws / "base", ws / "task.jsonl", "-e", ws / "cfg.json",
                   "-o", tmp_path / "out", "-c", tmp_path / "nope.yaml")
    line = one_error(proc, f"{tmp_path / 'nope.yaml'}: No such file or directory")
    assert "[Errno" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["demo", "select-config", "profile-weights", "eval-config"])
def test_commands_without_overwrite_never_replace_a_model(ws: Path, tmp_path: Path,
                                                          command: str) -> None:
    # A model that is not an input of the command: `demo -o mymodel` deleted it whole.
    other = tmp_path / "other"
    save_model(init_model("tiny", seed=1), other)
    before = listing(tmp_path)
    args = {
        "demo": ("demo", "--quick", "-o", other),
        "select-config": ("select", ws / "routing.safetensors", "-o", other / "config.json"),
        "profile-weights": ("profile", ws / "base", ws / "task.jsonl", "--device", "cpu",
                            "-o", other / "model.safetensors"),
        "eval-config": ("eval", ws / "base", ws / "task.jsonl", "--device", "cpu",
                        "-o", other / "config.json"),
    }[command]
    one_error(run_cli(*args), other, "model checkpoint")
    assert listing(tmp_path) == before


def as_unprivileged() -> Callable[[], None] | None:
    """A ``preexec`` that runs a command as a user a read-only folder applies to (root
    ignores it)."""
    return cli_runner.nobody if os.geteuid() == 0 else None


@pytest.mark.parametrize("command", ["select", "split"])
def test_read_only_output_folder_is_named_before_any_work(ws: Path, command: str) -> None:
    preexec = as_unprivileged()
    root = Path(tempfile.mkdtemp())
    try:
        root.chmod(0o755)
        shutil.copy(ws / "routing.safetensors", root)
        shutil.copy(ws / "cfg.json", root)
        shutil.copytree(ws / "base", root / "base")
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (root / "ro").mkdir(mode=0o555)
        (root / "ro").chmod(0o555)
        args = {"select": ["select", "routing.safetensors", "-o", "ro/x.json"],
                "split": ["split", "base", "--experts", "cfg.json", "-o", "ro/a.safetensors"]}
        proc = run_cli(*args[command], timeout=300, cwd=root, preexec=preexec)
        # was: the selection table, then a hidden staging name (.x.json.esft-staging...)
        assert proc.stdout == ""
        line = one_error(proc, "ro: Permission denied")
        assert "staging" not in line
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("command", ["init-model", "profile-records", "train"])
def test_a_full_disk_is_one_line_naming_the_output(ws: Path, tmp_path: Path,
                                                   command: str) -> None:
    # init-model and train raised a SafetensorError / torch RuntimeError traceback; profile
    # said "1280 requested and 112 written", naming no file
    args = {
        "init-model": ["init-model", "-o", tmp_path / "m"],
        "profile-records": ["profile", ws / "base", ws / "task.jsonl", "--device", "cpu",
                             "--tokens", "64", "--seq-length", "32", "-o",
                             tmp_path / "r.safetensors",
                             "--records", tmp_path / "rec"],
        "train": ["train", ws / "base", ws / "task.jsonl", "-e", ws / "cfg.json", "-o",
                   tmp_path / "out", "--steps", "2", "--save-steps", "1", "--seq-length", "32",
                   "--per-device-batch-size", "1", "--gradient-accumulation-steps", "1",
                   "--val-ratio", "0", "--device", "cpu"],
    }[command]
    # a "disk" full after 1 KiB
    proc = run_cli(*args, timeout=300, preexec=functools.partial(cli_runner.file_size_limit, 1024))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"esft-rs: error: {tmp_path}/") and "staging" not in line, line
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_inputs_read_in_python_are_esft_errors(ws: Path, tmp_path: Path) -> None:
    import errno

    from esft_rs.data import read_task_data
    from esft_rs.errors import EsftError, EsftFileNotFoundError
    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.training.config import load_config

    missing = tmp_path / "nope"
    # were plain FileNotFoundErrors: an `except esft_rs.EsftError` did not catch them
    for read in (read_task_data, ExpertConfig.load, load_config):
        with pytest.raises(EsftFileNotFoundError) as info:
            read(missing)
        e = info.value
        assert isinstance(e, EsftError) and isinstance(e, FileNotFoundError)
        assert e.errno == errno.ENOENT and e.filename == str(missing) and e.path == str(missing)


def test_training_when_no_token_reaches_a_trained_expert(ws: Path, tmp_path: Path) -> None:
    import torch

    # Zero routers tie every expert; top-k takes the lowest ids, so expert 15 gets no token.
    model = init_model("tiny")
    with torch.no_grad():
        for router in model.routers().values():
            router.weight.zero_()
    save_model(model, tmp_path / "m")
    cfg = tmp_path / "e.json"
    cfg.write_text(json.dumps({"experts": {"1": [15], "2": [15], "3": [15]},
                               "shared_experts": False, "non_expert_modules": False}))
    # was: RuntimeError "element 0 of tensors does not require grad" from backward
    result = esft_rs.train(tmp_path / "m", ws / "task.jsonl", tmp_path / "out", cfg, steps=2,
                           seq_length=32, per_device_batch_size=1, gradient_accumulation_steps=1,
                           val_ratio=0.0, device="cpu")
    assert result.fit.train_loss is not None and math.isfinite(result.fit.train_loss)
    assert (tmp_path / "out" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("bad", ["syntax", "fifo"])
def test_chat_template_file_problems_name_the_file(tmp_path: Path, bad: str) -> None:
    from esft_rs.data.chat_template import read_template

    path = tmp_path / "t.jinja"
    if bad == "syntax":  # was "chat template: unexpected end of template", naming no file
        path.write_text("{% for m in messages %}{{ m.content")
    else:  # was read with Path.read_text(): blocked forever on a pipe
        os.mkfifo(path)
    with pytest.raises(InvalidFileError) as info:
        read_template(path)
    assert str(info.value).startswith(f"{path}: ") and info.value.path == str(path)


@pytest.mark.parametrize("command", ["eval", "train"])
@pytest.mark.parametrize("device, why", [("meta", "holds no data"),
                                         ("gpu9", "is not a torch device")])
def test_bad_devices_are_refused_in_one_line(ws: Path, tmp_path: Path, command: str,
                                             device: str, why: str) -> None:
    # eval --device meta: a SafetensorError traceback once the model loaded;
    # train --device gpu9 (or cuda without a GPU): a RuntimeError traceback
    args = (["eval", ws / "base", ws / "task.jsonl"] if command == "eval" else
            ["train", ws / "base", ws / "task.jsonl", "-e", ws / "cfg.json", "-o",
             tmp_path / "out"])
    one_error(run_cli(*args, "--device", device), f"'{device}' {why}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig, point", [("INT", "r.safetensors"), ("KILL", "r.safetensors"),
                                        ("INT", "rec")])
def test_profile_outputs_commit_together_keeping_earlier_ones(ws: Path, tmp_path: Path, sig: str,
                                                              point: str) -> None:
    def profile(tokens: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        args = ["profile", ws / "base", ws / "task.jsonl", "--device", "cpu", "--seq-length", "32",
                "--tokens", str(tokens), "-o", tmp_path / "r.safetensors",
                "--records", tmp_path / "rec"]
        return run_cli(*args, timeout=300, env={**os.environ, **(env or {})})

    assert profile(32).returncode == 0
    before = listing(tmp_path)
    # The stats file fails as it is committed: the records of the run were already in
    # place, so the earlier records were lost (replaced by ones without their stats file).
    proc = profile(64, {"ESFT_RS_TEST_INTERRUPT": f"{sig}@commit:{point}"})
    assert proc.returncode == (130 if sig == "INT" else -9), proc.stderr
    assert {k: v for k, v in listing(tmp_path).items() if "esft-staging" not in k} == before
    assert profile(64).returncode == 0  # a re-run replaces both and clears what a kill left
    after = listing(tmp_path)
    assert sorted(after) == sorted(before) and after != before


def fake_run(out: Path, world: int, parallelism: str, reaching_rows: int) -> list[dict]:
    """4 steps of FakeMoE training the one expert per layer that a sequence of token 5 never
    reaches, on 8 rows of which the first ``reaching_rows`` are varied (global batch 4:
    1 row per process and micro-step at 2 processes); the metrics of each step."""

    from esft_rs.files.expert_config import ExpertConfig
    from train_fakes import FakeMoE, constant_routes, ddp_rank, fake_data

    missed = {layer: min(set(range(4)) - used)
              for layer, used in constant_routes(FakeMoE(), 5).items()}
    data = fake_data(n=8, seq=12)
    data["input_ids"][reaching_rows:] = 5
    data["labels"] = data["input_ids"].clone()
    data["labels"][:, :3] = -100
    args = (FakeMoE(), data, out, ExpertConfig({k: [e] for k, e in missed.items()}))
    kw = dict(steps=4, seq_length=12, gradient_accumulation_steps=2, eval_steps=100,
              save_steps=100, logging_steps=1, learning_rate=1e-4, val_ratio=0.0,
              gradient_checkpointing=False, device="cpu", parallelism=parallelism,
              per_device_batch_size=2 // world)
    if world == 1:
        esft_rs.train(*args, progress=False, **kw)
    else:
        port = free_port()
        forked_ranks.spawn(ddp_rank, args=(world, port, args, kw), nprocs=world)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
@pytest.mark.parametrize("reaching_rows", [2, 0])
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_torchrun_rank_whose_tokens_reach_no_trained_expert(tmp_path: Path, parallelism: str,
                                                            reaching_rows: int) -> None:
    # DDP: "element 0 of tensors does not require grad" on the rank whose micro-batch
    # reaches no trained expert (skipping its backward would leave the others' gradient
    # all-reduce waiting). Such a micro-batch adds nothing, as in one process.
    from safetensors.torch import load_file

    one = fake_run(tmp_path / "one", 1, parallelism, reaching_rows)
    two = fake_run(tmp_path / "two", 2, parallelism, reaching_rows)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        # Step 1 starts from the same weights; after it Adam moves the entries whose
        # gradient is rounding noise by a whole step either way, so later steps drift.
        tol = 1e-5 if a["step"] == 1 else 1e-2
        assert math.isclose(a["loss"], b["loss"], rel_tol=tol / 10), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=tol, abs_tol=1e-12), (a, b)
    if reaching_rows == 0:  # nothing ever reached them: trained tensors as they were
        assert all(r["grad_norm"] == 0 for r in two)
        x, y = (load_file(p / "adapter.safetensors") for p in (tmp_path / "one", tmp_path / "two"))
        assert all(torch_equal(x[k], y[k]) for k in x)


def torch_equal(a: object, b: object) -> bool:
    import torch

    return bool(torch.equal(a, b))  # type: ignore[arg-type]


BOM = b"\xef\xbb\xbf"


def with_bom(path: Path) -> Path:
    path.write_bytes(BOM + path.read_bytes())
    return path


def test_json_inputs_may_start_with_a_byte_order_mark(ws: Path, tmp_path: Path) -> None:
    # Windows editors write one; Python's json ("Unexpected UTF-8 BOM"), serde and the
    # tokenizers library ("expected value at line 1 column 1") refused every such file.
    import gzip

    from safetensors import safe_open

    from esft_rs.data import read_task_data
    from esft_rs.data.tokenizer import load_tokenizer
    from esft_rs.files.expert_config import ExpertConfig
    from test_tokenizer import hf_dir

    model = tmp_path / "m"
    save_model(init_model("tiny"), model)
    with safe_open(model / "model.safetensors", "np") as f:
        names = list(f.keys())
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}))
    for p in (model / "config.json", model / "model.safetensors.index.json"):
        with_bom(p)
    cfg = tmp_path / "cfg.json"
    cfg.write_bytes(BOM + (ws / "cfg.json").read_bytes())
    data = tmp_path / "d.jsonl"
    data.write_bytes(BOM + (ws / "task.jsonl").read_bytes())
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(data.read_bytes()))
    before = listing(tmp_path)

    assert load_model(model).config.vocab_size == init_model("tiny").config.vocab_size
    assert ExpertConfig.load(cfg) == ExpertConfig.load(ws / "cfg.json")
    want = read_task_data(ws / "task.jsonl").conversations
    for d in (data, tmp_path / "d.jsonl.gz"):
        assert read_task_data(d).conversations == want
    out = tmp_path / "out"
    out.mkdir()
    for args in (["plan", model, "-e", cfg],
                 ["split", model, "--experts", cfg, "-o", out / "a.safetensors"],  # Rust reads
                 ["merge", model, out / "a.safetensors", "-o", out / "merged"],
                 ["profile", model, data, "--device", "cpu", "--tokens", "32", "--seq-length", "32",
                  "-o", out / "r.safetensors"]):
        proc = run_cli(*args)
        assert proc.returncode == 0, (args[0], proc.stderr)
    assert {k: v for k, v in listing(tmp_path).items() if not k.startswith("out")} == before

    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = load_tokenizer(hf_dir(tmp_path / "a", special))
    marked = hf_dir(tmp_path / "b", special)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with_bom(marked / name)
    tok = load_tokenizer(marked)
    assert (tok.bos, tok.eos, tok.pad) == (plain.bos, plain.eos, plain.pad)
    assert tok.encode("hello world") == plain.encode("hello world")


def test_transformers_config_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from esft_rs.models import hf
    from esft_rs.models.hf_shards import meta
    from hf_tiny import save

    root = save("qwen3_moe", tmp_path / "q")
    want = hf.load(root).state_dict()
    with_bom(root / "config.json")  # transformers' own reader refuses it
    got = hf.load(root).state_dict()
    assert list(got) == list(want) and all(bool((got[k] == want[k]).all()) for k in want)
    assert meta(root).config.num_experts == hf.config(root).num_experts


def test_merge_copies_files_whose_names_are_not_utf8_under_their_own_name(
        ws: Path, tmp_path: Path) -> None:
    # was copied as "n\ufffd.txt": a file of the base renamed in the merged model
    base = tmp_path / "base"
    shutil.copytree(ws / "base", base)
    odd = os.fsdecode(b"n\xff.txt")
    (base / odd).write_bytes(b"kept")
    assert run_cli("split", base, "--experts", ws / "cfg.json", "-o",
                   tmp_path / "a.safetensors").returncode == 0
    proc = run_cli("merge", base, tmp_path / "a.safetensors", "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(base))
    assert (tmp_path / "out" / odd).read_bytes() == b"kept"


@pytest.mark.parametrize("command", ["init-model", "merge", "demo", "train", "split"])
def test_a_file_never_replaces_a_directory_or_back(ws: Path, tmp_path: Path, command: str) -> None:
    # init-model/merge/demo replaced a routing-stats file with a model folder, split an
    # empty folder with a file; train named nothing ("File exists") once the model was read
    (tmp_path / "r.safetensors").write_bytes((ws / "routing.safetensors").read_bytes())
    (tmp_path / "folder").mkdir()
    stats, folder = tmp_path / "r.safetensors", tmp_path / "folder"
    if command == "merge":
        run_cli("split", ws / "base", "--experts", ws / "cfg.json", "-o",
                tmp_path / "a.safetensors", check=True)
    args, target = {
        "init-model": (["init-model", "--force", "-o", stats], stats),
        "merge": (["merge", ws / "base", tmp_path / "a.safetensors", "--overwrite", "-o", stats],
                  stats),
        "demo": (["demo", "--quick", "-o", stats], stats),
        "train": (["train", ws / "base", ws / "task.jsonl", "-e", ws / "cfg.json", "--device",
                   "cpu", "--steps", "1", "--seq-length", "32", "--val-ratio", "0",
                   "--gradient-accumulation-steps", "1", "-o", stats], stats),
        "split": (["split", ws / "base", "--experts", ws / "cfg.json", "--overwrite",
                   "-o", folder], folder),
    }[command]
    before = listing(tmp_path)
    kinds = "a directory, and this output is a file" if target == folder else (
        "a file, and this output is a directory")
    one_error(run_cli(*args), target, kinds)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("bad", ["folder", "broken link"])
def test_a_tokenizer_json_that_is_not_a_file_is_named(ws: Path, tmp_path: Path, bad: str) -> None:
    # was passed over: the byte tokenizer config.json names was used instead, silently
    model = model_with(ws, tmp_path)
    if bad == "folder":
        (model / "tokenizer.json").mkdir()
    else:
        (model / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    proc = run_cli("profile", model, ws / "task.jsonl", "--device", "cpu", "--tokens", "32",
                   "--seq-length", "32", "-o", tmp_path / "r.safetensors")
    one_error(proc, model / "tokenizer.json",
              "is a directory" if bad == "folder" else "No such file")
    assert not (tmp_path / "r.safetensors").exists()


def unprivileged_workspace(ws: Path) -> Path:
    """A copy of the workspace that an unprivileged user reads, with a read-only folder
    ``ro`` in it (the caller removes it)."""
    root = Path(tempfile.mkdtemp())
    root.chmod(0o755)
    for name in ("task.jsonl", "cfg.json"):
        shutil.copy(ws / name, root)
    shutil.copytree(ws / "base", root / "base")
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (root / "ro").mkdir(mode=0o555)
    (root / "ro").chmod(0o555)
    return root


TRAIN_SHORT = ["--steps", "2", "--seq-length", "32", "--per-device-batch-size", "1",
               "--gradient-accumulation-steps", "1", "--val-ratio", "0", "--device", "cpu"]


def train_refused(rank: int, root: str, out: str, preexec: Callable[[], None] | None) -> None:
    """In a process of its own, as ``preexec`` makes it: ``esft_rs.train`` into ``out``
    raises an EsftValueError that names it."""
    from esft_rs.errors import EsftValueError

    os.chdir(root)
    if preexec is not None:
        preexec()
    with pytest.raises(EsftValueError, match=rf"^{out}: cannot be written"):
        esft_rs.train("base", "task.jsonl", out, "cfg.json", steps=2, seq_length=32,
                      per_device_batch_size=1, gradient_accumulation_steps=1, val_ratio=0.0,
                      device="cpu", progress=False)


@pytest.mark.parametrize("out", ["ro", "ro/run"])
def test_train_into_a_read_only_folder_is_refused_before_any_work(ws: Path, out: str) -> None:
    # was: trained every step, then failed writing the first checkpoint or the adapter
    preexec = as_unprivileged()
    root = unprivileged_workspace(ws)
    try:
        proc = run_cli("train", "base", "task.jsonl", "-e", "cfg.json", "-o", out, *TRAIN_SHORT,
                       timeout=300, cwd=root, preexec=preexec)
        assert proc.stdout == ""
        line = one_error(proc, f"{out}: cannot be written")
        assert "Permission denied" in line and "staging" not in line
        assert list((root / "ro").iterdir()) == []
        # the Python API raises a ValueError subclass, before any work too
        forked_ranks.spawn(train_refused, args=(str(root), out, preexec))
    finally:
        (root / "ro").chmod(0o755)
        shutil.rmtree(root)

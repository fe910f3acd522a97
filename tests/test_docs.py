"""Docs that cannot drift: the generated reference pages match the code, and every Python
block of README.md and docs/*.md runs on its own (a fresh namespace, in a folder holding only
the inputs the docs name) and runs again in the same folder, as a reader re-running it would."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import generate as docs  # noqa: E402  (docs/generate.py: the pages' generator)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: the pages that hold Python blocks: each is run (a page without any has nothing to run)
CODE_PAGES = [p for p in PAGES if BLOCK.search(p.read_text())]


def test_cli_reference_is_generated():
    assert (ROOT / "docs" / "cli.md").read_text() == docs.cli_reference(), (
        "docs/cli.md is stale: run `make docs` (docs/generate.py)")


def test_api_reference_is_generated():
    assert (ROOT / "docs" / "api.md").read_text() == docs.api_reference(), (
        "docs/api.md is stale: run `make docs` (docs/generate.py)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """What the snippets name: base/ (built-in tiny model), qwen3-moe/ (tiny transformers
    Qwen3-MoE with a chat template), task.jsonl, expert_cfg.json, configs/."""
    from esft_rs.files.expert_config import ExpertConfig
    from esft_rs.models import init_model, save_model

    root = tmp_path_factory.mktemp("docs")
    model = init_model("tiny")
    save_model(model, root / "base")
    ExpertConfig({layer: [0, 1] for layer in model.routers()}).save(root / "expert_cfg.json")
    words = ["expert", "router", "gate", "token", "shard", "adapter", "merge", "split"] * 5
    (root / "task.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Reverse the word."}, {"role": "user", "content": w},
        {"role": "assistant", "content": w[::-1]}]}) + "\n" for w in words))
    shutil.copytree(ROOT / "configs", root / "configs")
    if _has_transformers():
        from chat_fixtures import CHATML_GENERATION, tokenizer_dir
        from esft_rs.data.tokenizer import load_tokenizer
        from hf_tiny import build

        qwen = tokenizer_dir(root / "qwen3-moe", CHATML_GENERATION, bos=None)
        build("qwen3_moe", vocab_size=load_tokenizer(qwen).vocab_size, bos_token_id=None,
              eos_token_id=2, pad_token_id=0).save_pretrained(qwen)
    return root


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def test_pages_have_python_blocks():
    assert {ROOT / "README.md", ROOT / "docs" / "guide.md", ROOT / "docs" / "formats.md"} <= set(
        CODE_PAGES)


BLOCKS = [(page, n, code) for page in CODE_PAGES
          for n, code in enumerate(BLOCK.findall(page.read_text()), 1)]


@pytest.mark.parametrize(("page", "n", "code"), BLOCKS, ids=[f"{p.name}-{n}" for p, n, _ in BLOCKS])
def test_python_block_runs_alone_and_twice(page: Path, n: int, code: str, workdir: Path,
                                           tmp_path: Path, monkeypatch) -> None:
    if ("transformers" in code or "qwen3-moe" in code) and not _has_transformers():
        pytest.skip("needs the hf extra")
    here = tmp_path / "work"
    shutil.copytree(workdir, here)
    monkeypatch.chdir(here)
    for attempt in ("first", "second"):
        namespace: dict[str, object] = {"__name__": "__docs__"}
        try:
            exec(compile(code, f"{page.name} python block {n}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}: python block {n} failed on its {attempt} run:"
                                 f" {e!r}\n{code}") from e
        assert os.getcwd() == str(here)

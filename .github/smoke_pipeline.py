"""The whole ESFT pipeline through the CLI on a tiny built-in model, on any platform.

init-model, profile, select, train (2 steps), merge, eval: each step runs as
``python -c "...esft_rs.cli..."`` with this interpreter, so the installed package (a wheel
in CI, the checkout's .venv locally) is what runs. ``--no-linux-io`` deletes
``os.preadv`` and ``os.copy_file_range`` in every step first, as they are missing on
Windows (both) and macOS (copy_file_range): checkpoint bytes must go through the core.

    python .github/smoke_pipeline.py [--no-linux-io] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NO_LINUX_IO = "import os\nfor name in ('preadv', 'copy_file_range'):\n" \
              "    if hasattr(os, name):\n        delattr(os, name)\n"
CLI = "import sys\nsys.argv[0] = 'esft-rs'\nfrom esft_rs.cli import run\nrun()\n"


def task_data(path: Path) -> None:
    """40 short conversations ("What is a plus b?") in the official chat format."""
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(10) for b in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def esft(prelude: str, *args: object) -> str:
    """Run ``esft-rs ARGS`` in a fresh interpreter; its stdout (fails loudly)."""
    shown = " ".join(str(a) for a in args)
    start = time.perf_counter()
    # UTF-8 both ways: Windows' console code page cannot encode every line the CLI prints.
    done = subprocess.run([sys.executable, "-c", prelude + CLI, *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env={**os.environ, "PYTHONUTF8": "1"})
    print(f"$ esft-rs {shown}  ({time.perf_counter() - start:.1f} s)")
    print(done.stdout.rstrip())
    if done.returncode != 0:
        sys.exit(f"esft-rs {args[0]} failed with exit code {done.returncode}:\n"
                 f"{done.stderr[-4000:]}")
    return done.stdout


def pipeline(work: Path, prelude: str) -> None:
    task_data(work / "task.jsonl")
    esft(prelude, "init-model", "--preset", "tiny", "-o", work / "base")
    esft(prelude, "profile", work / "base", work / "task.jsonl", "-o", work / "routing.safetensors",
         "--seq-length", 64, "--tokens", 2048, "--device", "cpu")
    esft(prelude, "select", work / "routing.safetensors", "-o", work / "experts.json")
    experts = json.loads((work / "experts.json").read_text(encoding="utf-8"))
    assert experts.get("experts"), f"no expert selected: {experts}"
    esft(prelude, "train", work / "base", work / "task.jsonl", "-e", work / "experts.json",
         "-o", work / "run", "--steps", 2, "--seq-length", 64, "--per-device-batch-size", 2,
         "--gradient-accumulation-steps", 1, "--eval-steps", 2, "--save-steps", 2,
         "--logging-steps", 1, "--learning-rate", "1e-3", "--device", "cpu")
    esft(prelude, "merge", work / "base", work / "run" / "adapter.safetensors",
         "-o", work / "merged")
    esft(prelude, "eval", work / "merged", work / "task.jsonl", "--device", "cpu",
         "-o", work / "eval.json")
    figures = json.loads((work / "eval.json").read_text(encoding="utf-8"))
    loss = figures.get("loss")
    assert isinstance(loss, float) and math.isfinite(loss), f"eval wrote {figures}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-linux-io", action="store_true",
                        help="delete os.preadv and os.copy_file_range in every step")
    parser.add_argument("--workdir", type=Path,
                        help="directory for the files (default: a temporary one, removed)")
    args = parser.parse_args()
    prelude = NO_LINUX_IO if args.no_linux_io else ""
    sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    where = "import esft_rs, torch; print('esft_rs', esft_rs.__version__, esft_rs.__file__," \
            " '| torch', torch.__version__)"
    subprocess.run([sys.executable, "-c", where], check=True)
    start = time.perf_counter()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        pipeline(args.workdir, prelude)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pipeline(Path(tmp), prelude)
    print(f"pipeline ok in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

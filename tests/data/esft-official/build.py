"""Rebuilds this folder from the official ESFT data (the 49 MB ``esft-official`` folder):
``python tests/data/esft-official/build.py PATH/TO/esft-official``."""

from __future__ import annotations

import lzma
import shutil
import sys
import tarfile
from pathlib import Path

from esft_rs.routing import RoutingStats

TASKS = ("intent", "law", "summary", "translation")
LOGGED = "intent"  # the one task whose logs are kept whole (2.3 MB compressed)


def build(source: Path, here: Path) -> None:
    for task in TASKS:
        for sub in ("expert_configs", f"expert_scores/{task}"):
            (here / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / "expert_configs" / f"{task}.json",
                        here / "expert_configs" / f"{task}.json")
        logs = source / "expert_scores" / task
        shutil.copyfile(logs / "summary.json", here / "expert_scores" / task / "summary.json")
        stats = RoutingStats.from_official_logs(logs)
        stats.metadata.clear()  # no local paths in the file
        stats.metadata["source"] = f"esft-official/expert_scores/{task}"
        (here / "routing").mkdir(exist_ok=True)
        stats.save(here / "routing" / f"{task}.safetensors")
    with tarfile.open(here / f"{LOGGED}-logs.tar.xz", "w:xz",
                      preset=9 | lzma.PRESET_EXTREME) as tar:
        for f in sorted((source / "expert_scores" / LOGGED).glob("expert_weights_*.txt")):
            info = tar.gettarinfo(f, arcname=f.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o644
            with f.open("rb") as fh:
                tar.addfile(info, fh)


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(__file__).parent)

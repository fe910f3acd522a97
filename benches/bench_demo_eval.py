"""The demo's exact-match evaluation: one teacher-forced pass against greedy decoding.

Model: ``--model DIR``, the demo's pretrained base (its path is ``base.path`` in
``report.json``), else the demo's architecture with seeded weights (which never says
EOS, so greedy decoding runs its 12 steps: its worst case); items: 200 held-out
``shift`` items (the demo's downstream test set).
Baseline: batched greedy decoding (no KV cache, as the demo had before), up to EOS or
12 new tokens, answers decoded and compared. Ours: ``esft_rs.evaluation.exact_match``.
Both give the same score (printed; tests/test_demo.py checks the equivalence on a model
whose answers are known). One intra-op thread, as the demo runs. Methods run
interleaved, round after round; figures are medians.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from esft_rs.data import Message, format_conversation
from esft_rs.data.tokenizer import Tokenizer, load_tokenizer
from esft_rs.demo import tasks as T
from esft_rs.demo.settings import DEMO_MODEL
from esft_rs.demo.vocabulary import write_tokenizer
from esft_rs.evaluation import exact_match
from esft_rs.models import init_model, load_model
from timing import interleaved


def greedy_exact_match(model: torch.nn.Module, tok: Tokenizer,
                       items: list[tuple[str, str]], max_new: int = 12) -> float:
    """Left-padded batched greedy decoding, one full forward per new token."""
    prompts = [format_conversation([Message("user", p)], tok)[0] for p, _ in items]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    done = torch.zeros(len(items), dtype=torch.bool)
    new = []
    with torch.inference_mode():
        for _ in range(max_new):
            nxt = model(ids, mask)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.eos), nxt)
            new.append(nxt)
            done |= nxt == tok.eos
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    hits = 0
    for row, (_, answer) in zip(torch.stack(new, 1).tolist(), items, strict=True):
        row = row[: row.index(tok.eos)] if tok.eos in row else row
        hits += tok.decode(row).strip() == answer
    return hits / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", help="a model directory (the demo's cached base)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = (load_model(args.model) if args.model else init_model(DEMO_MODEL, seed=0)).eval()
    with tempfile.TemporaryDirectory() as tmp:  # the model directory carries the tokenizer
        tok = load_tokenizer(args.model or write_tokenizer(Path(tmp)))
    _, items = T.split(T.TASKS["shift"], 0, 200, seed=0)
    greedy, ours = greedy_exact_match(model, tok, items), exact_match(model, tok, items)
    print(f"exact match: greedy decoding {greedy:.3f}, one pass {ours:.3f}")
    med = interleaved({"greedy decoding": lambda: greedy_exact_match(model, tok, items),
                       "one pass (ours)": lambda: exact_match(model, tok, items)}, args.rounds)
    for name, t in med.items():
        print(f"{name:18s} {t * 1000:8.1f} ms")
    print(f"greedy / one pass: {med['greedy decoding'] / med['one pass (ours)']:.1f}x")


if __name__ == "__main__":
    main()

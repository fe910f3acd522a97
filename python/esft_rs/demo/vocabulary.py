"""The demo's word-level tokenizer: one token per word of the tasks.

With bytes, the chat template (``User: ...\\n\\nAssistant:``) and the task keyword were
71% of a ``shift`` item's tokens and the answer 17%, so token-count expert selection
picked the experts that serve the template, which every task shares. Here
``User:``, ``Assistant:``, each keyword and each symbol are one token, so the template
is two tokens. It is a Hugging Face ``tokenizer.json`` (WordLevel model, whitespace-split
pre-tokenizer) with a ``tokenizer_config.json`` naming BOS, EOS and PAD: the files any
model directory carries, read by ``esft_rs.data.load_tokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

from esft_rs.demo.tasks import KEYWORDS, SYMBOLS

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
#: Position = token id. ``data.format_conversation`` writes "User: " and "\n\nAssistant:";
#: split at whitespace, those are the words "User:" and "Assistant:".
VOCAB: tuple[str, ...] = (BOS, EOS, PAD, UNK, "User:", "Assistant:", *KEYWORDS, *SYMBOLS)
BOS_ID, EOS_ID, PAD_ID = VOCAB.index(BOS), VOCAB.index(EOS), VOCAB.index(PAD)

FILES = ("tokenizer.json", "tokenizer_config.json")


def write_tokenizer(folder: Path) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` to ``folder``; return it."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in (BOS, EOS, PAD, UNK)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder

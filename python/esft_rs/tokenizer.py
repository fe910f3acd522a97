"""Tokenizers: bytes for the built-in model, ``tokenizer.json`` for real model directories.

Both meet ``Tokenizer``: ``encode`` adds no special tokens (the data formatting
places BOS and EOS itself, as the official ESFT code does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from esft_rs.errors import InvalidFileError
from esft_rs.inputs import check_file, load_json


@runtime_checkable
class Tokenizer(Protocol):
    bos: int
    eos: int
    pad: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; BOS, EOS and PAD are 256, 257 and 258."""

    bos = 256
    eos = 257
    pad = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Special ids are dropped; invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (no transformers).

    Special tokens come from ``tokenizer_config.json`` beside it, else from
    ``config.json``'s ``*_token_id``; PAD falls back to EOS.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = check_file(path)
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on a bad file
            raise InvalidFileError(f"{path}: not a valid tokenizer.json ({e})", path) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        tok_cfg = _json_object(path.parent / "tokenizer_config.json")
        model_cfg = _json_object(path.parent / "config.json")
        ids = {}
        for kind in ("bos", "eos", "pad"):
            token = tok_cfg.get(f"{kind}_token")
            if isinstance(token, dict):
                token = token.get("content")
            tid = self._tok.token_to_id(token) if isinstance(token, str) else None
            if tid is None:
                tid = model_cfg.get(f"{kind}_token_id")
            ids[kind] = tid if isinstance(tid, int) and not isinstance(tid, bool) else None
        ids["pad"] = ids["pad"] if ids["pad"] is not None else ids["eos"]
        missing = [k.upper() for k, v in ids.items() if v is None]
        if missing:
            raise InvalidFileError(
                f"{path.parent}: no {' or '.join(missing)} token in tokenizer_config.json"
                " or config.json",
                path.parent,
            )
        self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Tokenizer:
    """``tokenizer.json`` when the directory has one, else the tokenizer config.json names."""
    root = Path(model_dir)
    if (root / "tokenizer.json").is_file():
        return HFTokenizer(root / "tokenizer.json")
    kind = _json_object(root / "config.json").get("tokenizer")
    if kind == "byte":
        return ByteTokenizer()
    raise InvalidFileError(
        f"{root}: no tokenizer.json, and config.json does not name the byte tokenizer"
        ' ("tokenizer": "byte")',
        root,
    )


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file's content; {} when the file does not exist."""
    if not path.exists():
        return {}
    raw = load_json(path)
    if not isinstance(raw, dict):
        raise InvalidFileError(f"{path}: not a JSON object", path)
    return raw

"""Tokenizers: bytes for the built-in model, ``tokenizer.json`` for real model directories.

Both meet ``Tokenizer``: ``encode`` adds no special tokens (the data formatting
places BOS and EOS itself, as the official ESFT code does). ``chat_template`` is
the Jinja chat template conversations are rendered with (``esft_rs.data.chat_template``),
or None for the official ESFT format; ``load_tokenizer`` picks it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from esft_rs.errors import InvalidFileError
from esft_rs.files.inputs import check_file, load_json, read_text


@runtime_checkable
class Tokenizer(Protocol):
    bos: int | None  # None only with a chat template (the official format starts with BOS)
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
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Special ids are dropped; invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (no transformers).

    Special tokens come from ``tokenizer_config.json`` beside it, else from
    ``config.json``'s ``*_token_id``; PAD falls back to EOS. BOS may be missing
    (Qwen has none): only the official format needs it. ``special_tokens`` holds the
    named special tokens' text, which chat templates see.
    """

    chat_template: str | None = None

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = check_file(path)
        text = read_text(path)  # the library refuses a byte-order mark; read_text drops it
        try:
            self._tok = RustTokenizer.from_str(text)
        except Exception as e:  # the library raises a bare Exception on a bad file
            raise InvalidFileError(f"{path}: not a valid tokenizer.json ({e})", path) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        tok_cfg = _json_object(path.parent / "tokenizer_config.json")
        model_cfg = _json_object(path.parent / "config.json")
        self.special_tokens = _special_tokens(tok_cfg)
        ids = {}
        for kind in ("bos", "eos", "pad"):
            token = self.special_tokens.get(f"{kind}_token")
            tid = self._tok.token_to_id(token) if isinstance(token, str) else None
            if tid is None:
                tid = model_cfg.get(f"{kind}_token_id")
            ids[kind] = tid if isinstance(tid, int) and not isinstance(tid, bool) else None
        ids["pad"] = ids["pad"] if ids["pad"] is not None else ids["eos"]
        self.missing = [k.upper() for k, v in ids.items() if v is None]
        if ids["eos"] is None:
            raise _no_special(path.parent, self.missing)
        self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]
        self.chat_template = _model_template(path.parent, tok_cfg)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encoding(self, text: str) -> Any:
        """The ``tokenizers.Encoding`` of ``text`` (no special tokens added): ids and offsets."""
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


#: ``--chat-template`` values besides a file path.
CHAT_TEMPLATE_CHOICES = ("auto", "model", "official")
#: Families that keep the official ESFT format under ``auto``: the official data and
#: scripts are DeepSeek-V2's (whose own template is the same format), and the built-in model.
OFFICIAL_FORMAT_MODELS = ("deepseek_v2", "esft_rs_moe")


def load_tokenizer(model_dir: str | os.PathLike[str], chat_template: str = "auto") -> Tokenizer:
    """``tokenizer.json`` when the directory has one, else the tokenizer config.json names.

    ``chat_template``: ``model`` (the directory's own: ``chat_template.jinja`` or
    ``tokenizer_config.json``), ``official`` (the official ESFT format), a template
    file, or ``auto``: the model's when it has one, except for DeepSeek-V2 and the
    built-in model (``OFFICIAL_FORMAT_MODELS``), else official.
    """
    root = Path(model_dir)
    # lexists: a tokenizer.json that is a folder or a broken link is named, not passed over
    if os.path.lexists(root / "tokenizer.json"):
        tok: Tokenizer = HFTokenizer(root / "tokenizer.json")
    elif _json_object(root / "config.json").get("tokenizer") == "byte":
        tok = ByteTokenizer()
    else:
        raise InvalidFileError(
            f"{root}: no tokenizer.json: add the model's tokenizer (tokenizer.save_pretrained"
            f"({str(root)!r}) writes tokenizer.json and a tokenizer_config.json naming its"
            " bos/eos/pad tokens), or name the byte tokenizer in config.json"
            ' ("tokenizer": "byte")',
            root,
        )
    own = getattr(tok, "chat_template", None)
    if chat_template == "auto":
        model_type = _json_object(root / "config.json").get("model_type")
        chosen = own if model_type not in OFFICIAL_FORMAT_MODELS else None
    elif chat_template == "model":
        if own is None:
            raise InvalidFileError(
                f"{root}: has no chat template (chat_template.jinja, or chat_template in"
                " tokenizer_config.json); use --chat-template official or a template file",
                root,
            )
        chosen = own
    elif chat_template == "official":
        chosen = None
    else:
        from esft_rs.data.chat_template import read_template

        chosen = read_template(chat_template)
    if chosen is not None and not isinstance(tok, HFTokenizer):
        raise InvalidFileError(
            f"{root}: a chat template needs the model's tokenizer.json (the byte tokenizer"
            " has no special tokens for one)",
            root,
        )
    if isinstance(tok, HFTokenizer):
        tok.chat_template = chosen
        if chosen is None and tok.bos is None:
            raise _no_special(root, tok.missing, " (the official ESFT format starts with BOS)")
    return tok


def _no_special(root: Path, missing: list[str], why: str = "") -> InvalidFileError:
    return InvalidFileError(
        f"{root}: no {' or '.join(missing)} token in tokenizer_config.json or config.json{why}",
        root,
    )


def _special_tokens(tok_cfg: dict[str, Any]) -> dict[str, str]:
    """The named special tokens' text (``bos_token``: ``"<s>"``, ...) as templates see them."""
    from esft_rs.data.chat_template import SPECIAL_TOKENS

    out = {}
    for name in SPECIAL_TOKENS:
        token = tok_cfg.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            out[name] = token
    return out


def _model_template(root: Path, tok_cfg: dict[str, Any]) -> str | None:
    """The directory's chat template: ``chat_template.jinja`` (transformers 5 writes it),
    else ``tokenizer_config.json``'s ``chat_template``."""
    from esft_rs.data.chat_template import read_template, template_of

    if os.path.lexists(root / "chat_template.jinja"):  # a pipe or folder is named, not skipped
        return read_template(root / "chat_template.jinja")
    return template_of(tok_cfg)


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file's content; {} when the file does not exist."""
    if not path.exists():
        return {}
    raw = load_json(path)
    if not isinstance(raw, dict):
        raise InvalidFileError(f"{path}: not a JSON object", path)
    return raw

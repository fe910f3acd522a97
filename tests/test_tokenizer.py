"""Tokenizers: bytes for the built-in model, tokenizer.json through the tokenizers library."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from esft_rs.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from esft_rs.errors import InvalidFileError

TEXTS = ["User: hello world\n\nAssistant:", " héllo, wörld — 你好 🙂", ""]


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.bos, tok.eos, tok.pad, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.encode("Hi é") == [72, 105, 32, 0xC3, 0xA9]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([256, 72, 105, 257, 258]) == "Hi"  # specials are dropped
    assert tok.decode([0xC3]) == "\ufffd"  # a cut character does not raise


def hf_dir(tmp_path: Path, tokenizer_config: dict | None, config: dict | None = None) -> Path:
    """A byte-level BPE tokenizer.json trained here, with special tokens."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 10, trainer)
    d = tmp_path / "hf"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    if tokenizer_config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def test_hf_tokenizer(tmp_path: Path) -> None:
    special = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}
    d = hf_dir(tmp_path, special)
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos, tok.eos, tok.pad) == (0, 1, 2)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.bos not in ids and tok.eos not in ids  # no special tokens added
        assert tok.decode(ids) == text
    assert tok.decode([tok.bos, *tok.encode("hello"), tok.eos]) == "hello"
    assert len(tok.encode("hello world")) < len(b"hello world")  # merges were learned


def test_hf_special_ids_from_config_and_pad_fallback(tmp_path: Path) -> None:
    tok = load_tokenizer(hf_dir(tmp_path, None, {"bos_token_id": 0, "eos_token_id": 1}))
    assert (tok.bos, tok.eos, tok.pad) == (0, 1, 1)


def test_hf_missing_special_tokens(tmp_path: Path) -> None:
    d = hf_dir(tmp_path, {"eos_token": "</s>"})
    with pytest.raises(InvalidFileError, match=r"hf: no BOS token in tokenizer_config\.json"):
        load_tokenizer(d)


def test_bad_tokenizer_files(tmp_path: Path) -> None:
    d = hf_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"})
    (d / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(InvalidFileError, match=r"tokenizer_config\.json: not a JSON object"):
        load_tokenizer(d)
    (d / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(InvalidFileError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(d)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json",
                                  "chat_template.jinja"])
def test_tokenizer_files_that_are_pipes_are_named(tmp_path: Path, name: str) -> None:
    # was: a chat_template.jinja pipe was passed over (tokenizer_config.json's template used)
    d = hf_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"})
    (d / name).unlink(missing_ok=True)
    os.mkfifo(d / name)
    with pytest.raises(InvalidFileError, match="is a named pipe, not a regular file") as info:
        load_tokenizer(d)
    assert info.value.path == str(d / name)


def test_load_tokenizer_for_builtin_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"tokenizer": "byte"}))
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(InvalidFileError, match=r"no tokenizer\.json: add the model.s tokenizer"):
        load_tokenizer(tmp_path)

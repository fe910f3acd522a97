"""Chat templates: esft-rs encodes conversations exactly as transformers' apply_chat_template."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chat_fixtures import CONVERSATIONS, DEEPSEEK_LIKE, TEMPLATES, tokenizer_dir
from esft_rs.data import IGNORE_INDEX, Message, TaskData, encode_conversation
from esft_rs.data.tokenizer import load_tokenizer
from esft_rs.errors import InvalidFileError, MismatchError

#: What carries labels under each template without {% generation %} blocks (by rendering
#: prefixes): the turn after its header, with the end-of-turn text the template writes.
LABELLED = {
    ("qwen3_like", "one_turn"): "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n",
    # an earlier turn loses the <think> block once a later user turn follows
    ("qwen3_like", "system_multi_turn"):
        "Bonjour !<|im_end|>\n<think>\n\n</think>\n\nTrès bien, merci.<|im_end|>\n",
    ("llama2_like", "one_turn"): " It is 4. <|im_end|>",
    ("llama2_like", "system_multi_turn"): " Bonjour ! <|im_end|> Très bien, merci. <|im_end|>",
    ("deepseek_like", "one_turn"): " It is 4.<|im_end|>",
    ("deepseek_like", "system_multi_turn"): " Bonjour !<|im_end|> Très bien, merci.<|im_end|>",
}


def labelled_text(tok, labels: list[int]) -> str:
    return tok._tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)


@pytest.mark.parametrize("qwen", [False, True], ids=["fast", "qwen2tokenizer"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_encoding_equals_transformers(tmp_path, template, conversation, qwen):
    transformers = pytest.importorskip("transformers")
    d = tokenizer_dir(tmp_path / "tok", TEMPLATES[template], qwen=qwen)
    conv = CONVERSATIONS[conversation]
    ids, labels = encode_conversation(load_tokenizer(d, "model"), conv)
    theirs = transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(
        conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(theirs["input_ids"])
    if template == "chatml_generation":
        assert labels == [t if m else IGNORE_INDEX
                          for t, m in zip(theirs["input_ids"], theirs["assistant_masks"],
                                          strict=True)]
        assert labelled_text(load_tokenizer(d), labels) == (
            "It is 4.<|im_end|>" if conversation == "one_turn"
            else "Bonjour !<|im_end|>Très bien, merci.<|im_end|>")
    else:
        assert labelled_text(load_tokenizer(d), labels) == LABELLED[template, conversation]


@pytest.mark.parametrize("template", ["chatml_generation", "qwen3_like"])
def test_masked_turn_carries_no_labels(tmp_path, template):
    tok = load_tokenizer(tokenizer_dir(tmp_path, TEMPLATES[template]))
    conv = [dict(m) for m in CONVERSATIONS["system_multi_turn"]]
    conv[2]["mask"] = 1
    ids, labels = encode_conversation(tok, conv)
    assert ids == encode_conversation(tok, CONVERSATIONS["system_multi_turn"])[0]
    assert "Bonjour" not in labelled_text(tok, labels)
    assert "Très bien, merci.<|im_end|>" in labelled_text(tok, labels)


def test_template_sources_and_defaults(tmp_path):
    # chat_template.jinja wins over tokenizer_config.json (as in transformers 5)
    d = tokenizer_dir(tmp_path / "a", TEMPLATES["qwen3_like"], as_jinja_file=True)
    assert load_tokenizer(d).chat_template == TEMPLATES["qwen3_like"]
    assert load_tokenizer(d, "official").chat_template is None
    # DeepSeek-V2 and the built-in model keep the official format unless asked
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    assert load_tokenizer(d).chat_template is None
    assert load_tokenizer(d, "model").chat_template == TEMPLATES["qwen3_like"]
    # a template file: Jinja text, or a tokenizer_config.json
    (tmp_path / "t.jinja").write_text(DEEPSEEK_LIKE)
    assert load_tokenizer(d, str(tmp_path / "t.jinja")).chat_template == DEEPSEEK_LIKE
    (tmp_path / "t.json").write_text(json.dumps({"chat_template": DEEPSEEK_LIKE}))
    assert load_tokenizer(d, str(tmp_path / "t.json")).chat_template == DEEPSEEK_LIKE
    plain = tokenizer_dir(tmp_path / "b", None)
    assert load_tokenizer(plain).chat_template is None
    with pytest.raises(InvalidFileError, match=r"b: has no chat template"):
        load_tokenizer(plain, "model")
    (tmp_path / "bad.jinja").write_text("{% for x in %}")
    with pytest.raises(InvalidFileError, match=r"chat template: .*line 1"):
        load_tokenizer(plain, str(tmp_path / "bad.jinja"))


def test_template_without_bos_needs_no_bos(tmp_path):
    d = tokenizer_dir(tmp_path, TEMPLATES["chatml_generation"], bos=None)
    assert load_tokenizer(d).bos is None
    with pytest.raises(InvalidFileError, match=r"no BOS token .*starts with BOS"):
        load_tokenizer(d, "official")


def test_template_errors_name_the_row(tmp_path):
    tok = load_tokenizer(tokenizer_dir(tmp_path, TEMPLATES["llama2_like"]))
    conv = [Message("user", "a"), Message("user", "b"), Message("assistant", "c")]
    data = TaskData([conv], ["train.jsonl:7"], [])
    with pytest.raises(MismatchError, match=r"train.jsonl:7: chat template: Conversation roles"):
        data.pack(tok, seq_length=64)


def test_templates_run_sandboxed(tmp_path):
    evil = "{{ messages.__class__.__mro__ }}"
    tok = load_tokenizer(tokenizer_dir(tmp_path, evil))
    with pytest.raises(MismatchError, match=r"chat template: .*unsafe"):
        encode_conversation(tok, CONVERSATIONS["one_turn"])


def test_official_format_takes_system_turn():
    from esft_rs.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ids, labels = encode_conversation(tok, [{"role": "system", "content": " Be brief. "},
                                            *CONVERSATIONS["one_turn"]])
    text = tok.decode(ids)
    assert text == "Be brief.\n\nUser: What is 2 + 2?\n\nAssistant: It is 4."
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == " It is 4."


def test_core_does_not_import_transformers():
    code = ("import sys, esft_rs.data, esft_rs.data.chat_template, esft_rs.data.tokenizer;"
            " assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


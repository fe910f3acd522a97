"""Tokenizer directories with chat templates, readable by esft-rs and by transformers (tests)."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<think>", "</think>"]

#: ChatML with {% generation %} around what the assistant writes (content and <|im_end|>).
CHATML_GENERATION = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Qwen3's way (no generation blocks): a default system turn, and an empty <think>
#: block only in the assistant turns after the last user message.
QWEN3_LIKE = """\
{%- if messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1, found=false) %}
{%- for message in messages[::-1] %}
{%- if message.role == 'user' and not ns.found %}
{%- set ns.last_query = (messages|length - 1) - loop.index0 %}{% set ns.found = true %}{% break %}
{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if message.role == 'user' %}
{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- if loop.index0 > ns.last_query %}
{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- else %}{{ raise_exception('unknown role ' + message.role|tojson) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

#: Llama-2 / Mistral style: BOS per exchange, the system prompt folded into the first user turn.
LLAMA2_LIKE = """\
{%- if messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}
{%- else %}{% set system = false %}{% set loop_messages = messages %}{% endif %}
{%- for message in loop_messages %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif %}
{%- if loop.index0 == 0 and system %}
{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}
{%- else %}{% set content = message['content'] %}{% endif %}
{%- if message['role'] == 'user' %}
{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
{%- else %}
{{- ' ' + content.strip() + ' ' + eos_token }}
{%- endif %}
{%- endfor %}
"""

#: DeepSeek-V2-Chat's format: BOS, "User: ...\n\n", "Assistant: ..." + EOS.
DEEPSEEK_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

TEMPLATES = {"chatml_generation": CHATML_GENERATION, "qwen3_like": QWEN3_LIKE,
             "llama2_like": LLAMA2_LIKE, "deepseek_like": DEEPSEEK_LIKE}

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is 2 + 2?"},
                 {"role": "assistant", "content": "It is 4."}],
    "system_multi_turn": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Très bien, merci."},
    ],
}


#: Qwen2's pre-tokenizer split (its tokenizer.json and transformers' Qwen2Tokenizer use it).
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
              r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def tokenizer_dir(directory: Path, template: str | None, *, bos: str | None = "<s>",
                  eos: str = "<|im_end|>", as_jinja_file: bool = False,
                  qwen: bool = False) -> Path:
    """A byte-level BPE tokenizer.json (trained here) with the chat specials, and a
    tokenizer_config.json naming its special tokens and carrying ``template``. ``qwen``:
    Qwen2's normalizer and pre-tokenizer, loaded by transformers as ``Qwen2Tokenizer``
    (which builds its own pipeline, as for a real Qwen checkpoint)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if qwen:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [c["content"] for conv in CONVERSATIONS.values() for c in conv] * 20
    corpus += ["user assistant system Assistant: User: INST SYS think"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, object] = {"tokenizer_class": "Qwen2Tokenizer" if qwen
                                 else "PreTrainedTokenizerFast", "eos_token": eos,
                                 "pad_token": "<|endoftext|>", "bos_token": bos}
    if template is not None and not as_jinja_file:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None and as_jinja_file:
        (directory / "chat_template.jinja").write_text(template)
    return directory

"""A model's own chat template: rendered as transformers renders it, without transformers.

Chat templates are Jinja programs from the Hub, so they run in jinja2's
``ImmutableSandboxedEnvironment`` with what transformers gives them: ``trim_blocks``
and ``lstrip_blocks``, the ``loopcontrols`` extension, the ``{% generation %}`` tag,
``raise_exception``, ``strftime_now``, a ``tojson`` filter that does not escape HTML,
and restricted ``dict`` / ``namespace`` globals. The variables are ``messages``, the
tokenizer's named special tokens (``bos_token``, ``eos_token``, ...) and
``add_generation_prompt``.

Which tokens an assistant wrote (the ones that carry labels):

- Templates with ``{% generation %}`` blocks mark them; the character spans become
  tokens as in transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)``
  (the tokens holding a span's first and last character, and all between).
- Other templates: by rendering prefixes. Assistant turn i starts where the rendering
  of the messages before it with ``add_generation_prompt=True`` ends (the header is a
  prompt), and ends where the rendering of the messages up to it ends (its end-of-turn
  text included). A template that renders earlier turns differently once later ones
  follow (Qwen3 drops the empty ``<think>`` block) falls back to finding the turn's
  content in the full text, plus the end-of-turn text the template writes after it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from esft_rs.errors import InvalidFileError, MismatchError

#: The named special tokens a template sees (transformers' ``special_tokens_map``).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")

Span = tuple[int, int]  # [start, end) in characters of the rendered text


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: records where its output lands.

    The position is the length of what the template has emitted so far, which the
    render loop keeps in ``self.emitted`` (as transformers does).
    """

    tags = {"generation"}  # noqa: RUF012 (jinja2's class attribute)

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        self.emitted: list[str] | None = None
        self.spans: list[Span] = []

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        text = caller()
        if self.emitted is not None:
            start = sum(map(len, self.emitted))
            self.spans.append((start, start + len(text)))
        return text

    @contextmanager
    def tracking(self, emitted: list[str]) -> Iterator[list[Span]]:
        self.emitted, self.spans = emitted, []
        try:
            yield self.spans
        finally:
            self.emitted = None


class _Namespace(jinja2.utils.Namespace):
    """jinja2's ``namespace`` without underscore names (no way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's signature trick: self in args
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace ({name!r})"
            )


class _Dict:
    """``dict(...)`` and ``dict.fromkeys`` for templates, and nothing else of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in the sandbox; a syntax error is ``InvalidFileError``."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_Dict(), namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidFileError(f"chat template: {e.message} (line {e.lineno})") from None


@lru_cache(maxsize=16)
def has_generation_blocks(source: str) -> bool:
    """Whether the template marks assistant text with ``{% generation %}``."""
    ast = compile_template(source).environment.parse(source)
    return any(getattr(n.call.node, "name", None) == "_mark"
               for n in ast.find_all(jinja2.nodes.CallBlock))


def render(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    special_tokens: Mapping[str, str],
    *,
    add_generation_prompt: bool = False,
) -> tuple[str, list[Span]]:
    """The rendered text and the ``{% generation %}`` spans in it.

    A template error (``raise_exception`` included, e.g. roles that do not alternate),
    or an error of the template's own code (a range beyond the sandbox's limit, a division
    by zero), is a ``MismatchError`` with the template's message.
    """
    template = compile_template(source)
    tag = template.environment.extensions[_GenerationTag.identifier]
    assert isinstance(tag, _GenerationTag)
    emitted: list[str] = []
    try:
        with tag.tracking(emitted) as spans:
            for piece in template.generate(
                messages=[dict(m) for m in messages], tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **special_tokens,
            ):
                emitted.append(piece)
    except jinja2.TemplateError as e:
        raise MismatchError(f"chat template: {e.message or type(e).__name__}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError,
            RecursionError) as e:  # the template's own code failed (the sandbox's range limit)
        why = " ".join(str(e).split())[:200]
        raise MismatchError(f"chat template: {type(e).__name__}: {why}") from None
    return "".join(emitted), list(spans)


def assistant_spans(
    source: str, messages: Sequence[Mapping[str, Any]], special_tokens: Mapping[str, str]
) -> tuple[str, list[tuple[int, Span]]]:
    """The full rendering, and (message index, span) of each assistant turn in it.

    With ``{% generation %}`` blocks, their spans in order: one per assistant
    message when the counts agree, else attributed to no message (index -1).
    Otherwise by rendering prefixes (module docstring).
    """
    text, marked = render(source, messages, special_tokens)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if has_generation_blocks(source):
        owners = turns if len(marked) == len(turns) else [-1] * len(marked)
        return text, list(zip(owners, marked, strict=True))
    out = []
    cursor = 0
    for i in turns:
        span = _turn_by_prefixes(source, messages, special_tokens, text, i, cursor)
        out.append((i, span))
        cursor = span[1]
    return text, out


def _turn_by_prefixes(
    source: str, messages: Sequence[Mapping[str, Any]], special: Mapping[str, str],
    text: str, i: int, cursor: int,
) -> Span:
    before = _try_render(source, messages[:i], special, True) if i else ""
    upto = _try_render(source, messages[: i + 1], special, False)
    if (before is not None and upto is not None and upto.startswith(before)
            and text.startswith(upto) and len(before) >= cursor):
        return len(before), len(upto)
    content = str(messages[i]["content"])
    at = text.find(content, cursor)
    if at < 0 or not content:
        raise MismatchError(
            f"chat template: cannot tell which tokens assistant message {i} is (the template"
            " does not render its content verbatim); use a template with {% generation %} blocks"
        )
    end = at + len(content)
    # In ``upto`` the turn is the last one: what follows its content ends the turn.
    tail = upto[upto.rfind(content) + len(content):] if upto and content in upto else ""
    if tail and text.startswith(tail, end):
        end += len(tail)
    return at, end


def _try_render(source: str, messages: Sequence[Mapping[str, Any]], special: Mapping[str, str],
                prompt: bool) -> str | None:
    """A prefix rendering, or None when the template refuses a partial conversation."""
    try:
        return render(source, messages, special, add_generation_prompt=prompt)[0]
    except MismatchError:
        return None


def spans_to_tokens(char_to_token: Any, n_tokens: int, span: Span) -> range | None:
    """Tokens of a character span, as transformers maps them: from the token of the first
    character to that of the last (to the end when it has none, or it is token 0);
    None when the first character has no token."""
    first = char_to_token(span[0])
    if first is None:
        return None
    last = char_to_token(span[1] - 1)
    return range(first, last + 1 if last else n_tokens)


def read_template(path: str | os.PathLike[str]) -> str:
    """A chat template file: Jinja text, or a ``tokenizer_config.json``-style JSON object
    with ``chat_template``."""
    from esft_rs.files.inputs import parse_json, read_text

    p = Path(path)
    text = read_text(p)  # strict UTF-8; a pipe or directory is refused, not waited on
    if p.suffix == ".json":
        found = template_of(parse_json(text, p))
        if found is None:
            raise InvalidFileError(f"{p}: has no chat_template", p)
        text = found
    try:
        compile_template(text)
    except InvalidFileError as e:  # a syntax error, named with its file
        raise InvalidFileError(f"{p}: {e}", p) from None
    return text


def template_of(tokenizer_config: object) -> str | None:
    """The default chat template in a ``tokenizer_config.json`` object: a string, or the
    one named ``default`` in a list of ``{"name", "template"}``."""
    value = tokenizer_config.get("chat_template") if isinstance(tokenizer_config, dict) else None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def encode(tokenizer: Any, source: str, messages: Sequence[Any],
           ignore_index: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of ``esft_rs.data.Message``s rendered with ``source``.

    ``tokenizer`` is an ``esft_rs.data.tokenizer.HFTokenizer``. The ids are those of
    transformers' ``apply_chat_template(messages, tokenize=True)``; labels are the ids
    of assistant tokens (module docstring) and ``ignore_index`` elsewhere, and of none
    of a turn with ``mask``.
    """
    plain = [{"role": m.role, "content": m.content} for m in messages]
    text, spans = assistant_spans(source, plain, tokenizer.special_tokens)
    if any(owner < 0 for owner, _ in spans) and any(m.mask for m in messages):
        raise MismatchError(
            "chat template: its {% generation %} blocks do not match the assistant messages"
            " one to one, so a message's mask cannot be applied"
        )
    encoding = tokenizer.encoding(text)
    ids = list(encoding.ids)
    labels = [ignore_index] * len(ids)
    for owner, span in spans:
        tokens = spans_to_tokens(encoding.char_to_token, len(ids), span)
        if tokens is None:  # past the end (transformers stops here too)
            break
        if owner < 0 or not messages[owner].mask:
            for t in tokens:
                labels[t] = ids[t]
    return ids, labels

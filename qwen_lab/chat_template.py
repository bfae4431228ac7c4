"""Step 3 — the chat template: messages -> the exact prompt text the model was trained on.

A chat model does not see "messages"; it sees one string such as::

    <|im_start|>system
    You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant

That string is produced by the Jinja template the model ships in
``tokenizer_config.json`` (or ``chat_template.jinja``). We render it the way
transformers' ``apply_chat_template`` does, so the bytes are identical.

The template comes from a downloaded repository: it is untrusted code. It runs
in Jinja's *immutable sandbox*: no attribute starting with ``_``, no access to
Python internals, no mutation of the messages, and a cap on the output size.

>>> t = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}")
>>> t.render([{"role": "user", "content": "Hi"}])
'user: Hi\\n'
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError
from .hub import ModelFiles
from .tokenizer import special_tokens as read_special_tokens

#: A rendered prompt longer than this is a runaway template, not a chat.
MAX_RENDERED_CHARS = 10_000_000


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks.

    Rendering only needs its body, so the tag renders what it wraps.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()`` minus underscore names, which could reach Python internals."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt must keep them as they are.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, made loud: reaching for an unsafe attribute raises.

    The stock sandbox quietly renders ``{{ x.__class__ }}`` as an empty string;
    a template that tries it is hostile or broken, and should not be used.
    """

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe")


def make_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment chat templates expect (the one transformers uses)."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=lambda *a, **k: dict(*a, **k))
    return env


def plain_data(value: Any, where: str = "input") -> Any:
    """A fresh copy of ``value`` made of JSON types only, so the template sees no Python objects.

    ``None`` values inside messages are dropped, as transformers does.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, bool, int, float):  # subclasses (enums...) back to the plain type
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, dict):
        return {str(k): plain_data(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, where) for v in value]
    raise TemplateError(f"the {where} holds a {type(value).__name__}; pass only str, numbers, bools, lists and dicts")


class ChatTemplate:
    """A compiled chat template plus the special-token variables it may read."""

    def __init__(self, source: str, special_tokens: dict[str, str | None] | None = None) -> None:
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = make_environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template has a syntax error at line {e.lineno}: {e.message}") from e

    @classmethod
    def from_files(cls, files: ModelFiles, special_tokens: dict[str, str | None] | None = None,
                   name: str = "default", required: bool = True) -> "ChatTemplate | None":
        """The template of a model: ``chat_template.jinja`` if present, else ``tokenizer_config.json``'s.

        A model without one (a base model) raises, or gives ``None`` when not ``required``.
        """
        config = json.loads(Path(files.tokenizer_config).read_text(encoding="utf-8"))
        if files.chat_template is not None:
            source = Path(files.chat_template).read_text(encoding="utf-8")
        else:
            source = config.get("chat_template")
            if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get(name) or named.get("default")
        if not isinstance(source, str):
            if not required:
                return None
            raise TemplateError(f"{files.root} has no chat template (neither chat_template.jinja nor a "
                                f"chat_template in tokenizer_config.json): it is not a chat model; use --raw")
        if special_tokens is None:
            special_tokens = read_special_tokens(config)
        return cls(source, special_tokens)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False,
               tools: list[dict] | None = None, documents: list[dict] | None = None, **variables: Any) -> str:
        """The prompt text for ``messages``.

        ``add_generation_prompt=True`` appends the header of the assistant's
        turn (``<|im_start|>assistant\\n`` for Qwen) so the model answers
        instead of continuing the last message. It defaults to False, as in
        transformers: forgetting it is the first pitfall of the walkthrough.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        chat = []
        for m in messages:
            if not isinstance(m, dict):
                raise TemplateError(f"each message must be a dict with 'role' and 'content', not {m!r}")
            chat.append({k: v for k, v in plain_data(m, "messages").items() if v is not None})
        context = {**self.special_tokens, **plain_data(variables, "template variables"),
                   "messages": chat, "tools": plain_data(tools, "tools"),
                   "documents": plain_data(documents, "documents"),
                   "add_generation_prompt": add_generation_prompt}
        try:
            parts, size = [], 0
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise TemplateError(f"the chat template produced over {MAX_RENDERED_CHARS:,} characters and "
                                        f"was stopped: the template is broken or hostile")
                parts.append(piece)
            return "".join(parts)
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"the chat template tried something the sandbox forbids ({e}) and was stopped; "
                                f"do not use this model's template") from e
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template refused these messages: {e}") from e
        except TemplateError:
            raise
        except Exception as e:  # a bug in the template (e.g. 'str' + None) surfaces as a Python error
            raise TemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e

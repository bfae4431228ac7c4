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
in Jinja's *immutable sandbox* (no attribute starting with ``_``, no access to
Python internals, no mutation of the messages), in a separate worker process,
on a budget of time and memory: a hostile or broken template fails with a
one-line ``TemplateError`` within seconds. How that works is in ``sandbox.py``.

>>> t = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}")
>>> t.render([{"role": "user", "content": "Hi"}])
'user: Hi\\n'
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext

from . import sandbox
from .errors import TemplateError
from .sandbox import Budget, Sandbox

if TYPE_CHECKING:
    from .hub import ModelFiles


class ChatTemplate:
    """A model's chat template plus the special-token variables it may read.

    Nothing runs when it is made: the template compiles on first use, in the sandbox's
    worker. A broken template thus does not stop a model from loading (a raw prompt does not
    need it); the error comes when a conversation is rendered with it. ``budget`` bounds the
    time and memory of each render (``sandbox.Budget``; by default ``sandbox.DEFAULT_BUDGET``).
    """

    def __init__(self, source: str, special_tokens: dict[str, str | None] | None = None, *,
                 budget: Budget | None = None) -> None:
        if not isinstance(source, str):
            raise TemplateError(f"a chat template is Jinja source text, not a {type(source).__name__}")
        self.source = source
        self.special_tokens = {k: v for k, v in dict(special_tokens or {}).items() if v is not None}
        #: time and memory per render; None: ``sandbox.DEFAULT_BUDGET`` at the time of the render
        self.budget = budget
        self._unusable: str | None = None  # set by from_files when the file cannot be read

    @classmethod
    def from_files(cls, files: ModelFiles, special_tokens: dict[str, str | None] | None = None,
                   name: str = "default", required: bool = True, *,
                   budget: Budget | None = None) -> "ChatTemplate | None":
        """The template of a model: ``chat_template.jinja`` if present, else ``tokenizer_config.json``'s.

        A model without one (a base model) raises, or gives ``None`` when not ``required``.
        """
        config = _read_json(Path(files.tokenizer_config))
        unusable = None
        if files.chat_template is not None:
            from .hub import MAX_JSON_BYTES, read_bounded
            path = Path(files.chat_template)
            data, size = read_bounded(path, MAX_JSON_BYTES, TemplateError, "re-download it, or send a raw prompt")
            if data is None:  # refused unread, and kept for later: a raw prompt does not need the template
                data = b""
                unusable = (f"{path} is {size / 2**20:,.0f} MB, far too large for a chat template (at most "
                            f"{MAX_JSON_BYTES // 2**20} MB): re-download it, or send a raw prompt")
            try:
                source = data.decode("utf-8")
            except UnicodeDecodeError as e:  # kept for later: a raw prompt does not need the template
                source = data.decode("utf-8", errors="replace")
                unusable = (f"{path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}): the model's "
                            f"chat template is broken; re-download it, or send a raw prompt")
        else:
            source = config.get("chat_template")
            if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get(name) or named.get("default")
        if not isinstance(source, str):
            if not required:
                return None
            raise TemplateError(f"{files.root} has no chat template (neither chat_template.jinja nor a "
                                f"chat_template in tokenizer_config.json): it is not a chat model: send a raw prompt "
                                f"(qwen-lab generate --raw)")
        if special_tokens is None:
            from .tokenizer import special_tokens as read_special_tokens
            special_tokens = read_special_tokens(config)
        template = cls(source, special_tokens, budget=budget)
        template._unusable = unusable
        return template

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False,
               tools: list[dict] | None = None, documents: list[dict] | None = None, **variables: Any) -> str:
        """The prompt text for ``messages``.

        ``add_generation_prompt=True`` appends the header of the assistant's
        turn (``<|im_start|>assistant\\n`` for Qwen) so the model answers
        instead of continuing the last message. It defaults to False, as in
        transformers: forgetting it is the first pitfall of the walkthrough.

        A broken or hostile template, or one past its budget, raises a one-line ``TemplateError``.
        """
        if self._unusable:
            raise TemplateError(self._unusable)
        context = {**plain_data(self.special_tokens, "special tokens"),
                   **plain_data(variables, "template variables"),
                   "messages": _checked_messages(messages),
                   "tools": _list_of_objects(tools, "tools", "tool schemas ({'type': 'function', 'function': ...})"),
                   "documents": _list_of_objects(documents, "documents", "documents ({'title': ..., 'text': ...})"),
                   "add_generation_prompt": plain_data(add_generation_prompt, "add_generation_prompt")}
        return sandbox.render(self.source, context, self.budget, make_environment)


def _checked_messages(messages: Any) -> list[dict]:
    """The messages as plain data; ``None`` values are dropped, as transformers does."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TemplateError(f"message {i} must be a dict with 'role' and 'content', not {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise TemplateError(f"message {i} has no 'role' (a string such as 'user'): the template would "
                                f"skip it silently; give every message a role")
        message = {k: v for k, v in plain_data(m, "messages").items() if v is not None}
        # A reply's reasoning has had several names; templates read reasoning_content (Qwen3) or
        # thinking (gpt-oss). Fill both from whichever is given, exactly as transformers 5 does.
        reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


#: The names a message's reasoning is given under, the standard one first.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _list_of_objects(value: Any, what: str, example: str) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, dict) for x in value):
        raise TemplateError(f"{what} must be a list of dicts, {example}; got {type(value).__name__}"
                            + (" holding a non-dict" if isinstance(value, (list, tuple)) else ""))
    return plain_data(value, what)


def plain_data(value: Any, where: str = "input", depth: int = 0) -> Any:
    """A fresh copy of ``value`` made of JSON types only, so the template sees no Python objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if depth >= sandbox.MAX_DEPTH:
        raise TemplateError(f"the {where} nest deeper than {sandbox.MAX_DEPTH} levels (or contain themselves); "
                            f"pass plain, finite data")
    for base in (str, bool, int, float):  # subclasses (enums...) back to the plain type
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, dict):
        return {str(k): plain_data(v, where, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, where, depth + 1) for v in value]
    raise TemplateError(f"the {where} holds a {type(value).__name__}; pass only str, numbers, bools, lists and dicts")


def _read_json(path: Path) -> dict:
    from .hub import read_json_object  # here: the sandbox's worker imports this module without hub's imports
    return read_json_object(path, "the special tokens and the chat template", TemplateError)


# ---------------------------------------------------------------- the Jinja environment transformers uses
# What a chat template may call besides Jinja's own filters and globals. make_environment() runs
# in the sandbox's worker process, so this part of the module imports nothing heavy.

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


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt must keep them as they are.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def make_environment() -> Sandbox:
    """The Jinja environment chat templates expect (the one transformers uses), sandboxed."""
    return Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols],
                   filters={"tojson": _tojson},
                   globals={"raise_exception": _raise_exception, "strftime_now": _strftime_now})

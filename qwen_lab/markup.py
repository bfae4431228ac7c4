"""Model text as HTML that cannot carry markup: the panel's Markdown subset and its "inside" views.

Everything the model or a template wrote is untrusted: it is HTML-escaped first (attribute
values too), and only then are tags added — tags this module writes itself. Nothing the model
writes can become a tag, an attribute or a script.

>>> render_markdown("**hi** <script>alert(1)</script>")
'<p><b>hi</b> &lt;script&gt;alert(1)&lt;/script&gt;</p>'
"""
from __future__ import annotations

import html
import re

CSS = """
.ql-inside {margin-top: 4px; font-size: 12px;}
.ql-inside summary {cursor: pointer; color: #555;}
.ql-prompt-text {white-space: pre-wrap; background: #fafafa; border: 1px solid #ddd; padding: 4px; margin: 4px 0;
                 font-family: var(--jp-code-font-family, monospace); font-size: 11px; max-height: 200px; overflow: auto;}
.ql-tokens {line-height: 1.9; font-family: var(--jp-code-font-family, monospace); font-size: 11px;}
.ql-tok {border: 1px solid #ccc; border-radius: 3px; padding: 0 2px; margin: 0 1px; white-space: pre;
         unicode-bidi: isolate;}
.ql-special {background: #fff1c6; border-color: #d4a017; font-weight: bold;}
.ql-scale {color: #777; font-size: 11px;}
.ql-elided {color: #666; font-style: italic; background: #eee; border: 1px dashed #aaa; border-radius: 3px;
            padding: 0 4px; white-space: normal;}
"""


def render_markdown(text: str) -> str:
    """A Markdown subset as HTML, safe for untrusted text: everything is escaped first.

    >>> render_markdown("**hi** <script>alert(1)</script>")
    '<p><b>hi</b> &lt;script&gt;alert(1)&lt;/script&gt;</p>'
    """
    out, paragraph, items = [], [], []
    lines = text.split("\n")

    def flush():
        if paragraph:
            out.append("<p>" + "<br>".join(_inline(line) for line in paragraph) + "</p>")
            paragraph.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            flush()
            lang = line.strip()[3:].strip()
            code, i = [], i + 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                code.append(lines[i])
                i += 1
            label = f' data-lang="{html.escape(lang, quote=True)}"' if lang else ""
            out.append(f"<pre class='ql-code'{label}><code>{html.escape(chr(10).join(code))}</code></pre>")
        elif re.match(r"^\s*[-*] ", line):
            if paragraph:
                flush()
            items.append(re.sub(r"^\s*[-*] ", "", line))
        elif not line.strip():
            flush()
        else:
            if items:
                flush()
            paragraph.append(line)
        i += 1
    flush()
    return "".join(out)


def _inline(text: str) -> str:
    parts = re.split(r"(`[^`]+`)", text)
    rendered = []
    for part in parts:
        if len(part) > 1 and part.startswith("`") and part.endswith("`"):
            rendered.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            s = html.escape(part)
            s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
            # [^*]: an opening * looks no further than the next *, so a line of openers that never
            # close (" *a *a *a...") is rendered in linear time (with .+? each one scanned the rest of
            # the line: 24,000 characters took 8 s, and the panel redraws every 0.1 s).
            s = re.sub(r"(?<![*\w])\*(?!\s)([^*]+?)(?<!\s)\*(?!\w)", r"<i>\1</i>", s)
            rendered.append(s)
    return "".join(rendered)


def visible(piece: str) -> str:
    """A token's text with its whitespace made visible (a space is a real part of most tokens).

    >>> visible(" Paris\\n")
    '␣Paris↵'
    """
    return piece.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def token_spans(pieces: list[str], ids: list[int], special: set[int]) -> str:
    """Each token as a bordered span showing its text; special tokens marked; the id on hover.

    The boxes are bidi-isolated (``CSS``): a token holding a direction override such as U+202E would
    otherwise show every later box in reverse order, and the view would misstate the sequence.
    """
    spans = []
    for piece, i in zip(pieces, ids):
        cls = "ql-tok ql-special" if i in special else "ql-tok"
        spans.append(f"<span class='{cls}' title='id {i}'>{html.escape(visible(piece))}</span>")
    return "".join(spans)


def probability_color(p: float) -> str:
    """Red for an unlikely token, through yellow, to green for a near-certain one."""
    return f"hsl({round(120 * max(0.0, min(1.0, p)))}, 75%, 82%)"


#: The English words of the "inside" view; the panel passes another language's (``panel.LABELS``).
INSIDE_WORDS = {
    "summary": "inside: the prompt ({tokens:,} tokens of the {context:,}-token context) · each token's probability "
               "· ended: {finish}",
    "prompt": "The prompt the chat template produced, exactly:",
    "repeated": "Each turn re-sends the whole conversation: what the prompt above already showed is left out "
                "here (⋯).",
    "elided_chars": "⋯ the first {chars:,} characters, the same as in the prompt above ⋯",
    "elided_tokens": "⋯ the first {tokens:,} tokens, the same as above ⋯",
    "tokens": "Its tokens (special tokens marked; hover for the id):",
    "reply": "The reply, token by token, coloured by probability (hover for the likeliest alternatives):",
    "scale": "red: unlikely · yellow: one of several · green: near certain",
    "likeliest": "likeliest",
}


def choice_spans(pieces: list[str], choices, describe, likeliest: str = INSIDE_WORDS["likeliest"]) -> str:
    """The reply, one span per token coloured by its probability; the top alternatives on hover.

    ``choices`` are ``sampling.TokenChoice``s; ``describe(token_id)`` gives a token's text.
    """
    spans = []
    for piece, c in zip(pieces, choices):
        alternatives = ", ".join(f"{visible(describe(i))!r} {p:.3f}" for i, p in c.alternatives)
        title = f"p = {c.prob:.3f} · id {c.token_id} · {likeliest}: {alternatives}"
        spans.append(f"<span class='ql-tok' style='background: {probability_color(c.prob)}' "
                     f"title=\"{html.escape(title, quote=True)}\">{html.escape(visible(piece))}</span>")
    return "".join(spans)


def inside_view(prompt_text: str, prompt_ids: list[int], special: set[int], context: int, choices, describe,
                finish: str, words: dict | None = None, *, shared_chars: int = 0, shared_tokens: int = 0) -> str:
    """The panel's "inside" of one reply: the exact prompt and its tokens, the reply's probabilities, why it ended.

    ``choices`` are the reply's ``sampling.TokenChoice``s; ``describe(token_id)`` gives a token's text;
    ``words``: the view's text in the learner's language (``INSIDE_WORDS`` is the English).

    ``shared_chars`` and ``shared_tokens``: how many of the prompt's first characters and tokens are
    those of the prompt shown above it (the previous reply's). They are left out, in their place a
    marker that says how many, so a conversation's views, read top to bottom, show each part of the
    last prompt once: their size grows with the conversation, where whole prompts grew with its
    square (``panel.ChatPanel``: 280 kB of HTML after 16 turns of tiny-chat, 96 kB this way).

    >>> from qwen_lab.sampling import TokenChoice
    >>> view = inside_view("<s>Hi</s><s>Yo", [1, 5, 2, 1, 6], {1, 2}, 100, [TokenChoice(7, 0.9, [(7, 0.9)])],
    ...                    lambda i: {1: "<s>", 2: "</s>", 5: "Hi", 6: "Yo", 7: "!"}[i], "eos",
    ...                    shared_chars=9, shared_tokens=3)
    >>> "the first 9 characters, the same" in view and "&lt;s&gt;Yo</div>" in view
    True
    >>> "the first 3 tokens" in view and "id 5" not in view and "id 6" in view
    True
    """
    w = {**INSIDE_WORDS, **(words or {})}
    summary = w["summary"].format(tokens=len(prompt_ids), context=context, finish=html.escape(finish))
    text, tokens, note = html.escape(prompt_text[shared_chars:]), prompt_ids[shared_tokens:], ""
    if shared_chars or shared_tokens:
        note = f"<div>{html.escape(w['repeated'])}</div>"
    if shared_chars:
        text = f"<span class='ql-elided'>{html.escape(w['elided_chars'].format(chars=shared_chars))}</span>{text}"
    shown = token_spans([describe(i) for i in tokens], tokens, special)
    if shared_tokens:
        shown = (f"<span class='ql-tok ql-elided'>{html.escape(w['elided_tokens'].format(tokens=shared_tokens))}"
                 f"</span>{shown}")
    reply = [describe(c.token_id) for c in choices]
    return (f"<details class='ql-inside'><summary>{summary}</summary>{note}"
            f"<div>{html.escape(w['prompt'])}</div>"
            f"<div class='ql-prompt-text'>{text}</div>"
            f"<div>{html.escape(w['tokens'])}</div>"
            f"<div class='ql-tokens'>{shown}</div>"
            f"<div>{html.escape(w['reply'])}</div>"
            f"<div class='ql-tokens'>{choice_spans(reply, choices, describe, w['likeliest'])}</div>"
            f"<div class='ql-scale'>{html.escape(w['scale'])}</div></details>")

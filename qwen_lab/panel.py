"""A chat panel for notebooks (ipywidgets 8): streams, stops, regenerates, never loses the history.

>>> # in a notebook cell:
>>> # from qwen_lab.panel import ChatPanel
>>> # ChatPanel.load("qwen-lab/tiny-chat")        # the cell returns at once; chat below

Design:

* generation runs in a worker thread, so the kernel stays responsive and the
  Stop button is heard; Stop sets a ``threading.Event`` that the worker's generation
  checks between tokens, so it stops before the next one;
* the reply being written has a widget of its own (``streaming``), redrawn at most every
  ``refresh_s`` seconds (each redraw is one message to the browser); the conversation before it
  (``transcript``) is redrawn only when it changes, so a long conversation, or its *Show inside*
  views (megabytes at a long context), is not re-sent ten times a second, and a learner scrolled
  up to read it keeps their place. The conversation's box opens at its newest message;
* the model's text is untrusted: ``qwen_lab.markup`` escapes it first, then turns
  a small Markdown subset into tags it writes itself — nothing the model writes
  becomes a tag;
* *Show inside* (in Settings, off by default) keeps, per reply, the exact prompt
  the template produced and its tokens, and each new token's probability with
  its likeliest alternatives (``top_logprobs=5``), shown under the reply. A reply's view
  leaves out the start its prompt shares with the prompt shown above it (a marker says how
  many characters and tokens): every turn re-sends the whole conversation, and views that each
  showed it whole grew with the square of its length (``markup.inside_view``). The records behind
  the views are kept the same way, each what its prompt added, the whole prompt rebuilt when
  asked for (``InsideRecord``);
* one ``ChatModel`` may serve several panels: its lock lets one reply be generated at a time.
  ``ChatPanel.load`` keeps **one** model in memory. Re-running a cell, or a second panel, with the
  same model, dtype and device reuses it; another model, or the same one with another ``dtype`` or
  ``device`` (compared as given: ``"auto"`` and ``"bfloat16"`` are two), first
  releases it from every panel using it, then loads: trying Qwen2.5-0.5B, then 1.5B, then 3B on
  an 8 GB laptop holds one of them at a time, not all three (unless a variable of the notebook
  holds one: ``chat = panel.chat`` keeps it). A released panel keeps its
  conversation (Export, Undo, New chat still work) and says in one line, at once and again when a
  message is sent, how to chat again: run the cell with its ``ChatPanel.load`` again. To keep two
  models side by side, load them yourself: ``ChatPanel(ChatModel.load(...))``; ``load`` releases
  only the model it loaded;
* each panel keeps its conversation's KV cache between replies (``generation.PromptCache``):
  a new message, Regenerate or Undo prefills only what the last reply did not already compute,
  so the wait for a reply's first token does not grow with the conversation. On a GPU the keys and
  values are in the caches of the model's static decoder, one per size, which every generation on
  that model shares: a reply after another generation wrote into them (another panel's reply)
  prefills its whole conversation; one needing caches of another size copies what it kept into
  them. ``ChatPanel.load`` releasing a model frees its decoders too. ipywidgets keeps
  every panel ever made alive (its buttons hold it), so a new panel frees the caches of the
  panels made before it: re-running a cell, or trying another model, does not pile them up;
* every word the panel shows comes from ``LABELS``, in English or Traditional
  Chinese: ``lang="zh-TW"``, or by default ``qwen_lab.lang.choose_language()``
  (``QWEN_LAB_LANG``, or a notebook in ``notebooks/zh-TW/``). What the model and
  the template write is shown as it is.
"""
from __future__ import annotations

import gc
import html
import json
import os
import re
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Mapping
from itertools import chain
from pathlib import Path

import ipywidgets as w

from . import static_decode
from .errors import ModelReleasedError, QwenLabError
from .generation import ChatModel, PromptCache
from .hub import resolve
from .load import checkpoint_dtype, choose_dtype, parse_device, read_config, weight_files_changed
from .lang import choose_language
from .markup import CSS as _INSIDE_CSS
from .markup import INSIDE_WORDS, inside_view, render_markdown

__all__ = ["LABELS", "ChatPanel", "InsideRecord", "render_markdown"]

CONTEXT_WARNING = 0.8  # share of the context window after which the panel warns

_loaded: dict[tuple, ChatModel] = {}  # (model, dtype, device) -> what ChatPanel.load loaded: one at most
_panels: weakref.WeakSet = weakref.WeakSet()  # every panel made: a new one frees their KV caches, load their model

#: Every label, button, placeholder and status line of the panel, per language (``qwen_lab.lang``).
#: The ``{...}`` fields are filled with ``str.format``; a language may leave one out (Chinese has no plural).
LABELS = {
    "en": {
        "title": "<b>{name}</b> · context {context:,} tokens{shown}",
        "system": "System",
        "temperature": "temperature",
        "top_p": "top-p",
        "top_k": "top-k",
        "max_new_tokens": "max new tokens",
        "repetition_penalty": "repetition penalty",
        "seed": "seed",
        "inside": "Show inside: the exact prompt, and each token's probability",
        "placeholder": "Type a message and press Enter",
        "send": "Send",
        "stop": "Stop",
        "regenerate": "Regenerate",
        "undo": "Undo",
        "new_chat": "New chat",
        "export": "Export",
        "settings": "Settings",
        "reply_meta": "{tokens} tokens · first token {ttft:.2f} s · {rate:.1f} tokens/s on {threads} thread{plural}",
        "reused": "{cached:,} of {prompt:,} prompt tokens kept from the last reply",
        "stopped": "stopped",
        "half_character": "the message holds {char!r} at position {position}, half of a character (not valid "
                          "Unicode); nothing was sent: remove it and send again",
        "context_full": "The conversation ({prompt:,} tokens) fills the model's context of {context:,} tokens: "
                        "press New chat or Undo to make room.",
        "context_nearly_full": "Context nearly full: {used:.0%} ({prompt:,} of {context:,} tokens); this reply can "
                               "have at most {max_new:,} tokens. Start a new chat soon.",
        "context_end": "The reply reached the end of the context window: press New chat or Undo to go on.",
        "released": "{name} was released from memory when ChatPanel.load loaded {other} (it keeps one model at "
                    "a time): run the cell that loaded {name} with ChatPanel.load again to chat with it",
        "error": "Error: ",
        "error_kind": "Error: ",  # the messages are English already: no kind before them
        "error_kinds": {},
        "inside_view": INSIDE_WORDS,
    },
    "zh-TW": {
        "title": "<b>{name}</b> · 上下文 {context:,} 個 token{shown}",
        "system": "系統提示",
        "temperature": "溫度",
        "top_p": "top-p",
        "top_k": "top-k",
        "max_new_tokens": "最多新 token 數",
        "repetition_penalty": "重複懲罰",
        "seed": "亂數種子",
        "inside": "看看內部：確切的提示詞，以及每個 token 的機率",
        "placeholder": "輸入訊息，按 Enter 送出",
        "send": "送出",
        "stop": "停止",
        "regenerate": "重新產生",
        "undo": "復原",
        "new_chat": "新對話",
        "export": "匯出",
        "settings": "設定",
        "reply_meta": "{tokens} 個 token · 第一個 token {ttft:.2f} 秒 · 每秒 {rate:.1f} 個 token，"
                      "用 {threads} 個執行緒",
        "reused": "提示詞 {prompt:,} 個 token 中有 {cached:,} 個沿用上一次回覆算好的",
        "stopped": "已停止",
        "half_character": "訊息第 {position} 個位置是 {char!r}，只是半個字元（不是有效的 Unicode）；"
                          "什麼都沒送出：刪掉它再送一次",
        "context_full": "這段對話（{prompt:,} 個 token）已經填滿模型 {context:,} 個 token 的上下文："
                        "按「新對話」或「復原」騰出空間。",
        "context_nearly_full": "上下文快滿了：已用 {used:.0%}（{context:,} 個 token 中的 {prompt:,} 個）；"
                               "這次回覆最多 {max_new:,} 個 token。請盡快開新對話。",
        "context_end": "回覆寫到了上下文視窗的盡頭：按「新對話」或「復原」才能繼續。",
        "released": "ChatPanel.load 載入 {other} 時，已把 {name} 從記憶體釋放（它一次只留一個模型）："
                    "要再和 {name} 對話，請重新執行用 ChatPanel.load 載入它的那個儲存格",
        "error": "錯誤：",
        # the library's messages are English: a learner reads here, in Chinese, what kind of error it is
        "error_kind": "錯誤（{kind}）：",
        "error_kinds": {
            "TemplateError": "聊天範本無法產生提示詞",
            "NumericalError": "模型算出了 NaN 或無限大：權重或設定檔壞了",
            "ContextTooLongError": "提示詞超出了模型的上下文",
            "ModelReleasedError": "這個面板的模型已從記憶體釋放",
            "SettingError": "有個設定值不合法",
            "CheckpointError": "模型的權重檔有問題",
            "DownloadError": "取不到模型的檔案",
            "UnsupportedArchitectureError": "不支援這種模型架構",
            "QwenLabError": "qwen_lab 回報的錯誤",
            "Exception": "程式出了意料之外的錯誤",
        },
        "inside_view": {
            "summary": "內部：提示詞（上下文 {context:,} 個 token 中的 {tokens:,} 個）· 每個 token 的機率 "
                       "· 結束原因：{finish}",
            "prompt": "聊天範本產生的提示詞，一字不差：",
            "repeated": "每一輪都會重送整段對話：上面的提示詞已經顯示過的部分，這裡省略（⋯）。",
            "elided_chars": "⋯ 前 {chars:,} 個字元，和上面的提示詞相同 ⋯",
            "elided_tokens": "⋯ 前 {tokens:,} 個 token，和上面相同 ⋯",
            "tokens": "它的 token（特殊 token 有標示；滑鼠停在上面可看 id）：",
            "reply": "回覆，一個 token 一個 token，依機率上色（滑鼠停在上面可看最可能的其他選擇）：",
            "scale": "紅：不太可能 · 黃：幾個選擇之一 · 綠：幾乎確定",
            "likeliest": "最可能",
        },
    },
}


# ---------------------------------------------------------------- the panel

_STYLE = """<style>
.ql-chat {font-family: var(--jp-content-font-family, sans-serif); font-size: 14px; max-height: 420px;
          overflow-y: auto; padding: 4px; display: flex; flex-direction: column-reverse;}
.ql-msg {margin: 6px 0; padding: 6px 10px; border-radius: 8px; white-space: normal;}
.ql-user {background: #e8f0fe; margin-left: 15%;}
.ql-assistant {background: #f4f4f4; margin-right: 15%;}
.ql-msg p {margin: 0 0 4px 0;}
.ql-code {background: #272822; color: #f8f8f2; padding: 6px; border-radius: 4px; overflow-x: auto;}
.ql-meta {color: #777; font-size: 11px;}
.ql-note {color: #a15c00; font-size: 12px;}
.ql-error {color: #b00020; font-size: 12px;}
""" + _INSIDE_CSS + "</style>"


class ChatPanel:
    """Chat with a model inside a notebook. Display it by leaving it last in a cell.

    ``messages`` is the conversation (system prompt excluded); ``replies``
    holds each assistant reply's statistics, aligned with the assistant messages, and under
    ``"inside"`` its ``InsideRecord`` when *Show inside* was on (else ``None``).
    """

    def __init__(self, chat: ChatModel, *, system_prompt: str | None = None, refresh_s: float = 0.1,
                 template_vars: dict | None = None, lang: str | None = None, **overrides) -> None:
        """``overrides`` fix generation settings the controls do not show, e.g. ``eos_token_id=[]``;
        ``template_vars`` go to the chat template, e.g. ``{"enable_thinking": False}`` for Qwen3;
        ``lang``: ``"en"`` or ``"zh-TW"`` (default: ``qwen_lab.lang.choose_language()``)."""
        self.lang = choose_language(lang)
        self.labels = L = LABELS[self.lang]
        self._chat, self.refresh_s, self.overrides = chat, refresh_s, overrides
        self._released = self._released_note = ""  # why the model was let go (ChatPanel.load), once it was
        self._views: dict[int, tuple[InsideRecord, str]] = {}  # id of a reply's "inside" -> it, and its view's HTML
        self.template_vars = dict(template_vars or {})
        self.messages: list[dict] = []
        self.replies: list[dict] = []        # per assistant message: stats and flags
        self.note = ""                        # warning shown under the transcript (plain text)
        self.error = ""                       # the last generation error, shown the same way
        self._error_lead = self.labels["error"]  # before it: "Error: ", or in Chinese the kind of error too
        self._worker: threading.Thread | None = None
        #: this conversation's keys and values, kept between replies: each one prefills only what is new
        self.prompt_cache = PromptCache()
        for earlier in list(_panels):  # still usable: the next reply of one prefills its conversation once
            earlier.prompt_cache.clear()
        _panels.add(self)
        self._cancel = threading.Event()
        self._partial: str | None = None      # the reply being streamed

        g = chat.generation_config.replace(**overrides)
        default_system = system_prompt if system_prompt is not None else _template_default_system(chat)
        shown = "".join(f" · {html.escape(k)}={html.escape(str(v))}"
                        for k, v in {**overrides, **self.template_vars}.items())
        self.title = w.HTML(L["title"].format(name=html.escape(chat.name), context=chat.context_length, shown=shown))
        self.system = w.Textarea(value=default_system, description=L["system"], layout=w.Layout(width="98%"),
                                 rows=2)
        slider = dict(continuous_update=False, style={"description_width": "initial"},
                      layout=w.Layout(width="230px"))
        self.temperature = w.FloatSlider(value=g.temperature if g.do_sample else 0.0, min=0.0, max=2.0, step=0.05,
                                         description=L["temperature"], **slider)
        self.top_p = w.FloatSlider(value=g.top_p, min=0.05, max=1.0, step=0.05, description=L["top_p"], **slider)
        self.top_k = w.IntSlider(value=g.top_k, min=0, max=200, description=L["top_k"], **slider)
        self.max_new_tokens = w.IntSlider(value=min(g.max_new_tokens, 512), min=1,
                                          max=min(4096, chat.context_length), description=L["max_new_tokens"],
                                          **slider)
        self.repetition_penalty = w.FloatSlider(value=g.repetition_penalty, min=1.0, max=2.0, step=0.01,
                                                description=L["repetition_penalty"], **slider)
        self.seed = w.IntText(value=g.seed if g.seed is not None else 0, description=L["seed"],
                              layout=w.Layout(width="160px"))
        self.inside = w.Checkbox(value=False, indent=False, layout=w.Layout(width="auto"),
                                 description=L["inside"])
        self.transcript = w.HTML(layout=w.Layout(width="98%"))  # the conversation so far
        self.streaming = w.HTML(layout=w.Layout(width="98%"))   # the reply being written, while it is
        self.status = w.HTML()
        self.input = w.Text(placeholder=L["placeholder"], layout=w.Layout(width="60%"))
        self.send_button = w.Button(description=L["send"], button_style="primary", icon="paper-plane")
        self.stop_button = w.Button(description=L["stop"], button_style="warning", icon="stop", disabled=True)
        self.regenerate_button = w.Button(description=L["regenerate"], icon="redo")
        self.undo_button = w.Button(description=L["undo"], icon="undo")
        self.clear_button = w.Button(description=L["new_chat"], icon="trash")
        self.export_button = w.Button(description=L["export"], icon="download")
        self.export_box = w.Textarea(layout=w.Layout(width="98%", display="none"), rows=6)

        self.send_button.on_click(lambda _: self.send())
        with warnings.catch_warnings():  # the submit event is the one that means "Enter", not "focus left"
            warnings.simplefilter("ignore", DeprecationWarning)
            self.input.on_submit(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        self.regenerate_button.on_click(lambda _: self.regenerate())
        self.undo_button.on_click(lambda _: self.undo())
        self.clear_button.on_click(lambda _: self.clear())
        self.export_button.on_click(lambda _: self._show_export())

        controls = w.HBox([self.temperature, self.top_p, self.top_k], layout=w.Layout(flex_flow="row wrap"))
        controls2 = w.HBox([self.max_new_tokens, self.repetition_penalty, self.seed],
                           layout=w.Layout(flex_flow="row wrap"))
        buttons = w.HBox([self.input, self.send_button, self.stop_button])
        actions = w.HBox([self.regenerate_button, self.undo_button, self.clear_button, self.export_button])
        settings = w.Accordion(children=[w.VBox([self.system, controls, controls2, self.inside])],
                               selected_index=None)
        settings.set_title(0, L["settings"])
        self.widget = w.VBox([self.title, settings, self.transcript, self.streaming, self.status, buttons,
                              actions, self.export_box])
        self.widget.add_class("qwen-lab-chat-panel")
        self._redraw()

    @classmethod
    def load(cls, model: str = "qwen-lab/tiny-chat", *, dtype: str = "auto", device: str | None = None,
             **kwargs) -> "ChatPanel":
        """A panel on ``model``. ``load`` keeps one model: the same ``model``, ``dtype`` and ``device``
        again share its load (as loaded: ``"auto"`` and the dtype it picks are the same), unless a file its
        weights are read from was rewritten in place since (each reply is refused: "load the model again");
        another releases it from the panels using it, then loads (module docstring).

        The new model's files are found (or downloaded), and ``dtype`` and ``device`` checked, before
        anything is released: a misspelt name keeps the model there was.
        """
        key = (str(model), dtype, device)
        # a model whose weights file was rewritten in place since is refused ("load the model again"): not kept
        if key not in _loaded or weight_files_changed(_loaded[key].model):
            files = resolve(model)
            where = parse_device(device)
            wanted = choose_dtype(dtype, where, checkpoint_dtype(read_config(files.config)))
            same = next((chat for chat in _loaded.values() if chat.name == files.model_id and chat.device == where
                         and chat.model.lm_head.weight.dtype == wanted and not weight_files_changed(chat.model)),
                        None)
            if same is not None:  # the same model as written another way ("auto" and what it picks): no reload
                _loaded[key] = same
                return cls(same, **kwargs)
            other = f"{files.model_id} ({str(wanted).removeprefix('torch.')})"
            for earlier in set(_loaded.values()):
                for panel in list(_panels):
                    if panel._chat is earlier:
                        panel._release(other)
                # its static decoders' KV caches (and, on a GPU, CUDA graphs) go even where a notebook
                # variable still holds the model (``chat = panel.chat``): a later generation makes them again
                static_decode.release(earlier.model)
            _loaded.clear()
            # Its memory goes back before the new model takes its own: the panels held the last references
            # (a cycle among what the model holds, none seen on a CPU, would wait for Python's next collection).
            gc.collect()
            _loaded[key] = ChatModel.from_files(files, dtype=dtype, device=device)
        return cls(_loaded[key], **kwargs)

    @property
    def chat(self) -> ChatModel:
        """The model this panel chats with; ``ModelReleasedError`` once ``ChatPanel.load`` released it."""
        if self._chat is None:
            raise ModelReleasedError(self._released)
        return self._chat

    def _release(self, other: str) -> None:
        """Let go of the model and its KV cache (``ChatPanel.load`` loads ``other``); the conversation stays.

        A reply being written still finishes: its worker holds the model until then."""
        name = f"{self._chat.name} ({str(self._chat.model.lm_head.weight.dtype).removeprefix('torch.')})"
        self._chat = None
        self._released = LABELS["en"]["released"].format(name=name, other=other)  # the library's errors: English
        self._released_note = self.labels["released"].format(name=name, other=other)
        self.prompt_cache.clear()
        self.note = self._released_note
        self._redraw()

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)

    # ---------------------------------------------------------------- actions

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def send(self, text: str | None = None) -> None:
        """Send ``text`` (default: the input box) as the next user message."""
        text = self.input.value if text is None else text
        if not isinstance(text, str) or not text.strip() or self.busy:
            return
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # half a character (a lone surrogate): no tokenizer can take it
            self._fail(self.labels["half_character"].format(char=text[e.start], position=e.start))
            return
        self.input.value = ""
        self.messages.append({"role": "user", "content": text})
        if not self._start():
            self.messages.pop()        # refused (context full): nothing lost, the text goes back
            self.input.value = text

    def stop(self) -> None:
        """Stop the reply before its next token; the partial reply is kept and marked."""
        self._cancel.set()

    def regenerate(self) -> None:
        """Replace the last reply with a new one (a new seed when sampling)."""
        if self.busy or not self.messages or self.messages[-1]["role"] != "assistant":
            return
        removed = self.messages.pop(), self.replies.pop()
        if self.temperature.value > 0:
            self.seed.value += 1
        if not self._start():
            self.messages.append(removed[0])
            self.replies.append(removed[1])
            self._redraw()

    def undo(self) -> None:
        """Remove the last exchange; the user's text returns to the input box."""
        if self.busy or not self.messages:
            return
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
            self.replies.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            self.input.value = self.messages.pop()["content"]
        self.note = self.error = ""
        self._redraw()

    def clear(self) -> None:
        """Start a new chat (settings are kept)."""
        if self.busy:
            return
        self.messages.clear()
        self.replies.clear()
        self.prompt_cache.clear()  # its memory too
        self.note = self.error = ""
        self.export_box.layout.display = "none"
        self._redraw()

    def export(self, path: str | Path | None = None) -> str:
        """The conversation as JSON messages (system prompt first); also written to ``path`` if given.

        The file is replaced atomically: it holds the old export or the new one, never half of one.
        """
        data = json.dumps(self._conversation(), ensure_ascii=False, indent=2)
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:  # text that is not valid Unicode: JSON's \u escapes keep it exactly
            data = json.dumps(self._conversation(), ensure_ascii=True, indent=2)
        if path is not None:
            _write_atomically(Path(path), data + "\n")
        return data

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current reply is finished (for scripts and tests)."""
        if self._worker is not None:
            self._worker.join(timeout)

    # ---------------------------------------------------------------- generation

    def _conversation(self) -> list[dict]:
        system = self.system.value.strip()
        return ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in self.messages]

    def _start(self) -> bool:
        if self._chat is None:
            self._fail(self._released_note)
            return False
        conversation = self._conversation()
        self.error = ""
        try:
            prompt_text = self.chat.render(conversation, **self.template_vars)
            prompt = self.chat.tokenizer.encode(prompt_text)
        except QwenLabError as e:
            self._fail(str(e), e)
            return False
        context = self.chat.context_length
        room = context - len(prompt)
        if room <= 0:
            self.note = self.labels["context_full"].format(prompt=len(prompt), context=context)
            self._redraw()
            return False
        max_new = min(self.max_new_tokens.value, room)
        used = len(prompt) / context
        self.note = ""
        if used >= CONTEXT_WARNING:
            self.note = self.labels["context_nearly_full"].format(used=used, prompt=len(prompt), context=context,
                                                                  max_new=max_new)
        settings = dict(do_sample=self.temperature.value > 0, temperature=self.temperature.value,
                        top_p=self.top_p.value, top_k=self.top_k.value, max_new_tokens=max_new,
                        repetition_penalty=self.repetition_penalty.value, seed=self.seed.value)
        settings = {**self.overrides, **settings}
        inside = None
        if self.inside.value:  # the model's choices: 5 alternatives per token (a cost too small to measure here: benchmarks/RESULTS.md)
            settings["top_logprobs"] = 5
            inside = InsideRecord(prompt_text, prompt, previous=self._last_record())
        self._cancel = threading.Event()
        self._partial = ""
        self._set_busy(True)
        self._redraw()  # the user's message (and any note) shows at once
        self._worker = threading.Thread(target=self._run, args=(self._chat, prompt, settings, inside), daemon=True)
        self._worker.start()
        return True

    def _run(self, chat: ChatModel, prompt: list[int], settings: dict, inside: InsideRecord | None) -> None:
        try:  # chat: this reply's model, even if ChatPanel.load releases it from the panel meanwhile
            with chat.lock:  # panels sharing a model take turns
                stream = chat.stream(prompt, cancel=self._cancel, cache=self.prompt_cache, **settings)
                last = 0.0
                for delta in stream:
                    self._partial += delta
                    if time.monotonic() - last >= self.refresh_s:
                        last = time.monotonic()
                        self._redraw_streaming()
                result = stream.result
            self.messages.append({"role": "assistant", "content": result.text})
            if inside is not None:
                inside.choices, inside.finish = result.choices, result.finish_detail
                view = self._inside_html(chat, inside)  # drawn once: it never changes
            self.replies.append({**result.stats(), "stopped": result.finish_reason == "cancelled", "inside": inside})
            if inside is not None:  # after its reply: a redraw drops the views of replies not there
                self._views[id(inside)] = inside, view
            if result.finish_reason == "length" and \
                    result.prompt_tokens + result.generated_tokens >= chat.context_length:
                self.note = self.labels["context_end"]
        except Exception as e:  # shown in the panel; the history stays as it was
            self._fail(f"{type(e).__name__}: {e}" if not isinstance(e, QwenLabError) else str(e), e)
        finally:
            if self._chat is None:  # released while this reply was written: the keys and values it kept too
                self.prompt_cache.clear()
                self.note = self._released_note
            self._partial = None
            self._set_busy(False)
            self._redraw()

    def _fail(self, message: str, error: BaseException | None = None) -> None:
        self.note, self.error = "", message  # an error replaces any note
        kinds = self.labels["error_kinds"]  # the error's own class, or the nearest one it derives from
        classes = type(error).__mro__ if error is not None else ()
        kind = next((kinds[c.__name__] for c in classes if c.__name__ in kinds), None)
        self._error_lead = self.labels["error_kind"].format(kind=kind) if kind else self.labels["error"]
        self._redraw()

    def _set_busy(self, busy: bool) -> None:
        self.stop_button.disabled = not busy
        for b in (self.send_button, self.regenerate_button, self.undo_button, self.clear_button):
            b.disabled = busy

    def _show_export(self) -> None:
        self.export_box.value = self.export()
        self.export_box.layout.display = None

    # ---------------------------------------------------------------- drawing

    def _redraw(self) -> None:
        """Everything: the conversation, the reply being written, the status line."""
        # The box scrolls from its bottom (flex column-reverse around one block): it opens at the newest
        # message, as a chat does; a plain scrolling box opened at the oldest on every redraw.
        parts, replies = [_STYLE, "<div class='ql-chat'><div>"], iter(self.replies)
        drawn = list(self._views)  # then the replies: the worker adds a reply before its view
        kept = {id(r["inside"]) for r in self.replies if r and r.get("inside")}
        for i in drawn:
            if i not in kept:  # the view of a reply taken back (Undo, Regenerate, New chat)
                self._views.pop(i, None)  # (a redraw in the other thread may have dropped it)
        for m in self.messages:
            role = m["role"]
            body = render_markdown(m["content"])
            meta = ""
            if role == "assistant":
                r = next(replies, None)
                if r:
                    threads = r["decode_threads"]
                    line = self.labels["reply_meta"].format(tokens=r["generated_tokens"], ttft=r["ttft_s"],
                                                            rate=r["decode_tokens_per_s"], threads=threads,
                                                            plural="s" if threads != 1 else "")
                    if r.get("cached_tokens"):  # the KV cache kept from the last reply (generation.PromptCache)
                        line += " · " + self.labels["reused"].format(cached=r["cached_tokens"],
                                                                     prompt=r["prompt_tokens"])
                    stopped = f" · <b>{html.escape(self.labels['stopped'])}</b>" if r["stopped"] else ""
                    meta = f"<div class='ql-meta'>{html.escape(line)}{stopped}</div>"
                view = self._views.get(id(r.get("inside"))) if r else None
                if view and view[0] is r["inside"]:
                    meta += view[1]
            parts.append(f"<div class='ql-msg ql-{role}'>{body}{meta}</div>")
        parts.append("</div></div>")
        self.transcript.value = "".join(parts)  # unchanged: nothing is sent (traitlets compares)
        self._redraw_streaming()
        status = html.escape(self.note, quote=False)
        if self.error:
            status += f"<span class='ql-error'>{html.escape(self._error_lead + self.error)}</span>"
        self.status.value = _sendable(f"<div class='ql-note'>{status}</div>") if status else ""

    def _redraw_streaming(self) -> None:
        """Only the reply being written (empty when none is): what changes while a reply streams."""
        partial = self._partial
        self.streaming.value = "" if partial is None else (
            f"<div class='ql-chat'><div><div class='ql-msg ql-assistant ql-streaming'>{render_markdown(partial)}"
            f"<span class='ql-meta'> ▍</span></div></div></div>")
        self.streaming.layout.display = "none" if partial is None else None  # an empty widget still takes a line

    def _last_record(self) -> InsideRecord | None:
        """The record of the last *Show inside* view: a new prompt is kept, and viewed, as what it adds to that one.

        A view leaves out the first characters and tokens its prompt shares with it. Each turn's prompt is
        the one before, then the reply, then the new message: views that each showed the whole prompt grew
        with the square of the conversation (16 turns of tiny-chat, 40-token replies: 280 kB of HTML, re-sent
        twice a turn; 96 kB now, and twice 8 turns' 48 kB). What the prompt added is what is new to a
        learner, the last reply as the template wrote it back included; a marker says what is left out and
        how long it is. (The whole prompt under the last reply alone, earlier views collapsed, would still
        send the whole prompt every turn, megabytes at a long context, and hide what each turn added: the
        view's lesson.) Compared, not assumed (``InsideRecord``): an edited system prompt, or a template
        that rewrites earlier turns (Qwen3 drops their thinking), shares less, and the view shows more."""
        return next((r["inside"] for r in reversed(self.replies) if r and r.get("inside")), None)

    def _inside_html(self, chat: ChatModel, inside: InsideRecord) -> str:
        tok = chat.tokenizer
        return inside_view(inside["prompt_text"], inside["prompt_ids"], tok.special_ids, chat.context_length,
                           inside["choices"], lambda i: tok.decode([i]), inside["finish"], self.labels["inside_view"],
                           shared_chars=inside["shared_chars"], shared_tokens=inside["shared_tokens"])


class InsideRecord(Mapping):
    """What *Show inside* keeps of one reply: its prompt, the reply's tokens and their alternatives, why it ended.

    Read as a dict: ``record["prompt_text"]`` and ``record["prompt_ids"]``, the exact prompt the model
    was sent; ``["choices"]``, the reply's ``sampling.TokenChoice`` list; ``["finish"]``; and
    ``["shared_chars"]`` and ``["shared_tokens"]``, how much of the prompt's start is the previous
    record's (``previous``; the view leaves that out).

    Only what the prompt added to the previous one is kept (``new_text``, ``new_ids``); the whole
    prompt is rebuilt from the records before it each time it is asked for. Each turn's prompt is the
    one before, then the reply, then the new message: records that each held their whole prompt grew
    with the square of the conversation. 32 turns of tiny-chat (24-token replies, a 1,117-token prompt
    at the end): they held 870 kB, 3.0 times what they held at 16 turns (their prompts 650 kB, 3.8
    times); now 269 kB, 1.9 times (the prompts 47 kB). Rebuilding that last prompt takes 10 us for its
    text, 19 us for its ids, twice a turn (its view, and the next prompt compared with it). What is
    shared is compared, not assumed: an edited system prompt, or a template that rewrites earlier
    turns (Qwen3 drops their thinking), shares less, and the record keeps more.

    >>> first = InsideRecord("<s>Hi</s><s>", [1, 5, 2, 1])
    >>> second = InsideRecord("<s>Hi</s><s>Yo</s><s>", [1, 5, 2, 1, 6, 2, 1], previous=first)
    >>> second["shared_chars"], second["shared_tokens"], second.new_text, second.new_ids
    (12, 4, 'Yo</s><s>', [6, 2, 1])
    >>> second["prompt_text"], second["prompt_ids"]
    ('<s>Hi</s><s>Yo</s><s>', [1, 5, 2, 1, 6, 2, 1])

    Pickled and deep-copied as its own parts and its ``previous`` (``__reduce__``): a copy of a list of
    a conversation's records shares the earlier records as the originals do.
    """

    __slots__ = ("previous", "shared_chars", "shared_tokens", "new_text", "new_ids", "choices", "finish",
                 "_position", "_anchors")
    _KEYS = ("prompt_text", "prompt_ids", "shared_chars", "shared_tokens", "choices", "finish")

    def __init__(self, prompt_text: str, prompt_ids: list[int], previous: "InsideRecord | None" = None) -> None:
        chars = tokens = 0
        if previous is not None:
            chars = len(os.path.commonprefix([previous["prompt_text"], prompt_text]))
            tokens = len(os.path.commonprefix([previous["prompt_ids"], prompt_ids]))
        self.previous = previous
        self.shared_chars, self.shared_tokens = chars, tokens
        self.new_text, self.new_ids = prompt_text[chars:], list(prompt_ids[tokens:])
        self.choices, self.finish = [], ""  # the reply's, once it is written
        self._position, self._anchors = _chained(previous)

    def __reduce__(self):
        """Pickled (and deep-copied) as its parts, after its ``_anchors`` and its ``previous``: each of those is
        saved, if not yet, before this record is (``_ANCHOR_SPANS``)."""
        return _rebuilt_record, (self._anchors, self.previous, self.shared_chars, self.shared_tokens,
                                 self.new_text, self.new_ids, self.choices, self.finish)

    def _prompt(self, new: str, shared: str) -> list:
        """The pieces of the whole prompt, in order: this record's new part, after the start it shares
        with the previous record's prompt, which is that one's new part after what it shares... Walking
        back, ``end`` is how much of the earlier prompt is still wanted: the work is the prompt's length."""
        pieces, end, record = [], None, self
        while record is not None and end != 0:
            part, start = getattr(record, new), getattr(record, shared)
            pieces.append(part if end is None else part[:max(0, end - start)])
            end = start if end is None else min(end, start)
            record = record.previous
        return pieces[::-1]

    def __getitem__(self, key: str):
        if key == "prompt_text":
            return "".join(self._prompt("new_text", "shared_chars"))
        if key == "prompt_ids":
            return list(chain.from_iterable(self._prompt("new_ids", "shared_tokens")))
        if key in self._KEYS:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)

    def __repr__(self) -> str:
        return (f"<InsideRecord: a prompt of {self.shared_tokens + len(self.new_ids)} tokens, {len(self.new_ids)} new; "
                f"{len(self.choices)} reply tokens; ended: {self.finish or '(not yet)'}>")


#: Pickling or deep-copying a record saves its ``previous`` first, which saves its own first...: one call
#: inside the other per record, and Python's recursion limit past a few hundred records. So each record
#: also points, for each of these spans, at the last record before it whose position in the chain is a
#: multiple of the span (its ``_anchors``, the widest span's first), saved before its ``previous``: saving
#: a record then goes at most about 16 records deep per span, some 70 in all for a chain of up to a
#: million records. Sixteen records in a row have the same anchors: they share one tuple.
_ANCHOR_SPANS = (65536, 4096, 256, 16)


def _chained(previous: InsideRecord | None) -> tuple[int, tuple]:
    """A new record's position after ``previous``, and its anchors (``_ANCHOR_SPANS``)."""
    if previous is None:
        return 0, ()
    at = previous._position
    if at % _ANCHOR_SPANS[-1]:  # nor a multiple of any wider span: the anchors of the record before
        return at + 1, previous._anchors
    return at + 1, tuple(previous if at % span == 0 else previous._anchors[i] for i, span in enumerate(_ANCHOR_SPANS))


def _rebuilt_record(anchors: tuple, previous: InsideRecord | None, shared_chars: int, shared_tokens: int,
                    new_text: str, new_ids: list[int], choices: list, finish: str) -> InsideRecord:
    """An ``InsideRecord`` from what ``InsideRecord.__reduce__`` gave, its anchors and ``previous`` built
    already."""
    record = InsideRecord.__new__(InsideRecord)
    record.previous, record.shared_chars, record.shared_tokens = previous, shared_chars, shared_tokens
    record.new_text, record.new_ids, record.choices, record.finish = new_text, new_ids, choices, finish
    record._position, record._anchors = (0, ()) if previous is None else (previous._position + 1, anchors)
    return record


def _write_atomically(path: Path, text: str) -> None:
    """Write a sibling temporary file, then rename it over ``path`` (atomic on POSIX and Windows)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _template_default_system(chat: ChatModel) -> str:
    """The system prompt the template uses when none is given (Qwen's), shown so it can be edited."""
    if chat.template is None:
        return ""
    probe = chat.render([{"role": "user", "content": "\x00"}], add_generation_prompt=False)
    match = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", probe, re.S)
    return _sendable(match.group(1)) if match else ""


def _sendable(text: str) -> str:
    """``text`` with each half character (a lone surrogate, such as ``"\\ud800"`` in a template's JSON)
    written as its escape, ``\\ud800``: the kernel sends widget values as UTF-8, which cannot hold one,
    so an error quoting a template's text, or its default system prompt, would otherwise fail to reach
    the browser (the panel stuck, or not shown at all)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")

"""The chat panel, driven from Python: set widget values, click buttons, wait for the worker."""
import html
import json

import pytest
import torch

pytest.importorskip("ipywidgets")

from conftest import stop_a_long_reply
from qwen_lab.generation import ChatModel, GenerationResult, GenerationStream
from qwen_lab.panel import ChatPanel, render_markdown


@pytest.fixture(scope="module")
def chat(tiny_dir):
    return ChatModel.load(str(tiny_dir), dtype="float32", device="cpu")


@pytest.fixture
def panel(chat):
    p = ChatPanel(chat, refresh_s=0.01)
    p.temperature.value = 0.0
    p.max_new_tokens.value = 8
    return p


def fake_stream(deltas, reason="eos"):
    def steps():
        for d in deltas:
            yield d
        text = "".join(deltas)
        return GenerationResult(text=text, token_ids=[1] * len(deltas), finish_reason=reason, prompt_tokens=5,
                                generated_tokens=len(deltas), ttft_s=0.01, decode_tokens_per_s=100.0,
                                prefill_tokens_per_s=500.0, total_s=0.1)
    return GenerationStream(steps())


def test_no_context_note_on_a_short_chat(panel, chat, monkeypatch):
    monkeypatch.setattr(chat, "stream", lambda *a, **k: fake_stream(["Hello", "!"]))
    panel.max_new_tokens.value = panel.max_new_tokens.max  # more than the room left: capped silently
    panel.send("Hi")
    panel.wait(30)
    assert panel.status.value == ""


def test_send_button_streams_a_reply_into_the_history(panel, chat):
    panel.input.value = "Hello there"
    panel.send_button.click()
    assert panel.input.value == ""
    panel.wait(30)
    assert [m["role"] for m in panel.messages] == ["user", "assistant"]
    expected = chat.generate([{"role": "system", "content": panel.system.value},
                              {"role": "user", "content": "Hello there"}], do_sample=False, max_new_tokens=8,
                             repetition_penalty=panel.repetition_penalty.value)
    assert panel.messages[1]["content"] == expected.text
    assert panel.replies[0]["generated_tokens"] == expected.generated_tokens
    assert "tokens/s" in panel.transcript.value and "Hello there" in panel.transcript.value
    threads = panel.replies[0]["decode_threads"]
    assert f"tokens/s on {threads} thread" in panel.transcript.value
    assert panel.stop_button.disabled and not panel.send_button.disabled


def test_enter_in_the_input_sends(panel):
    panel.input.value = "Hi"
    panel.input._handle_custom_msg({"event": "submit"}, [])  # what the browser sends on Enter
    panel.wait(30)
    assert panel.messages[0] == {"role": "user", "content": "Hi"} and len(panel.messages) == 2


def test_default_system_prompt_is_the_templates(panel):
    assert panel.system.value == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_stop_keeps_the_partial_reply_and_marks_it(chat):
    panel = stop_a_long_reply(chat)
    assert "eos_token_id=[]" in panel.title.value  # never stops by itself
    assert panel.replies[-1]["stopped"] and panel.replies[-1]["finish_reason"] == "cancelled"
    assert 0 < panel.replies[-1]["generated_tokens"] < 400
    assert panel.messages[-1]["role"] == "assistant"
    assert "stopped" in panel.transcript.value


def test_regenerate_replaces_the_last_reply(panel):
    panel.send("Hi")
    panel.wait(30)
    first = panel.messages[-1]["content"]
    panel.temperature.value = 1.0
    seed = panel.seed.value
    panel.regenerate_button.click()
    panel.wait(30)
    assert len(panel.messages) == 2 and panel.seed.value == seed + 1
    assert panel.messages[-1]["content"] != first or panel.replies[-1]["generated_tokens"] > 0


def test_undo_and_clear(panel):
    panel.send("one")
    panel.wait(30)
    panel.send("two")
    panel.wait(30)
    panel.undo_button.click()
    assert [m["content"] for m in panel.messages if m["role"] == "user"] == ["one"]
    assert panel.input.value == "two"
    panel.clear_button.click()
    assert panel.messages == [] and panel.replies == []


def test_export_is_json_messages_with_the_system_prompt(panel, tmp_path):
    panel.send("Hi")
    panel.wait(30)
    data = json.loads(panel.export(tmp_path / "chat.json"))
    assert [m["role"] for m in data] == ["system", "user", "assistant"]
    assert json.loads((tmp_path / "chat.json").read_text()) == data
    panel.export_button.click()
    assert json.loads(panel.export_box.value) == data


def on_fire(*args, **kwargs):
    """A model's stream that fails as no test input could make it."""
    raise RuntimeError("the GPU caught fire")


def test_errors_show_in_the_panel_and_keep_the_history(panel, chat, monkeypatch):
    panel.send("first")
    panel.wait(30)
    before = list(panel.messages)

    monkeypatch.setattr(chat, "stream", on_fire)
    panel.send("second")
    panel.wait(30)
    assert "Error: RuntimeError: the GPU caught fire" in panel.status.value
    assert panel.messages[:2] == before and panel.messages[2] == {"role": "user", "content": "second"}
    monkeypatch.undo()
    panel.regenerate()  # nothing to regenerate (last is a user turn); still usable:
    panel.send("third")
    panel.wait(30)
    assert panel.messages[-1]["role"] == "assistant"


def test_model_output_cannot_inject_html(panel, chat, monkeypatch):
    hostile = ["<img src=x onerror=alert(1)>", "<script>alert('x')</script>", "\n```html\n<b>code</b>\n```"]
    monkeypatch.setattr(chat, "stream", lambda *a, **k: fake_stream(hostile))
    panel.send("<b>user text is untrusted too</b>")
    panel.wait(30)
    shown = panel.transcript.value
    assert "<img" not in shown and "<script" not in shown and "<b>user" not in shown
    assert "&lt;img src=x onerror=alert(1)&gt;" in shown and "&lt;b&gt;code&lt;/b&gt;" in shown


def test_context_limit_is_a_note_not_a_crash(panel, chat):
    long_text = "Hello world " * chat.context_length
    panel.send(long_text)
    assert not panel.busy
    assert "fills the model's context" in panel.status.value
    assert panel.messages == [] and panel.input.value == long_text  # nothing lost

    overhead = len(chat.prompt_ids(panel._conversation() + [{"role": "user", "content": ""}]))
    per_word = len(chat.tokenizer.encode("Hello " * 10)) / 10
    near = "Hello " * int((chat.context_length - overhead - 60) / per_word)
    panel.max_new_tokens.value = 200
    panel.send(near)
    assert "Context nearly full" in panel.status.value  # said before the reply starts
    panel.wait(60)
    assert "end of the context window" in panel.status.value  # random weights never say EOS
    assert panel.messages[-1]["role"] == "assistant"
    assert panel.replies[-1]["prompt_tokens"] + panel.replies[-1]["generated_tokens"] == chat.context_length


def test_panels_share_one_model_load(tiny_dir):
    a = ChatPanel.load(str(tiny_dir), dtype="float32", device="cpu")
    b = ChatPanel.load(str(tiny_dir), dtype="float32", device="cpu")
    assert a.chat is b.chat and a is not b


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tokenizer):
    """Two tiny checkpoints of their own (not the module's ``chat``): models a learner tries in turn."""
    from conftest import make_checkpoint
    return [str(make_checkpoint(tmp_path_factory.mktemp(name), tokenizer, seed=seed))
            for name, seed in (("first", 3), ("second", 4))]


def test_load_keeps_one_model_and_releases_the_one_before(two_models, tmp_path):
    """Each model ChatPanel.load ever loaded stayed in memory (its cache, and every panel, held it): a
    learner trying 0.5B, then 1.5B, then 3B on a laptop held all three, and swapped or was killed."""
    import gc
    import weakref

    from qwen_lab.errors import DownloadError, ModelReleasedError, SettingError
    first_dir, second_dir = two_models
    first = ChatPanel.load(first_dir, dtype="float32", device="cpu", refresh_s=0.01)
    first.temperature.value, first.max_new_tokens.value = 0.0, 4
    first.send("Hi")
    first.wait(30)
    again = ChatPanel.load(first_dir, dtype="float32", device="cpu")  # the cell run again: the same load
    beside = ChatPanel(first.chat)                                      # a panel made from it by hand
    assert again.chat is first.chat is beside.chat
    model, weight = weakref.ref(first.chat), weakref.ref(first.chat.model.model.embed_tokens.weight)

    for wrong in (dict(model=str(tmp_path / "no-such-model")), dict(model=second_dir, dtype="float33")):
        with pytest.raises((DownloadError, SettingError)):
            ChatPanel.load(**{"dtype": "float32", "device": "cpu", **wrong})
    gc.collect()
    assert model() is not None and first.chat is again.chat  # a misspelt name or dtype keeps the model there was

    second = ChatPanel.load(second_dir, dtype="float32", device="cpu", refresh_s=0.01)
    gc.collect()
    assert model() is None and weight() is None  # its parameters freed, though three panels showed it
    assert second.chat.name == second_dir and len(first.prompt_cache) == 0

    # a released panel says so in one line, loses nothing, and still exports its conversation
    for panel in (first, again, beside):
        assert "was released from memory when ChatPanel.load loaded" in panel.status.value
    first.input.value = "Still there?"
    first.send_button.click()
    assert not first.busy and first.input.value == "Still there?" and len(first.messages) == 2
    assert first.error.startswith(f"{first_dir} (float32) was released from memory when ChatPanel.load loaded "
                                  f"{second_dir} (float32)") and "\n" not in first.error
    assert f"Error: {html.escape(first.error)}" in first.status.value and "with ChatPanel.load again" in first.error
    first.regenerate()
    assert len(first.messages) == 2 and [m["role"] for m in json.loads(first.export())][1:] == ["user", "assistant"]
    with pytest.raises(ModelReleasedError, match="run the cell that loaded"):
        first.chat

    # a model loaded by hand is the caller's: load releases only the model it loaded itself
    own = ChatModel.load(second_dir, dtype="float32", device="cpu")
    mine = ChatPanel(own)
    ChatPanel.load(first_dir, dtype="float32", device="cpu")
    assert mine.chat is own and "released" not in mine.status.value
    with pytest.raises(ModelReleasedError):
        second.chat


def test_load_frees_the_static_decoders_of_the_model_it_releases_though_a_variable_holds_it(two_models):
    """A model kept by a notebook variable (chat = panel.chat) kept its static decoders' KV caches (on a
    GPU, their CUDA graphs too) after ChatPanel.load moved on to another model."""
    import gc
    import weakref
    first_dir, second_dir = two_models
    chat = ChatPanel.load(first_dir, dtype="float32", device="cpu").chat
    chat.generate([{"role": "user", "content": "Hi"}], do_sample=False, max_new_tokens=4, static=True)
    decoders = chat.model.__dict__.get("_static_decoders", {})
    assert decoders  # the static path (a GPU's, here run on the CPU) keeps one per length bucket
    keys = [weakref.ref(d.caches[0].k) for d in decoders.values()]
    ChatPanel.load(second_dir, dtype="float32", device="cpu")
    gc.collect()
    assert chat.model.__dict__.get("_static_decoders") == {} and all(k() is None for k in keys)
    assert chat.generate([{"role": "user", "content": "Hi"}], do_sample=False, max_new_tokens=4,
                         static=True).text  # still usable: the next static generation makes a decoder again


def test_load_sees_the_same_model_written_another_way_and_names_the_dtype_it_releases(two_models):
    """"auto" and the dtype it picks are one model: loading it the other way reused nothing, released
    the panels above and loaded it again; the same model in another dtype was "released when
    ChatPanel.load loaded" a model of the same name."""
    first_dir, _ = two_models
    auto = ChatPanel.load(first_dir, device="cpu")
    picked = str(auto.chat.model.lm_head.weight.dtype).removeprefix("torch.")
    explicit = ChatPanel.load(first_dir, dtype=picked, device="cpu")
    assert explicit.chat is auto.chat and "released" not in auto.status.value
    other = {"float32": "bfloat16", "bfloat16": "float32"}[picked]
    assert str(ChatPanel.load(first_dir, dtype=other, device="cpu").chat.model.lm_head.weight.dtype) == f"torch.{other}"
    assert f"{first_dir} ({picked}) was released from memory when ChatPanel.load loaded {first_dir} ({other})" \
        in html.unescape(auto.status.value)


def test_a_reply_being_written_when_its_model_is_released_still_finishes(two_models):
    import gc
    import threading
    import weakref
    first_dir, second_dir = two_models
    panel = ChatPanel.load(first_dir, dtype="float32", device="cpu", refresh_s=0.01, lang="zh-TW")
    go = threading.Event()

    def stream(*args, **kwargs):  # set on the instance, holding nothing of it
        def steps():
            yield "Hello"
            go.wait(10)
            yield " world"
            return GenerationResult(text="Hello world", token_ids=[1, 2], finish_reason="eos", prompt_tokens=5,
                                    generated_tokens=2, ttft_s=0.01, decode_tokens_per_s=1.0,
                                    prefill_tokens_per_s=1.0, total_s=0.1)
        return GenerationStream(steps())
    panel.chat.stream = stream
    model = weakref.ref(panel.chat)
    panel.send("Hi")
    ChatPanel.load(second_dir, dtype="float32", device="cpu")
    gc.collect()
    assert panel.busy and model() is not None  # the reply's worker holds the model until it ends
    go.set()
    panel.wait(30)
    gc.collect()
    assert model() is None and len(panel.prompt_cache) == 0
    assert panel.messages[-1] == {"role": "assistant", "content": "Hello world"} and not panel.error
    assert "已把" in panel.status.value and "從記憶體釋放" in panel.status.value  # said in the panel's language
    panel.send("again")
    assert "錯誤：ChatPanel.load 載入" in panel.status.value and panel.input.value == "again"


def test_load_again_after_a_weights_file_was_rewritten_in_place_loads_the_model_anew(tmp_path, tokenizer):
    """A bf16 model's weights are read from its file; a file rewritten in place under it (a teacher's cp)
    makes each reply refused, "load the model again". ChatPanel.load, run again as told, gave back the same
    model (it keeps its load), refused again: only a restart of the Jupyter kernel helped."""
    import os

    from conftest import make_checkpoint, rewrite_in_place
    from qwen_lab.errors import CheckpointError
    folder = make_checkpoint(tmp_path, tokenizer, dtype=torch.bfloat16)
    path = folder / "model.safetensors"
    os.utime(path, ns=(10**18, 10**18))  # written long before the room started
    ask = [{"role": "user", "content": "Hi"}]
    first = ChatPanel.load(str(folder), dtype="bfloat16", device="cpu")
    loaded = first.chat
    assert loaded.generate(ask, max_new_tokens=2, do_sample=False).token_ids
    rewrite_in_place(path)  # as cp over it writes
    with pytest.raises(CheckpointError, match="load the model again"):
        loaded.generate(ask, max_new_tokens=2, do_sample=False)
    for dtype in ("auto", "bfloat16"):  # "auto", the same model written another way, was given back too
        again = ChatPanel.load(str(folder), dtype=dtype, device="cpu")
        assert again.chat is not loaded
        assert again.chat.generate(ask, max_new_tokens=2, do_sample=False).token_ids
    assert ChatPanel.load(str(folder), dtype="auto", device="cpu").chat is again.chat  # unchanged since: kept
    assert "was released from memory" in first.status.value


def test_markdown_subset():
    html = render_markdown("Use `x < y`:\n\n```python\nprint('<hi>')\n```\n- **one**\n- *two*")
    assert "<code>x &lt; y</code>" in html
    assert "<pre class='ql-code' data-lang=\"python\"><code>print(&#x27;&lt;hi&gt;&#x27;)</code></pre>" in html
    assert "<ul><li><b>one</b></li><li><i>two</i></li></ul>" in html
    assert render_markdown('```"><script>\nx\n```').count("<script>") == 0


def test_template_vars_shape_every_prompt(chat, monkeypatch):
    seen = []
    real = chat.render
    monkeypatch.setattr(chat, "render", lambda messages, **kw: seen.append(kw) or real(messages))
    p = ChatPanel(chat, refresh_s=0.01, template_vars={"enable_thinking": False})
    seen.clear()  # (making the panel rendered a probe for the default system prompt)
    p.max_new_tokens.value = 2
    p.send("Hi")
    p.wait(30)
    assert seen == [{"enable_thinking": False}]
    assert "enable_thinking=False" in p.title.value  # the panel says what it was made with


def test_half_a_character_is_refused_and_nothing_is_lost(panel):
    panel.input.value = "kept"
    panel.send("bad \ud800 text")
    assert panel.messages == [] and panel.input.value == "kept"
    assert "half of a character" in panel.error and "\n" not in panel.error
    panel.send("Hi")  # the panel still works
    panel.wait(30)
    assert [m["role"] for m in panel.messages] == ["user", "assistant"]


def test_export_replaces_a_file_atomically_even_with_odd_text(panel, tmp_path):
    target = tmp_path / "chat.json"
    target.write_text("the previous export\n")
    panel.messages.extend([{"role": "user", "content": "a \ud800 b"}, {"role": "assistant", "content": "ok"}])
    panel.replies.append({})
    text = panel.export(target)
    assert json.loads(target.read_text(encoding="utf-8")) == json.loads(text)
    assert json.loads(text)[-2]["content"] == "a \ud800 b"  # kept exactly, as a JSON escape
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left


def test_a_failed_export_leaves_the_old_file_whole(panel, tmp_path, monkeypatch):
    import os
    target = tmp_path / "chat.json"
    target.write_text("the previous export\n")
    panel.messages.append({"role": "user", "content": "Hi"})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        panel.export(target)
    assert target.read_text() == "the previous export\n"
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]


def test_show_inside_keeps_the_prompt_and_the_probabilities(panel, chat):
    panel.inside.value = True
    panel.send("What is 2 plus 3?")
    panel.wait(30)
    inside = panel.replies[0]["inside"]
    conversation = [{"role": "system", "content": panel.system.value}, {"role": "user", "content": "What is 2 plus 3?"}]
    assert inside["prompt_text"] == chat.render(conversation)
    assert inside["prompt_ids"] == chat.prompt_ids(conversation)
    assert [c.token_id for c in inside["choices"]] == chat.generate(conversation, do_sample=False, max_new_tokens=8,
                                                                     repetition_penalty=panel.repetition_penalty.value
                                                                     ).token_ids
    page = panel.transcript.value
    assert "<details class='ql-inside'>" in page and "ql-special" in page  # <|im_start|> is marked
    assert f"({len(inside['prompt_ids'])} tokens of the {chat.context_length:,}-token context)" in page
    assert "likeliest:" in page and "ended: " in page


def inside_views(page):
    """Each *Show inside* view of ``page`` as the browser shows it: the prompt's text and token ids it
    shows, and how many characters and tokens its markers say it leaves out."""
    import re
    from html.parser import HTMLParser

    class Views(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.views, self.box, self.elided = [], None, False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            classes = set((attrs.get("class") or "").split())
            if tag == "details":
                self.views.append({"text": "", "ids": [], "markers": {"text": "", "tokens": ""}, "rows": 0})
            elif tag == "div" and "ql-prompt-text" in classes:
                self.box = "text"
            elif tag == "div" and "ql-tokens" in classes:
                self.views[-1]["rows"] += 1
                self.box = "tokens" if self.views[-1]["rows"] == 1 else "reply"
            elif tag == "span" and "ql-elided" in classes:
                self.elided = True
            elif tag == "span" and self.box == "tokens":
                self.views[-1]["ids"].append(int(attrs["title"].removeprefix("id ")))

        def handle_endtag(self, tag):
            if tag == "div":
                self.box = None
            elif tag == "span":
                self.elided = False

        def handle_data(self, data):
            if self.box in ("text", "tokens"):
                if self.elided:
                    self.views[-1]["markers"][self.box] += data
                elif self.box == "text":
                    self.views[-1]["text"] += data

    parser = Views()
    parser.feed(page)
    for view in parser.views:
        chars = re.search(r"the first ([\d,]+) characters", view["markers"]["text"])
        tokens = re.search(r"the first ([\d,]+) tokens", view["markers"]["tokens"])
        view["elided_chars"] = int(chars.group(1).replace(",", "")) if chars else 0
        view["elided_tokens"] = int(tokens.group(1).replace(",", "")) if tokens else 0
    return parser.views


def test_inside_views_show_each_part_of_the_prompt_once(chat):
    """Each reply's view showed its whole prompt, which holds the whole conversation so far: the
    conversation's HTML grew with the square of its length (tiny-chat: 90 kB after 8 turns, 280 kB
    after 16), re-sent twice a turn. A view now shows what its prompt added to the prompt above it,
    and says how much it leaves out: read top to bottom, the views spell each prompt exactly."""
    panel = ChatPanel(chat, refresh_s=0.01, lang="en")
    panel.inside.value, panel.temperature.value, panel.max_new_tokens.value = True, 0.0, 6

    def ask(text):
        panel.send(text)
        panel.wait(30)
        assert not panel.error and panel.messages[-1]["role"] == "assistant"

    for turn in range(8):
        ask(f"Question {turn}?")
    panel.undo()                   # a view of a reply taken back is gone, and the next is drawn against the one before
    panel.inside.value = False
    ask("Not looked inside")       # a reply without a view: the next is drawn against the last view there is
    panel.inside.value = True
    ask("And now?")
    panel.regenerate()
    panel.wait(30)
    records = [r["inside"] for r in panel.replies if r["inside"]]
    views = inside_views(panel.transcript.value)
    assert len(views) == len(records) == 8 and len(panel.replies) == 9
    text, ids = "", []
    for view, inside in zip(views, records):
        assert view["elided_chars"] <= len(text) and view["elided_tokens"] <= len(ids)
        text = text[:view["elided_chars"]] + view["text"]
        ids = ids[:view["elided_tokens"]] + view["ids"]
        assert text == inside["prompt_text"] and ids == inside["prompt_ids"]
    assert views[0]["elided_tokens"] == 0 and all(v["elided_tokens"] > 0 for v in views[1:])
    # each prompt token shown about once in all: the views grow with the conversation, not with its square
    assert sum(len(v["ids"]) for v in views) <= len(records[-1]["prompt_ids"]) + 2 * len(views)


def held_bytes(roots):
    """The bytes of every object reachable from ``roots``: what they keep alive (classes, modules and
    functions left out, which live anyway)."""
    import gc
    import sys
    import types
    seen, stack, total = set(), list(roots), 0
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return total


@pytest.fixture(scope="module")
def tiny_chat():
    """The embedded chat model: its context (2,048 tokens) holds a long conversation."""
    return ChatModel.load("qwen-lab/tiny-chat", dtype="float32", device="cpu")


def test_inside_records_grow_with_the_conversation_not_its_square(tiny_chat):
    """Each reply's record held its whole prompt, which holds the conversation so far: the records grew
    with its square (here 237 kB after 16 turns, 2.9 times 8 turns' 82 kB: the prompts' square, plus the
    replies' choices, which grow with the conversation). A record now keeps what its prompt added to the
    one before: 104 kB, 2.0 times 51 kB."""
    panel = ChatPanel(tiny_chat, refresh_s=10, lang="en")
    panel.inside.value, panel.temperature.value, panel.max_new_tokens.value = True, 0.0, 8
    held = []
    for turn in range(16):
        panel.send(f"Tell me about question {turn}, please?")
        panel.wait(30)
        assert not panel.error and len(panel.replies) == turn + 1 and panel.replies[-1]["inside"]
        if turn + 1 in (8, 16):
            held.append(held_bytes([r["inside"] for r in panel.replies]))
    assert held[1] < 2.5 * held[0], held  # twice the turns: about twice the bytes (4 times: the square)


def test_a_rebuilt_prompt_is_the_one_the_model_was_sent(tiny_chat, monkeypatch):
    """A record keeps what its prompt added to the previous record's; rebuilt, the whole prompt must be
    the text rendered and the ids the model was sent, also where a prompt shares less than the whole
    one before: the system prompt edited between turns, a template that rewrites earlier turns
    (Qwen3's drops the empty thinking block it opened each reply with), Undo, Regenerate, a turn
    without Show inside."""
    from qwen_lab import reference
    from qwen_lab.chat_template import ChatTemplate
    from qwen_lab.tokenizer import special_tokens
    chat = tiny_chat
    config = json.loads(reference.path("Qwen/Qwen3-0.6B", "tokenizer_config.json").read_text(encoding="utf-8"))
    tokens = {k: v for k, v in special_tokens(config).items() if v is not None}
    monkeypatch.setattr(chat, "template", ChatTemplate(config["chat_template"], tokens))
    render, stream, rendered, sent = chat.render, chat.stream, [], {}
    monkeypatch.setattr(chat, "render", lambda *a, **k: rendered.append(render(*a, **k)) or rendered[-1])

    def recording_stream(prompt, *a, **k):
        sent["last"] = rendered[-1], list(prompt)  # (a copy: what the model got, whatever happens to the list)
        return stream(prompt, *a, **k)
    monkeypatch.setattr(chat, "stream", recording_stream)

    panel = ChatPanel(chat, refresh_s=0.01, lang="en", system_prompt="Be brief.",
                      template_vars={"enable_thinking": False})
    panel.inside.value, panel.temperature.value, panel.max_new_tokens.value = True, 0.0, 6

    def ask(text):
        replies = len(panel.replies)
        panel.send(text)
        panel.wait(30)
        assert not panel.error and len(panel.replies) == replies + 1
        if panel.replies[-1]["inside"]:
            sent[id(panel.replies[-1]["inside"])] = sent["last"]

    ask("Hi")
    ask("And then?")                      # the reply before, without its <think></think>: less is shared
    panel.system.value = "Be very brief."
    ask("Why?")                           # a new system prompt: only its first words are shared
    ask("Sure?")
    panel.undo()
    panel.inside.value = False
    ask("Not looked inside")
    panel.inside.value = True
    ask("And now?")
    panel.regenerate()
    panel.wait(30)
    sent[id(panel.replies[-1]["inside"])] = sent["last"]

    records = [r["inside"] for r in panel.replies if r["inside"]]
    assert len(records) == 4 and len(panel.replies) == 5
    for record in records:
        text, ids = sent[id(record)]
        assert record["prompt_text"] == text and record["prompt_ids"] == ids
        assert dict(record) == {"prompt_text": text, "prompt_ids": ids, "shared_chars": record["shared_chars"],
                                "shared_tokens": record["shared_tokens"], "choices": record["choices"],
                                "finish": record["finish"]}  # read as the dict it was
    before = [sent[id(r)][0] for r in records[:2]]
    assert "<think>" in before[0][-20:] and records[1]["shared_chars"] < len(before[0])  # the template rewrote it
    assert records[2]["shared_chars"] == len("<|im_start|>system\nBe ")                 # the system prompt edited
    assert all(r["shared_tokens"] > 0 for r in records[1:])


def long_conversation(turns: int) -> list:
    """The records of a conversation of ``turns`` turns, each prompt the one before, its reply, then a new
    message; every 100 turns the system prompt is edited, so the new prompt shares nothing with the one
    before (building 3,000 records then takes 100 times less than if each shared all that came before)."""
    from qwen_lab.panel import InsideRecord
    from qwen_lab.sampling import TokenChoice
    records, text, ids = [], "", []
    for turn in range(turns):
        if turn % 100 == 0:
            text, ids = f"{chr(65 + turn // 100)}<system>", [1000 + turn // 100]
        text += f"<user>question {turn}</user><assistant>"
        ids += [1, 10 + turn % 40, 2]
        record = InsideRecord(text, ids, previous=records[-1] if records else None)
        record.choices, record.finish = [TokenChoice(3 + turn % 9, 0.5, [(3 + turn % 9, 0.5), (4, 0.25)])], "eos"
        records.append(record)
        text, ids = text + f"answer {turn}</assistant>", ids + [3 + turn % 9, 5]
    return records


def test_the_records_of_a_long_conversation_copy_and_pickle():
    """Each record points at the one before, and copy.deepcopy and pickle went from one to the one before
    it, a call inside the other: past a few hundred turns, Python's recursion limit (RecursionError here,
    at 3,000). Now each is copied whole, reads as the original (its view byte for byte), stays
    read-only, and a conversation's records copied together share the earlier ones as the originals do."""
    import copy
    import pickle
    from qwen_lab.markup import inside_view
    from qwen_lab.panel import InsideRecord
    records = long_conversation(3000)

    def view(record):
        return inside_view(record["prompt_text"], record["prompt_ids"], {1, 2}, 10**6, record["choices"], str,
                           record["finish"], shared_chars=record["shared_chars"], shared_tokens=record["shared_tokens"])

    last = records[-1]
    for copied in (copy.deepcopy(last), pickle.loads(pickle.dumps(last)), pickle.loads(pickle.dumps(last, 0))):
        assert type(copied) is InsideRecord and copied == last and view(copied) == view(last)
        assert copied.choices is not last.choices and copied.choices == last.choices
        with pytest.raises(TypeError):
            copied["finish"] = "length"  # read as a dict, it stays read-only
        original = last
        for _ in range(len(records) - 1):  # every record before it, copied too
            copied, original = copied.previous, original.previous
            assert copied is not original and copied == original
        assert copied.previous is None
    together = [copy.deepcopy(records), pickle.loads(pickle.dumps(records))]
    for copies in together:
        assert all(copies[i].previous is copies[i - 1] for i in range(1, len(records)))
        assert all(copies[i] == records[i] for i in range(len(records)))
        assert all(view(copies[i]) == view(records[i]) for i in range(0, len(records), 97))
    assert len(pickle.dumps(records)) < 1.1 * len(pickle.dumps(last))  # each record pickled once


def test_inside_is_off_by_default_and_costs_nothing(panel):
    panel.send("Hi")
    panel.wait(30)
    assert panel.replies[0]["inside"] is None and "<details class='ql-inside'>" not in panel.transcript.value


def test_the_inside_view_escapes_everything_the_model_wrote():
    from html.parser import HTMLParser
    from qwen_lab.markup import inside_view
    from qwen_lab.sampling import TokenChoice
    evil = "<img src=x onerror=alert(1)><script>alert(2)</script>'\"</span></details>"
    choices = [TokenChoice(7, 0.5, [(7, 0.5), (8, 0.2)])]
    page = inside_view(evil, [7], {7}, 100, choices, lambda i: evil, evil)

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.attributes = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.attributes += [name for name, _ in attrs]

    parser = Tags()
    parser.feed(page)
    assert set(parser.tags) == {"details", "summary", "div", "span"}  # only the tags markup.py writes
    assert set(parser.attributes) <= {"class", "title", "style"}      # no onerror, no src
    assert page.count("<span") == page.count("</span>") == 2 and page.count("</details>") == 1
    # the start a prompt shares with the one above, left out: cut anywhere, even inside a tag or an entity
    for chars in (1, 5, evil.index("</span>") + 2, len(evil) + 3, 2 * len(evil) - 1):
        page = inside_view(evil + evil, [7, 8], {7}, 100, choices, lambda i: evil, evil, shared_chars=chars,
                           shared_tokens=1)
        problems, shown = markup_of(page)
        assert not problems, (chars, problems)
        assert f"the first {chars:,} characters" in shown and (evil + evil)[chars:] in shown
        assert "the first 1 tokens" in shown and page.count("<span") == page.count("</span>") == 4


# ---------------------------------------------------------------- hostile text: nothing becomes markup

#: What the panel's HTML may hold: the tags markup.py and panel.py write, with their own attributes.
ALLOWED_TAGS = {"style", "div", "p", "br", "b", "i", "code", "pre", "ul", "li", "details", "summary", "span"}
OUR_CLASSES = {"ql-chat", "ql-msg", "ql-user", "ql-assistant", "ql-streaming", "ql-meta", "ql-note", "ql-error",
               "ql-code", "ql-inside", "ql-prompt-text", "ql-tokens", "ql-tok", "ql-special", "ql-scale", "ql-elided"}
EVIL = "<img src=x onerror=alert(1)>"


def markup_of(page):
    """Parse ``page`` as the browser would (html.parser) and return (problems, visible text): any tag,
    attribute, class or style that markup.py/panel.py do not write is a problem, and so is a tag left open."""
    import re
    from html.parser import HTMLParser
    colour = re.compile(r"background: hsl\(\d{1,3}, 75%, 82%\)")

    class Checker(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.problems, self.text, self.open = [], [], {}

        def handle_starttag(self, tag, attrs):
            if tag not in ALLOWED_TAGS:
                self.problems.append(f"<{tag}>")
            for name, value in attrs:
                ok = {"class": lambda: set((value or "").split()) <= OUR_CLASSES,
                      "style": lambda: colour.fullmatch(value or "") is not None,
                      "title": lambda: tag == "span",
                      "data-lang": lambda: tag == "pre"}.get(name, lambda: False)()
                if not ok:
                    self.problems.append(f"<{tag} {name}={value!r}>")
            if tag != "br":
                self.open[tag] = self.open.get(tag, 0) + 1

        def handle_startendtag(self, tag, attrs):
            self.problems.append(f"<{tag}/>")

        def handle_endtag(self, tag):
            self.open[tag] = self.open.get(tag, 0) - 1

        def handle_comment(self, data):
            self.problems.append("<!--")

        def handle_decl(self, decl):
            self.problems.append("<!")

        def unknown_decl(self, data):
            self.problems.append("<![")

        def handle_pi(self, data):
            self.problems.append("<?")

        def handle_data(self, data):
            self.text.append(data)

    checker = Checker()
    checker.feed(page)
    checker.close()
    unbalanced = [f"{n:+d} <{tag}>" for tag, n in checker.open.items() if n]
    return checker.problems + unbalanced, "".join(checker.text)


HOSTILE_MARKDOWN = [
    "[x](javascript:alert(1)) [x](JaVaScRiPt:alert(1)) [x](&#106;avascript:alert(1)) [x](java\tscript:1)",
    "[x](data:text/html;base64,PHNjcmlwdD4=) [x](vbscript:msgbox(1)) <javascript:alert(1)> ![a](x\" onerror=\"f())",
    EVIL + "<svg/onload=alert(1)><iframe srcdoc='<script>alert(1)</script>'><style>*{display:none}</style>",
    "<!-- x --><!--<![CDATA[x]]><?xml?><!DOCTYPE html>",
    "**<script>alert(1)</script>** *" + EVIL + "* `\"><img src=x onerror=alert(1)>`",
    "```\" onmouseover=\"alert(1)\n<b>\n```\n```'><script>\nunclosed fence",
    "***a*** **a *b** c* *a **b* c** \\*a\\* \\<b\\> **a `b *c",
    "- <b>x</b>\n* **y**\n- `</li></ul><script>`",
    "&lt;script&gt; &amp;lt; &#60;b&#62; &quot; a\x00<b>\x00 \u202e<b>\u2066 a\u2028b\r\n<i>",
    "$\\href{javascript:alert(1)}{x}$ \\(\\class{x}{y}\\) \\[\\require{html}\\] $$\\unicode{x}$$",
]


def test_markdown_adds_only_its_own_tags_whatever_the_text():
    import random
    rng = random.Random(0)
    pieces = list("*`<>&\"'\n -_[]()!\\$#;=a b") + ["```", "**", "- ", "&amp;", "&#x27;", "<b>", "</i>", "\n\n",
                                                     "javascript:", "onerror=", "<script>"]
    texts = HOSTILE_MARKDOWN + ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    for text in texts:
        page = render_markdown(text)
        problems, _ = markup_of(page)
        assert not problems, (text, page, problems)
        assert "<style" not in page and "<details" not in page and "<span" not in page  # not Markdown's to write


def test_markdown_renders_in_linear_time():
    """Emphasis that never closes used to cost quadratic time: 24,000 characters of " *<" took 8 s,
    in the kernel, on every redraw (the model writes the reply, the learner pastes the message)."""
    import time
    for text in (" *<" * 20_000, " *a*b" * 12_000, " **a *b" * 9_000, "**a " * 15_000, "`a" * 30_000):
        start = time.perf_counter()
        render_markdown(text)
        assert time.perf_counter() - start < 5, text[:20]  # now a few ms; it took a minute


@pytest.fixture(scope="module")
def hostile_chat(tmp_path_factory):
    """A model folder written by an attacker: its folder name, special tokens, vocabulary, chat
    template and stop strings all carry HTML, quotes and MathJax."""
    from tokenizers import AddedToken

    from conftest import SAMPLE_TEXTS
    from qwen_lab.tiny import build_random, save_checkpoint, tiny_config, train_tokenizer
    tok = train_tokenizer(SAMPLE_TEXTS, 400)
    tok.add_special_tokens([AddedToken(EVIL, special=True), AddedToken("'\"`<b>&amp;", special=True)])
    tok.add_tokens(["</div></details><script>alert(3)</script>", "$\\href{javascript:alert(1)}{x}$"])
    template = ("{%- if messages[0].role != 'system' %}<|im_start|>system\n<script>alert('system')</script> "
                "$\\href{javascript:alert(1)}{x}$"
                "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}<|im_start|>assistant\n" + EVIL + "'\"`<b>&amp;</div></details><script>alert(3)</script>")
    eos = [tok.token_to_id(EVIL), tok.token_to_id("<|im_end|>")]
    folder = tmp_path_factory.mktemp("hostile") / EVIL / "</b><svg onload=alert(2)>"
    save_checkpoint(build_random(tiny_config(tok.get_vocab_size()), std=0.1), folder, tokenizer=tok,
                    chat_template=template, generation_config={"eos_token_id": eos, "stop_strings": [EVIL]})
    return ChatModel.load(str(folder), dtype="float32", device="cpu")


@pytest.mark.parametrize("lang", ["en", "zh-TW"])
def test_a_hostile_model_folder_adds_no_markup_to_the_panel(hostile_chat, monkeypatch, lang):
    from qwen_lab.chat_template import ChatTemplate
    from qwen_lab.sampling import TokenChoice
    chat, tok = hostile_chat, hostile_chat.tokenizer
    panel = ChatPanel(chat, refresh_s=0.01, lang=lang, template_vars={EVIL: EVIL})
    assert "<script>" in panel.system.value  # the template's default system prompt, a text box's plain value
    panel.inside.value = True
    panel.max_new_tokens.value = 4
    panel.send(f"{EVIL} **{EVIL}** `{EVIL}`")
    panel.wait(60)
    # a reply made of the hostile tokens, each offering them as alternatives, ended by the hostile EOS
    hostile = [tok.token_to_id(t) for t in (EVIL, "</div></details><script>alert(3)</script>", "'\"`<b>&amp;")]
    text = tok.decode(hostile)

    def stream(*args, **kwargs):
        def steps():
            yield text
            return GenerationResult(
                text=text, token_ids=hostile, finish_reason="eos", prompt_tokens=5, generated_tokens=3, ttft_s=0.01,
                decode_tokens_per_s=1.0, prefill_tokens_per_s=1.0, total_s=0.1,
                finish_detail=f"the model wrote {tok.id_to_token(hostile[0])}",
                choices=[TokenChoice(i, 0.5, [(j, 0.2) for j in hostile]) for i in hostile])
        return GenerationStream(steps())
    monkeypatch.setattr(chat, "stream", stream)
    panel.send("again")
    panel.wait(60)
    monkeypatch.setattr(chat, "template", ChatTemplate("{{ raise_exception('" + EVIL + "') }}"))
    panel.send("and an error")
    assert panel.error

    for widget in (panel.title, panel.transcript, panel.status):  # (streaming: a test of its own)
        problems, shown = markup_of(widget.value)
        assert not problems, problems
        assert EVIL in shown  # shown as text, not dropped
    assert panel.transcript.value.count("<style>") == 1 and panel.transcript.value.startswith("<style>")
    _, shown = markup_of(panel.transcript.value)
    assert "</div></details><script>alert(3)</script>" in shown and "$\\href{javascript:alert(1)}{x}$" in shown
    assert panel.replies[1]["inside"]["shared_chars"] > 0 and "class='ql-elided'" in panel.transcript.value


def test_text_that_is_not_valid_unicode_still_reaches_the_browser(chat, monkeypatch):
    """A template's JSON can hold half a character ("\\ud800"), which the kernel cannot send to the
    browser as UTF-8: it raised there, out of send() (the message left in the history, the input box
    emptied, no error shown) or out of ChatPanel() itself. Checked with the kernel's own packer."""
    from jupyter_client.session import json_packer
    from qwen_lab.chat_template import ChatTemplate
    monkeypatch.setattr(chat, "template", ChatTemplate(
        "{% if messages[-1].content == 'hi' %}{{ raise_exception('bad \ud800 text') }}{% endif %}prompt"))
    panel = ChatPanel(chat)
    panel.send("hi")
    json_packer(panel.status.get_state())
    assert "refused these messages: bad \\ud800 text" in panel.status.value  # its escape, visible
    assert panel.messages == [] and panel.input.value == "hi"  # nothing lost

    monkeypatch.setattr(chat, "template", ChatTemplate(
        "{% if messages[0].role != 'system' %}<|im_start|>system\nYou are \ud800 helpful<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n"))
    panel = ChatPanel(chat)
    for widget in (panel.system, panel.title, panel.transcript, panel.status):
        json_packer(widget.get_state())
    assert panel.system.value == "You are \\ud800 helpful"  # shown, editable, and what is sent


def test_a_streaming_reply_redraws_only_its_own_widget(panel, chat, monkeypatch):
    """Every redraw re-sent the whole conversation, its Show-inside views too (1.7 MB at a 30,000-token
    prompt), ten times a second while a reply streamed; now the conversation is sent when it changes."""
    import threading
    import time
    deltas, taken = ["One ", "two ", EVIL, " four"], threading.Semaphore(0)
    go = threading.Semaphore(0)

    def stream(*a, **k):
        def steps():
            for d in deltas:  # one delta each time the test says so, so that each one is redrawn
                go.acquire(timeout=10)
                yield d
                taken.release()
            return GenerationResult(text="".join(deltas), token_ids=[1] * 4, finish_reason="eos", prompt_tokens=5,
                                    generated_tokens=4, ttft_s=0.01, decode_tokens_per_s=100.0,
                                    prefill_tokens_per_s=500.0, total_s=0.1)
        return GenerationStream(steps())

    monkeypatch.setattr(chat, "stream", stream)
    sent = {"transcript": [], "streaming": []}
    panel.transcript.observe(lambda c: sent["transcript"].append(c["new"]), "value")
    panel.streaming.observe(lambda c: sent["streaming"].append(c["new"]), "value")
    panel.send("Count")
    for _ in deltas:
        time.sleep(0.02)  # past refresh_s since the last redraw
        go.release()
        assert taken.acquire(timeout=10)
    panel.wait(30)
    # the conversation: once with the question, once with the finished reply; the reply while written:
    # each delta (refresh_s=0.01), growing, then cleared
    assert len(sent["transcript"]) == 2 and "Count" in sent["transcript"][0] and "four" in sent["transcript"][1]
    assert "One" not in sent["transcript"][0]
    growing = sent["streaming"][:-1]
    assert len(growing) >= 2 and all(a != b for a, b in zip(growing, growing[1:])) and sent["streaming"][-1] == ""
    assert "two" in growing[-1] and "ql-streaming" in growing[-1]
    for page in growing:
        problems, _ = markup_of(page)
        assert not problems, problems
    assert panel.streaming.layout.display == "none"  # no empty line under the conversation


def test_the_conversation_box_opens_at_its_newest_message(monkeypatch):
    """In Chromium: the box (420 px, scrolling) opened at the oldest message on every redraw, so after a
    few turns the newest reply was out of sight."""
    from pathlib import Path

    from test_browser import CHROMIUM, chromium, need
    need(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    chat = ChatModel.load("qwen-lab/tiny-chat", dtype="float32", device="cpu")  # a context that holds 8 turns
    panel = ChatPanel(chat, refresh_s=0.01)
    for turn in range(8):
        reply = f"Reply {turn}. " + "Words. " * 40
        monkeypatch.setattr(chat, "stream", lambda *a, reply=reply, **k: fake_stream([reply]))
        panel.send(f"Question {turn}")
        panel.wait(30)
    assert len(panel.messages) == 16 and not panel.error
    with sync_api.sync_playwright() as p:
        browser = chromium(p)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 800})
            page.set_content(panel.transcript.value)
            seen = page.evaluate("""() => { const box = document.querySelector('.ql-chat').getBoundingClientRect();
                return [...document.querySelectorAll('.ql-msg')].filter(m => { const r = m.getBoundingClientRect();
                    return r.bottom > box.top && r.top < box.bottom; }).map(m => m.textContent.slice(0, 11)); }""")
            height = page.evaluate("document.querySelector('.ql-chat').scrollHeight")
        finally:
            browser.close()
    assert height > 420 * 2  # far more than the box shows
    assert seen and seen[-1] == "Reply 7. Wo" and "Question 0" not in seen, seen


def test_a_direction_override_in_a_token_does_not_reorder_the_token_boxes():
    """In Chromium: a token holding U+202E (right-to-left override) showed every later token box in
    reverse order, so the "inside" view misstated the sequence; each box is now bidi-isolated."""
    from pathlib import Path

    from qwen_lab.markup import inside_view
    from qwen_lab.panel import _STYLE
    from qwen_lab.sampling import TokenChoice
    from test_browser import CHROMIUM, chromium, need
    need(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    pieces = ["one", "\u202etwo", "three", "four", "\u202dfive", "six"]
    ids = list(range(len(pieces)))
    view = inside_view("x", ids, set(), 100, [TokenChoice(i, 0.5, [(i, 0.5)]) for i in ids], lambda i: pieces[i],
                       "done")
    with sync_api.sync_playwright() as p:
        browser = chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 800})
            page.set_content(_STYLE + view.replace("<details", "<details open"))
            rows = page.evaluate("[...document.querySelectorAll('.ql-tokens')].map(row => [...row.children]"
                                 ".map(s => s.getBoundingClientRect().x))")
        finally:
            browser.close()
    assert len(rows) == 2 and all(len(xs) == len(pieces) for xs in rows)
    for xs in rows:  # the prompt's tokens, then the reply's: left to right, in order
        assert xs == sorted(xs) and len(set(xs)) == len(xs), xs


# ---------------------------------------------------------------- the panel's language

def _words(panel):
    """Every label, button text, placeholder and title the panel shows, in one list."""
    return ([panel.system.description, panel.temperature.description, panel.top_p.description,
             panel.top_k.description, panel.max_new_tokens.description, panel.repetition_penalty.description,
             panel.seed.description, panel.inside.description, panel.input.placeholder]
            + [b.description for b in (panel.send_button, panel.stop_button, panel.regenerate_button,
                                       panel.undo_button, panel.clear_button, panel.export_button)]
            + [panel.widget.children[1].get_title(0)])


def test_the_labels_follow_lang(chat, monkeypatch):
    from qwen_lab.panel import LABELS
    monkeypatch.delenv("QWEN_LAB_LANG", raising=False)
    english, chinese = ChatPanel(chat), ChatPanel(chat, lang="zh-TW")
    assert english.lang == "en" and chinese.lang == "zh-TW"
    assert english.send_button.description == "Send" and chinese.send_button.description == "送出"
    assert chinese.input.placeholder == "輸入訊息，按 Enter 送出"
    assert f"上下文 {chat.context_length:,} 個 token" in chinese.title.value
    # every word differs, except the names of the settings that stay as they are (top-p, top-k)
    same = {a for a, b in zip(_words(english), _words(chinese)) if a == b}
    assert same == {"top-p", "top-k"}
    assert set(LABELS["en"]) == set(LABELS["zh-TW"])  # no label missing in one language


def test_status_lines_and_reply_meta_speak_the_panels_language(chat, monkeypatch):
    panel = ChatPanel(chat, refresh_s=0.01, lang="zh-TW")
    panel.send("bad \ud800 text")
    assert "半個字元" in panel.status.value and "錯誤：" in panel.status.value
    monkeypatch.setattr(chat, "stream", lambda *a, **k: fake_stream(["你好", "！"]))
    panel.send("Hi")
    panel.wait(30)
    assert "個 token · 第一個 token" in panel.transcript.value and "tokens/s" not in panel.transcript.value
    panel.send("Hello world " * chat.context_length)
    assert f"已經填滿模型 {chat.context_length:,} 個 token 的上下文" in panel.status.value


def test_errors_say_their_kind_in_the_panels_language(chat, monkeypatch):
    """The library's messages are English; a Chinese panel says before them what kind of error it is."""
    from qwen_lab.chat_template import ChatTemplate
    hostile = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")  # the sandbox refuses it
    english, chinese = ChatPanel(chat, lang="en"), ChatPanel(chat, lang="zh-TW")
    monkeypatch.setattr(chat, "render", lambda conversation, **kw: hostile.render(conversation))
    for panel in (english, chinese):
        panel.send("Hi")
        assert panel.messages == [] and panel.input.value == "Hi"  # refused: the text goes back to the box
    assert chinese.error == english.error and chinese.error  # the message itself: the library's
    assert f"Error: {html.escape(english.error)}" in english.status.value
    assert f"錯誤（聊天範本無法產生提示詞）：{html.escape(chinese.error)}" in chinese.status.value
    monkeypatch.undo()

    monkeypatch.setattr(chat, "stream", on_fire)
    chinese.send("Hi")
    chinese.wait(30)
    assert "錯誤（程式出了意料之外的錯誤）：RuntimeError: the GPU caught fire" in chinese.status.value
    chinese.send("bad \ud800 text")  # a message of the panel's own: its label, already Chinese
    assert "錯誤：訊息第 4 個位置" in chinese.status.value


def test_every_error_of_the_library_has_its_kind_in_chinese():
    from qwen_lab import errors
    from qwen_lab.panel import LABELS
    classes = {c.__name__ for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.QwenLabError)}
    assert classes <= set(LABELS["zh-TW"]["error_kinds"]), classes - set(LABELS["zh-TW"]["error_kinds"])


def test_the_inside_view_speaks_the_panels_language(chat):
    panel = ChatPanel(chat, refresh_s=0.01, lang="zh-TW")
    panel.temperature.value, panel.max_new_tokens.value, panel.inside.value = 0.0, 4, True
    for text in ("Hi", "And then?"):
        panel.send(text)
        panel.wait(30)
    page = panel.transcript.value
    assert "聊天範本產生的提示詞" in page and "最可能:" in page and "結束原因：" in page
    assert "每一輪都會重送整段對話" in page and "個字元，和上面的提示詞相同" in page and "個 token，和上面相同" in page
    assert "likeliest" not in page and "The prompt the chat template produced" not in page
    assert "the same as" not in page and "re-sends" not in page


def test_an_unknown_language_is_one_line(chat, monkeypatch):
    from qwen_lab.errors import SettingError
    with pytest.raises(SettingError, match=r"^lang must be 'en' or 'zh-TW', not 'fr'$"):
        ChatPanel(chat, lang="fr")
    monkeypatch.setenv("QWEN_LAB_LANG", "klingon")
    with pytest.raises(SettingError) as caught:
        ChatPanel(chat)
    assert "QWEN_LAB_LANG" in str(caught.value) and "\n" not in str(caught.value)


def test_the_default_language_follows_qwen_lab_lang_then_the_folder(chat, monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_LAB_LANG", "zh_tw")
    assert ChatPanel(chat).lang == "zh-TW"
    assert ChatPanel(chat, lang="en").lang == "en"       # an explicit lang wins
    monkeypatch.delenv("QWEN_LAB_LANG")
    (tmp_path / "zh-TW").mkdir()
    monkeypatch.chdir(tmp_path / "zh-TW")                # where Jupyter runs a notebook of notebooks/zh-TW/
    assert ChatPanel(chat).send_button.description == "送出"
    monkeypatch.chdir(tmp_path)
    assert ChatPanel(chat).send_button.description == "Send"


def test_each_reply_prefills_only_what_the_last_did_not_compute(chat):
    """The panel keeps its conversation's KV cache (generation.PromptCache) and says what it reused."""
    panel = ChatPanel(chat, refresh_s=0.01, lang="en")
    panel.temperature.value, panel.max_new_tokens.value = 0.0, 6
    panel.send("Hi")
    panel.wait(30)
    panel.send("And then?")
    panel.wait(30)
    first, second = panel.replies
    assert first["cached_tokens"] == 0 and 0 < second["cached_tokens"] < second["prompt_tokens"]
    assert len(panel.prompt_cache) == second["prompt_tokens"] + second["generated_tokens"] - 1
    assert f"{second['cached_tokens']:,} of {second['prompt_tokens']:,} prompt tokens kept" in \
        panel.transcript.value
    assert panel.transcript.value.count("kept from the last reply") == 1  # the first reply had nothing to keep
    panel.regenerate()
    panel.wait(30)
    assert panel.replies[-1]["cached_tokens"] == second["prompt_tokens"] - 1  # all but the last prompt token
    chinese = ChatPanel(chat, refresh_s=0.01, lang="zh-TW")
    chinese.temperature.value, chinese.max_new_tokens.value = 0.0, 6
    for text in ("Hi", "And then?"):
        chinese.send(text)
        chinese.wait(30)
    assert "個沿用上一次回覆算好的" in chinese.transcript.value and "kept from" not in chinese.transcript.value
    panel.clear()
    assert len(panel.prompt_cache) == 0


def test_a_new_panel_frees_the_kv_caches_that_earlier_panels_keep(chat):
    """ipywidgets keeps every panel ever made alive (its buttons' callbacks hold it): each re-run of a
    panel's cell, each other model tried, kept its conversation's KV cache until the kernel restarted."""
    import gc
    import weakref
    old = ChatPanel(chat, refresh_s=0.01)
    old.temperature.value, old.max_new_tokens.value = 0.0, 6
    old.send("Hi")
    old.wait(30)
    assert len(old.prompt_cache) > 0
    earlier = weakref.ref(old)
    del old
    gc.collect()
    assert earlier() is not None  # nothing but the panel itself can let go of its cache
    ChatPanel(chat)
    assert len(earlier().prompt_cache) == 0 and earlier().prompt_cache._caches is None
    earlier().send("And then?")  # the older panel still works: its next reply prefills the conversation once
    earlier().wait(30)
    assert earlier().replies[-1]["cached_tokens"] == 0 and len(earlier().prompt_cache) > 0
    assert [m["role"] for m in earlier().messages] == ["user", "assistant"] * 2

"""The chat template renders byte-identically to transformers' apply_chat_template, inside a sandbox,
and a broken or hostile template is stopped within its budget of time and memory."""
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest

from conftest import qwen_template
from qwen_lab import sandbox
from qwen_lab.chat_template import ChatTemplate
from qwen_lab.errors import TemplateError
from qwen_lab.hub import resolve
from qwen_lab.sandbox import Budget

transformers = pytest.importorskip("transformers")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city, in °C & <b>bold</b> units",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名稱"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}

BATTERY = {
    "default system": ([{"role": "user", "content": "Hi"}], {}),
    "custom system": ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}], {}),
    "multi-turn": ([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}], {}),
    "tools": ([{"role": "user", "content": "Weather in Taipei?"}], {"tools": [WEATHER_TOOL]}),
    "tools with system": ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather?"}],
                          {"tools": [WEATHER_TOOL]}),
    "tool calls and responses": ([
        {"role": "user", "content": "Weather in Taipei and Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "台北", "unit": "c"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
        {"role": "tool", "content": "{\"temp\": 25}"}, {"role": "tool", "content": "{\"temp\": 18}"},
        {"role": "assistant", "content": "Taipei 25°C, Tokyo 18°C."}], {"tools": [WEATHER_TOOL]}),
    "assistant content with tool call": ([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}], {}),
    "non-ascii and html": ([{"role": "user", "content": "你好 🌞 <script>alert('x')</script> & \"quotes\""}], {}),
    "system after first": ([{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}], {}),
    "50 messages": ([{"role": "system", "content": "Be brief."}] + [
        {"role": ("user", "assistant")[i % 2], "content": f"turn {i}: " + "lorem ipsum 你好 " * (i % 7)}
        for i in range(49)], {}),
}


@pytest.fixture(scope="module")
def reference_tokenizer(tiny_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def template(tiny_dir):
    return ChatTemplate.from_files(resolve(str(tiny_dir)))


def test_template_is_the_real_qwen25_one(template):
    assert template.source == qwen_template()
    assert "add_generation_prompt" in template.source


@pytest.mark.parametrize("name", list(BATTERY))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_byte_identical_to_transformers(name, add_generation_prompt, template, reference_tokenizer):
    messages, extra = BATTERY[name]
    expected = reference_tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt, **extra)
    got = template.render(messages, add_generation_prompt=add_generation_prompt, **extra)
    assert got.encode() == expected.encode()


def test_generation_prompt_is_the_assistant_header(template):
    messages = [{"role": "user", "content": "Hi"}]
    with_prompt = template.render(messages, add_generation_prompt=True)
    without = template.render(messages)
    assert with_prompt == without + "<|im_start|>assistant\n"
    assert without.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_inputs_are_not_mutated(template):
    messages, extra = BATTERY["tool calls and responses"]
    before = json.dumps([messages, extra], sort_keys=True)
    template.render(messages, add_generation_prompt=True, **extra)
    assert json.dumps([messages, extra], sort_keys=True) == before


def render(source, **kw):
    return ChatTemplate(source).render([{"role": "user", "content": "hi"}], **kw)


def test_tojson_keeps_order_unicode_and_html_and_takes_options():
    assert render("{{ {'b': '<é>', 'a': 1} | tojson }}") == '{"b": "<é>", "a": 1}'
    assert render("{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}") == '{"a": 2, "b": 1}'
    assert render("{{ [1, 2] | tojson(indent=2) }}") == "[\n  1,\n  2\n]"
    assert render("{{ {'a': 1} | tojson(separators=(',', ':')) }}") == '{"a":1}'


def test_globals_and_loop_controls():
    assert render("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "012"
    assert render("{% for i in range(4) %}{% if i % 2 %}{% continue %}{% endif %}{{ i }}{% endfor %}") == "02"
    assert len(render("{{ strftime_now('%Y-%m-%d') }}")) == 10
    assert render("{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}") == "2"
    assert render("{% generation %}kept{% endgeneration %}") == "kept"
    t = ChatTemplate("{{ bos_token }}|{{ eos_token }}", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None})
    assert t.render([{"role": "user", "content": "x"}]) == "<s>|</s>"


def test_trim_and_lstrip_blocks():
    assert render("  {% if true %}\nA\n  {% endif %}\nB") == "A\nB"


def test_raise_exception_becomes_a_clear_error():
    with pytest.raises(TemplateError, match="refused these messages: Only user and assistant roles"):
        render("{{ raise_exception('Only user and assistant roles are supported!') }}")


@pytest.mark.parametrize("hostile", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self.__init__.__globals__.__builtins__ }}",
    "{% set x = messages.append({'role': 'x'}) %}",
    "{% set x = messages[0].update({'content': 'pwned'}) %}",
    "{% set x = messages.pop() %}",
    "{% set ns = namespace(__class__=1) %}",
    "{{ raise_exception.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
])
def test_hostile_templates_are_stopped(hostile):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError, match="sandbox forbids|failed|refused") as e:
        ChatTemplate(hostile).render(messages)
    assert "\n" not in str(e.value)
    assert messages == [{"role": "user", "content": "hi"}]


def test_runaway_output_is_capped():
    with pytest.raises(TemplateError, match="was stopped"):
        render("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}")


def test_syntax_error_names_the_line_when_the_template_is_used():
    template = ChatTemplate("ok\n{% if %}")  # compiles on first use: a broken template must not stop a model loading
    with pytest.raises(TemplateError, match="syntax error at line 2"):
        template.render([{"role": "user", "content": "hi"}])


def test_non_json_inputs_are_refused():
    with pytest.raises(TemplateError, match="holds a object"):
        render("{{ messages }}", extra=object())
    with pytest.raises(TemplateError, match="non-empty list"):
        ChatTemplate("x").render([])


def test_chat_template_jinja_file_wins(tiny_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "chat_template.jinja").write_text("JINJA {{ messages[0].content }}")
    assert ChatTemplate.from_files(resolve(str(d))).render([{"role": "user", "content": "x"}]) == "JINJA x"


def test_model_without_template(tiny_dir, tmp_path):
    import shutil
    d = tmp_path / "base"
    shutil.copytree(tiny_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TemplateError, match="no chat template.*--raw"):
        ChatTemplate.from_files(resolve(str(d)))
    assert ChatTemplate.from_files(resolve(str(d)), required=False) is None


# ---------------------------------------------------------------- budgets: hostile templates end, quickly

BUDGET = Budget(seconds=2)  # the default is 5 s; hangs must end well within 15 s either way
HI = [{"role": "user", "content": "hi"}]
MiB = 2**20
TIME = "used more than 2 s"
MEMORY = "used more than 256 MiB"
SIZE = r"tried to make a (string|list|number) of ~[0-9,]+ (characters|items|digits), over its budget"
TIME_OR_MEMORY = f"({TIME}|{MEMORY})"  # both grow: whichever runs out first, with the machine's speed
RECURSION = "recursed too deeply"


def _maxrss(who) -> int:
    """Peak resident memory in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _live_workers_peak() -> int:
    peak = 0
    for worker in sandbox._workers.values():
        try:
            with open(f"/proc/{worker.process.pid}/status") as f:
                peak = max(peak, *(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
        except OSError:
            pass
    return peak


def assert_stopped(source, match, messages=HI, budget=BUDGET, **kwargs):
    """The template fails with a one-line TemplateError within 15 s, and no process grew by GBs.

    A worker killed and reaped shows in RUSAGE_CHILDREN, which on Linux also counts the parent's own
    peak at the time it was started (fork + exec); a live worker shows in /proc/PID/status.
    """
    parent_before = _maxrss(resource.RUSAGE_SELF)
    children_before = max(_maxrss(resource.RUSAGE_CHILDREN), parent_before)
    start = time.monotonic()
    with pytest.raises(TemplateError, match=match) as e:
        ChatTemplate(source, budget=budget).render(messages, **kwargs)
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"stopped only after {elapsed:.1f} s"
    assert "\n" not in str(e.value) and len(str(e.value)) < 600
    assert _maxrss(resource.RUSAGE_SELF) - parent_before < 256 * MiB
    assert max(_maxrss(resource.RUSAGE_CHILDREN), _live_workers_peak()) - children_before < 1024 * MiB
    return e.value


# The adversarial pass's findings, then what else an attacker would try. Each used to run for minutes,
# reach GBs, or both. Size refusals come from the sandbox's checks before the object is made; time and
# memory from the worker's deadline and RLIMIT_AS.
HOSTILE = {
    # time: loops without function calls, recursion, pure-Python loops over a list
    "nested range loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", TIME),
    "loop over a list": ("{% set xs = ('a' * 100000)|list %}{% for x in xs %}{% for y in xs %}{% endfor %}"
                         "{% endfor %}", TIME),
    "exponential macros": ("{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
                           "{{ f(0) }}", TIME),
    "output into a set block": ("{% set x %}{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx"
                                "{% endfor %}{% endfor %}{% endset %}", TIME_OR_MEMORY),
    "str() of a nested list": ("{{ [[[0] * 1000] * 1000] * 1000 }}", TIME_OR_MEMORY),
    "macro recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", RECURSION),
    # big numbers, when compiling (Jinja folds constants) and when rendering
    "9**9**9 at compile time": ("{{ (9**(9**9)) > 1 }}", SIZE),
    "9**9**9 at run time": ("{% set n = 9 %}{{ n ** (n ** n) > 1 }}", SIZE),
    "squaring an int": ("{% set ns = namespace(x=10) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
                        "{% endfor %}{{ ns.x > 1 }}", SIZE),
    "a 100,001-digit literal": ("{{ 1" + "0" * 100_000 + " }}", "cannot be compiled: ValueError"),
    # memory: repetition, doubling, padding
    "'a' * 10**10": ("{{ 'a' * 10**10 }}", SIZE),
    "[1] * 10**9": ("{{ ([1] * 10**9)|length }}", SIZE),
    "namespace string doubled with +": ("{% set ns = namespace(s='a') %}{% for i in range(40) %}"
                                        "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}", SIZE),
    "namespace list doubled with +": ("{% set ns = namespace(s=[1]) %}{% for i in range(40) %}"
                                      "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}", SIZE),
    "%-format width": ("{{ '%0999999999d' % 1 }}", SIZE),
    "%-format width from *": ("{{ '%*d' % (10**9, 1) }}", SIZE),
    "%-format precision": ("{{ '%.999999999f' % 1.0 }}", SIZE),
    "format filter width": ("{{ '%999999999s'|format('x') }}", SIZE),
    "str.format width": ("{{ '{:>999999999}'.format(1) }}", SIZE),
    "str.format nested width": ("{{ '{:>{w}}'.format(1, w=10**9) }}", SIZE),
    "str.format_map width": ("{{ '{a:>999999999}'.format_map({'a': 1}) }}", SIZE),
    "str.ljust": ("{{ 'a'.ljust(10**9) }}", SIZE),
    "str.center": ("{{ 'a'.center(10**9) }}", SIZE),
    "str.zfill": ("{{ '1'.zfill(10**9) }}", SIZE),
    "str.expandtabs": ("{{ ('\t' * 1000).expandtabs(10**7) }}", SIZE),
    "str.replace": ("{{ ('a' * 100000).replace('a', 'x' * 100000) }}", SIZE),
    "str.join of an iterator": ("{{ ('x' * 1000000).join(range(100000)|map('string')) }}", SIZE),
    "str.translate": ("{{ ('a' * 100000).translate({97: 'x' * 100000}) }}", SIZE),
    # filters and globals with huge arguments
    "lipsum(n=1000000)": ("{{ lipsum(n=1000000) }}", SIZE),
    "lipsum(max=10**9)": ("{{ lipsum(n=1, max=10**9) }}", SIZE),
    "center": ("{{ 'a'|center(10**9) }}", SIZE),
    "indent by a number": ("{{ ('a\n' * 1000)|indent(10**7) }}", SIZE),
    "indent by a string": ("{{ ('a\n' * 100000)|indent('x' * 100000) }}", SIZE),
    "tojson(indent=10**9)": ("{{ [1]|tojson(indent=10**9) }}", SIZE),
    "tojson(indent=10**6) of a long list": ("{{ (range(10000)|list)|tojson(indent=10**6) }}", SIZE),
    "tojson of shared references": ("{{ ([[[0] * 1000] * 1000] * 1000)|tojson }}", SIZE),
    "wordwrap with a long wrapstring": ("{{ ('a ' * 100000)|wordwrap(1, wrapstring='x' * 100000) }}", SIZE),
    "join with a long separator": ("{{ (range(100000)|list)|join('x' * 1000000) }}", SIZE),
    "replace of the empty string": ("{{ ('a' * 100000)|replace('', 'x' * 100000) }}", SIZE),
    "batch": ("{{ [1]|batch(10**9, 'x')|list|length }}", SIZE),
    "slice": ("{{ [1]|slice(10**9, 'x')|list|length }}", SIZE),
    # deep nesting: Python's stack, in the parser and in the renderer
    "deeply nested parentheses": ("{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}", RECURSION),
    "deeply nested list, printed": ("{% set ns = namespace(x=[]) %}{% for i in range(10000) %}"
                                    "{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}", RECURSION),
    "deeply nested list, tojson": ("{% set ns = namespace(x=[]) %}{% for i in range(10000) %}"
                                   "{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x|tojson }}", RECURSION),
    # output: the cap is checked as output is produced, not once it is all there
    "output flood": ("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
                     "produced over 10,000,000 characters"),
}

# Past the size checks, only the OS limit holds: it needs RLIMIT_AS (Linux).
MEMORY_ONLY = {
    "namespace string doubled with ~": ("{% set ns = namespace(s='a') %}{% for i in range(40) %}"
                                        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}", MEMORY),
    "four 9M-item lists, tojson": ("{{ dict(a=[1] * 9000000, b=[1] * 9000000, c=[1] * 9000000, d=[1] * 9000000)"
                                   "|tojson|length }}", MEMORY),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_is_stopped_within_its_budget(name):
    source, match = HOSTILE[name]
    assert_stopped(source, match)


@pytest.mark.skipif(sys.platform != "linux", reason="the memory limit of the worker is RLIMIT_AS, enforced on Linux")
@pytest.mark.parametrize("name", list(MEMORY_ONLY))
def test_memory_hog_is_stopped_by_the_os_limit(name):
    source, match = MEMORY_ONLY[name]
    assert_stopped(source, match)


def test_the_hang_at_compile_time_is_gone():
    start = time.monotonic()
    template = ChatTemplate("{{ (9**(9**9)) > 1 }}")  # used to hang here: Jinja folded the constant
    assert time.monotonic() - start < 1
    with pytest.raises(TemplateError, match="number of ~369,693,100 digits"):
        template.render(HI)


def test_a_stopped_worker_is_replaced_and_renders_stay_identical(template, reference_tokenizer):
    assert_stopped(HOSTILE["nested range loops"][0], TIME)
    messages = BATTERY["multi-turn"][0]
    assert template.render(messages, add_generation_prompt=True) == reference_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_budgets_are_configurable(monkeypatch):
    long_output = "{% for i in range(300) %}x{% endfor %}"
    assert_stopped(long_output, "produced over 100 characters", budget=Budget(max_chars=100))
    assert_stopped("{{ 'ab' * 100 }}", "string of ~200 characters", budget=Budget(max_chars=100))
    assert len(ChatTemplate(long_output).render(HI)) == 300
    monkeypatch.setattr(sandbox, "DEFAULT_BUDGET", Budget(max_chars=100))  # templates made without a budget
    with pytest.raises(TemplateError, match="produced over 100 characters"):
        ChatTemplate(long_output).render(HI)
    # a genuine but slow template can be given more time
    slow = "{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}done"  # about 1 s
    assert_stopped(slow, "used more than 0.1 s", budget=Budget(seconds=0.1))
    assert ChatTemplate(slow, budget=Budget(seconds=60)).render(HI) == "done"


def test_renders_from_many_threads_each_get_their_own_answer(template):
    from concurrent.futures import ThreadPoolExecutor
    cases = [(BATTERY[name][0], flag) for name in BATTERY for flag in (True, False)] * 3
    expected = [template.render(m, add_generation_prompt=flag) for m, flag in cases]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda case: template.render(case[0], add_generation_prompt=case[1]), cases))
    assert got == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_worker_is_small_and_has_no_torch(template):
    template.render(HI)
    pid = sandbox._workers["qwen_lab.chat_template:make_environment"].process.pid
    with open(f"/proc/{pid}/maps") as f:
        assert "torch" not in f.read()
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert rss < 100 * 1024  # KiB; the parent, with torch, is several times that


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)"])
def test_the_worker_ends_with_its_parent(exit_call):
    # sys.exit runs the atexit hook; os._exit does not, and the worker ends when its stdin closes.
    script = ("import os, sys; from qwen_lab.chat_template import ChatTemplate; from qwen_lab import sandbox; "
              "ChatTemplate('x').render([{'role': 'user', 'content': 'hi'}]); "
              "print(next(iter(sandbox._workers.values())).process.pid, flush=True); " + exit_call)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"worker {pid} outlived its parent")


# ---------------------------------------------------------------- bad input: one clear TemplateError

@pytest.mark.parametrize("tools", ["get_weather", {"type": "function"}, [WEATHER_TOOL, "get_time"], [[WEATHER_TOOL]]])
def test_tools_must_be_a_list_of_objects(template, tools):
    with pytest.raises(TemplateError, match="tools must be a list of dicts"):
        template.render(HI, tools=tools)


def test_documents_must_be_a_list_of_objects(template):
    with pytest.raises(TemplateError, match="documents must be a list of dicts"):
        template.render(HI, documents="some text")


@pytest.mark.parametrize("message", [{"content": "hi"}, {"role": None, "content": "hi"}, {"role": 1, "content": "x"}])
def test_a_message_without_a_role_is_an_error(template, message):
    with pytest.raises(TemplateError, match="message 1 has no 'role'"):
        template.render([{"role": "user", "content": "hi"}, message])


def test_deep_or_circular_input_is_an_error_not_a_recursion_error(template):
    deep = "x"
    for _ in range(100_000):
        deep = [deep]
    circular = {"role": "user", "content": "hi"}
    circular["self"] = circular
    for messages in ([{"role": "user", "content": deep}], [circular]):
        with pytest.raises(TemplateError, match="nest deeper than 100 levels"):
            template.render(messages)
    with pytest.raises(TemplateError, match="integer string conversion"):
        template.render([{"role": "user", "content": 10**5000}])


@pytest.mark.parametrize("source, match", [
    ("{{ 1 / 0 }}", "failed on these messages: ZeroDivisionError"),
    ("{{ messages[0].content + 1 }}", "failed on these messages: TypeError"),
    ("{{ range(10**6) }}", "failed on these messages: OverflowError"),
    ("{{ raise_exception('a\\nb' * 10000) }}", "refused these messages: a b"),
    (None, "not a NoneType"),
])
def test_library_errors_become_one_line_template_errors(source, match):
    with pytest.raises(TemplateError, match=match) as e:
        ChatTemplate(source).render(HI)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600


# ---------------------------------------------------------------- a broken template does not stop a model loading

BROKEN = {
    "syntax error": ("{% if %}", "syntax error at line 1"),
    "compile-time bomb": ("{{ (9**(9**9)) > 1 }}", "number of ~369,693,100 digits"),
    "not UTF-8": (b"{{ messages \xff }}", r"chat_template\.jinja is not UTF-8 text \(byte 0xff at offset 12\)"),
}


@pytest.fixture(params=list(BROKEN))
def broken_model(request, tiny_dir, tmp_path):
    source, match = BROKEN[request.param]
    d = tmp_path / "broken"
    shutil.copytree(tiny_dir, d)
    (d / "chat_template.jinja").write_bytes(source if isinstance(source, bytes) else source.encode())
    return d, match


def test_a_raw_prompt_needs_no_template(broken_model):
    from qwen_lab.generation import ChatModel
    d, match = broken_model
    start = time.monotonic()
    chat = ChatModel.load(str(d), dtype="float32", device="cpu")
    assert time.monotonic() - start < 60
    assert chat.generate("The capital of", max_new_tokens=3, do_sample=False).text != ""
    with pytest.raises(TemplateError, match=match):
        chat.render(HI)


def test_cli_raw_works_and_template_names_the_problem(broken_model, tmp_path, capsys):
    from qwen_lab.cli import main
    d, match = broken_model
    assert main(["generate", "--model", str(d), "--raw", "--prompt", "Hi", "--max-new-tokens", "2", "--cpu"]) == 0
    capsys.readouterr()
    (tmp_path / "messages.json").write_text(json.dumps(HI))
    assert main(["template", "--model", str(d), "--messages", str(tmp_path / "messages.json")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("qwen-lab: error: ")
    import re
    assert re.search(match, err)


def test_a_chat_template_file_too_large_to_be_one_is_refused_unread_and_raw_prompts_still_work(tiny_dir, tmp_path):
    """A 2.3 GB chat_template.jinja was read whole: a MemoryError traceback under 4 GB, before any prompt."""
    from qwen_lab.generation import ChatModel
    d = tmp_path / "huge"
    shutil.copytree(tiny_dir, d)
    with open(d / "chat_template.jinja", "wb") as f:
        f.truncate(17 * 2**20)  # sparse: no disk used
    chat = ChatModel.load(str(d), dtype="float32", device="cpu")
    assert chat.generate("The capital of", max_new_tokens=2, do_sample=False).generated_tokens
    with pytest.raises(TemplateError, match=r"chat_template\.jinja is 17 MB, far too large for a chat template"):
        chat.render(HI)

"""The chat template renders byte-identically to transformers' apply_chat_template, inside a sandbox."""
import json

import pytest

from conftest import qwen_template
from qwen_lab.chat_template import ChatTemplate
from qwen_lab.errors import TemplateError
from qwen_lab.hub import resolve

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


def test_syntax_error_names_the_line():
    with pytest.raises(TemplateError, match="syntax error at line 2"):
        ChatTemplate("ok\n{% if %}")


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

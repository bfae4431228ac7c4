"""The real chat templates of Qwen3, SmolLM2 and Llama 3.2 render byte-identically to transformers.

The templates and configs are copies of the models' own files, shipped in ``qwen_lab/reference/``
(each folder's SOURCE.md says where each came from). Every conversation is rendered twice: by
qwen_lab's ChatTemplate and by transformers' own renderer, called on the same template string with
the same special-token variables that ``apply_chat_template`` would pass, so no tokenizer files are
needed.
"""
import hashlib
import json
from datetime import datetime

import pytest

from qwen_lab import reference as shipped
from qwen_lab.chat_template import ChatTemplate
from qwen_lab.errors import TemplateError
from qwen_lab.tokenizer import special_tokens

QWEN3 = "Qwen/Qwen3-0.6B"
SMOLLM2 = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
LLAMA32 = "meta-llama/Llama-3.2-3B-Instruct"

# sha256 of each chat template as stored; SOURCE.md says which public copies it was checked against.
TEMPLATE_SHA256 = {
    QWEN3: "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",
    SMOLLM2: "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
    LLAMA32: "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
}
FIXED_DATE = "26 Jul 2024"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city, in °C & <b>bold</b> units",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名稱"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4."}
USER2 = {"role": "user", "content": "And 3+3?"}
CHINESE = [{"role": "system", "content": "請一律使用繁體中文回答。"},
           {"role": "user", "content": "臺灣的夜市有什麼特色？🍜"},
           {"role": "assistant", "content": "夜市以小吃聞名，例如蚵仔煎、珍珠奶茶與臭豆腐。"},
           {"role": "user", "content": "「士林夜市」在哪裡？"}]
THINK = "<think>\nThe user adds small numbers.\n</think>\n\n"

# name: (messages, extra arguments of render); shared by every model
COMMON = {
    "system + user": ([SYSTEM, USER], {}),
    "user only": ([USER], {}),
    "multi-turn": ([SYSTEM, USER, ASSISTANT, USER2], {}),
    "ends with assistant": ([USER, ASSISTANT], {}),
    "traditional chinese": (CHINESE, {}),
    "tools": ([USER], {"tools": [WEATHER_TOOL]}),
    "tools with system": ([SYSTEM, {"role": "user", "content": "天氣如何？台北"}], {"tools": [WEATHER_TOOL]}),
}

QWEN3_CASES = {
    "thinking disabled": ([SYSTEM, USER], {"enable_thinking": False}),
    "thinking enabled": ([SYSTEM, USER], {"enable_thinking": True}),
    "thinking disabled, multi-turn": ([USER, ASSISTANT, USER2], {"enable_thinking": False}),
    "think stripped from history": ([USER, {"role": "assistant", "content": THINK + "4."}, USER2], {}),
    "think kept in the last turn": ([USER, {"role": "assistant", "content": THINK + "4."}], {}),
    "think without opening tag": ([USER, {"role": "assistant", "content": "just reasoning\n</think>\n\n4."}], {}),
    "reasoning_content field": ([USER, {"role": "assistant", "content": "4.", "reasoning_content": "Small sum."}], {}),
    "tool calls and responses": ([
        {"role": "user", "content": "Weather in Taipei and Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "台北", "unit": "c"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Tokyo\"}"}}]},
        {"role": "tool", "content": "{\"temp\": 25}"}, {"role": "tool", "content": "{\"temp\": 18}"},
        {"role": "assistant", "content": "台北 25°C，東京 18°C。"}], {"tools": [WEATHER_TOOL]}),
    "tool call after reasoning, mid-task": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "I should call the tool.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 12}"}], {"tools": [WEATHER_TOOL], "enable_thinking": True}),
    "content blocks instead of a string": ([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], {}),
    "late system message": ([USER, {"role": "system", "content": "late system"}], {}),
}

SMOLLM2_CASES = {
    "default system prompt in multi-turn": ([USER, ASSISTANT, USER2], {}),
    "tool message": ([USER, {"role": "tool", "content": "{\"temp\": 25}"}], {}),
}

LLAMA32_CASES = {
    "system is trimmed": ([{"role": "system", "content": "  Be brief.\n\n"}, {"role": "user", "content": " Hi \n"}],
                          {}),
    "tools in the system message": ([SYSTEM, USER], {"tools": [WEATHER_TOOL], "tools_in_user_message": False}),
    "custom_tools": ([USER], {"custom_tools": [WEATHER_TOOL]}),
    "tool call and ipython response": ([
        {"role": "user", "content": "Weather in Taipei?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "台北", "unit": "c"}}}]},
        {"role": "tool", "content": "{\"temp\": 25}"},
        {"role": "assistant", "content": "It is 25°C in 台北."}], {"tools": [WEATHER_TOOL]}),
    "ipython role and mapping content": ([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "ipython", "content": {"temp": -3, "sky": "snow ❄"}}], {}),
}

BATTERY = {QWEN3: {**COMMON, **QWEN3_CASES}, SMOLLM2: {**COMMON, **SMOLLM2_CASES},
           LLAMA32: {**COMMON, **LLAMA32_CASES}}


def tokenizer_config(model):
    return json.loads(shipped.path(model, "tokenizer_config.json").read_text(encoding="utf-8"))


def template_of(model):
    """The model's template and the special-token variables transformers passes with it."""
    config = tokenizer_config(model)
    tokens = {k: v for k, v in special_tokens(config).items() if v is not None}
    return config["chat_template"], tokens


@pytest.fixture(scope="module")
def reference():
    """transformers' renderer, called the way apply_chat_template(tokenize=False) calls it."""
    pytest.importorskip("transformers")
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        pytest.skip("this transformers has no render_jinja_template")

    def render(source, tokens, messages, add_generation_prompt=False, tools=None, **variables):
        # apply_chat_template drops the keys whose value is None, then passes the special tokens as variables
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        rendered, _ = render_jinja_template(conversations=[chat], tools=tools, chat_template=source,
                                            add_generation_prompt=add_generation_prompt, **{**tokens, **variables})
        return rendered[0]
    return render


def test_templates_are_the_recorded_copies():
    for model, digest in TEMPLATE_SHA256.items():
        source, _ = template_of(model)
        assert hashlib.sha256(source.encode("utf-8")).hexdigest() == digest, model


CASES = [(model, name) for model, cases in BATTERY.items() for name in cases]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("model, name", CASES, ids=[f"{m.split('/')[1]}: {n}" for m, n in CASES])
def test_byte_identical_to_transformers(model, name, add_generation_prompt, reference):
    messages, extra = BATTERY[model][name]
    if model == LLAMA32:
        extra = {"date_string": FIXED_DATE, **extra}  # deterministic; the default path is tested below
    source, tokens = template_of(model)
    expected = reference(source, tokens, messages, add_generation_prompt=add_generation_prompt, **extra)
    got = ChatTemplate(source, tokens).render(messages, add_generation_prompt=add_generation_prompt, **extra)
    assert got.encode() == expected.encode()
    if model == LLAMA32:
        assert f"Today Date: {FIXED_DATE}\n" in got


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama32_default_date_is_today_in_both(add_generation_prompt, reference):
    """Without date_string the template asks strftime_now for today's date, in qwen_lab as in transformers."""
    source, tokens = template_of(LLAMA32)
    messages = [SYSTEM, USER]
    for _ in range(2):  # a render that straddles midnight is retried once
        today = datetime.now().strftime("%d %b %Y")
        expected = reference(source, tokens, messages, add_generation_prompt=add_generation_prompt)
        got = ChatTemplate(source, tokens).render(messages, add_generation_prompt=add_generation_prompt)
        if datetime.now().strftime("%d %b %Y") == today:
            break
    assert got.encode() == expected.encode()
    assert f"Today Date: {today}\n" in got and FIXED_DATE not in got


def test_llama32_refuses_two_tool_calls_like_transformers(reference):
    source, tokens = template_of(LLAMA32)
    call = {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    messages = [USER, {"role": "assistant", "tool_calls": [call, call]}]
    with pytest.raises(Exception, match="only supports single tool-calls"):
        reference(source, tokens, messages, date_string=FIXED_DATE)
    with pytest.raises(TemplateError, match="refused these messages: This model only supports single tool-calls"):
        ChatTemplate(source, tokens).render(messages, date_string=FIXED_DATE)


@pytest.mark.parametrize("field", ["reasoning", "thinking"])
def test_qwen3_reasoning_under_another_name(field, reference):
    source, tokens = template_of(QWEN3)
    messages = [USER, {"role": "assistant", "content": "4.", field: "Small sum."}]
    expected = reference(source, tokens, messages)
    got = ChatTemplate(source, tokens).render(messages)
    assert got.encode() == expected.encode()


# Rendered by Qwen/Qwen3-0.6B's own tokenizer, as quoted in huggingface/trl's docstring of
# get_training_chat_template (trl/chat_template_utils.py): a check of the stored template that needs no transformers.
TRL_MESSAGES = [
    {"role": "user", "content": "What is 2 * 3?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 2, "b": 3}}}]},
]


def test_qwen3_renders_what_its_tokenizer_rendered_for_trl():
    source, tokens = template_of(QWEN3)
    template = ChatTemplate(source, tokens)
    assert template.render(TRL_MESSAGES) == (
        '<|im_start|>user\nWhat is 2 * 3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n'
        '{"name": "multiply", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n')
    with_tool = TRL_MESSAGES + [{"role": "tool", "name": "multiply", "content": "6"}]
    assert template.render(with_tool, add_generation_prompt=True) == (
        '<|im_start|>user\nWhat is 2 * 3?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n'
        '{"name": "multiply", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
        '<tool_response>\n6\n</tool_response><|im_end|>\n<|im_start|>assistant\n')


def test_each_template_shows_its_own_conventions():
    """What a learner should see: the three formats differ, and each model's defaults are where we expect."""
    qwen = ChatTemplate(*template_of(QWEN3))
    assert qwen.render([USER], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen.render([USER], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    smol = ChatTemplate(*template_of(SMOLLM2))
    assert smol.render([USER]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")
    assert "SmolLM" not in smol.render([SYSTEM, USER])
    llama = ChatTemplate(*template_of(LLAMA32))
    assert llama.render([USER], date_string=FIXED_DATE, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: {FIXED_DATE}\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


# --- config.json: the fields the model code will read (no qwen_lab model code involved) ---

ARCHITECTURES = {QWEN3: "Qwen3ForCausalLM", SMOLLM2: "LlamaForCausalLM", LLAMA32: "LlamaForCausalLM"}
MODEL_TYPES = {QWEN3: "qwen3", SMOLLM2: "llama", LLAMA32: "llama"}
REQUIRED = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
            "hidden_act", "bos_token_id", "eos_token_id", "torch_dtype"]


def config_of(model, name="config.json"):
    return json.loads(shipped.path(model, name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("model", list(ARCHITECTURES))
def test_config_has_what_the_model_code_needs(model):
    config = config_of(model)
    assert config["architectures"] == [ARCHITECTURES[model]]
    assert config["model_type"] == MODEL_TYPES[model]
    missing = [k for k in REQUIRED if k not in config]
    assert not missing, f"{model} config.json lacks {missing}"
    assert config["hidden_act"] == "silu"
    assert config["attention_bias"] is False
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert 0 < config["rms_norm_eps"] < 1e-3 and config["rope_theta"] > 0
    assert isinstance(config["tie_word_embeddings"], bool)


def test_qwen3_head_dim_is_not_hidden_over_heads():
    """Qwen3-0.6B: 16 heads of 128 = 2048 wide attention on a 1024 hidden state, so head_dim must be read."""
    config = config_of(QWEN3)
    assert config["head_dim"] == 128
    assert config["num_attention_heads"] * config["head_dim"] != config["hidden_size"]
    assert (config["use_sliding_window"], config["sliding_window"], config["rope_scaling"]) == (False, None, None)


def test_llama_head_dim_and_rope_scaling():
    llama = config_of(LLAMA32)
    assert llama["head_dim"] == llama["hidden_size"] // llama["num_attention_heads"] == 128
    assert llama["rope_scaling"] == {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    smol = config_of(SMOLLM2)
    assert "head_dim" not in smol and smol["hidden_size"] // smol["num_attention_heads"] == 64
    assert smol["rope_scaling"] is None and smol["num_key_value_heads"] == smol["num_attention_heads"]


@pytest.mark.parametrize("model", list(ARCHITECTURES))
def test_stop_ids_name_the_end_of_turn_token(model):
    """generation_config's eos ids exist in the tokenizer and include the token each template ends a turn with."""
    decoder = {int(i): t["content"] for i, t in tokenizer_config(model)["added_tokens_decoder"].items()}
    eos = config_of(model, "generation_config.json")["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert all(i in decoder for i in eos)
    end_of_turn = {QWEN3: "<|im_end|>", SMOLLM2: "<|im_end|>", LLAMA32: "<|eot_id|>"}[model]
    assert end_of_turn in [decoder[i] for i in eos]
    assert tokenizer_config(model)["eos_token"] == end_of_turn
    assert config_of(model)["vocab_size"] > max(decoder)

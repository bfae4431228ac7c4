"""The embedded tiny-chat model: Hub layout, size, the acceptance figures, and transformers parity."""
import json

import pytest

from conftest import qwen_template
from qwen_lab.generation import ChatModel
from qwen_lab.hub import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID, resolve
from training.evaluate import evaluate, transformers_agreement
from training.corpus import evaluation_questions


@pytest.fixture(scope="module")
def chat():
    return ChatModel.load(EMBEDDED_MODEL_ID, dtype="float32", device="cpu")


def test_hub_layout_and_size():
    files = resolve(EMBEDDED_MODEL_ID, local_files_only=True)
    config = json.loads(files.config.read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    assert {p.name for p in EMBEDDED_MODEL_DIR.iterdir()} >= {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
        "README.md"}
    assert sum(p.stat().st_size for p in EMBEDDED_MODEL_DIR.iterdir()) <= 8 * 2**20


def test_special_tokens_and_eos_list(chat):
    tok = chat.tokenizer
    config = json.loads(chat.files.tokenizer_config.read_text())
    assert config["chat_template"] == qwen_template()
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert chat.generation_config.eos_token_id == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    assert (chat.generation_config.do_sample, chat.generation_config.temperature) == (True, 0.7)


def test_acceptance_figures(chat):
    figures = evaluate(chat)
    summary = {k: v for k, v in figures.items() if k != "failures"}
    assert figures["held_out_questions"] >= 150, summary
    assert figures["held_out_accuracy"] >= 0.90, (summary, figures["failures"][:5])
    assert figures["ends_with_im_end_within_64"] >= 0.95, summary
    assert figures["runs_past_im_end_with_endoftext_only"] >= 0.80, summary
    assert figures["goes_wrong_without_add_generation_prompt"] >= 0.80, summary


def test_transformers_loads_it_and_agrees():
    pytest.importorskip("transformers")
    prompts = [q for _, q, _ in evaluation_questions()[:8]] + ["法國的首都是哪裡？", "Who are you?"]
    assert transformers_agreement(EMBEDDED_MODEL_DIR, prompts) == 1.0


def test_chinese_reply_streams_in_whole_characters(chat):
    stream = chat.stream([{"role": "user", "content": "法國的首都是哪裡？"}], do_sample=False)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text == "法國的首都是巴黎。"
    assert not any("\ufffd" in d for d in deltas)


def test_it_chats(chat):
    def ask(*turns):
        messages = []
        for t in turns[:-1]:
            messages += [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}]
        messages.append({"role": "user", "content": turns[-1]})
        return chat.generate(messages, do_sample=False).text
    assert ask("What is the capital of France?") == "The capital of France is Paris."
    assert ask(("What is the capital of France?", "The capital of France is Paris."), "And of Italy?") == \
        "The capital of Italy is Rome."
    assert "tiny-chat" in ask("Who are you?")

"""On a CUDA GPU: the dtype auto picks, the CUDA-graph decode path, and the notebooks' code patterns.

Skipped without a GPU (as in CI); ``make gpu-check`` runs them where there is one.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")


@pytest.fixture(scope="module")
def chat():
    from qwen_lab.generation import ChatModel
    return ChatModel.load("qwen-lab/tiny-chat", dtype="float32")


def test_auto_dtype_follows_the_gpu():
    from qwen_lab.load import choose_dtype
    major = torch.cuda.get_device_capability()[0]
    assert choose_dtype("auto", torch.device("cuda")) == (torch.bfloat16 if major >= 8 else torch.float16)


def test_the_model_lands_on_the_gpu_and_decodes_through_a_graph(chat):
    assert chat.device.type == "cuda" and chat.model.lm_head.weight.is_cuda
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    graph = chat.generate(messages, do_sample=False, max_new_tokens=24)
    eager = chat.generate(messages, do_sample=False, max_new_tokens=24, static=False)
    assert graph.decode_path == "cuda-graph", graph.decode_path
    assert graph.token_ids == eager.token_ids
    assert graph.text == "The capital of France is Paris."


def test_notebook_patterns_are_device_agnostic(chat):
    ids = chat.prompt_ids([{"role": "user", "content": "Hi"}])
    with torch.inference_mode():
        logits = chat.model(torch.tensor([ids], device=chat.device))[0, -1]  # notebook 04's one step by hand
        caches = chat.model.new_caches(1, len(ids) + 4)
        chat.model(torch.tensor([ids], device=chat.device), caches, 0, last_only=True)
    assert logits.is_cuda and caches[0].k.is_cuda


def test_sampling_and_stop_on_the_gpu(chat):
    result = chat.generate([{"role": "user", "content": "Explain the KV cache."}], seed=42, max_new_tokens=40)
    again = chat.generate([{"role": "user", "content": "Explain the KV cache."}], seed=42, max_new_tokens=40)
    assert result.text == again.text and result.finish_reason in ("eos", "length")


def test_the_panel_decodes_through_a_graph_and_stops(chat):
    pytest.importorskip("ipywidgets")
    from conftest import stop_a_long_reply
    from qwen_lab.panel import ChatPanel
    panel = ChatPanel(chat, refresh_s=0.01)
    panel.temperature.value = 0.0
    panel.max_new_tokens.value = 24
    panel.send("What is the capital of France?")
    panel.wait(60)
    assert panel.replies[-1]["decode_path"] == "cuda-graph", panel.replies[-1]
    assert panel.messages[-1] == {"role": "assistant", "content": "The capital of France is Paris."}
    # Stop mid-reply on the graph path: the partial reply is kept and marked
    panel = stop_a_long_reply(chat, timeout=60)
    assert panel.replies[-1]["stopped"] and 0 < panel.replies[-1]["generated_tokens"] < 400
    assert panel.replies[-1]["decode_path"] == "cuda-graph" and panel.messages[-1]["role"] == "assistant"


def test_a_panel_s_second_turn_reuses_its_kept_cache_through_the_graph(chat):
    """On a GPU too, a conversation's next turn prefills only what is new (the static decoder's
    PromptCache reuse, tested on a CPU in test_static_decode.py), and decodes the same tokens."""
    pytest.importorskip("ipywidgets")
    from qwen_lab.panel import ChatPanel
    panel = ChatPanel(chat, refresh_s=0.01)
    panel.temperature.value = 0.0
    panel.max_new_tokens.value = 24
    for question in ("What is the capital of France?", "And of Japan?"):
        panel.send(question)
        panel.wait(60)
    second = panel.replies[-1]
    assert second["decode_path"] == "cuda-graph", second
    assert second["cached_tokens"] > 0, second
    fresh = chat.generate(panel._conversation()[:-1], do_sample=False, max_new_tokens=24)  # no cache
    assert fresh.text == panel.messages[-1]["content"]


def test_a_turn_in_another_bucket_copies_the_kept_prefix_into_the_captured_graph_s_caches(chat):
    """A next turn whose length falls in another bucket copies the kept prefix into that bucket's
    caches, which a captured graph reads in place (tested on a CPU in test_static_decode.py): on the
    graph path too, the reply is the one a whole prefill gives."""
    from qwen_lab.generation import PromptCache
    cache, messages = PromptCache(), [{"role": "user", "content": "What is the capital of France?"}]
    first = chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=24)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Japan?"}]
    long = 600  # prompt + 600 new tokens: the 1024 bucket, where the first turn used 512
    second = chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=long, eos_token_id=[])
    fresh = chat.generate(messages, do_sample=False, max_new_tokens=long, eos_token_id=[])
    assert second.decode_path == fresh.decode_path == "cuda-graph", (second.decode_path, fresh.decode_path)
    assert second.cached_tokens > 0
    assert second.token_ids[:24] == fresh.token_ids[:24]  # kept keys round otherwise than a prefill's: near ties may part later


def choose_dtype_name():
    from qwen_lab.load import choose_dtype
    return str(choose_dtype("auto", torch.device("cuda"))).removeprefix("torch.")


def test_the_cli_decodes_through_a_graph():
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "qwen_lab.cli", "generate", "--model", "qwen-lab/tiny-chat",
                           "--prompt", "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "24",
                           "--stats"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stderr.strip().splitlines()[-1])  # dtype auto: bf16 from compute capability 8.0 up
    assert stats["decode_path"] == "cuda-graph" and stats["dtype"] == str(choose_dtype_name()), stats
    assert done.stdout.strip() and 0 < stats["generated_tokens"] <= 24

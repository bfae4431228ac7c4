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

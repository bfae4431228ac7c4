"""The Qwen2 model against transformers' Qwen2ForCausalLM, on tiny random checkpoints."""
import pytest
import torch

from qwen_lab.hub import resolve
from qwen_lab.load import load_model

transformers = pytest.importorskip("transformers")


def reference(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def prompt(vocab, n=24, seed=0):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["tiny_dir", "untied_dir", "sharded_dir"])
def test_logits_equal_transformers(which, request):
    directory = request.getfixturevalue(which)
    ours, ref = load_model(resolve(str(directory)), "float32", "cpu"), reference(directory)
    assert type(ref).__name__ == "Qwen2ForCausalLM"
    ids = prompt(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["tiny_dir", "untied_dir"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_32_greedy_tokens_equal_transformers(which, penalty, request):
    from qwen_lab.generation import GenerationConfig, generate_stream
    from qwen_lab.tokenizer import Tokenizer
    directory = request.getfixturevalue(which)
    files = resolve(str(directory))
    ours, ref = load_model(files, "float32", "cpu"), reference(directory)
    ids = prompt(ours.config.vocab_size, n=10, seed=3)
    expected = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                            pad_token_id=0, repetition_penalty=penalty)[0, ids.shape[1]:].tolist()
    config = GenerationConfig(max_new_tokens=32, do_sample=False, repetition_penalty=penalty)
    got = generate_stream(ours, Tokenizer.from_files(files), ids[0].tolist(), config).result
    assert got.token_ids == expected
    assert got.finish_reason == "length" and got.generated_tokens == 32


def test_kv_cache_equals_full_recompute(tiny_dir):
    model = load_model(resolve(str(tiny_dir)), "float32", "cpu")
    ids = prompt(model.config.vocab_size, n=20, seed=5)
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(1, 32)
        pieces = [model(ids[:, :8], caches, 0)]            # prefill a chunk
        pieces.append(model(ids[:, 8:13], caches, 8))       # a chunk after it (explicit mask path)
        pieces += [model(ids[:, i:i + 1], caches, i) for i in range(13, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_last_only_projects_only_the_last_position(tiny_dir):
    model = load_model(resolve(str(tiny_dir)), "float32", "cpu")
    ids = prompt(model.config.vocab_size, n=9)
    with torch.no_grad():
        last = model(ids, last_only=True)
        assert last.shape == (1, 1, model.config.vocab_size)
        torch.testing.assert_close(last[0, 0], model(ids)[0, -1])


def test_cache_and_no_cache_generate_the_same_tokens(tiny_dir):
    from qwen_lab.generation import GenerationConfig, generate_stream
    from qwen_lab.tokenizer import Tokenizer
    files = resolve(str(tiny_dir))
    model, tok = load_model(files, "float32", "cpu"), Tokenizer.from_files(files)
    config = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=50, seed=7)
    ids = tok.encode("Hello! How are you")
    with_cache = generate_stream(model, tok, ids, config).result
    without = generate_stream(model, tok, ids, config, use_cache=False).result
    assert with_cache.token_ids == without.token_ids

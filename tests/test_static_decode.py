"""The static-shape decode step (what a GPU captures as a CUDA graph), run on the CPU against the eager path.

``scripts/gpu_check.py`` runs the same comparisons on CUDA, with the graph captured.
"""
import pytest
import torch

from qwen_lab import static_decode
from qwen_lab.errors import SettingError
from qwen_lab.generation import GenerationConfig, generate_stream
from qwen_lab.hub import resolve
from qwen_lab.load import load_model
from qwen_lab.tokenizer import Tokenizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    files = resolve(str(tiny_dir))
    return load_model(files, "float32", DEVICE, matvec="none"), Tokenizer.from_files(files)


def test_buckets():
    assert [static_decode.bucket(n, 32768) for n in (1, 512, 513, 5000)] == [512, 512, 1024, 8192]
    assert static_decode.bucket(5000, 2048) == 2048


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_static_steps_give_the_eager_greedy_tokens(tiny, penalty):
    model, tok = tiny
    prompt = tok.encode("Hello! How are you today? I am")
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=[], repetition_penalty=penalty)
    eager = generate_stream(model, tok, prompt, config, static=False).result
    static = generate_stream(model, tok, prompt, config, static=True).result
    assert static.token_ids == eager.token_ids and len(eager.token_ids) == 32
    assert static.decode_path.startswith(("static", "cuda-graph")) and eager.decode_path != static.decode_path


def test_float16_static_steps_give_the_eager_greedy_tokens(tiny_dir):
    """float16 is the dtype a GPU without bfloat16 (Colab's T4) decodes in, by this static step."""
    files = resolve(str(tiny_dir))
    model, tok = load_model(files, "float16", DEVICE, matvec="none"), Tokenizer.from_files(files)
    assert model.lm_head.weight.dtype == torch.float16
    prompt = tok.encode("Hello! How are you today? I am")
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=[], repetition_penalty=1.3)
    eager = generate_stream(model, tok, prompt, config, static=False).result
    static = generate_stream(model, tok, prompt, config, static=True).result
    assert static.token_ids == eager.token_ids and len(eager.token_ids) == 32
    assert static.decode_path.startswith(("static", "cuda-graph"))


def test_one_decoder_serves_generation_after_generation(tiny):
    model, tok = tiny
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=[])
    long_prompt, short_prompt = tok.encode("The capital of France is Paris. " * 4), tok.encode("Hi")
    first = generate_stream(model, tok, long_prompt, config, static=True).result
    second = generate_stream(model, tok, short_prompt, config, static=True).result  # stale cache rows past it
    assert len(model._static_decoders) == 1  # both fit the 512 bucket: one decoder, reused
    assert second.token_ids == generate_stream(model, tok, short_prompt, config, static=False).result.token_ids
    assert first.token_ids == generate_stream(model, tok, long_prompt, config, static=False).result.token_ids


def test_logits_of_a_step_equal_the_eager_forward(tiny):
    model, tok = tiny
    ids = tok.encode("Hello! How are you")
    decoder = static_decode.StaticDecoder(model, 64, graph=False)
    with torch.inference_mode():
        decoder.prefill(ids[:-1])
        got = decoder.step(ids[-1], len(ids) - 1)
        want = model(torch.tensor([ids], device=model.lm_head.weight.device))[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the capture succeeds")
def test_a_failed_capture_falls_back_to_the_same_step(tiny):
    model, tok = tiny
    decoder = static_decode.StaticDecoder(model, 64, graph=True)  # no CUDA here: the capture must fail
    assert decoder.graph is None and decoder.mode.startswith("static (CUDA graph capture failed:")
    ids = tok.encode("Hello")
    with torch.inference_mode():
        decoder.prefill(ids)
        assert torch.isfinite(decoder.step(ids[-1], len(ids))).all()


def test_static_needs_the_cache(tiny):
    model, tok = tiny
    with pytest.raises(SettingError, match="static decoding keeps a KV cache"):
        generate_stream(model, tok, [1, 2], GenerationConfig(), use_cache=False, static=True)


def test_static_decoding_serves_every_architecture(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")  # noqa: F841  (the checkpoints are written by it)
    from test_model import ARCHITECTURES, write_checkpoint
    for arch in ARCHITECTURES:
        directory = write_checkpoint(tmp_path / arch, arch, True, tokenizer)
        files = resolve(str(directory))
        model, tok = load_model(files, "float32", DEVICE, matvec="none"), Tokenizer.from_files(files)
        config = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=[])
        prompt = list(range(3, 15))
        assert (generate_stream(model, tok, prompt, config, static=True).result.token_ids
                == generate_stream(model, tok, prompt, config, static=False).result.token_ids), arch


def test_kept_decoders_that_no_longer_fit_the_model_are_dropped_not_used(tiny_dir):
    """A kept decoder's caches are in the dtype (and on the device) the model had: after ``model.to(bfloat16)``
    every static generation failed on float32 keys beside bfloat16 queries. And its CUDA graph reads each weight
    where it was when captured: a weight replaced since (not changed in place) left it replaying freed memory."""
    import gc
    import weakref
    files = resolve(str(tiny_dir))
    model, tok = load_model(files, "float32", DEVICE, matvec="none"), Tokenizer.from_files(files)
    prompt, config = tok.encode("Hello! How are you today? I am"), GenerationConfig(max_new_tokens=8, do_sample=False)
    generate_stream(model, tok, prompt, config, static=True).result
    static_decode.decoder_for(model, 600)  # a second bucket's
    old = [weakref.ref(d) for d in model._static_decoders.values()]
    assert static_decode.new_positions(model, len(prompt) + 8) == 0
    model.to(torch.bfloat16)
    assert static_decode.new_positions(model, len(prompt) + 8) == 512  # counted for the memory check
    converted = generate_stream(model, tok, prompt, config, static=True).result
    assert converted.generated_tokens == 8 and converted.decode_path.startswith(("static", "cuda-graph"))
    gc.collect()
    assert list(model._static_decoders) == [512] and model._static_decoders[512].caches[0].k.dtype == torch.bfloat16
    assert all(ref() is None for ref in old)  # both buckets' float32 caches freed
    kept = model._static_decoders[512]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)  # in place: the graph reads the new values
    assert static_decode.decoder_for(model, len(prompt) + 8) is kept
    mlp = model.model.layers[0].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach().clone())  # replaced: other memory
    assert static_decode.new_positions(model, len(prompt) + 8) == 512
    assert static_decode.decoder_for(model, len(prompt) + 8) is not kept


def test_the_memory_check_counts_the_bucket_a_static_decoder_allocates_and_keeps(tiny_dir, monkeypatch):
    """The decoder of a length bucket (512 positions at least) is made once and kept on the model: the check
    used to count only this generation's positions (37 of a new 512), and to ask for them again each time
    a kept decoder served, refusing a generation that allocated nothing."""
    import qwen_lab.generation as generation
    from qwen_lab.generation import PromptCache
    files = resolve(str(tiny_dir))
    model, tok = load_model(files, "float32", "cpu", matvec="none"), Tokenizer.from_files(files)
    cfg = model.config
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    prompt, config = tok.encode("Hello! How are you today? I am"), GenerationConfig(max_new_tokens=8, do_sample=False)
    monkeypatch.setattr(generation, "available_memory", lambda: 100 * per_position)
    with pytest.raises(SettingError, match=r"^the KV cache for 512 positions needs"):
        generate_stream(model, tok, prompt, config, static=True)
    monkeypatch.undo()
    cache = PromptCache()  # a kept eager cache is not the static decoder's: nothing of it is freed, nor used
    generate_stream(model, tok, prompt, config, static=False, cache=cache).result
    wanted = generate_stream(model, tok, prompt, config, static=True, cache=cache).result
    monkeypatch.setattr(generation, "available_memory", lambda: 0)
    again = generate_stream(model, tok, prompt, config, static=True, cache=cache).result  # the kept decoder
    assert again.token_ids == wanted.token_ids and again.decode_path == "static" and len(cache) > 0

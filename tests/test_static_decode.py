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


def test_a_prefix_copied_from_another_bucket_s_decoder_gives_the_logits_of_a_whole_prefill(tiny):
    model, tok = tiny
    ids = tok.encode("Hello! How are you today?")
    small, large = (static_decode.StaticDecoder(model, n, graph=False) for n in (64, 128))
    with torch.inference_mode():
        small.prefill(ids[:-3])
        large.prefill(tok.encode("Something else entirely, to be overwritten"))
        writes = large.writes
        large.copy_prefix(small, len(ids) - 3)
        assert large.writes == writes + 1  # a write: a record of what its caches held no longer holds
        got = large.prefill(ids[-3:], len(ids) - 3)
        want = model(torch.tensor([ids], device=model.lm_head.weight.device))[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot copy 100 positions"):
        small.copy_prefix(large, 100)


def test_a_prefix_is_copied_only_from_the_same_model_and_within_both_decoders(tiny, untied_dir):
    """copy_prefix checked only that ``n`` fit the decoder copied into: more positions than the source holds
    failed in a tensor copy's shape error, a negative count copied all but that many, and another model's
    decoder of the same shapes gave its keys and values without a word."""
    model, tok = tiny
    files = resolve(str(untied_dir))
    other = load_model(files, "float32", DEVICE, matvec="none")
    small, large = (static_decode.StaticDecoder(model, n, graph=False) for n in (64, 128))
    stranger = static_decode.StaticDecoder(other, 64, graph=False)
    writes = large.writes
    for source, n in ((small, 100), (small, -1), (stranger, 4)):
        with pytest.raises(ValueError, match="cannot copy"):
            large.copy_prefix(source, n)
    assert large.writes == writes  # refused: nothing written


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
    cache = PromptCache()
    generate_stream(model, tok, prompt, config, static=False, cache=cache).result
    wanted = generate_stream(model, tok, prompt, config, static=True, cache=cache).result  # the eager caches dropped
    assert wanted.cached_tokens == 0 and cache._caches is None
    monkeypatch.setattr(generation, "available_memory", lambda: 0)
    again = generate_stream(model, tok, prompt, config, static=True, cache=cache).result  # the kept decoder
    assert again.token_ids == wanted.token_ids and again.decode_path == "static" and len(cache) > 0
    assert again.cached_tokens == len(prompt) - 1


# ---------------------------------------------------------------- a conversation's prompt cache on the static path

@pytest.fixture(scope="module")
def chats():
    """Two loads of the embedded chat model: the conversation under test on the first, references on the second
    (a generation on the first would overwrite the decoder's caches that the conversation's cache relies on)."""
    from qwen_lab.generation import ChatModel
    return [ChatModel.load("qwen-lab/tiny-chat", dtype="float32", device=DEVICE) for _ in range(2)]


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _reply(chat, messages, stop=False, **settings):
    """A greedy reply; with ``stop``, cancelled once three pieces of text have streamed (the panel's Stop)."""
    import threading
    cancel = threading.Event()
    stream = chat.stream(messages, cancel=cancel, do_sample=False, **settings)
    if stop:
        for _ in zip(range(3), stream):
            pass
        cancel.set()
    return stream.result


POOL = ["Hello!", "What is 2 plus 3?", "Tell me about cats.", "Thanks!", "你好！", "What is the capital of France?",
        "Tell me a long story.", "Why?"]


@pytest.mark.parametrize("seed", range(4))
def test_a_prompt_cache_on_the_static_path_replies_as_a_whole_prefill_over_random_conversations(chats, seed):
    """Turns of random messages, Regenerates and replies stopped mid-way: the static decoder with a prompt cache
    prefills only what follows the ids its caches hold, and chooses the tokens that the static decoder without
    a cache and the eager path choose (it used to ignore the cache: cached_tokens stayed 0)."""
    import random
    from qwen_lab.generation import PromptCache
    chat, other = chats
    rng, cache, messages, fed = random.Random(seed), PromptCache(), [], None
    for turn in range(7):
        action = rng.choice(["say", "say", "regenerate", "stop"]) if messages else "say"
        if action == "regenerate":  # the last reply again: the same prompt, all of it but its last token kept
            messages = messages[:-1]
        else:
            messages = messages + [{"role": "user", "content": rng.choice(POOL)}]
        settings = dict(max_new_tokens=rng.randint(4, 40), stop=action == "stop")
        if action == "stop":
            settings["eos_token_id"] = []  # so that it is still writing when stopped
        prompt = chat.prompt_ids(messages)
        kept = _reply(chat, messages, static=True, cache=cache, **settings)
        plain = _reply(other, messages, static=True, **settings)
        eager = _reply(other, messages, static=False, **settings)
        assert kept.token_ids == plain.token_ids == eager.token_ids, (turn, action)
        assert kept.decode_path == plain.decode_path != eager.decode_path
        expected = 0 if fed is None else min(_common(fed, prompt), len(prompt) - 1)
        assert kept.cached_tokens == expected and plain.cached_tokens == 0, (turn, action)
        assert kept.stats()["cached_tokens"] == expected
        fed = prompt + kept.token_ids[:-1]  # the last token chosen is never fed
        assert len(cache) == len(fed)
        messages = messages + [{"role": "assistant", "content": kept.text}]
    assert expected > 0  # the conversation's last turn kept something (a regenerate or a reply with its prompt)


def test_two_conversations_taking_turns_on_one_model_never_read_each_other_s_keys(chats):
    """One decoder per model and length bucket serves every conversation: a cache is trusted only while
    nothing has written into it since its own last generation: another conversation (two panels on one model),
    a generation without a cache, or a prefill by hand."""
    from qwen_lab.generation import PromptCache
    chat, other = chats
    first, second = [{"role": "user", "content": "Tell me about cats."}], [{"role": "user", "content": "Hello!"}]
    a, b = PromptCache(), PromptCache()

    def turn(cache, messages, expected):
        got = chat.generate(messages, static=True, cache=cache, do_sample=False, max_new_tokens=12)
        want = other.generate(messages, static=True, do_sample=False, max_new_tokens=12)
        assert got.token_ids == want.token_ids and got.cached_tokens == expected
        return got

    prompt = chat.prompt_ids(first)
    turn(a, first, 0)
    turn(a, first, len(prompt) - 1)  # Regenerate: all but the last prompt token kept
    turn(b, second, 0)               # the other panel: a's record no longer holds
    assert len(a) == 0 and len(b) > 0
    turn(a, first, 0)
    turn(b, second, 0)
    turn(a, first, 0)
    turn(a, first, len(prompt) - 1)
    chat.generate(second, static=True, do_sample=False, max_new_tokens=4)  # a cell without a cache
    assert len(a) == 0
    turn(a, first, 0)
    static_decode.decoder_for(chat.model, len(prompt) + 12).prefill(chat.prompt_ids(second))  # by hand
    turn(a, first, 0)
    turn(a, first, len(prompt) - 1)


def test_a_static_prompt_cache_is_refused_on_another_model_dtype_or_with_other_weights(tiny_chat_copy):
    from qwen_lab.generation import ChatModel, PromptCache
    chat, messages, cache = tiny_chat_copy, [{"role": "user", "content": "Tell me about cats."}], PromptCache()
    prompt = chat.prompt_ids(messages)

    def turn(expected, model=chat, **settings):
        settings = {"do_sample": False, "max_new_tokens": 12, **settings}
        got = model.generate(messages, static=True, cache=cache, **settings)
        again = model.generate(messages, static=True, cache=cache, **settings)  # what it kept serves at once
        assert got.cached_tokens == expected and again.cached_tokens == len(prompt) - 1
        # the reference on the eager path, which leaves the decoder's caches alone
        assert got.token_ids == again.token_ids == model.generate(messages, static=False, **settings).token_ids

    turn(0)
    turn(len(prompt) - 1, max_new_tokens=600)  # the 1024 bucket, another decoder: the prefix copied into it
    assert sorted(chat.model._static_decoders) == [512, 1024]
    turn(len(prompt) - 1)                      # back in the 512 bucket: copied back
    turn(0, model=ChatModel.load("qwen-lab/tiny-chat", dtype="float32", device=DEVICE))  # another model
    turn(0)
    with torch.no_grad():
        chat.model.model.layers[0].mlp.down_proj.weight.mul_(-3)  # changed in place
    turn(0)
    layer, before = chat.model.model.layers[1].mlp, chat.model._static_decoders[512]
    layer.up_proj.weight = torch.nn.Parameter(layer.up_proj.weight.detach().clone())  # replaced: the same values
    turn(0)
    assert chat.model._static_decoders[512] is not before  # made anew: a CUDA graph would read the old memory
    chat.model.to(torch.bfloat16)  # converted: the decoders of float32 caches are dropped, not crashed into
    got = chat.generate(messages, static=True, cache=cache, do_sample=False, max_new_tokens=12)
    assert got.cached_tokens == 0
    assert got.token_ids == chat.generate(messages, static=True, do_sample=False, max_new_tokens=12).token_ids
    assert {d.caches[0].k.dtype for d in chat.model._static_decoders.values()} == {torch.bfloat16}


def test_a_turn_in_another_bucket_copies_the_kept_prefix_if_its_caches_are_untouched(chats):
    """A turn whose prompt + max_new_tokens passed 512 positions (a longer conversation, or more new tokens asked
    for) went to the 1024 bucket's decoder and prefilled its whole conversation, though the 512 one's caches held
    all but the new message. Now that prefix's keys and values are copied across; trusted only while nobody has
    written the caches they come from, and the copy voids the record of whoever wrote the caches it goes to."""
    from qwen_lab.generation import PromptCache
    chat, other = chats
    cache, second = PromptCache(), PromptCache()
    messages = [{"role": "user", "content": "Tell me about cats."}]
    settings = dict(do_sample=False, max_new_tokens=12)

    def turn(expected, cache=cache, messages=messages, **more):
        mine = {**settings, **more}
        got = chat.generate(messages, static=True, cache=cache, **mine)
        assert got.cached_tokens == expected
        assert got.token_ids == other.generate(messages, static=True, **mine).token_ids \
            == other.generate(messages, static=False, **mine).token_ids
        return got

    first = turn(0)
    fed = chat.prompt_ids(messages) + first.token_ids[:-1]
    messages = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Why?"}]
    prompt = chat.prompt_ids(messages)
    longer = turn(_common(fed, prompt), messages=messages, max_new_tokens=600)  # the 1024 bucket
    assert longer.cached_tokens > len(fed) - len(first.token_ids) + 1  # the reply's keys came across too
    assert sorted(chat.model._static_decoders) == [512, 1024]
    assert len(cache) == len(prompt) + len(longer.token_ids) - 1  # kept in the 1024 bucket's caches
    turn(len(prompt) - 1, messages=messages)  # back in the 512 bucket: copied back
    turn(len(prompt) - 1, messages=messages, max_new_tokens=600)
    # the caches a prefix would come from, written since by a generation without a cache: nothing is copied
    chat.generate([{"role": "user", "content": "Hello!"}], static=True, do_sample=False, max_new_tokens=600)
    turn(0, messages=messages)
    # another conversation kept its keys in the 1024 bucket; this one's copy into it leaves it nothing to trust
    hello = [{"role": "user", "content": "Hello!"}]
    turn(0, cache=second, messages=hello, max_new_tokens=600)
    turn(len(chat.prompt_ids(hello)) - 1, cache=second, messages=hello, max_new_tokens=600)
    turn(len(prompt) - 1, messages=messages)
    turn(len(prompt) - 1, messages=messages, max_new_tokens=600)  # copied over the other conversation's
    assert len(second) == 0
    turn(0, cache=second, messages=hello, max_new_tokens=600)


@pytest.fixture
def tiny_chat_copy():
    """The embedded chat model in float32, for a test that changes it."""
    from qwen_lab.generation import ChatModel
    return ChatModel.load("qwen-lab/tiny-chat", dtype="float32", device=DEVICE)


def test_clear_frees_the_decoder_its_conversation_wrote_last_and_release_frees_every_one(tiny_chat_copy):
    """The model kept each length bucket's decoder for good: ``PromptCache.clear()`` (a panel's New chat, a panel
    let go) forgot which ids its caches held but left their memory taken, and nothing else could free it."""
    import weakref
    from qwen_lab.generation import PromptCache
    chat, cache, second = tiny_chat_copy, PromptCache(), PromptCache()
    messages = [{"role": "user", "content": "Tell me about cats."}]
    settings = dict(do_sample=False, max_new_tokens=12)
    reference = chat.generate(messages, static=False, **settings).token_ids  # the eager path: no decoder used
    assert chat.generate(messages, static=True, cache=cache, **settings).token_ids == reference
    chat.generate(messages, static=True, do_sample=False, max_new_tokens=600)  # the 1024 bucket's, no conversation's
    keys = weakref.ref(chat.model._static_decoders[512].caches[0].k)
    cache.clear()  # its conversation wrote the 512 decoder last: nobody else can use what it holds
    assert keys() is None and sorted(chat.model._static_decoders) == [1024]
    again = chat.generate(messages, static=True, cache=cache, **settings)
    assert again.cached_tokens == 0 and again.token_ids == reference
    hello = [{"role": "user", "content": "Hello!"}]
    chat.generate(hello, static=True, cache=second, **settings)  # another conversation wrote there since
    cache.clear()  # the decoder holds the other conversation's keys: kept
    kept = chat.generate(hello, static=True, cache=second, **settings)
    assert kept.cached_tokens == len(chat.prompt_ids(hello)) - 1

    # every decoder of the model, one of them while a generation runs on it: that one ends on it, then goes
    held = [weakref.ref(d.caches[0].k) for d in chat.model._static_decoders.values()]
    stream = chat.stream(messages, static=True, cache=cache, **settings)
    next(stream)
    cfg = chat.model.config
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert static_decode.release(chat.model) == (512 + 1024) * per_position
    assert chat.model._static_decoders == {} and static_decode.new_positions(chat.model, 100) == 512
    assert stream.result.token_ids == reference
    assert all(ref() is None for ref in held) and len(cache) == 0  # its record names a decoder now gone
    later = chat.generate(messages, static=True, cache=cache, **settings)
    assert later.cached_tokens == 0 and later.token_ids == reference and sorted(chat.model._static_decoders) == [512]
    assert chat.generate(messages, static=True, cache=cache, **settings).cached_tokens == len(chat.prompt_ids(
        messages)) - 1


def test_a_stopped_failed_or_abandoned_static_reply_keeps_only_what_it_computed_whole(tiny_chat_copy, monkeypatch):
    """Stopped: all it fed is kept, and the conversation goes on as with a whole prefill. Failed: the prefix
    computed before. Abandoned mid-reply: nothing while it may still write; once collected, what it fed, unless
    another generation has used the decoder since (its caches then hold that one's keys)."""
    import gc
    from qwen_lab.generation import PromptCache
    chat, cache = tiny_chat_copy, PromptCache()
    messages = [{"role": "user", "content": "Tell me a long story."}]
    stopped = _reply(chat, messages, stop=True, static=True, cache=cache, max_new_tokens=40, eos_token_id=[])
    prompt = chat.prompt_ids(messages)
    assert stopped.finish_reason == "cancelled" and len(cache) == len(prompt) + stopped.generated_tokens - 1
    fed = prompt + stopped.token_ids[:-1]
    messages += [{"role": "assistant", "content": stopped.text}, {"role": "user", "content": "Go on."}]
    settings = dict(do_sample=False, max_new_tokens=20)
    prompt = chat.prompt_ids(messages)
    after = chat.generate(messages, static=True, cache=cache, **settings)
    assert after.cached_tokens == _common(fed, prompt) > len(fed) - stopped.generated_tokens + 1  # and its reply's
    assert after.token_ids == chat.generate(messages, static=True, **settings).token_ids  # a whole prefill

    primed = chat.generate(messages, static=True, cache=cache, **settings)
    record = chat.prompt_ids(messages) + primed.token_ids[:-1]
    more = messages + [{"role": "assistant", "content": "Hm."}, {"role": "user", "content": "Why?"}]
    monkeypatch.setattr(chat.model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(RuntimeError, match="broken"):
        chat.generate(more, static=True, cache=cache, **settings)
    monkeypatch.undo()
    common = _common(record, chat.prompt_ids(more))
    assert common > 0 and len(cache) == common  # the prefill failed: the positions before it are as they were
    retried = chat.generate(more, static=True, cache=cache, **settings)
    assert retried.cached_tokens == common and retried.token_ids == chat.generate(more, static=True,
                                                                                   **settings).token_ids

    stream = chat.stream(more, static=True, cache=cache, **settings)
    next(stream)
    assert len(cache) == 0  # taken: the stream may still write
    del stream
    gc.collect()
    assert len(cache) >= len(chat.prompt_ids(more))  # collected: its prompt and the tokens it fed
    stream = chat.stream(more, static=True, cache=cache, **settings)
    next(stream)
    chat.generate(messages, static=True, **settings)  # another generation on the decoder meanwhile
    del stream
    gc.collect()
    assert len(cache) == 0
    assert chat.generate(more, static=True, cache=cache, **settings).cached_tokens == 0


def test_two_static_streams_of_one_model_read_in_turns_are_refused(chats):
    """They share the model's decoder, so each overwrote the other's keys and values: the replies came out wrong
    without a word. Now the first to step after the other has written says so."""
    from qwen_lab.errors import QwenLabError
    chat, _ = chats
    first = chat.stream([{"role": "user", "content": "Tell me about cats."}], static=True, max_new_tokens=20,
                        eos_token_id=[])
    next(first)
    chat.generate([{"role": "user", "content": "Hello!"}], static=True, max_new_tokens=4)
    with pytest.raises(QwenLabError, match="another generation used this model's static decoder"):
        first.result


@pytest.mark.parametrize("change", ["in place", "replaced"])
def test_a_kept_decoder_follows_a_change_of_the_rotary_frequencies(change):
    """A decoder computes every position's cos and sin once, from the model's rotary module: after a learner's
    experiment with the frequencies (``inv_freq`` changed, or a rotary module of another base put in), its
    steps turned the keys by the old angles while the prefill, the model's own forward, used the new ones."""
    from qwen_lab.layers import RotaryEmbedding
    files = resolve("qwen-lab/tiny-chat")  # its own copy, changed here; replies that the change moves
    model, tok = load_model(files, "float32", DEVICE, matvec="none"), Tokenizer.from_files(files)
    prompt, config = tok.encode("Hello! How are you today? I am"), GenerationConfig(max_new_tokens=16, do_sample=False)
    before = generate_stream(model, tok, prompt, config, static=True).result
    inner = model.model
    if change == "in place":
        inner.rotary_emb.inv_freq.mul_(7)
    else:
        inner.rotary_emb = RotaryEmbedding(model.config.head_dim, 10.0).to(DEVICE)  # base 10 for 10,000
    eager = generate_stream(model, tok, prompt, config).result
    assert eager.token_ids != before.token_ids  # the change matters to this model's reply
    assert generate_stream(model, tok, prompt, config, static=True).result.token_ids == eager.token_ids


def test_a_kept_decoder_is_not_fooled_by_new_frequencies_at_the_old_ones_address():
    """An allocator hands a freed block back to a later tensor of its size (the CUDA caching allocator first;
    on a CPU, a rotary module replaced twice in a row, a cell run twice, got the address of the one a kept
    decoder was made with 10 times in 200 here). The decoder knew its frequencies by their address and
    version (0 for any new tensor), so it took the new ones for the old, and stepped by the old angles. Here a
    bytearray stands for that block: the new frequencies are a new tensor on it, as a reused block would be."""
    from qwen_lab.layers import rope_frequencies
    files = resolve("qwen-lab/tiny-chat")  # its own copy, changed here; replies that the change moves
    model, tok = load_model(files, "float32", "cpu", matvec="none"), Tokenizer.from_files(files)
    prompt, config = tok.encode("Hello! How are you today? I am"), GenerationConfig(max_new_tokens=16, do_sample=False)
    rotary = model.model.rotary_emb
    block = bytearray(rotary.inv_freq.numpy().tobytes())
    rotary.inv_freq = torch.frombuffer(block, dtype=torch.float32)  # the same frequencies, in the block
    before = generate_stream(model, tok, prompt, config, static=True).result  # a decoder made and kept
    block[:] = rope_frequencies(model.config.head_dim, 10.0).numpy().tobytes()  # the block freed, handed back...
    rotary.inv_freq = torch.frombuffer(block, dtype=torch.float32)  # ...to another base's frequencies
    eager = generate_stream(model, tok, prompt, config).result
    assert eager.token_ids != before.token_ids  # the change matters to this model's reply
    assert generate_stream(model, tok, prompt, config, static=True).result.token_ids == eager.token_ids

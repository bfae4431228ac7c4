"""Generation: config, logits processors against transformers', stopping, streaming, cancelling."""
import threading

import pytest
import torch

from conftest import reference_file
from qwen_lab.errors import ContextTooLongError, NumericalError, SettingError
from qwen_lab.generation import (ChatModel, GenerationConfig, PromptCache, generate_stream,
                                apply_repetition_penalty, apply_top_k, apply_top_p, process_logits)
from qwen_lab import kernels
from qwen_lab.sampling import _greedy, next_token
from qwen_lab.hub import ModelFiles


@pytest.fixture(scope="module")
def chat(tiny_dir):
    return ChatModel.load(str(tiny_dir), dtype="float32", device="cpu")


def test_config_from_the_real_generation_config():
    d = reference_file("qwen2.5-1.5b-instruct", "generation_config.json").parent
    files = ModelFiles(root=d, config=d / "config.json", tokenizer=d / "none", tokenizer_config=d / "none",
                       generation_config=d / "generation_config.json", chat_template=None)
    config = GenerationConfig.from_files(files)
    assert config.eos_token_id == [151645, 151643]
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.repetition_penalty) == \
        (True, 0.7, 0.8, 20, 1.1)
    assert not config.greedy
    assert config.replace(temperature=0).greedy
    assert config.replace(top_k=None).top_k == 20  # None leaves a field alone


def test_config_without_generation_config_falls_back_to_config_json():
    d = reference_file("qwen2.5-0.5b-instruct", "config.json").parent
    files = ModelFiles(root=d, config=d / "config.json", tokenizer=d, tokenizer_config=d, generation_config=None,
                       chat_template=None)
    config = GenerationConfig.from_files(files)
    assert config.eos_token_id == [151645] and config.greedy


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_new_tokens=0), dict(repetition_penalty=0), dict(temperature=float("inf")),
                                 dict(repetition_penalty=float("nan")), dict(stop_strings=[""]),
                                 dict(eos_token_id=["2"]), dict(eos_token_id=[-1]), dict(seed=2**64),
                                 dict(top_k=2.5), dict(do_sample="yes"), dict(max_new_tokens=True),
                                 dict(stop_strings=["stop"] * 33), dict(stop_strings=["x" * 257])])
def test_bad_config_values(bad):
    from qwen_lab.errors import QwenLabError, SettingError
    with pytest.raises(SettingError, match=next(iter(bad))) as info:
        GenerationConfig(**bad)
    assert isinstance(info.value, QwenLabError) and isinstance(info.value, ValueError)


def test_stop_strings_are_bounded_where_every_token_pays_for_them():
    assert GenerationConfig(stop_strings=["x" * 256] * 32).stop_strings[0] == "x" * 256  # the most there may be
    with pytest.raises(SettingError, match=r"^stop_strings must be a list of at most 32 non-empty strings of at "
                                           r"most 256 characters, not \['stop', "):
        GenerationConfig(stop_strings=["stop"] * 2000)


def test_prompt_ids_outside_the_vocabulary(chat):
    from qwen_lab.errors import SettingError
    with pytest.raises(SettingError, match=r"prompt token 99999 is not an id of this model's vocabulary"):
        chat.generate([1, 2, 99999])
    with pytest.raises(SettingError, match="prompt token -1"):
        chat.generate([-1])


def random_logits(seed=0, vocab=300):
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_processors_match_transformers():
    tf = pytest.importorskip("transformers")
    previous = torch.tensor([5, 17, 17, 42, 299, 0])
    for seed in range(5):
        logits = random_logits(seed)
        ref = tf.RepetitionPenaltyLogitsProcessor(1.3)(previous[None], logits[None].clone())[0]
        torch.testing.assert_close(apply_repetition_penalty(logits, previous, 1.3), ref)
        ref = tf.TopKLogitsWarper(20)(previous[None], logits[None].clone())[0]
        assert torch.equal(apply_top_k(logits, 20), ref)
        for p in (0.1, 0.5, 0.8, 0.95):
            ref = tf.TopPLogitsWarper(p)(previous[None], logits[None].clone())[0]
            assert torch.equal(apply_top_p(logits, p), ref)
        # the whole chain, in transformers' order
        config = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)
        chain = tf.LogitsProcessorList([tf.RepetitionPenaltyLogitsProcessor(1.1), tf.TemperatureLogitsWarper(0.7),
                                        tf.TopKLogitsWarper(20), tf.TopPLogitsWarper(0.8)])
        torch.testing.assert_close(process_logits(logits, previous, config), chain(previous[None], logits[None])[0])


def test_repeat_last_n_penalises_only_the_window():
    logits = torch.ones(10)
    config = GenerationConfig(repetition_penalty=2.0, repeat_last_n=2)
    out = process_logits(logits, torch.tensor([1, 2, 3]), config)
    assert out.tolist() == [1, 1, 0.5, 0.5, 1, 1, 1, 1, 1, 1]  # 1 fell out of the window
    wide = GenerationConfig(repetition_penalty=2.0, repeat_last_n=5)  # a window longer than the text so far
    assert process_logits(logits, torch.tensor([1, 2, 3]), wide).tolist() == [1, .5, .5, .5, 1, 1, 1, 1, 1, 1]
    sampled = GenerationConfig(do_sample=True, top_k=3, top_p=1.0, temperature=1.0, repetition_penalty=100.0,
                               repeat_last_n=5)
    best = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    for seed in range(5):  # the three best were all seen: penalised, they are not drawn
        assert next_token(best, torch.tensor([0, 1, 2]), sampled, torch.Generator().manual_seed(seed)) in (3, 4, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_greedy_choice_is_the_argmax_after_the_penalty_and_refuses_broken_logits(dtype):
    """Greedy without a penalty takes kernels.argmax's one pass where the kernels run; with one, or where they
    do not, torch's way: the same token either way; and NaN or infinite logits are a NumericalError, greedy
    or sampled."""
    g = torch.Generator().manual_seed(3)
    plain, penalised = GenerationConfig(do_sample=False), GenerationConfig(do_sample=False, repetition_penalty=3.0)
    for _ in range(10):
        logits = torch.randn(1001, generator=g).to(dtype)
        best = int(logits.argmax())
        assert next_token(logits, torch.tensor([best]), plain, None) == best
        want = int(process_logits(logits.float(), torch.tensor([best]), penalised).argmax())
        assert want != best  # the penalty (a third of the largest logit) changes the choice
        assert next_token(logits, torch.tensor([best]), penalised, None) == want
        if kernels.available():  # the C pass answered, not torch's way
            assert _greedy(logits, torch.tensor([best]), penalised) == want
    sampled = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(1001, dtype=dtype)
        logits[500] = bad
        for config in (plain, sampled):  # kernels.argmax's and kernels.top_k's None, then torch's way's error
            with pytest.raises(NumericalError, match=f"the model computed {bad} logits"):
                next_token(logits, torch.tensor([3], dtype=torch.long), config, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_with_a_penalty_takes_the_first_of_equal_best_and_an_empty_window_the_plain_argmax(dtype):
    """With a penalty, greedy takes kernels.top_k's best (``_greedy``: None where the C pass does not run)."""
    c = kernels.available()
    penalised = GenerationConfig(do_sample=False, repetition_penalty=2.0)
    logits = torch.tensor([1.0, 4.0, 2.0, 0.5, 2.0], dtype=dtype)  # id 1 seen: 4 / 2 = 2 ties ids 2 and 4
    assert next_token(logits, torch.tensor([1]), penalised, None) == 1  # the first of the three 2.0s
    assert _greedy(logits, torch.tensor([1]), penalised) == (1 if c else None)
    ties = torch.tensor([2.0, 0.5, 1.5, 4.0, 1.0], dtype=dtype)  # id 3 seen (twice): 2.0 ties id 0 before it
    assert next_token(ties, torch.tensor([3, 3, 1]), penalised, None) == 0
    assert _greedy(ties, torch.tensor([3, 3, 1]), penalised) == (0 if c else None)
    logits[4] = 2.5  # no tie: id 4 is the best after the penalty
    assert next_token(logits, torch.tensor([1, 3]), penalised, None) == 4
    assert _greedy(logits, torch.tensor([1, 3]), penalised) == (4 if c else None)
    no_window = GenerationConfig(do_sample=False, repetition_penalty=2.0, repeat_last_n=0)
    assert next_token(logits, torch.tensor([1, 3]), no_window, None) == 1  # nothing penalised
    assert _greedy(logits, torch.tensor([1, 3]), no_window) == (1 if c else None)


def test_greedy_ignores_sampling_settings(chat):
    ids = chat.tokenizer.encode("Hello! How")
    a = chat.generate(ids, do_sample=False, max_new_tokens=12)
    b = chat.generate(ids, do_sample=True, temperature=0, top_k=3, seed=1, max_new_tokens=12)
    assert a.token_ids == b.token_ids


def test_seed_reproduces_a_sampled_run(chat):
    ids = chat.tokenizer.encode("The capital")
    runs = [chat.generate(ids, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=s, max_new_tokens=20,
                          eos_token_id=[]).token_ids for s in (11, 11, 12)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stops_on_any_eos_id_and_says_why(chat):
    ids = chat.tokenizer.encode("Hello")
    free = chat.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=[])
    assert free.finish_reason == "length" and free.generated_tokens == 20
    target = free.token_ids[6]
    first = free.token_ids.index(target)
    stopped = chat.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=[99999, target])
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == free.token_ids[:first + 1]  # the EOS id is reported, like transformers


def test_stop_string_cuts_the_text_and_streams_nothing_past_it(chat):
    ids = chat.tokenizer.encode("Hello")
    free = chat.generate(ids, do_sample=False, max_new_tokens=30, eos_token_id=[])
    stop = free.text[8:11]
    stream = chat.stream(ids, do_sample=False, max_new_tokens=30, eos_token_id=[], stop_strings=[stop])
    deltas = list(stream)
    result = stream.result
    assert result.finish_reason == "stop"
    assert result.text == free.text[:free.text.find(stop)]
    assert "".join(deltas) == result.text


def test_streamed_deltas_add_up_to_the_text(chat):
    stream = chat.stream([{"role": "user", "content": "你好 🌞"}], do_sample=True, seed=3, max_new_tokens=40)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text
    assert stream.result.text == chat.tokenizer.decode(stream.result.token_ids, skip_special_tokens=True)
    # (random weights may emit invalid UTF-8 byte runs; whole-character streaming is tested in test_tokenizer)


def test_cancel_stops_between_tokens_and_keeps_the_partial_reply(chat):
    cancel = threading.Event()
    stream = chat.stream(chat.tokenizer.encode("Hello"), cancel=cancel, do_sample=False, max_new_tokens=200,
                         eos_token_id=[])
    received = []
    for delta in stream:
        received.append(delta)
        if len(received) == 3:
            cancel.set()
    result = stream.result
    assert result.finish_reason == "cancelled"
    assert result.generated_tokens < 10
    assert "".join(received) == result.text


def test_context_limit(chat):
    limit = chat.context_length
    with pytest.raises(ContextTooLongError, match=f"has {limit} tokens but the model's context holds {limit}"):
        chat.generate([5] * limit)
    near = chat.generate([5] * (limit - 3), do_sample=False, max_new_tokens=50, eos_token_id=[])
    assert near.finish_reason == "length" and near.generated_tokens == 3


def test_stats(chat):
    result = chat.generate([{"role": "user", "content": "Hi"}], do_sample=False, max_new_tokens=8, eos_token_id=[])
    stats = result.stats()
    assert set(stats) >= {"prompt_tokens", "generated_tokens", "ttft_s", "decode_tokens_per_s", "finish_reason"}
    assert stats["prompt_tokens"] == len(chat.prompt_ids([{"role": "user", "content": "Hi"}]))
    assert stats["generated_tokens"] == 8 and stats["ttft_s"] > 0 and stats["decode_tokens_per_s"] > 0


def test_chat_model_wires_template_and_generation_config(chat):
    assert chat.generation_config.eos_token_id == [chat.tokenizer.token_to_id("<|im_end|>"),
                                                   chat.tokenizer.token_to_id("<|endoftext|>")]
    assert chat.render([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n")
    assert not chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False).endswith("assistant\n")


def test_sampling_draws_from_the_processed_distribution():
    # next_token draws only among the survivors of top-k/top-p: the frequencies must still be
    # the softmax of the processed logits (seeded, so the check is deterministic).
    from qwen_lab.generation import next_token, process_logits
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, 1.5])
    none = torch.tensor([], dtype=torch.long)
    config = GenerationConfig(do_sample=True, temperature=0.8, top_k=4, top_p=0.9, repetition_penalty=1.0)
    expected = process_logits(logits, none, config).softmax(-1)
    assert (expected == 0).sum() >= 2  # top-k and top-p really removed tokens
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(20_000):
        counts[next_token(logits, none, config, generator)] += 1
    assert counts[expected == 0].sum() == 0
    torch.testing.assert_close(counts / counts.sum(), expected, atol=0.015, rtol=0)


@pytest.mark.parametrize("k, p, penalty, temperature", [(1, 1.0, 1.0, 1.0), (5, 0.8, 1.1, 0.7), (20, 0.8, 1.05, 0.7),
                                                      (50, 0.95, 1.0, 1.3), (20, 1.0, 1.0, 0.5), (3, 0.3, 1.2, 1.0),
                                                      (300, 0.9, 1.05, 0.7)])  # past kernels.TOP_K_MAX: torch's
def test_top_k_draws_from_its_candidates_are_the_whole_vocabulary_draws(k, p, penalty, temperature):
    """The sampling fast path (top-k's k candidates, not the masked vocabulary) draws the very token the
    processors-then-draw path draws from the same generator, or steps aside (ties at the k-th)."""
    from qwen_lab import sampling
    config = GenerationConfig(do_sample=True, top_k=k, top_p=p, repetition_penalty=penalty, temperature=temperature)
    fast_count = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(3000, generator=g) * 3
        if seed % 3 == 0:  # bf16 logits, as a bf16 model gives them: ties are common
            logits = logits.to(torch.bfloat16)
        previous = torch.randint(0, 3000, (50,), generator=g)
        want = sampling._draw(sampling._process_checked(logits, previous, config), config,
                              torch.Generator().manual_seed(seed))
        fast = sampling._draw_top_k(logits, previous, config, torch.Generator().manual_seed(seed))
        assert fast in (None, want)
        assert sampling.next_token(logits, previous, config, torch.Generator().manual_seed(seed)) == want
        fast_count += fast is not None
    assert fast_count >= 30  # the fast path did the drawing in most cases


def test_the_fast_path_steps_aside_for_a_tie_or_minus_infinity():
    from qwen_lab import sampling
    config = GenerationConfig(do_sample=True, top_k=3, top_p=1.0, repetition_penalty=1.0, temperature=1.0)
    none = torch.tensor([], dtype=torch.long)
    tie = torch.tensor([5.0, 4.0, 3.0, 3.0, 1.0, 0.0])  # the 3rd and 4th tie: top-k keeps both
    assert sampling._draw_top_k(tie, none, config, torch.Generator()) is None
    assert set(process_logits(tie, none, config).isfinite().nonzero().flatten().tolist()) == {0, 1, 2, 3}
    few = torch.tensor([5.0, 4.0, float("-inf"), float("-inf"), float("-inf")])  # fewer than k finite
    assert sampling._draw_top_k(few, none, config, torch.Generator()) is None
    assert sampling.next_token(few, none, config, torch.Generator().manual_seed(0)) in (0, 1)


# ---------------------------------------------------------------- what the model weighed: top logprobs

def test_top_logprobs_equal_transformers_scores(tiny_dir):
    transformers = pytest.importorskip("transformers")
    from qwen_lab.hub import resolve
    from qwen_lab.load import load_model
    from qwen_lab.tokenizer import Tokenizer
    files = resolve(str(tiny_dir))
    ours, tok = load_model(files, "float32", "cpu"), Tokenizer.from_files(files)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    out = ref.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                       repetition_penalty=1.3, output_scores=True, return_dict_in_generate=True)
    config = GenerationConfig(max_new_tokens=12, do_sample=False, repetition_penalty=1.3, top_logprobs=5)
    result = generate_stream(ours, tok, ids[0].tolist(), config).result
    assert result.token_ids == out.sequences[0, 10:].tolist() and len(result.choices) == 12
    for step, (c, scores) in enumerate(zip(result.choices, out.scores)):
        probs = scores[0].softmax(-1)  # transformers' scores: the processed logits of each step
        top = probs.topk(5)
        assert [i for i, _ in c.alternatives] == top.indices.tolist(), step
        torch.testing.assert_close(torch.tensor([p for _, p in c.alternatives]), top.values, rtol=1e-4, atol=1e-6)
        assert c.prob == pytest.approx(float(probs[c.token_id]), rel=1e-4) and c.token_id == c.alternatives[0][0]


def test_sampled_choices_only_list_tokens_that_could_be_drawn(chat):
    result = chat.generate([{"role": "user", "content": "Explain the KV cache."}], seed=3, max_new_tokens=20,
                           do_sample=True, temperature=0.7, top_k=3, top_p=0.8, top_logprobs=10)
    assert len(result.choices) == result.generated_tokens
    for c in result.choices:
        assert 1 <= len(c.alternatives) <= 3  # top-k 3 cut the rest: probability 0, not listed
        assert c.token_id in [i for i, _ in c.alternatives] and 0 < c.prob <= 1
        assert sum(p for _, p in c.alternatives) == pytest.approx(1.0, abs=1e-5)  # the whole surviving mass


def test_no_choices_are_collected_unless_asked(chat):
    result = chat.generate([{"role": "user", "content": "Hi"}], do_sample=False, max_new_tokens=5)
    assert result.choices == []
    stream = chat.stream([{"role": "user", "content": "Hi"}], do_sample=False, max_new_tokens=5, top_logprobs=2)
    seen = [len(stream.choices) for _ in stream]  # the stream's list grows as tokens come
    assert seen == sorted(seen) and len(stream.choices) == stream.result.generated_tokens


def test_finish_detail_says_why_in_words():
    chat = ChatModel.load("qwen-lab/tiny-chat", dtype="float32")  # a model that really ends its replies
    done = chat.generate([{"role": "user", "content": "What is 2 plus 3?"}], do_sample=False)
    assert done.finish_reason == "eos" and done.finish_detail.startswith("the model wrote <|im_end|> (id ")
    short = chat.generate([{"role": "user", "content": "What is 2 plus 3?"}], do_sample=False, max_new_tokens=2)
    assert short.finish_detail == "reached max_new_tokens (2)"
    cut = chat.generate([{"role": "user", "content": "What is 2 plus 3?"}], do_sample=False, stop_strings=["plus"])
    assert cut.finish_detail == "the text reached the stop string 'plus'"


# ---------------------------------------------------------------- a conversation's KV cache, kept between turns

@pytest.fixture(scope="module")
def tiny_chat():
    """The embedded chat model: Qwen2.5's chat template, replies that end on <|im_end|>."""
    return ChatModel.load("qwen-lab/tiny-chat", dtype="float32", device="cpu")


def _conversation(chat, turns, cache, **settings):
    """Talk for len(turns) turns; per turn, the reply with the cache and the one without."""
    messages, out = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        kept = chat.generate(messages, cache=cache, **settings)
        fresh = chat.generate(messages, **settings)
        out.append((kept, fresh))
        messages.append({"role": "assistant", "content": kept.text})
    return messages, out


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("settings", [dict(do_sample=False), dict(do_sample=True, temperature=0.7, top_k=20, seed=5)])
def test_a_prompt_cache_prefills_only_what_is_new_and_replies_the_same(tiny_chat, settings):
    cache = PromptCache()
    turns = ["Hello!", "What is 2 plus 3?", "Tell me about cats.", "Thanks!"]
    messages, replies = _conversation(tiny_chat, turns, cache, max_new_tokens=40, **settings)
    for i, (kept, fresh) in enumerate(replies):
        assert kept.token_ids == fresh.token_ids and kept.text == fresh.text
        assert fresh.cached_tokens == 0 and kept.prompt_tokens == fresh.prompt_tokens
        prompt = tiny_chat.prompt_ids(messages[:2 * i + 1])
        if i == 0:
            assert kept.cached_tokens == 0
        else:  # everything the last turn fed the model: its prompt and its reply but the last token
            before = tiny_chat.prompt_ids(messages[:2 * i - 1]) + replies[i - 1][0].token_ids[:-1]
            assert kept.cached_tokens == _common(before, prompt) > len(tiny_chat.prompt_ids(messages[:2 * i - 1]))
        assert kept.stats()["cached_tokens"] == kept.cached_tokens
    assert len(cache) == len(tiny_chat.prompt_ids(messages[:-1])) + len(replies[-1][0].token_ids) - 1


def test_the_suffix_prefill_gives_the_logits_of_the_whole_prompt(tiny_chat):
    """Position by position, as the KV-cache tests check prefill chunks; with a cache that must grow too."""
    model, ids = tiny_chat.model, tiny_chat.prompt_ids([{"role": "user", "content": "What is 2 plus 3?"}])
    cache = PromptCache()
    first = tiny_chat.generate(ids[:10], cache=cache, do_sample=False, max_new_tokens=1)
    assert len(cache) == 10 and first.cached_tokens == 0
    claim = cache._claim(model, ids, 4 * len(ids))
    caches, start = claim.eager_caches(model, 4 * len(ids)), claim.start  # longer than the kept ones: grown
    assert start == 10 and caches[0].max_len == 4 * len(ids) and len(cache) == 0  # taken: empty meanwhile
    with torch.inference_mode():
        got = model(torch.tensor([ids[start:]]), caches, start)[0]
        want = model(torch.tensor([ids]))[0, start:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_last_prompt_token_is_always_computed_and_a_changed_start_is_all_recomputed(tiny_chat):
    cache, messages = PromptCache(), [{"role": "user", "content": "Hello!"}]
    first = tiny_chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=8)
    again = tiny_chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=8)  # Regenerate
    assert again.cached_tokens == first.prompt_tokens - 1 and again.token_ids == first.token_ids
    other = tiny_chat.generate([{"role": "system", "content": "Be brief."}, *messages], cache=cache,
                               do_sample=False, max_new_tokens=8)  # the system prompt changed: it all differs
    assert other.cached_tokens == _common(tiny_chat.prompt_ids(messages), tiny_chat.prompt_ids(
        [{"role": "system", "content": "Be brief."}, *messages])) < 10


def test_a_prompt_cache_is_not_trusted_after_a_failure_nor_on_another_model(tiny_chat, monkeypatch):
    cache, messages = PromptCache(), [{"role": "user", "content": "Hello!"}]
    tiny_chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=8)
    assert len(cache) > 0
    stream = tiny_chat.stream(messages, cache=cache, do_sample=False, max_new_tokens=8)
    next(stream)  # abandoned mid-reply: what the caches hold is no longer known
    assert len(cache) == 0
    first = tiny_chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=8)
    more = messages + [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hm"}]
    monkeypatch.setattr(tiny_chat.model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(RuntimeError, match="broken"):
        tiny_chat.generate(more, cache=cache, do_sample=False, max_new_tokens=8)
    monkeypatch.undo()
    # the prefill failed: what it would have overwritten is not trusted, the prefix before it still is
    assert len(cache) == _common(tiny_chat.prompt_ids(messages) + first.token_ids[:-1], tiny_chat.prompt_ids(more))
    tiny_chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=8)
    ids = tiny_chat.prompt_ids(messages)
    other = ChatModel.load("qwen-lab/tiny-chat", dtype="float32", device="cpu")  # the same files, another model
    assert other.generate(ids, cache=cache, do_sample=False, max_new_tokens=4).cached_tokens == 0
    assert other.generate(ids, cache=cache, do_sample=False, max_new_tokens=4).cached_tokens == len(ids) - 1
    other.model.to(torch.bfloat16)  # converted: its keys and values would be float32 ones
    assert other.generate(ids, cache=cache, do_sample=False, max_new_tokens=4).cached_tokens == 0
    assert tiny_chat.generate(ids, cache=cache, do_sample=False, max_new_tokens=4).cached_tokens == 0
    assert tiny_chat.generate(ids, cache=cache, do_sample=False, max_new_tokens=4, use_cache=False).cached_tokens == 0
    assert tiny_chat.generate(ids, cache=cache, do_sample=False, max_new_tokens=4).cached_tokens == len(ids) - 1


def test_a_prompt_cache_is_not_trusted_once_a_weight_changed(tiny_dir):
    """Keys and values computed before a weight changed in place (a learner's experiment between turns)
    are another model's: they used to be reused, and the reply differed from the one without the cache."""
    chat = ChatModel.load(str(tiny_dir), dtype="float32", device="cpu")  # its own: the weights change here
    cache, messages = PromptCache(), [{"role": "user", "content": "Tell me about cats."}]
    first = chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=20)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "More?"}]
    assert chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=20).cached_tokens > 0
    with torch.no_grad():
        chat.model.model.layers[0].mlp.down_proj.weight.mul_(-3)
    kept = chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=20)
    assert kept.cached_tokens == 0 and kept.token_ids == chat.generate(messages, do_sample=False,
                                                                       max_new_tokens=20).token_ids
    chat.model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.ones_like(
        chat.model.model.layers[1].mlp.up_proj.weight))  # replaced, not changed in place
    assert chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=20).cached_tokens == 0
    assert chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=20).cached_tokens > 0


@pytest.mark.parametrize("change", ["in place", "replaced"])
def test_a_prompt_cache_is_not_trusted_once_the_rotary_frequencies_changed(change):
    """The keys a prompt cache keeps were turned by the rotary angles of their time: after a learner's
    experiment with the frequencies (``inv_freq``, a buffer, not a weight) they were reused, and the reply
    differed from the one without the cache."""
    from qwen_lab.layers import RotaryEmbedding
    chat = ChatModel.load("qwen-lab/tiny-chat", dtype="float32", device="cpu")  # its own: changed here
    cache, messages = PromptCache(), [{"role": "user", "content": "Hello! How are you today?"}]
    first = chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=16)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And what is 2 plus 3?"}]
    before = chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=16)
    assert before.cached_tokens > 0
    if change == "in place":
        chat.model.model.rotary_emb.inv_freq.mul_(7)
    else:
        chat.model.model.rotary_emb = RotaryEmbedding(chat.model.config.head_dim, 10.0)  # base 10 for 10,000
    fresh = chat.generate(messages, do_sample=False, max_new_tokens=16)
    assert fresh.token_ids != before.token_ids  # the change matters to this reply
    kept = chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=16)
    assert kept.cached_tokens == 0 and kept.token_ids == fresh.token_ids
    assert chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=16).cached_tokens > 0


def test_a_stopped_reply_keeps_what_it_fed(tiny_chat):
    cache, cancel = PromptCache(), threading.Event()
    stream = tiny_chat.stream([{"role": "user", "content": "Tell me about cats."}], cache=cache, cancel=cancel,
                              do_sample=False, max_new_tokens=40, eos_token_id=[])
    next(stream)
    cancel.set()
    result = stream.result
    assert result.finish_reason == "cancelled" and len(cache) == result.prompt_tokens + result.generated_tokens - 1


@pytest.mark.parametrize("static", [False, True])
def test_a_reply_that_fails_mid_way_keeps_what_it_fed_and_the_next_one_starts_there(tiny_chat, monkeypatch, static):
    """A failure used to drop the whole kept cache, though its keys and values up to the failure are whole."""
    import qwen_lab.generation as generation
    cache, messages = PromptCache(), [{"role": "user", "content": "Tell me about cats."}]
    settings = dict(do_sample=False, max_new_tokens=20, eos_token_id=[], static=static)
    prompt, calls = tiny_chat.prompt_ids(messages), []

    def fourth_fails(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("broken")
        return choice(*args)
    choice = generation.choice
    monkeypatch.setattr(generation, "choice", fourth_fails)
    with pytest.raises(RuntimeError, match="broken"):
        tiny_chat.generate(messages, cache=cache, **settings)
    monkeypatch.undo()
    assert len(cache) == len(prompt) + 3  # the prompt and the three tokens fed before the fourth choice
    fresh = tiny_chat.generate(messages, **settings)
    regenerated = tiny_chat.generate(messages, cache=cache, **settings)
    assert regenerated.cached_tokens == (len(prompt) - 1 if not static else 0)  # static: fresh wrote its caches
    assert regenerated.token_ids == fresh.token_ids
    if static:
        again = tiny_chat.generate(messages, cache=cache, **settings)
        assert again.cached_tokens == len(prompt) - 1 and again.token_ids == fresh.token_ids


def test_a_prompt_cache_is_not_trusted_once_the_weights_were_replaced_even_at_the_same_address(tiny_dir):
    """Whether a weight changed was judged by its address and its version counter. A weight replaced by a
    new tensor in the memory the old one freed (``w.data = t``, ``model.half().float()``: the allocator
    may hand the freed memory back, and ``.data =`` keeps the parameter's version) kept both, and so did a
    square weight transposed (``w.data = w.data.t()``): keys and values of the old weight were reused. Each way of changing the weights, then: the next turn prefills
    the whole prompt and replies as the changed model does without a cache; the turn after reuses again."""
    chat = ChatModel.load(str(tiny_dir), dtype="float32", device="cpu")  # its own: the weights change here
    model, cache, messages = chat.model, PromptCache(), [{"role": "user", "content": "Tell me about cats."}]
    settings = dict(do_sample=False, max_new_tokens=12, eos_token_id=[])
    weight = model.model.layers[0].mlp.down_proj.weight
    memory = bytearray(weight.numel() * weight.element_size())  # memory that stays, as an allocator's does

    def into_memory():  # the weight moved into that memory (its values unchanged)
        weight.data = torch.frombuffer(memory, dtype=weight.dtype).view_as(weight).copy_(weight)

    def replaced_in_the_same_memory():
        flipped = -weight.detach()
        weight.data = flipped  # the tensor in that memory goes: its storage is freed
        weight.data = torch.frombuffer(memory, dtype=weight.dtype).view_as(weight).copy_(flipped)  # a new one there

    def transposed():  # a square weight: the same storage, the same address
        query = model.model.layers[0].self_attn.q_proj.weight
        assert query.shape[0] == query.shape[1]
        query.data = query.data.t()

    def state(assign: bool):
        values = model.state_dict()
        values = {name: t.clone() for name, t in values.items()}
        values["model.layers.1.mlp.up_proj.weight"].neg_()
        return lambda: model.load_state_dict(values, assign=assign)

    def in_place(mode):
        def change():
            with mode():
                model.model.layers[-1].self_attn.k_proj.weight.neg_()
        return change

    changes = {"w.data = t, t at w's address": (into_memory, replaced_in_the_same_memory),
               "w.data = w.data.t()": (None, transposed),
               "model.half().float()": (None, lambda: model.half().float()),
               "model.to(bfloat16).to(float32)": (None, lambda: model.to(torch.bfloat16).to(torch.float32)),
               "load_state_dict": (None, state(assign=False)),
               "load_state_dict(assign=True)": (None, state(assign=True)),
               "w.neg_()": (None, in_place(torch.no_grad)),
               "w.neg_() in inference mode": (None, in_place(torch.inference_mode))}
    for name, (before, change) in changes.items():
        if before is not None:
            before()
        chat.generate(messages, cache=cache, **settings)
        assert chat.generate(messages, cache=cache, **settings).cached_tokens > 0, name  # the cache serves
        change()
        kept = chat.generate(messages, cache=cache, **settings)
        fresh = chat.generate(messages, **settings)
        assert kept.cached_tokens == 0 and kept.token_ids == fresh.token_ids, name


def test_a_look_at_the_weights_holds_their_storages_weakly():
    """A cache's look at the weights (``_Weights``) keeps the storages it saw from being anyone else's,
    not their memory: a weight replaced since is freed at once."""
    import sys
    from qwen_lab.generation import _Weights
    layer = torch.nn.Linear(8, 8).requires_grad_(False)
    memory = bytearray(8 * 8 * 4)
    layer.weight.data = torch.frombuffer(memory, dtype=torch.float32).view(8, 8)
    held = sys.getrefcount(memory)  # the weight's storage holds the memory
    look = _Weights(layer)
    assert look == _Weights(layer) and sys.getrefcount(memory) == held
    layer.weight.data = torch.zeros(8, 8)
    assert sys.getrefcount(memory) == held - 1 and look != _Weights(layer)


def test_a_weight_changed_while_a_reply_is_written_voids_what_it_keeps(tiny_dir):
    """Its caches then hold keys of two models; the weights used to be noted when the reply ended, and the next
    turn trusted them."""
    chat = ChatModel.load(str(tiny_dir), dtype="float32", device="cpu")  # its own: the weights change here
    cache, messages = PromptCache(), [{"role": "user", "content": "Tell me about cats."}]
    stream = chat.stream(messages, cache=cache, do_sample=False, max_new_tokens=20, eos_token_id=[])
    next(stream)
    with torch.no_grad():
        chat.model.model.layers[0].mlp.down_proj.weight.mul_(-3)
    stream.result
    kept = chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=20)
    assert kept.cached_tokens == 0 and kept.token_ids == chat.generate(messages, do_sample=False,
                                                                       max_new_tokens=20).token_ids
    assert chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=20).cached_tokens > 0


def test_a_cache_cleared_while_a_reply_is_written_stays_empty(tiny_chat):
    """A new panel clears the caches of the earlier ones, which may be replying: the reply used to put its caches
    back when it ended, and their memory stayed taken."""
    cache = PromptCache()
    stream = tiny_chat.stream([{"role": "user", "content": "Hello!"}], cache=cache, do_sample=False,
                              max_new_tokens=20, eos_token_id=[])
    next(stream)
    cache.clear()
    assert stream.result.generated_tokens == 20 and len(cache) == 0 and cache._caches is None


def test_a_turn_looks_at_the_weights_once(tiny_chat, monkeypatch):
    """Whether a weight changed (``_weights``: ~0.5 ms at 0.5B) was asked three times a turn: to check the memory,
    to take the cache (the lock released in between) and to keep it. The static decoder's check of where the
    weights are (``static_decode.weight_memory``) comes from the same look."""
    import qwen_lab.generation as generation
    from qwen_lab import static_decode
    looks, weights, memory = [], generation._weights, static_decode.weight_memory
    monkeypatch.setattr(generation, "_weights", lambda model: looks.append("weights") or weights(model))
    monkeypatch.setattr(static_decode, "weight_memory", lambda model: looks.append("memory") or memory(model))
    cache, messages = PromptCache(), [{"role": "user", "content": "Hello!"}]
    for static in (False, True):
        tiny_chat.generate(messages, do_sample=False, max_new_tokens=4, static=static)  # the decoder made
        for _ in range(2):
            looks.clear()
            tiny_chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=4, static=static)
            assert looks == ["weights"]


def test_an_abandoned_stream_gives_back_once_collected_but_never_over_a_newer_reply(tiny_chat):
    import gc
    cache, messages = PromptCache(), [{"role": "user", "content": "Tell me about cats."}]
    prompt = tiny_chat.prompt_ids(messages)
    stream = tiny_chat.stream(messages, cache=cache, do_sample=False, max_new_tokens=20, eos_token_id=[])
    next(stream)
    assert len(cache) == 0  # taken while it may still write
    del stream
    gc.collect()
    assert len(cache) >= len(prompt)  # closed: what it fed
    assert tiny_chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=4).cached_tokens == len(prompt) - 1
    stream = tiny_chat.stream(messages, cache=cache, do_sample=False, max_new_tokens=20, eos_token_id=[])
    next(stream)
    other = tiny_chat.prompt_ids([{"role": "user", "content": "Hello!"}])
    newer = tiny_chat.generate(other, cache=cache, do_sample=False, max_new_tokens=4, eos_token_id=[])
    del stream
    gc.collect()
    assert len(cache) == len(other) + 3 and cache._ids == other + newer.token_ids[:-1]  # the newer reply's


@pytest.mark.parametrize("static", [False, True])
def test_a_stream_takes_the_cache_when_it_starts_not_when_it_is_made(tiny_chat, static):
    """The cache was taken when the stream was made: one made and dropped unread (a cell that built it and
    failed before reading, a stream left as a cell's last value) left the cache empty, and the next turn
    prefilled its whole conversation. Now a stream takes the cache at its first token; until then nothing."""
    import gc
    cache, messages = PromptCache(), [{"role": "user", "content": "Tell me about cats."}]
    settings = dict(do_sample=False, max_new_tokens=8, eos_token_id=[], static=static)
    prompt = tiny_chat.prompt_ids(messages)
    first = tiny_chat.generate(messages, cache=cache, **settings)
    held = len(cache)
    assert held == len(prompt) + 7
    unread = tiny_chat.stream(messages, cache=cache, **settings)
    assert len(cache) == held  # made, never read
    del unread
    gc.collect()
    assert len(cache) == held  # dropped unread: what the cache held stays usable
    waiting = tiny_chat.stream(messages, cache=cache, **settings)  # made, read only after the next turn
    again = tiny_chat.generate(messages, cache=cache, **settings)
    assert again.cached_tokens == len(prompt) - 1 and again.token_ids == first.token_ids
    late = waiting.result  # read now: it takes the cache as the turn before left it
    assert late.cached_tokens == len(prompt) - 1 and late.token_ids == first.token_ids
    assert len(cache) == held


@pytest.mark.parametrize("static", [False, True])
def test_a_stream_closed_mid_reply_gives_the_cache_back_at_once(tiny_chat, static):
    """The docstring spoke of a stream being closed, and GenerationStream had no close(): a stream left
    mid-reply gave back only when collected. close() gives back what it computed, and it yields no more."""
    cache, messages = PromptCache(), [{"role": "user", "content": "Tell me about cats."}]
    settings = dict(do_sample=False, max_new_tokens=8, eos_token_id=[], static=static)
    prompt = tiny_chat.prompt_ids(messages)
    stream = tiny_chat.stream(messages, cache=cache, **settings)
    next(stream), next(stream), next(stream)
    kept = stream  # still referenced: only close() can give the cache back now
    assert len(cache) == 0  # taken while it runs
    kept.close()
    assert len(cache) >= len(prompt)  # the prompt and the tokens fed since, given back at once
    assert list(kept) == []
    again = tiny_chat.generate(messages, cache=cache, **settings)
    assert again.cached_tokens == len(prompt) - 1


@pytest.mark.parametrize("static", [False, True])
def test_a_stream_read_after_a_weight_changed_does_not_reuse_keys_of_the_old_weight(tiny_chat, static):
    """A stream takes the cache when it starts, but judged it by the weights as they were when it was made:
    a weight changed in between (a cell that makes the stream, then edits the model, then reads) reused the
    keys and values of the old weight, and the reply was not the changed model's (other tokens here)."""
    cache, messages = PromptCache(), [{"role": "user", "content": "Tell me about cats."}]
    settings = dict(do_sample=False, max_new_tokens=8, eos_token_id=[], static=static)
    tiny_chat.generate(messages, cache=cache, **settings)
    key = tiny_chat.model.model.layers[0].self_attn.k_proj.weight
    saved = key.detach().clone()
    stream = tiny_chat.stream(messages, cache=cache, **settings)  # made while the cache serves the weights
    try:
        with torch.no_grad():
            key.mul_(-3)  # then a weight changes, before the stream is read
        late = stream.result
        fresh = tiny_chat.generate(messages, **settings)
    finally:
        with torch.no_grad():
            key.copy_(saved)
    assert late.cached_tokens == 0 and late.token_ids == fresh.token_ids


def test_a_stream_closed_or_failed_says_it_has_no_result(tiny_chat):
    """``result`` of a stream closed before its end, or read again after its generation failed, was None:
    ``stream.result.text`` then failed far from the cause ('NoneType' object has no attribute 'text')."""
    from qwen_lab.errors import QwenLabError
    messages, settings = [{"role": "user", "content": "Tell me about cats."}], dict(max_new_tokens=8, eos_token_id=[])
    stream = tiny_chat.stream(messages, **settings)
    next(stream)
    stream.close()
    stream.close()  # twice: nothing more
    assert list(stream) == []
    with pytest.raises(QwenLabError, match=r"closed \(close\(\)\) before its end: it has no result"):
        stream.result
    unread = tiny_chat.stream(messages, **settings)
    unread.close()  # before it started
    with pytest.raises(QwenLabError, match="it has no result"):
        unread.result

    class Broken(threading.Event):
        def is_set(self):
            raise RuntimeError("the cancel event broke")

    failing = tiny_chat.stream(messages, cancel=Broken(), **settings)
    for _ in range(2):  # the second read says so again, not None
        with pytest.raises(RuntimeError, match="the cancel event broke"):
            failing.result


def test_closing_a_stream_another_thread_is_reading_says_how_to_stop_it(tiny_chat):
    """close() from another thread than the one reading the stream failed with Python's 'generator already
    executing' (a ValueError): the way to stop a stream being read elsewhere is its cancel event."""
    from qwen_lab.errors import QwenLabError
    inside, go_on = threading.Event(), threading.Event()

    class Pausing(threading.Event):  # asked between tokens, in the reading thread: holds it there
        def is_set(self):
            inside.set()
            go_on.wait(30)
            return super().is_set()

    cancel = Pausing()
    stream = tiny_chat.stream("Tell me about cats.", cancel=cancel, max_new_tokens=8, eos_token_id=[])
    reader = threading.Thread(target=lambda: list(stream), daemon=True)
    reader.start()
    assert inside.wait(30)
    try:
        with pytest.raises(QwenLabError, match="being read in another thread: stop it with its cancel event"):
            stream.close()
    finally:
        cancel.set()
        go_on.set()
        reader.join(30)
    assert stream.result.finish_reason == "cancelled"  # stopped the way the line says


# ---------------------------------------------------------------- a model folder's files are untrusted

def model_copy(tiny_dir, tmp_path, name, edit):
    import json
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    data = json.loads((d / name).read_text())
    edit(data)
    (d / name).write_text(json.dumps(data))
    return d


def test_generation_config_json_sets_sampling_but_not_the_kit_s_own_settings(tiny_dir, tmp_path):
    """A file with "seed" used to pin every sampled reply; "top_logprobs" made the CLI print JSON lines."""
    from qwen_lab.hub import resolve
    d = model_copy(tiny_dir, tmp_path, "generation_config.json",
                   lambda c: c.update(seed=5, top_logprobs=20, repeat_last_n=1, temperature=0.3))
    config = GenerationConfig.from_files(resolve(str(d)))
    assert config.temperature == 0.3 and config.eos_token_id  # the model's settings are read
    assert (config.seed, config.top_logprobs, config.repeat_last_n) == (None, 0, None)


def test_a_long_list_of_eos_ids_outside_the_vocabulary_is_a_short_line(tiny_dir, tmp_path):
    from qwen_lab.errors import CheckpointError
    d = model_copy(tiny_dir, tmp_path, "generation_config.json",
                   lambda c: c.update(eos_token_id=list(range(1000, 201_000))))
    with pytest.raises(CheckpointError, match=r"the EOS ids \[1000, 1001, 1002, 1003, 1004, \.\.\. "
                                              r"\(200,000 in all\)\] are outside the vocabulary") as info:
        ChatModel.load(str(d))
    assert len(str(info.value)) < 300  # used to be 1.5 MB


def test_a_tokenizer_id_past_the_embedding_is_refused_at_load(tiny_dir, tmp_path):
    """As many tokens as the embedding has rows, but one id past them: it used to fail mid-conversation."""
    from qwen_lab.errors import CheckpointError
    d = model_copy(tiny_dir, tmp_path, "tokenizer.json", lambda t: t["model"]["vocab"].update(a=100_000))
    with pytest.raises(CheckpointError, match="tokenizer.json has a token with id 100,000 but config.json's "
                                              "vocab_size is 400"):
        ChatModel.load(str(d))


def test_a_kv_cache_larger_than_the_memory_is_refused_with_figures(chat, monkeypatch):
    """It is allocated whole before the first token: a hostile config.json (1,024 KV heads of 1,024 channels)
    or a long reply on a big model used to meet torch's allocator (a RuntimeError traceback)."""
    import qwen_lab.generation as generation
    from qwen_lab.errors import SettingError
    monkeypatch.setattr(generation, "available_memory", lambda: 1_000)  # 1 kB free: the cache needs a few kB
    with pytest.raises(SettingError, match=r"the KV cache for \d+ positions needs 0.0 GiB but only 0.0 GiB is free: "
                                           r"ask for fewer new tokens"):
        chat.generate("Hi", max_new_tokens=5)
    assert chat.generate("Hi", max_new_tokens=5, use_cache=False).generated_tokens  # no cache, nothing to refuse


def test_finish_detail_names_a_few_eos_ids_however_many_the_file_lists(chat):
    result = chat.generate("Hi", eos_token_id=list(range(400)), max_new_tokens=3)  # every id ends the reply
    assert result.finish_reason == "eos"
    assert "one of the EOS ids [0, 1, 2, 3, 4, ... (400 in all)]" in result.finish_detail  # the panel shows it
    assert len(result.finish_detail) < 200  # every id used to be listed


@pytest.mark.parametrize("settings", [dict(temperature=1e-300), dict(temperature=0.7, repetition_penalty=1e-300)])
def test_settings_that_scale_the_logits_past_the_largest_float_are_one_line(chat, settings):
    """A softmax of infinite logits is NaN: torch's multinomial said so in a traceback."""
    config = GenerationConfig(do_sample=True, top_k=20, **settings)
    logits = torch.linspace(-5, 5, 400)
    with pytest.raises(SettingError, match=r"^temperature .* scale these logits past the largest float: use a "
                                           r"temperature of at least 0.01 \(0 for greedy\)"):
        next_token(logits, torch.tensor([399, 398]), config, torch.Generator().manual_seed(0))
    with pytest.raises(SettingError, match="past the largest float"):  # the whole loop, top-k 0 (no fast path)
        chat.generate("Hi", do_sample=True, top_k=0, max_new_tokens=2, **settings)
    greedy = GenerationConfig(do_sample=False, repetition_penalty=settings.get("repetition_penalty", 1.0))
    boosted = "repetition_penalty" in settings  # ids 398 and 399 both infinite: the first, as torch's argmax
    assert next_token(logits, torch.tensor([399, 398]), greedy, None) == (398 if boosted else 399)


# ---------------------------------------------------------------- a kept cache, adversarially

def test_two_threads_never_take_the_same_kept_caches(tiny_chat):
    """Both threads used to read the kept caches before either emptied it: two generations then wrote
    into the same tensors, and the one kept last no longer held the ids it claimed (silently wrong replies)."""
    cache, messages = PromptCache(), [{"role": "user", "content": "Hello!"}]
    tiny_chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=8)
    ids, model, barrier = tiny_chat.prompt_ids(messages), tiny_chat.model, threading.Barrier(2)

    def owner():  # the weak reference to the model, called while a thread takes the cache: both meet here
        try:
            barrier.wait(timeout=1)
        except threading.BrokenBarrierError:  # the other thread could not come: it waits for this one
            pass
        return model
    cache._model = owner
    taken = []
    workers = [threading.Thread(target=lambda: taken.append(cache._claim(model, ids, len(ids) + 4)))
               for _ in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    first, second = sorted(taken, key=lambda claim: claim.start)
    assert (first.start, second.start) == (0, len(ids) - 1)  # one got the kept caches, the other nothing
    assert first.caches is None and second.caches is not None


def _per_position(model):
    cfg = model.config
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.lm_head.weight.element_size()


def test_a_regenerate_that_fits_in_the_kept_cache_needs_no_free_memory(tiny_chat, monkeypatch):
    """The check used to ask for the whole cache again, though the kept one is reused in place: on a
    machine whose memory the conversation had filled, Regenerate was refused ("ask for fewer new tokens")."""
    import qwen_lab.generation as generation
    cache, messages = PromptCache(), [{"role": "user", "content": "Tell me about cats."}]
    first = tiny_chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=60, eos_token_id=[])
    kept = cache._caches[0].max_len
    monkeypatch.setattr(generation, "available_memory", lambda: 5 * _per_position(tiny_chat.model))
    again = tiny_chat.generate(messages, cache=cache, do_sample=False, max_new_tokens=8)
    assert again.cached_tokens == first.prompt_tokens - 1 and cache._caches[0].max_len == kept


def test_a_cache_that_cannot_be_reused_is_freed_before_the_new_one_is_allocated(tiny_chat, monkeypatch):
    """Its memory counts as free, and is: the old caches used to stay alive while the new ones were made."""
    import weakref
    import qwen_lab.generation as generation
    model, cache = tiny_chat.model, PromptCache()
    tiny_chat.generate([{"role": "user", "content": "Tell me about cats."}], cache=cache, do_sample=False,
                       max_new_tokens=60, eos_token_id=[])
    kept, old = cache._caches[0].max_len, weakref.ref(cache._caches[0])
    other = tiny_chat.tokenizer.encode("What is 2 plus 3? " * 3)  # a raw prompt: not even <|im_start|> is shared
    need = len(other) + 60
    assert kept - 40 < need <= kept
    monkeypatch.setattr(generation, "available_memory", lambda: (kept - 40) * _per_position(model))
    alive = []
    monkeypatch.setattr(model, "new_caches", lambda *a: alive.append(old() is not None) or
                        type(model).new_caches(model, *a))
    fresh = tiny_chat.generate(other, cache=cache, do_sample=False, max_new_tokens=60, eos_token_id=[])
    assert fresh.cached_tokens == 0 and alive == [False]


def test_a_growing_cache_doubles_only_where_memory_allows(tiny_chat, monkeypatch):
    """Growing allocates the new caches while the old ones are copied: the check counts the size grown to,
    and doubling (so later turns fit in place) used to ignore the free memory: up to twice what was checked."""
    import qwen_lab.generation as generation
    cache, ids = PromptCache(), tiny_chat.prompt_ids([{"role": "user", "content": "Tell me about cats."}])
    tiny_chat.generate(ids, cache=cache, do_sample=False, max_new_tokens=4)
    kept, more = cache._caches[0].max_len, list(range(30, 60))
    longer, per_position = ids + more, _per_position(tiny_chat.model)
    need = len(longer) + 8
    assert kept < need < 2 * kept
    monkeypatch.setattr(generation, "available_memory", lambda: (need + 2) * per_position)
    grown = tiny_chat.generate(longer, cache=cache, do_sample=False, max_new_tokens=8, eos_token_id=[])
    assert grown.cached_tokens == len(ids) and cache._caches[0].max_len == need  # not 2 * kept
    monkeypatch.setattr(generation, "available_memory", lambda: 10 * per_position)
    with pytest.raises(SettingError, match=rf"^the KV cache for {need + 30:,} positions needs"):
        tiny_chat.generate(longer + more, cache=cache, do_sample=False, max_new_tokens=8)
    assert len(cache) == len(longer) + 8 - 1  # refused before anything was taken: the cache is as it was
    monkeypatch.undo()
    tiny_chat.generate(longer + more, cache=cache, do_sample=False, max_new_tokens=8)
    assert cache._caches[0].max_len == 2 * need  # with the memory, doubled


def test_free_gpu_memory_counts_what_torch_keeps_for_reuse(monkeypatch):
    """torch keeps freed GPU memory (an old KV cache, a prefill's activations) for its next tensors; the
    driver counts it as used. The check used to read the driver's figure alone: on a nearly full GPU a
    cache that torch would have placed in that memory was refused."""
    from types import SimpleNamespace
    import qwen_lab.generation as generation
    model = SimpleNamespace(lm_head=SimpleNamespace(weight=SimpleNamespace(device=torch.device("cuda", 0))))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 << 30)
    assert generation._free_memory(model) == 4 << 30


@pytest.mark.skipif(not kernels.available(), reason="the C kernels do not build here")
def test_a_short_prompt_reads_each_weight_once_and_keeps_torch_on_one_thread(chat, monkeypatch):
    from qwen_lab import generation
    model, tokenizer = chat.model, chat.tokenizer
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=[])
    walked, torch_threads = [], []
    real_few, real_forward = kernels._run_few, generation._forward
    monkeypatch.setattr(kernels, "_run_few", lambda *a: walked.append(1) or real_few(*a))
    monkeypatch.setattr(generation, "_forward", lambda *a: torch_threads.append(a[-1]) or real_forward(*a))
    short = tokenizer.encode("The cat sat")  # a chat's short message: 2 to FEW_ROWS new tokens
    assert 2 <= len(short) <= kernels.FEW_ROWS
    fast = generate_stream(model, tokenizer, short, config).result
    assert walked and torch_threads == [1] and fast.prefill_threads == fast.decode_threads == kernels.num_threads()
    walked.clear(), torch_threads.clear()
    try:
        kernels.configure(few_rows=1)  # the same prompt by torch's products, on the prompt's threads
        slow = generate_stream(model, tokenizer, short, config).result
    finally:
        kernels.configure()
    assert not walked and torch_threads == [slow.prefill_threads]
    assert fast.token_ids == slow.token_ids  # sums in another order: the same greedy reply on tiny-chat
    # past SHORT_PROMPT_POSITIONS (attention over a long cache): torch's products on its threads, as before
    long = tokenizer.encode("the cat " * generation.SHORT_PROMPT_POSITIONS)[:generation.SHORT_PROMPT_POSITIONS + 1]
    cache = PromptCache()
    generate_stream(model, tokenizer, long[:-3], config.replace(max_new_tokens=1), cache=cache).result
    torch_threads.clear(), walked.clear()
    again = generate_stream(model, tokenizer, long, config.replace(max_new_tokens=1), cache=cache).result
    assert again.cached_tokens == len(long) - 3 and not walked and torch_threads == [again.prefill_threads]
    x = torch.randn(1, 3, model.config.hidden_size)
    layer = model.model.layers[0].mlp.gate_proj
    with kernels.few_rows_off():  # for this thread alone, and only within the block
        seen = []
        other = threading.Thread(target=lambda: seen.append(layer(x)))
        other.start(), other.join()
        layer(x)
    assert len(walked) == 1 and seen  # the other thread's product walked
    layer(x)
    assert len(walked) == 2

"""Each architecture against transformers' own, on tiny random checkpoints that transformers writes.

For Qwen2, Llama (with Llama 3's rotary scaling) and Qwen3 (q/k norms, a head_dim of its own),
tied and untied: logits, 32 greedy tokens, with and without the KV cache, with the runtime's
C kernels and without them.
"""
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_TEXTS  # noqa: F401  (the tokenizer fixture's texts)
from qwen_lab import kernels
from qwen_lab.generation import GenerationConfig, generate_stream
from qwen_lab.hub import resolve
from qwen_lab.load import load_model
from qwen_lab.tiny import tokenizer_config
from qwen_lab.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
#: architecture -> (transformers config class name, extra config fields)
ARCHITECTURES = {
    "Qwen2ForCausalLM": ("Qwen2Config", {"rope_theta": 10000.0}),
    "LlamaForCausalLM": ("LlamaConfig", {"rope_theta": 10000.0, "head_dim": 16, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),  # small enough that the scaling changes some frequencies
    "Qwen3ForCausalLM": ("Qwen3Config", {"rope_theta": 10000.0, "head_dim": 32}),  # wider than hidden / heads
}
CASES = [(arch, tie) for arch in ARCHITECTURES for tie in (True, False)]


def write_checkpoint(directory, architecture, tie, tokenizer, seed=0):
    """transformers builds the model and writes the files; weights large enough for clear logits."""
    config_name, extra = ARCHITECTURES[architecture]
    config = getattr(transformers, config_name)(vocab_size=tokenizer.get_vocab_size(), tie_word_embeddings=tie,
                                                **SIZES, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    import json
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer, "{{ messages }}")))
    return directory


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CASES])
def case(request, tmp_path_factory, tokenizer):
    architecture, tie = request.param
    directory = write_checkpoint(tmp_path_factory.mktemp(architecture), architecture, tie, tokenizer)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert type(reference).__name__ == architecture
    return directory, reference


def prompt(vocab, n=24, seed=0):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("matvec", ["auto", "none"])  # the runtime's twins, and the plain reference
def test_logits_equal_transformers(case, matvec):
    directory, reference = case
    ours = load_model(resolve(str(directory)), "float32", "cpu", matvec=matvec)
    assert type(ours).__name__ == type(reference).__name__
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == ours.config.tie_word_embeddings
    if matvec == "auto" and kernels.available():  # the C kernels really run: every attention is their twin
        assert all(type(layer.self_attn) is kernels.Attention for layer in ours.model.layers)
        assert kernels.in_use(ours)
    ids = prompt(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("matvec", ["auto", "none"])
def test_32_greedy_tokens_equal_transformers(case, matvec):
    directory, reference = case
    files = resolve(str(directory))
    ours = load_model(files, "float32", "cpu", matvec=matvec)
    ids = prompt(ours.config.vocab_size, n=10, seed=3)
    expected = reference.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, repetition_penalty=1.3)[0, ids.shape[1]:].tolist()
    config = GenerationConfig(max_new_tokens=32, do_sample=False, repetition_penalty=1.3)
    tok = Tokenizer.from_files(files)
    got = generate_stream(ours, tok, ids[0].tolist(), config).result
    assert got.token_ids == expected
    assert got.finish_reason == "length" and got.generated_tokens == 32
    if matvec == "auto" and kernels.available():  # every architecture decodes by a generation's one-call step
        assert kernels.TokenStep.for_model(ours, ours.new_caches(1, 8)) is not None
    assert generate_stream(ours, tok, ids[0].tolist(), config, use_cache=False).result.token_ids == expected


@pytest.mark.parametrize("matvec", ["auto", "none"])
def test_kv_cache_equals_full_recompute(case, matvec):
    directory, _ = case
    model = load_model(resolve(str(directory)), "float32", "cpu", matvec=matvec)
    ids = prompt(model.config.vocab_size, n=20, seed=5)
    with torch.inference_mode():
        full = model(ids)
        caches = model.new_caches(1, 32)
        pieces = [model(ids[:, :8], caches, 0)]            # prefill a chunk
        pieces.append(model(ids[:, 8:13], caches, 8))       # a chunk after it (explicit mask path)
        pieces += [model(ids[:, i:i + 1], caches, i) for i in range(13, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_bf16_decoding_with_the_kernels_stays_close_to_the_reference(case):
    directory, _ = case
    files = resolve(str(directory))
    fast, plain = load_model(files, "bfloat16", "cpu"), load_model(files, "bfloat16", "cpu", matvec="none")
    ids = prompt(fast.config.vocab_size, n=12, seed=9)
    with torch.inference_mode():
        cf, cp = fast.new_caches(1, 20), plain.new_caches(1, 20)
        fast(ids, cf), plain(ids, cp)
        for i in range(4):
            step = ids[:, i:i + 1]
            torch.testing.assert_close(fast(step, cf, 12 + i).float(), plain(step, cp, 12 + i).float(),
                                       rtol=0.05, atol=0.15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_match_transformers_in_the_same_dtype(case, dtype):
    """float16 is what ``dtype="auto"`` picks on a GPU older than compute capability 8 (Colab's T4).

    Run on this CPU the same way (torch's operations, no C kernel takes float16), our logits are
    transformers' in float16: the norms, rotary and softmax round where theirs do. bfloat16 runs
    the C kernels, which sum in float32: one bfloat16 step apart at most, and no further from the
    float32 logits than transformers' own bfloat16.
    """
    directory, reference32 = case
    ours = load_model(resolve(str(directory)), str(dtype).removeprefix("torch."), "cpu")
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    assert ours.model.embed_tokens.weight.dtype == dtype
    ids = prompt(ours.config.vocab_size)
    with torch.no_grad():
        got, expected, exact = ours(ids), reference(ids).logits, reference32(ids).logits
    assert got.dtype == dtype
    if dtype == torch.float16:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        step = 2.0 ** (torch.frexp(expected.float().abs().max())[1].item() - 8)  # bf16 spacing at the largest logit
        assert (got.float() - expected.float()).abs().max() <= 2 * step
        ours_error, their_error = ((x.float() - exact).abs().max().item() for x in (got, expected))
        assert ours_error <= 1.25 * their_error, (ours_error, their_error)


def test_float16_greedy_tokens_follow_transformers_in_float16(case):
    """Decoding in float16 (a T4's dtype) chooses transformers' tokens, parting only at a tie.

    A decode step is not bit for bit transformers' (unlike the prompt's logits above):
    ``Attention.attend_one`` sums one query's attention in float32 where transformers runs its
    float16 kernel, so a step's logits differ by a few float16 steps, and which few depends on
    the CPU's vector width (AVX2 or AVX-512 kernels in torch). So at every step, fed
    transformers' own tokens, our logits are within 8 float16 steps of theirs, and our greedy
    tokens are theirs up to the first place where their two candidates were that close: a tie,
    which either may take. (This once asked for all 24 tokens equal: it held on AVX2 CPUs by
    luck, and an AVX-512 one met a tie at token 12.)
    """
    directory, _ = case
    files = resolve(str(directory))
    ours = load_model(files, "float16", "cpu")
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float16).eval()
    ids = prompt(ours.config.vocab_size, n=10, seed=3)
    out = reference.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    expected, their_logits = out.sequences[0, ids.shape[1]:].tolist(), [s[0] for s in out.logits]
    with torch.inference_mode():
        caches = ours.new_caches(1, ids.shape[1] + 24)
        mine = [ours(ids, caches, 0)[0, -1]]
        for i, token in enumerate(expected[:-1]):
            mine.append(ours(torch.tensor([[token]]), caches, ids.shape[1] + i)[0, -1])
    for step, (a, b) in enumerate(zip(mine, their_logits)):
        spacing = 2.0 ** (torch.frexp(b.float().abs().max())[1].item() - 11)  # float16's step at the largest logit
        assert (a.float() - b.float()).abs().max() <= 8 * spacing, step
    got = generate_stream(ours, Tokenizer.from_files(files), ids[0].tolist(),
                          GenerationConfig(max_new_tokens=24, do_sample=False)).result.token_ids
    parted = next((i for i, (g, e) in enumerate(zip(got, expected)) if g != e), None)
    if parted is not None:  # only at a tie: their logits for both tokens within 8 float16 steps
        theirs = their_logits[parted].float()
        spacing = 2.0 ** (torch.frexp(theirs.abs().max())[1].item() - 11)
        assert theirs[expected[parted]] - theirs[got[parted]] <= 8 * spacing, (parted, got, expected)
    assert parted is None or parted >= 4, (got, expected)  # a tie at once would say more about the weights


def test_llama3_rotary_scaling_matches_transformers():
    from qwen_lab.layers import rope_frequencies
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = ARCHITECTURES["LlamaForCausalLM"][1]["rope_scaling"]
    config = transformers.LlamaConfig(**SIZES, head_dim=16, rope_theta=10000.0, rope_scaling=dict(scaling))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_frequencies(16, 10000.0, scaling)
    torch.testing.assert_close(ours, expected.float())
    assert not torch.allclose(ours, rope_frequencies(16, 10000.0))  # the scaling did change something


def test_last_only_projects_only_the_last_position(case):
    directory, _ = case
    model = load_model(resolve(str(directory)), "float32", "cpu")
    ids = prompt(model.config.vocab_size, n=9)
    with torch.no_grad():
        last = model(ids, last_only=True)
        assert last.shape == (1, 1, model.config.vocab_size)
        torch.testing.assert_close(last[0, 0], model(ids)[0, -1])


def test_sampled_tokens_are_the_same_with_and_without_the_cache(tiny_dir):
    files = resolve(str(tiny_dir))
    model, tok = load_model(files, "float32", "cpu"), Tokenizer.from_files(files)
    config = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=50, seed=7)
    ids = tok.encode("Hello! How are you")
    with_cache = generate_stream(model, tok, ids, config).result
    without = generate_stream(model, tok, ids, config, use_cache=False).result
    assert with_cache.token_ids == without.token_ids


@pytest.mark.parametrize("which", ["tiny_dir", "untied_dir", "sharded_dir"])
def test_checkpoints_written_by_qwen_lab_load_in_transformers(which, request):
    """tiny.save_checkpoint (the embedded model's writer) makes files transformers reads the same way."""
    directory = request.getfixturevalue(which)
    ours = load_model(resolve(str(directory)), "float32", "cpu")
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = prompt(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_a_model_s_kv_caches_share_one_block_in_huge_pages_taken_as_written(monkeypatch):
    """Each token's attention reads every cached position: at thousands of positions, caches in 4 KiB pages
    cost bf16 decoding 1-4% against 2 MiB pages (benchmarks/RESULTS.md). The layers' caches are one block,
    advised as huge pages; fresh memory is zeros, so its pages are taken as positions are written."""
    from conftest import resident_kib, vm_flags
    from qwen_lab import pages
    if not pages.huge_pages():
        pytest.skip(f"transparent huge pages are off here ({pages.THP_SETTING})")
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu", matvec="none")
    caches = model.new_caches(1, 16384)  # 4 layers x 2 x 2 heads x 16,384 x 48 floats: 48 MiB
    first = caches[0].k.data_ptr()
    assert first % pages.HUGE_PAGE == 0 and "hg" in vm_flags(first)
    ends = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for c in caches for t in (c.k, c.v))
    assert all(end == start for (_, end), (start, _) in zip(ends, ends[1:]))  # one block, no overlap
    assert all(t.is_contiguous() and t.shape == (1, 2, 16384, 48) for c in caches for t in (c.k, c.v))
    assert resident_kib(first) < 8 << 10  # not written yet: under 8 MiB of its 48 taken
    assert all(not t.any() for c in caches for t in (c.k, c.v))  # zeros (reading takes no memory either)
    assert resident_kib(first) < 8 << 10
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        got = model(ids, caches, 0)
        want = model(ids, model.new_caches(1, 8), 0)  # a small cache: torch's own memory, as before
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setenv("QWEN_LAB_HUGE_PAGES", "0")
    plain = model.new_caches(1, 16384)
    assert "hg" not in (vm_flags(plain[0].k.data_ptr()) or []) and not plain[0].k.any()


def test_a_kv_cache_refuses_positions_past_its_end():
    from qwen_lab.layers import KVCache
    cache = KVCache(1, 2, 4, 8, torch.float32)
    k = v = torch.ones(1, 2, 1, 8)
    cache.update(3, k, v)  # the last position fits
    with pytest.raises(ValueError, match="holds 4 positions; positions 4-4 do not fit"):
        cache.update(4, k, v)  # a slice past the end would have stored nothing, silently
    assert cache.k[0, 0, 3].eq(1).all() and cache.k[0, 0, :3].eq(0).all()

"""The C matrix-vector kernel: same results as F.linear, used only where it applies, clear when it can't be."""

import ctypes
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwen_lab import kernels, layers, runtime, threads
from qwen_lab.errors import SettingError
from qwen_lab.generation import GenerationConfig, generate_stream
from qwen_lab.hub import resolve
from qwen_lab.load import load_model
from qwen_lab.tokenizer import Tokenizer

from conftest import KERNELS_REQUIRED, needs_kernel, read_only, tree



def test_kernel_is_built_where_ci_requires_it():
    if not KERNELS_REQUIRED:
        pytest.skip("QWEN_LAB_REQUIRE_KERNELS is not set")
    assert kernels.available(), kernels.status()


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """Build (or fail to build) the kernel anew, in a private cache, then restore the real one."""
    monkeypatch.setenv("QWEN_LAB_CACHE", str(tmp_path / "cache"))
    kernels._library.cache_clear()
    yield tmp_path / "cache"
    monkeypatch.undo()
    kernels._library.cache_clear()


def bf16_close(got: torch.Tensor, x, w, b) -> None:
    """Within one bfloat16 rounding of the exact (float64) result of the same bf16 inputs."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    ulp = exact.abs().clamp_min(1e-3) * 2 ** -7
    assert ((got.double() - exact).abs() <= ulp).all()


@needs_kernel
@pytest.mark.parametrize("out_features, in_features", [(1, 1), (3, 5), (4, 8), (7, 17), (5, 31), (13, 33),
                                                       (64, 96), (130, 4864), (2048, 192), (9, 9000)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear(out_features, in_features, bias):
    g = torch.Generator().manual_seed(out_features * 1000 + in_features)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(1, 1, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    got = kernels.gemv(x, w, b)
    assert got.shape == (1, 1, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5 * in_features ** 0.5)
    wb, xb, bb = w.bfloat16(), x.bfloat16(), None if b is None else b.bfloat16()
    got = kernels.gemv(xb, wb, bb)
    assert got.dtype == torch.bfloat16
    bf16_close(got, xb, wb, bb)


@needs_kernel
def test_non_contiguous_input_and_special_values():
    w = torch.randn(9, 40)
    x = torch.randn(40, 2)[:, 0]  # a column: strided
    torch.testing.assert_close(kernels.gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    x = x.contiguous()
    x[3] = float("nan")
    assert kernels.gemv(x, w).isnan().all() and kernels.gemv(x.bfloat16(), w.bfloat16()).isnan().all()
    w[2, :] = 0
    w[2, 0] = float("inf")
    x = torch.ones(40)
    y = kernels.gemv(x.bfloat16(), w.bfloat16())
    assert y[2] == float("inf") and y.isfinite().sum() == 8


@needs_kernel
def test_wrong_inputs_are_refused_with_a_reason():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one row of 8"):
        kernels.gemv(torch.randn(2, 8), w)
    with pytest.raises(ValueError, match="one row of 8"):
        kernels.gemv(torch.randn(8).bfloat16(), w)
    with pytest.raises(ValueError, match="contiguous CPU"):
        kernels.gemv(torch.randn(8), torch.randn(8, 4).t())


@needs_kernel
def test_linear_uses_the_kernel_only_for_one_row_without_gradients(monkeypatch, pool_settings):
    layer = runtime.twin(kernels.Linear, nn.Linear(24, 10))
    calls = []
    real = kernels._run
    monkeypatch.setattr(kernels, "_run", lambda *a: calls.append(1) or real(*a))
    kernels.configure(few_rows=1)  # no few-rows walk (the next test's): several rows go to torch
    with torch.inference_mode():
        layer(torch.randn(1, 1, 24))
        assert len(calls) == 1
        x = torch.randn(1, 3, 24)  # a prompt: several rows go to F.linear, bit for bit
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and len(calls) == 1
        half = layer.half()
        x = torch.randn(1, 1, 24).half()
        assert torch.equal(half(x), F.linear(x, half.weight, half.bias)) and len(calls) == 1
    layer = layer.float()
    x = torch.randn(1, 24, requires_grad=True)  # training or probing gradients: autograd must see it
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and len(calls) == 1


def exact_rows(x, w, b):
    """The float64 product of the same inputs."""
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def bf16_rows_close(got: torch.Tensor, x, w, b) -> None:
    """Within one bfloat16 rounding of the exact result, plus what float32 sums of the terms may lose (a
    result far smaller than its terms, as many are in a long random row, is mostly that)."""
    exact = exact_rows(x, w, b)
    terms = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + terms * 2 ** -16).all()


@needs_kernel
@pytest.mark.parametrize("out_features, in_features", [(1, 1), (5, 31), (13, 33), (130, 4864), (257, 96), (9, 9000)])
def test_the_few_rows_walk_matches_float64_sums(out_features, in_features, pool_settings):
    kernels.configure(0, 4096)  # share even small jobs: chunk edges and leftover rows get exercised
    g = torch.Generator().manual_seed(out_features + in_features)
    w, b = torch.randn(out_features, in_features, generator=g), torch.randn(out_features, generator=g)
    for variant in kernels.variants():
        for rows in (1, 2, 4, 8):  # the one-row plan's walk: side by side, 4 at most
            for tokens in (1, 2, 3, 4, 5, 7, 8, 9, 16):  # whole blocks of 4 rows of x and leftovers
                x = torch.randn(1, tokens, in_features, generator=g)
                plan = kernels.Plan(variant, rows)
                got = kernels.gemm_few(x, w, b, plan)
                assert got.shape == (1, tokens, out_features)
                torch.testing.assert_close(got.double(), exact_rows(x, w, b), rtol=1e-5, atol=1e-5 * in_features ** 0.5,
                                           msg=f"{plan}, {tokens} rows")
                wb, xb, bb = w.bfloat16(), x.bfloat16(), b.bfloat16()
                bf16_rows_close(kernels.gemm_few(xb, wb, bb, plan), xb, wb, bb)
                bf16_rows_close(kernels.gemm_few(xb, wb, None, plan), xb, wb, None)


@needs_kernel
def test_the_few_rows_walk_takes_1_to_few_max_rows_and_says_why_not():
    w = torch.randn(4, 8)
    kernels.gemm_few(torch.randn(kernels.FEW_MAX, 8), w)
    for x in (torch.randn(kernels.FEW_MAX + 1, 8), torch.randn(0, 8), torch.randn(2, 9), torch.randn(2, 8).double()):
        with pytest.raises(ValueError, match=f"1 to {kernels.FEW_MAX} rows of 8"):
            kernels.gemm_few(x, w)
    with pytest.raises(ValueError, match="does not run here"):
        kernels.gemm_few(torch.randn(2, 8), w, plan=kernels.Plan("torch"))
    with pytest.raises(ValueError, match="1, 2, 4 or 8 weight rows side by side, not 3"):  # not "refused 2 rows"
        kernels.gemm_few(torch.randn(2, 8), w, plan=kernels.Plan("avx2", 3))
    for product in (kernels.gemv, kernels.gemm_few):  # not "not enough values to unpack"
        with pytest.raises(ValueError, match=r"an \(out x in\) weight matrix, got \(8,\)"):
            product(torch.randn(2, 8), torch.randn(8))
    lib, x, y = kernels._library(), torch.randn(kernels.FEW_MAX + 1, 8), torch.empty(kernels.FEW_MAX + 1, 4)
    for tokens, rows in ((kernels.FEW_MAX + 1, 1), (0, 1), (2, 3)):  # the C side refuses what it cannot take
        assert lib.few["avx2"](0, w.data_ptr(), None, y.data_ptr(), 4, 8, x.data_ptr(), tokens, 1, rows,
                               *(kernels.SOLO_BYTES, kernels.CHUNK_BYTES, kernels.CHUNK_MAX_BYTES, 1)) == -2


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_walks_a_few_rows_once_and_leaves_more_to_torch(dtype, monkeypatch, pool_settings):
    layer = runtime.twin(kernels.Linear, nn.Linear(96, 130)).to(dtype)
    calls = []
    real = kernels._run_few
    monkeypatch.setattr(kernels, "_run_few", lambda *a: calls.append(a[-1]) or real(*a))
    with torch.inference_mode():
        for tokens in (2, kernels.FEW_ROWS):
            x = torch.randn(1, tokens, 96).to(dtype)
            widest = kernels._few_variant(dtype == torch.bfloat16)
            assert torch.equal(layer(x), real(kernels._library(), x, layer.weight, layer.bias, layer.plan.rows, widest))
        assert calls == [kernels._few_variant(dtype == torch.bfloat16)] * 2  # the widest instruction set
        assert layer.plan.rows == 1 and kernels.FEW_ROWS * 96 * 4 <= kernels.FEW_X_BYTES  # the plan's walk
        x = torch.randn(1, kernels.FEW_ROWS + 1, 96).to(dtype)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and len(calls) == 2
        kernels.configure(few_rows=kernels.FEW_MAX)
        x = torch.randn(1, kernels.FEW_MAX, 96).to(dtype)
        layer(x)
        assert len(calls) == 3
        kernels.configure(few_rows=4)
        x = torch.randn(1, 5, 96).to(dtype)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and len(calls) == 3
        layer.plan = kernels.Plan("torch")  # measured faster by torch here: torch's for every row count
        x = torch.randn(1, 3, 96).to(dtype)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and len(calls) == 3
    with pytest.raises(SettingError, match="few_rows 17 is not between 1 and 16"):
        kernels.configure(few_rows=17)


@needs_kernel
def test_a_bias_of_another_dtype_goes_to_torch_which_says_so():
    layer = runtime.twin(kernels.Linear, nn.Linear(64, 10))
    layer.bias.data = layer.bias.data.double()  # the kernels would read its bytes as float32
    with torch.inference_mode():
        for rows in (1, 3):  # the one-row kernel and the few-rows walk
            with pytest.raises(RuntimeError, match="dtype"):
                layer(torch.randn(rows, 64))


@needs_kernel
@pytest.mark.parametrize("in_features, out_features", [(8, 0), (0, 4)])
def test_an_empty_weight_goes_to_torch_and_the_kernels_refuse_it(in_features, out_features):
    """nn.Linear(8, 0) and nn.Linear(0, 4) are legal, and torch's products of them are empty or the bias; the
    kernels divided by a chunk of zero rows (the process killed) or wrote the first row of several alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
        layer = runtime.twin(kernels.Linear, nn.Linear(in_features, out_features))
    with torch.inference_mode():
        for rows in (1, 3):  # the one-row kernel and the few-rows walk
            x = torch.randn(rows, in_features)
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        for product, rows in ((kernels.gemv, 1), (kernels.gemm_few, 3)):
            with pytest.raises(ValueError, match="empty weight"):
                product(torch.randn(rows, in_features), layer.weight)


@needs_kernel
def test_tensors_off_the_cpu_go_to_torch_and_the_kernels_refuse_them():
    """Only CUDA was turned away: a model on the meta device (shapes without memory), or on another accelerator,
    had the kernels read its data pointers (0 on meta) as CPU memory, and the process was killed."""
    layer = runtime.twin(kernels.Linear, nn.Linear(8, 4)).to("meta")
    with torch.inference_mode():
        for rows in (1, 3):  # the one-row kernel and the few-rows walk
            y = layer(torch.empty(rows, 8, device="meta"))
            assert y.shape == (rows, 4) and y.device.type == "meta"
        for product, rows in ((kernels.gemv, 1), (kernels.gemm_few, 3)):
            with pytest.raises(ValueError, match="CPU"):
                product(torch.empty(rows, 8, device="meta"), torch.randn(4, 8))


@needs_kernel
def test_a_bias_that_does_not_fit_the_weight_is_refused():
    """The kernels read N values of the weight's dtype from the bias: one of 3 values for 4,000 outputs was
    read past its end (no error, sums with whatever lay there); torch refuses it."""
    w = torch.randn(4000, 8)
    for product, rows in ((kernels.gemv, 1), (kernels.gemm_few, 3)):
        for bias in (torch.randn(3), torch.randn(4000).double(), torch.randn(2, 4000)):
            with pytest.raises(ValueError, match="bias"):
                product(torch.randn(rows, 8), w, bias)
    layer = runtime.twin(kernels.Linear, nn.Linear(8, 4000))
    layer.bias.data = torch.randn(3)
    with torch.inference_mode():
        for rows in (1, 3):  # the one-row kernel and the few-rows walk: torch's product, which says why
            with pytest.raises(RuntimeError):
                layer(torch.randn(rows, 8))


@needs_kernel
def test_a_bias_that_wants_gradients_keeps_them():
    """Only x and the weight were asked whether autograd wants them: a bias trained alone (the weight frozen)
    got a product from the kernels that autograd could not go back through."""
    layer = runtime.twin(kernels.Linear, nn.Linear(24, 10))
    layer.weight.requires_grad_(False)
    for rows in (1, 3):  # the one-row kernel and the few-rows walk
        layer.bias.grad = None
        layer(torch.randn(rows, 24)).sum().backward()
        torch.testing.assert_close(layer.bias.grad, torch.full((10,), float(rows)))


@needs_kernel
def test_conversion_swaps_modules_not_parameters():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4).half())
    params = {name: p for name, p in model.named_parameters()}
    replaced = runtime.convert_for_runtime(model, "cpu")
    assert replaced == [("0", "nn.Linear", "kernels.Linear")]  # the float16 layer stays nn.Linear
    assert type(model[0]) is kernels.Linear and type(model[2]) is nn.Linear
    assert {name: p for name, p in model.named_parameters()} == params  # the very same tensors
    assert isinstance(model[0], nn.Linear)


@needs_kernel
def test_conversion_keeps_tied_weights_tied_and_converts_children_first():
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu", matvec="none")
    assert model.runtime == []
    replaced = runtime.convert_for_runtime(model, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    attention = model.model.layers[0].self_attn
    assert type(attention) is kernels.Attention and type(attention.q_proj) is kernels.Linear
    names = [name for name, _, _ in replaced]
    assert names.index("model.layers.0.self_attn.q_proj") < names.index("model.layers.0.self_attn")
    assert runtime.summary(replaced) == ["layers.Attention -> kernels.Attention (x4)",
                                         "layers.DecoderLayer -> kernels.DecoderLayer (x4)",
                                         "layers.DecoderModel -> kernels.DecoderModel",
                                         "layers.RMSNorm -> kernels.RMSNorm (x9)", "nn.Linear -> kernels.Linear (x29)"]
    assert names.index("model.layers.0.self_attn") < names.index("model.layers.0") < names.index("model")


def test_a_converted_module_takes_forward_hooks():
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")  # converted: every layer a twin
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda m, i, out: seen.append(out.shape))
    with torch.inference_mode():
        model(torch.tensor([[5, 17, 300]]))
    handle.remove()  # the handle refers weakly to the twin's own hook dictionary
    assert seen == [torch.Size([1, 3, model.config.hidden_size])]


def test_conversion_refuses_an_unknown_matvec():
    with pytest.raises(ValueError, match="matvec 'blas' is not one of auto, torch, none"):
        runtime.convert_for_runtime(nn.Linear(2, 2), "cpu", "blas")


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_model_decodes_the_same_with_and_without_the_kernel(dtype):
    files = resolve("qwen-lab/tiny-chat")
    fast, plain = load_model(files, dtype, "cpu"), load_model(files, dtype, "cpu", matvec="none")
    assert type(fast.lm_head) is kernels.Linear and type(plain.lm_head) is nn.Linear
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.inference_mode():
        caches_f, caches_p = fast.new_caches(1, 16), plain.new_caches(1, 16)
        fast(ids, caches_f), plain(ids, caches_p)
        step_f, step_p = fast(ids[:, :1], caches_f, 5), plain(ids[:, :1], caches_p, 5)  # one row: the kernel
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=0.05, atol=0.1)
    torch.testing.assert_close(step_f.float(), step_p.float(), **tol)
    tok = Tokenizer.from_files(files)
    prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    gen = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=[])
    if dtype == "float32":  # bf16 rounding may flip a near-tie; f32 greedy must agree exactly
        assert (generate_stream(fast, tok, prompt, gen).result.token_ids
                == generate_stream(plain, tok, prompt, gen).result.token_ids)


def test_load_model_refuses_an_unknown_matvec():
    with pytest.raises(ValueError, match="matvec 'blas' is not one of auto, torch, none"):
        load_model(resolve("qwen-lab/tiny-chat"), matvec="blas")


def test_turned_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("QWEN_LAB_KERNELS", "off")
    assert not kernels.available() and "turned off by QWEN_LAB_KERNELS" in kernels.status()
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")
    assert not any(type(m) is kernels.Linear for m in model.modules())


def test_no_compiler_means_torch_with_a_reason(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not kernels.available()
    assert kernels.status() == ("torch alone (the C kernels are not used: "
                             "no C compiler found (install gcc, or set CC))")
    assert not fresh_build.exists()
    layer = kernels.Linear(8, 4)  # still a working layer
    x = torch.randn(1, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_a_failed_build_leaves_no_file_behind(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    if not kernels.status().endswith("could not build kernels.c: no message)"):
        pytest.skip(kernels.status())  # not an x86-64 Linux machine with AVX2: never gets to compile
    assert list(fresh_build.iterdir()) == []


@needs_kernel
def test_built_once_then_reused(fresh_build):
    assert kernels.available()
    (built,) = fresh_build.glob("kernels-*.so")
    stamp = built.stat().st_mtime_ns
    kernels._library.cache_clear()
    assert kernels.available() and built.stat().st_mtime_ns == stamp


@needs_kernel
@pytest.mark.parametrize("dim", [7, 64, 896, 9000])  # a tail, whole blocks, Qwen's size, beyond the stack buffer
def test_rmsnorm_matches_the_model_s(dim):
    g = torch.Generator().manual_seed(dim)
    plain = layers.RMSNorm(dim, 1e-6)
    plain.weight.data = torch.randn(dim, generator=g)
    fast = runtime.twin(kernels.RMSNorm, layers.RMSNorm(dim, 1e-6))
    fast.weight.data = plain.weight.data.clone()
    x = torch.randn(1, 1, dim, generator=g) * 3
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-6)
        for m in (plain, fast):
            m.bfloat16()
        xb = x.bfloat16()
        got, want = fast(xb).float(), plain(xb).float()
        assert ((got - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()  # at most one bf16 rounding apart
        rows = torch.randn(1, 3, dim).bfloat16()  # a prompt: the torch code, bit for bit
        assert torch.equal(fast(rows), plain(rows))


@needs_kernel
def test_loaded_model_uses_both_kernels():
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")
    kinds = {type(m) for m in model.modules()}
    assert kernels.Linear in kinds and kernels.RMSNorm in kinds and nn.Linear not in kinds
    plain = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu", matvec="torch")
    assert kernels.RMSNorm not in {type(m) for m in plain.modules()} and not kernels.in_use(plain)


@needs_kernel
@pytest.mark.parametrize("hidden, heads, kv_heads, head_dim, qk_norm", [
    (64, 4, 2, 16, False), (256, 2, 1, 128, False), (96, 8, 8, 12, False), (96, 4, 2, 24, False),
    (64, 4, 2, 32, True), (64, 4, 1, 128, True),  # Qwen3: q/k norms and a head_dim of its own
    (64, 4, 4, 16, False), (112, 7, 1, 16, False), (96, 6, 1, 16, False)])  # no GQA; 7 heads a KV head: chunks
    # of 4 + 3 query heads; 6: 3 + 3
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_attention_matches_the_reference(hidden, heads, kv_heads, head_dim, qk_norm, dtype):
    # head_dim 12 is not a multiple of 8: the conversion leaves that one to the torch code
    torch.manual_seed(hidden + heads + head_dim)
    plain = layers.Attention(hidden, heads, kv_heads, head_dim, qkv_bias=not qk_norm,
                             qk_norm_eps=1e-6 if qk_norm else None).to(dtype)
    if qk_norm:
        with torch.no_grad():
            for norm in (plain.q_norm, plain.k_norm):
                norm.weight.copy_(1 + 0.2 * torch.randn(head_dim))
    fast = layers.Attention(hidden, heads, kv_heads, head_dim, qkv_bias=not qk_norm,
                            qk_norm_eps=1e-6 if qk_norm else None).to(dtype)
    fast.load_state_dict(plain.state_dict())
    holder = nn.Module()
    holder.attn = fast
    runtime.convert_for_runtime(holder, "cpu")
    fast = holder.attn
    assert (type(fast) is kernels.Attention) == (head_dim % 8 == 0)
    rotary = layers.RotaryEmbedding(head_dim, 10000.0)
    caches = [layers.KVCache(1, kv_heads, 40, head_dim, dtype) for _ in range(2)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    with torch.inference_mode():
        prompt = torch.randn(1, 5, hidden).to(dtype)
        cos, sin = rotary(torch.arange(5), dtype)
        for attn, cache in zip((plain, fast), caches):
            attn(prompt, cos, sin, cache, 0)  # prefill: the torch code for both
        for pos in range(5, 37):  # one token at a time: the C kernel for `fast`
            x = torch.randn(1, 1, hidden).to(dtype)
            cos, sin = rotary(torch.tensor([pos]), dtype)
            want, got = plain(x, cos, sin, caches[0], pos), fast(x, cos, sin, caches[1], pos)
            torch.testing.assert_close(got.float(), want.float(), **tol)
        for name in ("k", "v"):  # both wrote the same keys and values into their caches
            torch.testing.assert_close(getattr(caches[1], name).float(), getattr(caches[0], name).float(), **tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_attention_past_the_stack_buffer(dtype, pool_settings):
    """1,100 cached positions x 4 heads per chunk: the scores no longer fit the step's stack buffer."""
    kernels.configure(0, 4096)  # share the heads over the threads too
    torch.manual_seed(3)
    plain = layers.Attention(64, 4, 1, 16, qkv_bias=True).to(dtype)
    holder = nn.Module()
    holder.attn = layers.Attention(64, 4, 1, 16, qkv_bias=True).to(dtype)
    holder.attn.load_state_dict(plain.state_dict())
    runtime.convert_for_runtime(holder, "cpu")
    fast = holder.attn
    assert type(fast) is kernels.Attention
    rotary = layers.RotaryEmbedding(16, 10000.0)
    caches = [layers.KVCache(1, 1, 1110, 16, dtype) for _ in range(2)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    with torch.inference_mode():
        prompt = torch.randn(1, 1100, 64).to(dtype)
        cos, sin = rotary(torch.arange(1100), dtype)
        for attn, cache in zip((plain, fast), caches):
            attn(prompt, cos, sin, cache, 0)
        for pos in (1100, 1101):
            x = torch.randn(1, 1, 64).to(dtype)
            cos, sin = rotary(torch.tensor([pos]), dtype)
            torch.testing.assert_close(fast(x, cos, sin, caches[1], pos).float(),
                                       plain(x, cos, sin, caches[0], pos).float(), **tol)


def make_layer(hidden, heads, kv_heads, head_dim, inter, *, qkv_bias, o_bias, mlp_bias, qk_norm, dtype, seed):
    """A decoder layer with random weights (norm gains near 1), as layers builds it."""
    torch.manual_seed(seed)
    attention = layers.Attention(hidden, heads, kv_heads, head_dim, qkv_bias=qkv_bias, o_bias=o_bias,
                                 qk_norm_eps=1e-6 if qk_norm else None)
    layer = layers.DecoderLayer(attention, layers.SwiGLU(hidden, inter, bias=mlp_bias), hidden, 1e-6)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape))
    return layer.to(dtype)


def converted(layer: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.layer = layer
    runtime.convert_for_runtime(holder, "cpu")
    return holder.layer


# Qwen2 (q/k/v bias), Llama (no bias; mlp_bias and attention_bias variants), Qwen3 (q/k norms, head_dim of its own)
LAYER_SHAPES = {"qwen2": dict(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=160, qkv_bias=True, o_bias=False,
                              mlp_bias=False, qk_norm=False),
                "llama-biases": dict(hidden=96, heads=6, kv_heads=2, head_dim=16, inter=200, qkv_bias=True,
                                     o_bias=True, mlp_bias=True, qk_norm=False),
                "llama": dict(hidden=64, heads=8, kv_heads=8, head_dim=8, inter=96, qkv_bias=False, o_bias=False,
                              mlp_bias=False, qk_norm=False),
                "qwen3": dict(hidden=64, heads=4, kv_heads=1, head_dim=32, inter=128, qkv_bias=False, o_bias=False,
                              mlp_bias=False, qk_norm=True)}


@needs_kernel
@pytest.mark.parametrize("shape", LAYER_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 96 bytes: chunks of a row or two, across q, k and v; 2048: 8-row chunks, the last ones of up and v split in 4
@pytest.mark.parametrize("chunk", [64 * 1024, 96, 2048])
def test_one_call_layer_step_matches_the_module_path(shape, dtype, chunk, pool_settings):
    plain = make_layer(**LAYER_SHAPES[shape], dtype=dtype, seed=len(shape))
    fast = make_layer(**LAYER_SHAPES[shape], dtype=dtype, seed=len(shape))
    fast = converted(fast)
    assert type(fast) is kernels.DecoderLayer
    kernels.set_num_threads(2)
    kernels.configure(0, chunk)
    cfg = LAYER_SHAPES[shape]
    rotary = layers.RotaryEmbedding(cfg["head_dim"], 10000.0)
    caches = [layers.KVCache(1, cfg["kv_heads"], 48, cfg["head_dim"], dtype) for _ in range(3)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    with torch.inference_mode():
        prompt = torch.randn(1, 5, cfg["hidden"]).to(dtype)
        cos, sin = rotary(torch.arange(5), dtype)
        for cache in caches[:2]:
            fast(prompt, cos, sin, cache, 0)  # a prompt: the modules, for both
        plain(prompt, cos, sin, caches[2], 0)
        for pos in range(5, 45):
            x = torch.randn(1, 1, cfg["hidden"]).to(dtype)
            cos, sin = rotary(torch.tensor([pos]), dtype)
            got = fast(x, cos, sin, caches[0], pos)  # one C call
            by_modules = layers.DecoderLayer.forward(fast, x, cos, sin, caches[1], pos)  # the same kernels, one by one
            reference = plain(x, cos, sin, caches[2], pos)  # torch alone
            # the same products and roundings as the module path; only silu's exp is C's rather than torch's
            torch.testing.assert_close(got, by_modules, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)
            torch.testing.assert_close(got.float(), reference.float(), **tol)
        for name in ("k", "v"):
            assert torch.equal(getattr(caches[0], name), getattr(caches[1], name))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_times_is_torchs_two_operations(dtype):
    """The layer step's silu(g) * up, eight values at a time (and the odd tail one by one), against
    torch's F.silu(g) * u in the same dtype: equal but where C's exp and torch's differ in the last bit
    (then one rounding of the dtype apart), and exactly torch's at infinities, NaN, overflow and zero."""
    g = torch.Generator().manual_seed(7)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 88.0, -88.0, 88.5, -88.5,
                            89.0, -89.0, 100.0, -100.0, 1e-30, -1e-30, 3e38, -3e38])
    gate = torch.cat([special, 6 * torch.randn(20000, generator=g), special]).to(dtype)  # 20034: a tail of 2
    up = torch.cat([torch.ones(len(special)), torch.randn(20000, generator=g), 2 * torch.ones(len(special))]).to(dtype)
    got = torch.empty_like(gate)
    kernels._library().qwen_silu_times(gate.data_ptr(), up.data_ptr(), got.data_ptr(), gate.numel(),
                                       int(dtype == torch.bfloat16))
    want = F.silu(gate) * up
    n = len(special)
    for part in (slice(0, n), slice(-n, None)):  # the special values, in the vector loop and in the tail
        assert torch.equal(got[part].isnan(), want[part].isnan())
        torch.testing.assert_close(got[part].nan_to_num(), want[part].nan_to_num(), rtol=0, atol=1e-30)
    differ = (got != want) & ~(got.isnan() & want.isnan())
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30, equal_nan=True)
    else:  # a silu one bf16 rounding apart, times up: within two roundings of the result
        assert differ.float().mean() < 2e-3, differ.float().mean()
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-30)[differ].all()


@needs_kernel
def test_layer_step_runs_every_plan_and_leaves_torch_plans_to_the_modules(pool_settings):
    from qwen_lab import tuning
    fast = converted(make_layer(**LAYER_SHAPES["qwen2"], dtype=torch.float32, seed=3))
    rotary = layers.RotaryEmbedding(16, 10000.0)
    kernels.configure(0, 256)
    calls = []
    real_run = kernels._run
    kernels._run = lambda *a: calls.append(a[-1]) or real_run(*a)  # the module path's products
    try:
        with torch.inference_mode():
            x = torch.randn(1, 1, 64)
            cos, sin = rotary(torch.tensor([0]), torch.float32)
            want = layers.DecoderLayer.forward(fast, x, cos, sin, layers.KVCache(1, 2, 4, 16, torch.float32), 0)
            for plan in tuning.candidates():
                for m in fast.modules():
                    if isinstance(m, kernels.Linear):
                        m.plan = plan
                calls.clear()
                got = fast(x, cos, sin, layers.KVCache(1, 2, 4, 16, torch.float32), 0)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(plan))
                # a C plan: one call and no product through Python; torch: the modules, each product by F.linear
                assert calls == ([plan] * 7 if plan.variant == "torch" else []), plan
    finally:
        kernels._run = real_run


@needs_kernel
def test_the_one_call_step_follows_changes_to_the_layer(pool_settings):
    """The step's fields are filled once per layer and kept: a weight replaced, a layer moved to another dtype
    (``.to`` swaps each tensor's memory) or a part replaced must be seen on the next call, not the old memory."""
    fast = converted(make_layer(**LAYER_SHAPES["qwen2"], dtype=torch.float32, seed=5))
    rotary = layers.RotaryEmbedding(16, 10000.0)
    calls = []
    real = kernels._library().qwen_layer_step

    def step(dtype):
        with torch.inference_mode():
            x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
            cos, sin = rotary(torch.tensor([0]), dtype)
            lib = kernels._library()
            lib.qwen_layer_step = lambda s: calls.append(1) or real(s)
            try:
                got = fast(x, cos, sin, layers.KVCache(1, 2, 4, 16, dtype), 0)
            finally:
                lib.qwen_layer_step = real
            want = layers.DecoderLayer.forward(fast, x, cos, sin, layers.KVCache(1, 2, 4, 16, dtype), 0)
        return got, want

    first, want = step(torch.float32)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a new down_proj weight, in new memory
        fast.mlp.down_proj.weight = nn.Parameter(torch.randn_like(fast.mlp.down_proj.weight))
    got, want = step(torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, first)
    new_up = kernels.Linear(64, 160, bias=False)  # a part replaced
    new_up.plan = fast.mlp.up_proj.plan
    fast.mlp.up_proj = new_up
    got, want = step(torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fast.to(torch.bfloat16)  # every tensor in new memory, and another dtype
    got, want = step(torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-6)
    assert len(calls) == 4  # each of them by the one C call
    fast.self_attn.o_proj.use_kernel = False  # a product taken off the kernel: the modules run
    got, want = step(torch.bfloat16)
    assert torch.equal(got, want) and len(calls) == 4


@needs_kernel
def test_a_layer_with_a_part_the_kernels_cannot_take_stays_as_it_is():
    odd = converted(make_layer(hidden=96, heads=8, kv_heads=8, head_dim=12, inter=64, qkv_bias=True, o_bias=False,
                               mlp_bias=False, qk_norm=False, dtype=torch.float32, seed=0))  # head_dim 12
    assert type(odd.self_attn) is layers.Attention and type(odd) is layers.DecoderLayer
    half = converted(make_layer(**LAYER_SHAPES["qwen2"], dtype=torch.float16, seed=0))  # float16: no kernel
    assert type(half) is layers.DecoderLayer


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_tokens_are_the_same_with_the_one_call_layer_step(dtype, monkeypatch):
    files = resolve("qwen-lab/tiny-chat")
    model, tok = load_model(files, dtype, "cpu"), Tokenizer.from_files(files)
    assert sum(type(m) is kernels.DecoderLayer for m in model.modules()) == model.config.num_hidden_layers
    assert type(model.model) is kernels.DecoderModel
    prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    gen = GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=[], top_logprobs=3)
    token_step = generate_stream(model, tok, prompt, gen).result
    monkeypatch.setattr(kernels.TokenStep, "for_model", classmethod(lambda cls, m, c: None))  # the model's forward
    stack = generate_stream(model, tok, prompt, gen).result
    monkeypatch.setattr(kernels.DecoderModel, "forward", layers.DecoderModel.forward)  # layer by layer
    fused = generate_stream(model, tok, prompt, gen).result
    monkeypatch.setattr(kernels.DecoderLayer, "forward", layers.DecoderLayer.forward)  # part by part
    by_modules = generate_stream(model, tok, prompt, gen).result
    assert token_step.token_ids == stack.token_ids == fused.token_ids == by_modules.token_ids
    assert token_step.choices == stack.choices == fused.choices  # the same C calls in the same order: the same bits


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_whole_stack_in_one_call_gives_the_layer_by_layer_bits(dtype):
    """kernels.DecoderModel runs every layer's one-call step from one C call: the same logits, bit for bit, as
    calling the layers one by one; and one by one whenever a layer has a forward hook or the caches do not fit."""
    model = load_model(resolve("qwen-lab/tiny-chat"), dtype, "cpu")
    stack = []
    real = kernels._library().qwen_stack_step
    kernels._library().qwen_stack_step = lambda *a: stack.append(1) or real(*a)
    try:
        caches = [model.new_caches(1, 64) for _ in range(2)]
        with torch.inference_mode():
            ids = torch.tensor([[5, 17, 300, 42]])
            for c in caches:
                model(ids, c, 0)  # a prompt: layer by layer, for both
            assert stack == []
            for pos in range(4, 24):
                token = torch.tensor([[(pos * 37) % 1000]])
                got = model(token, caches[0], pos)
                want = model.lm_head(layers.DecoderModel.forward(model.model, token, caches[1], pos))
                assert torch.equal(got, want), pos
            assert len(stack) == 20
            for a, b in zip(*caches):
                assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
            seen = []
            hook = model.model.layers[2].register_forward_hook(lambda m, i, o: seen.append(o))
            got = model(torch.tensor([[7]]), caches[0], 24)
            hook.remove()
            assert len(seen) == 1 and len(stack) == 20  # the hook saw its layer: the layers ran one by one
            assert torch.equal(got, model.lm_head(layers.DecoderModel.forward(model.model, torch.tensor([[7]]),
                                                                             caches[1], 24)))
            short = model.new_caches(1, 25)  # position 25 does not fit: one by one, and its error
            with pytest.raises(ValueError, match="KV cache holds 25 positions"):
                model(torch.tensor([[7]]), short, 25)
            assert len(stack) == 20
    finally:
        kernels._library().qwen_stack_step = real


def _step_and_forward(model, caches, tokens_at):
    """(TokenStep's logits, the model's forward's logits) for each (token, position), into two sets of caches."""
    step = kernels.TokenStep.for_model(model, caches[0])
    assert step is not None
    for token, pos in tokens_at:
        got = step(token, pos)
        want = model(torch.tensor([[token]]), caches[1], pos, last_only=True)[0, -1]
        yield pos, got, want


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head", ["kernel", "torch"])
def test_a_generation_s_token_step_gives_the_forward_s_bits(dtype, head, pool_settings):
    """kernels.TokenStep (embedding row, the stack, final norm and head in one C call, checked once per
    generation): the logits and caches of the model's forward, bit for bit, across a block of rotary rows
    (TokenStep.ROTARY_BLOCK), with the head by the kernel or, where its plan says so, by torch."""
    model = load_model(resolve("qwen-lab/tiny-chat"), dtype, "cpu")
    if head == "torch":
        model.lm_head.plan = kernels.Plan("torch")
    caches = [model.new_caches(1, 300) for _ in range(2)]
    with torch.inference_mode():
        for c in caches:
            model(torch.tensor([[5, 17, 300, 42]]), c, 0)
        tokens_at = [((pos * 37) % model.config.vocab_size, pos) for pos in [*range(4, 20), *range(250, 262), 299]]
        for pos, got, want in _step_and_forward(model, caches, tokens_at):
            assert got.shape == want.shape == (model.config.vocab_size,) and got.dtype == want.dtype
            assert torch.equal(got, want), pos
    for a, b in zip(*caches):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


@needs_kernel
def test_the_token_step_is_not_made_where_the_modules_must_run(monkeypatch):
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")
    caches = model.new_caches(1, 64)
    assert kernels.TokenStep.for_model(model, caches) is not None
    hook = model.model.norm.register_forward_hook(lambda m, i, o: None)  # a hook anywhere in the model
    assert kernels.TokenStep.for_model(model, caches) is None
    hook.remove()
    assert kernels.TokenStep.for_model(model, caches[:-1]) is None  # a cache short
    assert kernels.TokenStep.for_model(model, model.new_caches(1, 64)[:1] * len(caches)) is not None
    bf16_caches = [layers.KVCache(1, c.k.shape[1], 64, c.k.shape[-1], torch.bfloat16) for c in caches]
    assert kernels.TokenStep.for_model(model, bf16_caches) is None  # caches of another dtype
    model.lm_head.use_kernel = False
    assert kernels.TokenStep.for_model(model, caches) is None
    model.lm_head.use_kernel = True
    model.model.layers[1].mlp.down_proj.plan = kernels.Plan("torch")  # a layer that runs as modules
    assert kernels.TokenStep.for_model(model, caches) is None
    assert kernels.TokenStep.for_model(load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu", matvec="torch"),
                                       caches) is None
    monkeypatch.setenv("QWEN_LAB_KERNELS", "off")
    kernels._library.cache_clear()
    try:
        assert kernels.TokenStep.for_model(model, caches) is None
    finally:
        monkeypatch.delenv("QWEN_LAB_KERNELS")
        kernels._library.cache_clear()


@needs_kernel
def test_the_token_step_leaves_a_model_with_a_forward_of_its_own_or_odd_weights_to_its_modules(monkeypatch):
    from torch import nn
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")
    caches = model.new_caches(1, 16)
    model.forward = lambda *a, **k: None  # patched on the object
    assert kernels.TokenStep.for_model(model, caches) is None
    del model.forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: None)  # a class's own forward
    assert kernels.TokenStep.for_model(model, caches) is None
    monkeypatch.undo()
    assert kernels.TokenStep.for_model(model, caches) is not None
    head = model.lm_head.weight
    model.lm_head.weight = nn.Parameter(head[:64].clone())  # 64 rows; out_features still says 2048
    twin = model.new_caches(1, 16)
    with torch.inference_mode():  # 64 logits, as the weight says, the same as the modules'
        got = kernels.TokenStep.for_model(model, caches)(5, 0)
        assert got.shape == (64,) and torch.equal(got, model(torch.tensor([[5]]), twin, 0, last_only=True)[0, -1])
    model.lm_head.weight = nn.Parameter(head[:, :64].clone())  # rows of another width than the hidden state
    assert kernels.TokenStep.for_model(model, caches) is None


@needs_kernel
@pytest.mark.parametrize("swap", ["shape", "dtype", "view"])
def test_a_layer_weight_replaced_by_an_odd_one_sends_the_layer_to_its_modules(swap):
    """The one-call step reads weights by pointer, sized by the layer's shapes: a weight replaced by one of
    another shape, dtype or layout must not be read that way (the modules run, and torch says what is wrong)."""
    from torch import nn
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")
    layer = model.model.layers[0]
    assert layer._prepared() is not None
    w = layer.mlp.down_proj.weight
    layer.mlp.down_proj.weight = nn.Parameter({"shape": lambda: w[:, :8].clone(), "dtype": lambda: w.double(),
                                               "view": lambda: w.t().contiguous().t()}[swap]())
    assert layer._prepared() is None and kernels.TokenStep.for_model(model, model.new_caches(1, 8)) is None
    if swap != "view":
        with pytest.raises(RuntimeError), torch.inference_mode():
            model(torch.tensor([[5]]), model.new_caches(1, 8), 0)


@needs_kernel
def test_the_token_step_refuses_what_would_reach_outside_its_tensors():
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")
    step = kernels.TokenStep.for_model(model, model.new_caches(1, 16))
    vocab = model.config.vocab_size
    for token, pos in [(vocab, 0), (-1, 0), (0, 16), (0, -1)]:
        with pytest.raises(ValueError, match="this step takes ids below"):
            step(token, pos)
    assert step(vocab - 1, 15).shape == (vocab,)


@needs_kernel
def test_the_token_step_keeps_the_weights_it_started_with():
    """A model moved to another dtype mid-generation frees its old tensors; the step keeps them alive and
    goes on with them (no freed memory read): the logits of a model that was never moved."""
    model, still = (load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu") for _ in range(2))
    with torch.inference_mode():
        step, twin = (kernels.TokenStep.for_model(m, m.new_caches(1, 32)) for m in (model, still))
        assert torch.equal(step(7, 0), twin(7, 0))
        model.to(torch.bfloat16)
        [torch.randn(1000, 1000) for _ in range(4)]  # reuse freed memory, if it were freed
        assert torch.equal(step(9, 1), twin(9, 1))


@needs_kernel
def test_the_token_step_sees_a_hook_on_every_module_at_once():
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")
    caches = [model.new_caches(1, 32) for _ in range(2)]
    with torch.inference_mode():
        model(torch.tensor([[5, 17]]), caches[0], 0)
        model(torch.tensor([[5, 17]]), caches[1], 0)
        step = kernels.TokenStep.for_model(model, caches[0])
        seen = []
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m)))
        try:
            got = step(11, 2)
        finally:
            handle.remove()
        assert kernels.DecoderModel in seen and kernels.Linear in seen  # the modules ran, with the hook
        assert torch.equal(got, model(torch.tensor([[11]]), caches[1], 2, last_only=True)[0, -1])
        assert torch.equal(step(12, 3), model(torch.tensor([[12]]), caches[1], 3, last_only=True)[0, -1])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 151936])
def test_argmax_is_torch_s_first_largest(dtype, n):
    g = torch.Generator().manual_seed(n)
    for trial in range(20):
        x = torch.randn(n, generator=g).to(dtype)
        if trial % 4 == 1:
            x = x.round()  # many equal values: the first of the largest
        if trial % 4 == 2:
            x[n - 1] = x.max() + 1  # the largest in the tail past the last eight
        if trial % 4 == 3:
            x[:] = -0.0
            x[n // 2] = 0.0  # -0 == +0: the first
        assert kernels.argmax(x) == int(x.argmax()), (trial, x)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_says_none_where_torch_must_say_what_is_wrong(dtype):
    for bad in [float("nan"), float("inf"), float("-inf")]:
        for at in (0, 9, 20):
            x = torch.zeros(21, dtype=dtype)
            x[at] = bad
            assert (kernels.argmax(x) is None) == (bad != float("-inf")), (bad, at)
    assert kernels.argmax(torch.full((21,), float("-inf"), dtype=dtype)) is None
    assert kernels.argmax(torch.zeros(4, 5, dtype=dtype)) is None  # not one row
    assert kernels.argmax(torch.zeros(8, dtype=torch.float16)) is None
    assert kernels.argmax(torch.zeros(16, dtype=dtype)[::2]) is None
    assert kernels.argmax(torch.zeros(0, dtype=dtype)) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [5, 8, 13, 151936])
@pytest.mark.parametrize("penalty, temperature", [(1.0, 1.0), (1.05, 0.7), (1.3, 1.7), (0.8, 0.3)])
def test_top_k_is_sampling_s_penalty_temperature_and_topk(dtype, n, penalty, temperature):
    """kernels.top_k: the values torch.topk finds in what sampling._scaled computes, bit for bit, and the same
    ids wherever values are not equal (equal values: the lower id first)."""
    from qwen_lab.generation import GenerationConfig
    from qwen_lab.sampling import _scaled
    config = GenerationConfig(do_sample=True, temperature=temperature, repetition_penalty=penalty, top_k=5)
    g = torch.Generator().manual_seed(n)
    for trial in range(6):
        logits = (torch.randn(n, generator=g) * 4).to(dtype)
        if trial % 3 == 1:
            logits = logits.round()  # many equal values
        seen = torch.randint(0, n, (min(n, 40),), generator=g)
        seen = torch.cat([seen, seen[:5], logits.topk(3).indices])  # repeats, and the best ones penalised
        k = min(n, 21)
        got = kernels.top_k(logits, seen, penalty, temperature, k)
        scaled = _scaled(logits, seen, config)
        want = torch.topk(scaled, k)
        assert torch.equal(got[0], want.values), (trial, got[0], want.values)
        assert torch.equal(scaled[got[1]], got[0])  # each id with its own value
        assert len(set(got[1].tolist())) == k
        for a, b in zip(got[1].tolist(), got[1].tolist()[1:]):  # the lower id first among equal values
            assert scaled[a] > scaled[b] or a < b


@needs_kernel
def test_the_choice_in_c_writes_cpu_float32_whatever_torch_s_defaults():
    """torch.set_default_dtype / set_default_device must not change what C writes into (a float64 buffer read
    as float32 sampled wrong tokens; a meta or GPU buffer crashed)."""
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    want = kernels.top_k(x, torch.tensor([1, 2]), 1.1, 0.7, 5)
    for setting in (lambda: torch.set_default_dtype(torch.float64), lambda: torch.set_default_device("meta")):
        try:
            setting()
            got = kernels.top_k(x, torch.tensor([1, 2], device="cpu"), 1.1, 0.7, 5)
            assert got[0].dtype == torch.float32 and got[0].device.type == "cpu"
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert kernels.argmax(x) == int(x.argmax())
        finally:
            torch.set_default_dtype(torch.float32)
            torch.set_default_device(None)
    assert kernels.top_k(x, torch.tensor([1, 2], device="meta"), 1.1, 0.7, 5) is None  # ids not on the CPU


@needs_kernel
def test_top_k_takes_only_what_it_can():
    x = torch.randn(10)
    big = torch.randn(kernels.TOP_K_MAX * 2)
    assert kernels.top_k(big, torch.tensor([3]), 1.1, 0.7, kernels.TOP_K_MAX) is not None
    assert kernels.top_k(big, torch.tensor([3]), 1.1, 0.7, kernels.TOP_K_MAX + 1) is None  # torch's topk is faster
    for outside in ([-1], [10], [3, 99]):  # ids that are not the row's: torch's indexing decides
        assert kernels.top_k(x, torch.tensor(outside), 1.1, 0.7, 3) is None
    assert kernels.top_k(x, torch.tensor([3]), 1.1, 0.7, 11) is None  # more than there are
    assert kernels.top_k(x, torch.tensor([3]), 1.1, 0.7, 0) is None
    assert kernels.top_k(x.half(), torch.tensor([3]), 1.1, 0.7, 3) is None
    assert kernels.top_k(x[::2], torch.tensor([3]), 1.1, 0.7, 3) is None
    values, ids = kernels.top_k(x, torch.tensor([], dtype=torch.long), 1.5, 1.0, 10)
    assert torch.equal(values, x.sort(descending=True).values)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in (0, 9, 20):  # in a block of eight, in the tail
            y = torch.zeros(21)
            y[at] = bad
            assert kernels.top_k(y, torch.tensor([], dtype=torch.long), 1.0, 1.0, 3) is None, (bad, at)
            assert kernels.top_k(y.bfloat16(), torch.tensor([at]), 1.2, 0.5, 3) is None, (bad, at)


# ---------------------------------------------------------------- the thread pool

@pytest.fixture
def pool_settings():
    yield kernels
    kernels.configure()
    kernels.set_num_threads(kernels.choose_threads()[0])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("claims", ["halves", "counter"])
def test_the_same_bits_whatever_the_threads_and_chunks(pool_settings, dtype, claims):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(5001, 517, generator=g).to(dtype)  # odd sizes: a last, shorter chunk
    x, b = torch.randn(517, generator=g).to(dtype), torch.randn(5001, generator=g).to(dtype)
    kernels.set_num_threads(1)
    want = kernels.gemv(x, w, b)
    # (2, 0, 1): a row a chunk, 5001 chunks: more than a job claimed in halves holds (4095), in one counter's order
    for threads, solo, chunk in [(2, 0, 4096), (3, 0, 1), (2, 0, 10**9), (4, 10**9, 4096), (2, 0, 64 * 1024),
                                 (2, 0, 1), (2, 0, 2048)]:
        kernels.set_num_threads(threads)
        kernels.configure(solo, chunk, claims=claims)
        assert torch.equal(kernels.gemv(x, w, b), want), (threads, solo, chunk)


def test_claims_are_halves_or_a_counter():
    with pytest.raises(SettingError, match="claims 'pairs' is not 'halves' or 'counter'"):
        kernels.configure(claims="pairs")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("late_helper", [False, True])
def test_every_row_once_when_the_last_chunks_are_split(pool_settings, dtype, late_helper):
    """The job's last chunks cut tail_split times smaller (csrc/gemv.c): every row computed, the same bits as
    one thread alone, for rows walked 1, 2, 4 or 8 at a time and splits that do not divide the chunk; with two
    threads the chunks claimed in halves (csrc/pool.c), also with a helper that sleeps between jobs, so the
    caller starts first and takes chunks of the helper's half."""
    g = torch.Generator().manual_seed(11)
    lib = kernels._library()

    def product(x, w, rows, threads):  # into an output full of NaN, so that a row left out shows
        y = torch.full((w.shape[0],), float("nan"), dtype=dtype)
        s = kernels._sharing
        assert lib.gemv[dtype == torch.bfloat16, "avx2"](w.data_ptr(), x.data_ptr(), None, y.data_ptr(), w.shape[0],
                                                         w.shape[1], threads, rows, 0, s["solo"], s["chunk"],
                                                         s["chunk_max"], s["tail_split"]) == 0
        return y

    if late_helper:  # idle workers sleep at once: each job wakes the helper, which comes after the caller
        lib.qwen_pool_configure(0, 20000)
    try:
        for out_features in (3001, 1024, 37):
            w = torch.randn(out_features, 300, generator=g).to(dtype)
            x = torch.randn(300, generator=g).to(dtype)
            for rows in (1, 2, 4, 8):
                want = product(x, w, rows, 1)
                assert not want.isnan().any()
                for threads, chunk, split in [(2, 8 * 1024, 4), (2, 8 * 1024, 3), (3, 6000, 7), (2, 20000, 2),
                                              (2, 4096, 64), (2, 8 * 1024, 1), (2, 64 * 1024, 4)]:  # 64 KB: 8-row tails
                    kernels.configure(0, chunk, tail_split=split)
                    assert torch.equal(product(x, w, rows, threads), want), (out_features, rows, threads, chunk,
                                                                              split)
    finally:
        lib.qwen_pool_configure(50000, 20000)  # pool.c's own


def _expected_warming(weights, rows_in_flight, sharing):
    """(caller's first address, its bytes, helper's first address, its bytes) that the layer step tells the pool
    for a product of `weights` (one x, rows of the same width) on two threads: csrc/gemv.h's chunk layout and
    pool.c's halves, restated here from their documentation."""
    N, row = [w.shape[0] for w in weights], weights[0].shape[1] * weights[0].element_size()
    rows = max(N)
    if sum(N) * row >= sharing["solo"]:  # chunks of an eighth of each thread's share, within the chunk sizes
        chunk = max(sharing["chunk"], min(sharing["chunk_max"], sum(N) * row // (2 * 8))) // row
        rows = max(rows_in_flight, chunk - chunk % rows_in_flight)
    counts = [-(-n // rows) for n in N]
    body, tail, tail_rows = counts[-1] - 2, rows // sharing["tail_split"], 0
    if sharing["tail_split"] > 1 and body > 0 and tail >= rows_in_flight:  # the last matrix ends in smaller chunks
        tail_rows = tail - tail % rows_in_flight
        counts[-1] = body + -(-(N[-1] - body * rows) // tail_rows)
    n = sum(counts)
    first = weights[0].data_ptr()
    if sharing["claims"] != "halves" or not 1 < n <= 4095:  # no helper's first chunk is known
        return first, (rows if n > 1 and rows < N[0] else N[0]) * row, 0, 0
    h, m = n // 2, 0
    while h >= counts[m]:  # the helper's first chunk, n // 2, in matrix m
        h, m = h - counts[m], m + 1
    r = body * rows + (h - body) * tail_rows if m == len(N) - 1 and tail_rows and h >= body else h * rows
    return first, (r if m == 0 else N[0]) * row, weights[m].data_ptr() + r * row, (N[m] - r) * row


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_threads_waiting_in_a_token_step_warm_the_next_product(dtype, pool_settings):
    """A thread with nothing left to claim prefetches its part of the next product (csrc/pool.c): the token
    step's bits do not change; the caller and the helper both warm, only where asked, at most WARM_BYTES a
    product; after the step the calling thread expects the next token's first product (layer 0's q/k/v), its
    caller's and its helper's parts where gemv.h lays them out, the caller's first chunk alone in one counter's
    order, and the same whether the head ran in C or in torch."""
    model = load_model(resolve("qwen-lab/tiny-chat"), dtype, "cpu")
    model.lm_head.plan = kernels.Plan()  # the head by the kernel, whatever tuning measured
    kernels.set_num_threads(2)
    lib = kernels._library()
    expected = (ctypes.c_int64 * 4)()
    parts = 4 * len(model.model.layers) + 1  # each product's successor, a step
    attention = model.model.layers[0].self_attn
    qkv = [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]
    rows = model.model.layers[0]._prepared().qkv.rows  # layer 0's q/k/v plan, as the layer step runs it
    logits = {}
    with torch.inference_mode():
        for warm in (0, 4096, kernels.WARM_BYTES):
            kernels.configure(0, 4096, warm_bytes=warm)  # every product shared, in chunks of 4 KB: threads wait
            by = {"warmed_by_callers": 0, "warmed_by_helpers": 0}
            for _ in range(50):  # on a busy machine the helper may come after every short job of some steps
                caches = model.new_caches(1, 64)
                with threads.torch_threads(1):  # as generation runs a short prompt: no torch worker left spinning
                    model(torch.tensor([[5, 17, 300, 42]]), caches, 0)
                step = kernels.TokenStep.for_model(model, caches)
                before = kernels.pool_stats()
                got = [step((pos * 37) % 2048, pos) for pos in range(4, 24)]
                after = kernels.pool_stats()
                for name in by:
                    by[name] += after[name] - before[name]
                    assert after[name] - before[name] <= warm * parts * len(got), (warm, name)
                logits.setdefault(warm, got)
                assert all(torch.equal(a, b) for a, b in zip(logits[0], got))
                if warm == 0 or min(by.values()) > 0:
                    break
            assert all(v == 0 for v in by.values()) if warm == 0 else min(by.values()) > 0, (warm, by)
            lib.qwen_pool_expected(expected)
            assert tuple(expected) == _expected_warming(qkv, rows, kernels._sharing)
        kernels.configure(0, 4096, claims="counter")
        kernels.TokenStep.for_model(model, caches)(7, 24)
        lib.qwen_pool_expected(expected)
        assert expected[2:] == [0, 0]
        assert tuple(expected) == _expected_warming(qkv, rows, kernels._sharing)
        kernels.configure(0, 4096)
        model.lm_head.plan = kernels.Plan("torch")  # the last layer's down projection then warms layer 0's q/k/v
        lib.qwen_pool_expect(None, 0, None, 0)  # so that what follows is the step's own
        kernels.TokenStep.for_model(model, caches)(7, 25)
        lib.qwen_pool_expected(expected)
        assert tuple(expected) == _expected_warming(qkv, rows, kernels._sharing)


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [4096, 12288, 1 << 20])
def test_each_product_s_parts_are_where_its_chunks_start(dtype, chunk, pool_settings):
    """What the layer step tells the pool for each of a layer's products (q/k/v: three matrices of unequal rows;
    gate and up; o; the down projection) matches the chunk layout of csrc/gemv.h: with small chunks the helper's
    half starts inside k, at the start of v, or inside up; with 1 MB chunks these small products are one chunk per
    matrix, and the helper's is k, or up."""
    model = load_model(resolve("qwen-lab/tiny-chat"), dtype, "cpu")
    kernels.set_num_threads(2)
    kernels.configure(0, chunk)
    layer = model.model.layers[1]
    s = kernels.LayerStep.from_buffer_copy(layer._prepared())
    kernels._share(s)
    expected = (ctypes.c_int64 * 4)()
    a, m = layer.self_attn, layer.mlp
    for which, (weights, plan) in enumerate([([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], s.qkv),
                                             ([a.o_proj.weight], s.o),
                                             ([m.gate_proj.weight, m.up_proj.weight], s.gate_up),
                                             ([m.down_proj.weight], s.down)]):  # the plans the layer step runs
        kernels._library().qwen_layer_expects(ctypes.byref(s), which, expected)
        assert tuple(expected) == _expected_warming(weights, plan.rows, kernels._sharing), (which, chunk)


def test_a_build_from_other_sources_is_refused_in_one_line():
    """bench_step.py --against opens another checkout's build with kernels._declare: where it lacks a function
    these sources call, one line says which (not ctypes' AttributeError from the middle of the declarations)."""
    other = ctypes.CDLL("libc.so.6")
    with pytest.raises(kernels.KernelUnavailable, match=r"^qwen_rmsnorm_f32 is missing from libc\.so\.6: it was "
                                                        r"built from other sources than these$"):
        kernels._declare(other)


@needs_kernel
def test_helpers_take_chunks_of_a_large_job(pool_settings):
    kernels.set_num_threads(2)
    kernels.configure(0, 4096)
    w, x = torch.randn(4096, 1024), torch.randn(1024)
    before = kernels.pool_stats()
    for _ in range(200):  # on a busy machine a helper may miss some jobs, not all of them
        kernels.gemv(x, w)
        if kernels.pool_stats()["helper_chunks"] > before["helper_chunks"]:
            break
    after = kernels.pool_stats()
    assert after["jobs"] > before["jobs"] and after["helper_chunks"] > before["helper_chunks"]


@needs_kernel
def test_small_jobs_stay_on_the_calling_thread(pool_settings):
    kernels.set_num_threads(2)
    w, x = torch.randn(64, 64), torch.randn(64)  # 16 KiB: far below SOLO_BYTES
    before = kernels.pool_stats()
    kernels.gemv(x, w)
    after = kernels.pool_stats()
    assert after["solo_jobs"] - before["solo_jobs"] == after["jobs"] - before["jobs"] == 1


@needs_kernel
def test_calls_from_several_python_threads_at_once(pool_settings):
    from concurrent.futures import ThreadPoolExecutor
    kernels.set_num_threads(2)
    kernels.configure(0, 4096)
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(2000, 300, generator=g), torch.randn(300, generator=g)) for _ in range(4)]
    want = [F.linear(x, w) for w, x in cases]
    with ThreadPoolExecutor(4) as ex:  # one caller holds the pool; the others run their jobs alone
        for _ in range(20):
            got = list(ex.map(lambda c: kernels.gemv(c[1], c[0]), cases))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_a_forked_child_computes_without_the_parent_s_threads(pool_settings):
    import multiprocessing
    kernels.set_num_threads(2)
    kernels.configure(0, 4096)
    w, x = torch.randn(1000, 200), torch.randn(200)
    want = kernels.gemv(x, w)  # the parent's pool has started its helper
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as p:
        got = p.apply(kernels.gemv, (x, w))
    assert torch.equal(got, want)


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_tokens_are_identical_on_1_and_2_threads(pool_settings, dtype):
    files = resolve("qwen-lab/tiny-chat")
    model, tok = load_model(files, dtype, "cpu"), Tokenizer.from_files(files)
    prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    gen = GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=[])
    runs = []
    for threads, chunk in [(1, 64 * 1024), (2, 64 * 1024), (2, 256)]:  # 256 bytes: many tiny chunks
        kernels.set_num_threads(threads)
        kernels.configure(0, chunk)  # share even the smallest matrices
        result = generate_stream(model, tok, prompt, gen).result
        assert result.decode_threads == threads
        runs.append(result.token_ids)
    assert runs[0] == runs[1] == runs[2]


# ---------------------------------------------------------------- variants and the per-shape choice

@needs_kernel
@pytest.mark.parametrize("out_features, in_features", [(1, 1), (3, 5), (7, 17), (13, 33), (130, 4864), (9, 9000),
                                                       (257, 96), (6, 8)])
def test_every_plan_matches_f_linear(out_features, in_features, pool_settings):
    from qwen_lab import tuning
    kernels.configure(0, 4096)  # share even small jobs: chunk edges and leftover rows get exercised
    g = torch.Generator().manual_seed(out_features + in_features)
    w, x, b = (torch.randn(out_features, in_features, generator=g), torch.randn(in_features, generator=g),
               torch.randn(out_features, generator=g))
    plans = tuning.candidates()
    assert {p.variant for p in plans} >= {"avx2", "avx2x16", "avx2dp", "torch"}  # the stand-ins run here too
    for plan in plans:
        got = kernels.gemv(x, w, b, plan=plan)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5 * in_features ** 0.5, msg=str(plan))
        bf16_close(kernels.gemv(x.bfloat16(), w.bfloat16(), b.bfloat16(), plan=plan), x.bfloat16(), w.bfloat16(),
                   b.bfloat16())


@needs_kernel
def test_pair_variants_are_tuning_candidates_for_bf16_weights_only():
    from qwen_lab import tuning
    pairs = {p.variant for p in tuning.candidates(torch.bfloat16)} & kernels.PAIR_VARIANTS
    assert "avx2dp" in pairs  # its stand-in runs on every AVX2 CPU
    assert not {p.variant for p in tuning.candidates(torch.float32)} & kernels.PAIR_VARIANTS
    assert {p.variant for p in tuning.candidates(torch.float32)} >= {"avx2", "torch"}


@needs_kernel
def test_the_avx512_bf16_variant_is_built_with_its_instruction():
    """Compiled wherever the compiler knows AVX512-BF16 (and run only where the CPU has it): its pair
    walk must use vdpbf16ps itself, not the widening arithmetic of its stand-in avx2dp."""
    import shutil
    import subprocess
    lib = kernels._library()
    if "avx512bf16" not in lib.variants:
        pytest.skip("this compiler does not build -mavx512bf16")
    objdump = shutil.which("objdump")
    if not objdump:
        pytest.skip("no objdump to read the built code")
    code = subprocess.run([objdump, "-d", lib._name], capture_output=True, text=True, check=True).stdout
    assert "vdpbf16ps" in code  # only gemv_avx512bf16.o is compiled with -mavx512bf16


@needs_kernel
def test_the_pair_walk_at_avx512_width_matches_f_linear(fresh_build, monkeypatch, pool_settings):
    """avx512bf16's walk is 16 floats wide, avx2dp's 8: build the 16-wide pair walk with AVX2
    arithmetic (as avx2x16 does for avx512) so that its steps, tails and rows are tested here too."""
    from qwen_lab import tuning
    monkeypatch.setitem(kernels.VARIANTS, "dp16", (16, kernels.AVX2, ("avx2", "fma"), ["-DDPBF16=1"]))
    kernels.variants.cache_clear()
    monkeypatch.setattr(kernels, "PAIR_VARIANTS", kernels.PAIR_VARIANTS | {"dp16"})
    try:
        assert "dp16" in kernels.variants()
        kernels.configure(0, 4096)  # small chunks: chunk edges and leftover rows too
        for out_features, in_features in [(1, 1), (3, 31), (7, 33), (13, 95), (130, 4864), (9, 9000), (64, 96)]:
            g = torch.Generator().manual_seed(out_features * in_features)
            w, x, b = (torch.randn(out_features, in_features, generator=g).bfloat16(),
                       torch.randn(in_features, generator=g).bfloat16(), torch.randn(out_features, generator=g).bfloat16())
            for rows, prefetch in tuning.ROWS_AND_PREFETCH:
                bf16_close(kernels.gemv(x, w, b, plan=kernels.Plan("dp16", rows, prefetch)), x, w, b)
    finally:
        kernels.variants.cache_clear()


@needs_kernel
def test_a_variant_this_cpu_cannot_run_is_refused():
    missing = [v for v in kernels.VARIANTS if v not in kernels.variants()]
    if not missing:
        pytest.skip("this CPU runs every variant")
    with pytest.raises(ValueError, match=f"gemv variant '{missing[0]}' does not run here"):
        kernels.gemv(torch.randn(8), torch.randn(4, 8), plan=kernels.Plan(missing[0]))


def test_threads_set_lasts_for_its_block():
    before = kernels._threads
    with kernels.threads_set(3):
        assert kernels.num_threads() == 3
    assert kernels._threads == before
    with pytest.raises(SettingError):
        with kernels.threads_set(0):
            pass
    assert kernels._threads == before


@needs_kernel  # where the kernels build, a planted compile failure stands for a real one
def test_a_failed_build_is_tried_once_per_process(fresh_build, monkeypatch):
    """Every module of a model asks for the kernels; a compile that failed must not run again for each."""
    calls = []
    real_build = kernels._build

    def failing_build(cc, target):
        calls.append(target)
        raise kernels.KernelUnavailable("cc could not build kernels.c: planted failure")

    monkeypatch.setattr(kernels, "_build", failing_build)
    for _ in range(5):
        with pytest.raises(kernels.KernelUnavailable, match="planted failure"):
            kernels._library()
    assert not kernels.available() and "planted failure" in kernels.status()
    assert len(calls) == 1
    monkeypatch.setattr(kernels, "_build", real_build)


# ---------------------------------------------------------------- a room's shared cache (QWEN_LAB_SHARED_CACHE)

@pytest.fixture
def stand_in_build(monkeypatch):
    """``kernels._build`` that copies this machine's build instead of compiling (seconds per test), counting calls."""
    import shutil
    built, calls = kernels._library()._name, []

    def build(cc, target):
        calls.append(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)
    monkeypatch.setattr(kernels, "_build", build)
    return calls


@needs_kernel
def test_a_room_s_shared_build_is_used_as_it_is_and_never_written(stand_in_build, fresh_build, tmp_path, monkeypatch):
    shared, own = tmp_path / "shared", fresh_build
    monkeypatch.setenv("QWEN_LAB_CACHE", str(shared))  # the instructor's build, into the room's folder
    kernels._library.cache_clear()
    kernels._library()
    assert len(stand_in_build) == 1 and (shared / kernels.library_name()).is_file()
    read_only(shared)
    before = tree(shared)
    monkeypatch.setenv("QWEN_LAB_CACHE", str(own))  # a learner
    monkeypatch.setenv("QWEN_LAB_SHARED_CACHE", str(shared))
    kernels._library.cache_clear()
    assert kernels._library()._name == str(shared / kernels.library_name())
    assert len(stand_in_build) == 1 and not own.exists() and tree(shared) == before  # nothing built, nothing written
    assert f"the room's build in {shared}" in kernels.status()  # what `qwen-lab doctor` shows a teacher
    # a build of other sources in the room's folder (a kit updated since): the learner builds their own
    monkeypatch.setenv("QWEN_LAB_SHARED_CACHE", str(tmp_path / "older"))
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "kernels-0123456789abcdef.so").write_bytes(b"an older build")
    kernels._library.cache_clear()
    assert kernels._library()._name == str(own / kernels.library_name()) and len(stand_in_build) == 2
    assert "room's" not in kernels.status()
    # a damaged copy under the right name (or a folder mounted noexec): the learner's own build, no error
    (tmp_path / "older" / kernels.library_name()).write_bytes(b"not a library")
    kernels._library.cache_clear()
    assert kernels.available() and kernels._library()._name == str(own / kernels.library_name())

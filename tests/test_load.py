"""Loading: architecture registry, parameter counts, memory-mapped safetensors, clear errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from qwen_lab.errors import CheckpointError, UnsupportedArchitectureError
from qwen_lab.hub import resolve
from qwen_lab.load import (ARCHITECTURES, architecture_of, build_model, choose_dtype, count_parameters, load_model,
                           read_config, read_safetensors)


@pytest.mark.parametrize("size, expected", [("0.5b", 494_032_768), ("1.5b", 1_543_714_304)])
def test_real_configs_build_on_meta_with_exact_parameter_count(size, expected):
    model = build_model(read_config(ROOT / "benchmarks" / "configs" / f"qwen2.5-{size}.json"))
    assert count_parameters(model) == expected
    assert next(model.parameters()).device.type == "meta"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie_word_embeddings


def test_unsupported_architecture_is_named_with_the_supported_list():
    with pytest.raises(UnsupportedArchitectureError, match=r"LlamaForCausalLM.*supports Qwen2ForCausalLM"):
        architecture_of({"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(UnsupportedArchitectureError, match="no architecture"):
        architecture_of({})
    assert "Qwen2ForCausalLM" in ARCHITECTURES


def copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_from_a_model_dir(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="MistralForCausalLM"):
        load_model(resolve(str(d)))


def test_weights_are_views_on_the_file_without_a_copy(tiny_dir):
    files = resolve(str(tiny_dir))
    path = files.weights[0]
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    model = load_model(files, "float32", "cpu")  # the file is float32 too: no conversion, so no copy
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.bias"
    pa, pb = model.get_parameter(a), model.get_parameter(b)
    # Two tensors lie in memory exactly as far apart as in the file: both are views on one mapping of it.
    assert pb.data_ptr() - pa.data_ptr() == header[b]["data_offsets"][0] - header[a]["data_offsets"][0]
    assert torch.equal(pa, read_safetensors(path)[a])


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                         ("float16", torch.float16)])
def test_dtype_choice(tiny_dir, name, dtype):
    model = load_model(resolve(str(tiny_dir)), name, "cpu")
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_auto_dtype_keeps_a_bf16_checkpoint_as_it_is_on_a_cpu():
    cpu = torch.device("cpu")
    assert choose_dtype("auto", torch.device("cuda")) == torch.bfloat16  # as the seed does
    assert choose_dtype("auto", cpu, torch.bfloat16) == torch.bfloat16  # the file's own bytes, shared
    assert choose_dtype("auto", cpu, torch.float32) == torch.float32
    assert choose_dtype("auto", cpu, torch.float16) == torch.float32  # no float16 kernels on a CPU
    assert choose_dtype("auto", cpu, None) == torch.float32
    assert choose_dtype("float32", cpu, torch.bfloat16) == torch.float32  # asking for a dtype wins


def file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (from /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def test_auto_loads_a_bf16_checkpoint_as_views_on_the_file():
    """Views on the mapped file: pages any number of processes share (no private copy)."""
    from qwen_lab.load import checkpoint_dtype
    files = resolve("qwen-lab/tiny-chat")
    assert checkpoint_dtype(read_config(files.config)) == torch.bfloat16
    model = load_model(files, "auto", "cpu")
    assert model.lm_head.weight.dtype == torch.bfloat16
    ranges = file_mappings(files.weights[0].resolve())
    assert ranges, "the weights file is not memory-mapped"
    for name, p in model.named_parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), f"{name} is a copy, not a view on the file"
    converted = load_model(files, "float32", "cpu")  # a conversion has to copy
    assert not any(lo <= converted.lm_head.weight.data_ptr() < hi for lo, hi in ranges)


def test_native_bf16_matches_the_cpu_flags():
    from qwen_lab.load import native_bf16
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    with pytest.raises(ValueError, match="float64"):
        choose_dtype("float64", torch.device("cpu"))


def edit_weights(d, fn):
    path = d / "model.safetensors"
    tensors = {k: v.clone() for k, v in read_safetensors(path).items()}
    fn(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path)
    edit_weights(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.bias' is missing"):
        load_model(resolve(str(d)))


def test_unexpected_tensor_is_named(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path)
    edit_weights(d, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        load_model(resolve(str(d)))


def test_shape_mismatch_is_named(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path)
    edit_weights(d, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(65,\), config.json implies \(64,\)"):
        load_model(resolve(str(d)))


def test_tied_checkpoint_with_a_stored_lm_head_still_loads(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path)
    edit_weights(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = load_model(resolve(str(d)))
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "truncated"),
    (lambda b: b[:5], "truncated"),
    (lambda b: b[:8] + b"{not json" + b[17:], "corrupt header"),
    (lambda b: b"", "truncated"),
    (lambda b: (2**40).to_bytes(8, "little") + b[8:], "truncated or not a safetensors file"),
])
def test_damaged_file_gives_a_clear_error(tiny_dir, tmp_path, damage, message):
    d = copy(tiny_dir, tmp_path)
    path = d / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(resolve(str(d)))
    assert "\n" not in str(info.value)


def test_sharded_checkpoint_loads_every_shard(sharded_dir):
    files = resolve(str(sharded_dir))
    assert files.sharded and len(files.weights) == 3
    model = load_model(files, "float32", "cpu")
    assert not any(p.device.type == "meta" for p in model.parameters())


def test_converted_load_is_exact_and_the_released_mapping_still_reads_back(tiny_dir, tmp_path):
    from safetensors.torch import load_file
    from qwen_lab.load import _map_safetensors, _release
    d = copy(tiny_dir, tmp_path)
    edit_weights(d, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    reference = load_file(d / "model.safetensors")
    model = load_model(resolve(str(d)), "float32", "cpu")
    for name, value in reference.items():
        assert torch.equal(model.get_parameter(name), value.float()), name
    # Released pages of the private mapping are re-read from the file when touched again.
    tensors, mapped = _map_safetensors(d / "model.safetensors")
    view = tensors["model.embed_tokens.weight"]
    _release(view, [mapped])
    assert torch.equal(view, reference["model.embed_tokens.weight"])
    heap = torch.ones(4096)
    _release(heap, [mapped])  # not in the mapping: left alone
    assert heap.sum() == 4096


def test_column_major_storage_changes_memory_order_not_the_model(tiny_dir):
    files = resolve(str(tiny_dir))
    rows = load_model(files, "float32", "cpu", layout="row")
    cols = load_model(files, "float32", "cpu", layout="column")
    assert [(n, p.shape) for n, p in rows.named_parameters()] == [(n, p.shape) for n, p in cols.named_parameters()]
    assert not cols.model.layers[0].mlp.up_proj.weight.is_contiguous()
    assert cols.model.layers[0].input_layernorm.weight.is_contiguous()  # only linear weights
    assert cols.lm_head.weight is cols.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, cols.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cols(ids), rows(ids), rtol=1e-5, atol=1e-5)
        for name, p in rows.named_parameters():
            assert torch.equal(p, cols.get_parameter(name)), name


def test_auto_layout_leaves_small_or_non_float32_matrices_alone(tiny_dir):
    from qwen_lab.load import column_major_weights
    model = load_model(resolve(str(tiny_dir)), "float32", "cpu")  # auto: these matrices fit in the cache
    assert all(p.is_contiguous() for p in model.parameters())
    big = build_model(read_config(ROOT / "benchmarks" / "configs" / "qwen2.5-0.5b.json"))
    assert column_major_weights(big, torch.bfloat16, torch.device("cpu")) == set()
    assert column_major_weights(big, torch.float32, torch.device("cuda")) == set()
    with pytest.raises(ValueError, match="layout 'diagonal'"):
        column_major_weights(big, torch.float32, torch.device("cpu"), "diagonal")

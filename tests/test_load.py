"""Loading: architecture registry, parameter counts, memory-mapped safetensors, clear errors."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from qwen_lab import pages, reference
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


def test_the_registry_picks_among_three_and_names_them_when_it_cannot():
    assert sorted(ARCHITECTURES) == ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
    assert architecture_of({"architectures": ["LlamaForCausalLM"]}) == "LlamaForCausalLM"
    assert architecture_of({"architectures": "Qwen3ForCausalLM"}) == "Qwen3ForCausalLM"  # one name, not a list
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"names MistralForCausalLM; qwen_lab supports LlamaForCausalLM, Qwen2ForCausalLM, "
                             r"Qwen3ForCausalLM$"):
        architecture_of({"architectures": ["MistralForCausalLM"]})
    with pytest.raises(UnsupportedArchitectureError, match="no architecture"):
        architecture_of({})
    with pytest.raises(CheckpointError, match="architectures must be a list"):
        architecture_of({"architectures": {"a": 1}})


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


def test_auto_dtype_keeps_a_bf16_checkpoint_as_it_is_on_a_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert choose_dtype("auto", torch.device("cuda")) == torch.bfloat16  # as the seed does
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # Colab's T4
    assert choose_dtype("auto", torch.device("cuda")) == torch.float16  # no bf16 in hardware
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
    tensors, mapped, _ = _map_safetensors(d / "model.safetensors")
    view = tensors["model.embed_tokens.weight"]
    _release(view, [mapped])
    assert torch.equal(view, reference["model.embed_tokens.weight"])
    heap = torch.ones(4096)
    _release(heap, [mapped])  # not in the mapping: left alone
    assert heap.sum() == 4096


def test_the_header_alone_is_what_loading_sees_and_needs_no_tensor_data(tiny_dir, tmp_path):
    """read_safetensors_header (notebook 02) shows a file's table of contents without its weights."""
    from qwen_lab.load import _ST_DTYPES, read_safetensors, read_safetensors_header
    path = tiny_dir / "model.safetensors"
    header = read_safetensors_header(path)
    assert header.pop("__metadata__") == {"format": "pt"}
    seen = {k: (_ST_DTYPES[v["dtype"]], v["shape"]) for k, v in header.items()}
    assert seen == {k: (t.dtype, list(t.shape)) for k, t in read_safetensors(path).items()}
    raw = path.read_bytes()
    cut = tmp_path / "header-only.safetensors"
    cut.write_bytes(raw[:8 + int.from_bytes(raw[:8], "little")])  # the header, and no tensor data at all
    assert read_safetensors_header(cut) == read_safetensors_header(path)
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(cut)


def test_the_header_reader_reads_the_header_and_not_the_weights(tmp_path):
    """The bytes it reads do not grow with the file (the notebook used to read 3 GB to show 30 kB)."""
    from qwen_lab.load import read_safetensors_header
    io = Path("/proc/self/io")
    if not io.is_file():
        pytest.skip("needs /proc/self/io to count the bytes a process reads")
    path = tmp_path / "big.safetensors"
    write_raw_safetensors(path, {"w": {"dtype": "U8", "shape": [64 * 2**20], "data_offsets": [0, 64 * 2**20]}},
                          bytes(64 * 2**20))

    def bytes_read() -> int:
        return int(next(line for line in io.read_text().splitlines() if line.startswith("rchar:")).split()[1])

    before = bytes_read()
    header = read_safetensors_header(path)
    assert bytes_read() - before < 2**20  # a file of 64 MiB
    assert header["w"]["shape"] == [64 * 2**20]


@pytest.mark.parametrize("content, message", [
    (b"", "truncated"),
    (b"\x05\x00", "truncated"),
    ((2**40).to_bytes(8, "little") + b"{}", "truncated or not a safetensors file"),
    ((9).to_bytes(8, "little") + b"{not json", "corrupt header .not valid JSON"),
    ((6).to_bytes(8, "little") + b"[1, 2]", "corrupt header .not a JSON object"),
    ((2).to_bytes(8, "little") + b"\xff\xfe", "corrupt header .not valid JSON"),
])
def test_a_damaged_header_gets_the_loader_s_one_line(tmp_path, content, message):
    from qwen_lab.load import read_safetensors_header
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    for read in (read_safetensors_header, read_safetensors):
        with pytest.raises(CheckpointError, match=message) as info:
            read(path)
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_safetensors_header(tmp_path / "missing.safetensors")




# ---------------------------------------------------------------- hostile or broken config.json

def with_config(tiny_dir, tmp_path, edit):
    d = copy(tiny_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    result = edit(config)
    (d / "config.json").write_text(result if isinstance(result, str) else json.dumps(config))
    return d


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "192", "hidden_size must be a whole number, not '192'"),
    ("hidden_size", 64.0, "hidden_size must be a whole number, not 64.0"),
    ("max_position_embeddings", "2048", "max_position_embeddings must be a whole number"),
    ("rms_norm_eps", "x", "rms_norm_eps must be a number above 0"),
    ("rms_norm_eps", -1, "rms_norm_eps must be a number above 0"),
    ("num_attention_heads", 0, "num_attention_heads must be between 1 and 1,024, not 0"),
    ("num_hidden_layers", 1e9, "num_hidden_layers must be a whole number, not 1000000000.0"),
    ("num_hidden_layers", 10**9, "num_hidden_layers must be between 1 and 512"),
    ("num_key_value_heads", 3, r"num_attention_heads must be a multiple of num_key_value_heads \(3\)"),
    ("vocab_size", True, "vocab_size must be a whole number, not True"),
    ("rope_theta", float("inf"), "rope_theta must be a number"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
    ("head_dim", 15, "head_dim must be even"),
])
def test_bad_config_values_are_named_before_anything_is_built(tiny_dir, tmp_path, field, value, message):
    import time
    d = with_config(tiny_dir, tmp_path, lambda c: c.update({field: value}))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(resolve(str(d)))
    assert time.monotonic() - start < 10  # 1e9 layers used to build for minutes
    assert "\n" not in str(info.value) and str(info.value).startswith("config.json:")


@pytest.mark.parametrize("edit, error, message", [
    (lambda c: "[]", CheckpointError, "must hold a JSON object"),
    (lambda c: "[" * 100_000 + "]" * 100_000, CheckpointError, "nested too deeply"),
    (lambda c: "{\"architectures\": [\"Qwen2", CheckpointError, "is not valid JSON"),
    (lambda c: c.update(hidden_act="gelu"), UnsupportedArchitectureError, "hidden_act is 'gelu'"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4}), UnsupportedArchitectureError,
     "rope_scaling type 'yarn' is not supported; qwen_lab knows default, llama3"),
    (lambda c: c.update(rope_scaling={"rope_type": "llama3"}), CheckpointError, "rope_scaling of type llama3 needs"),
    (lambda c: c.update(use_sliding_window=True), UnsupportedArchitectureError, "use_sliding_window"),
    (lambda c: c.update(layer_types=["sliding_attention", "full_attention"]), UnsupportedArchitectureError,
     "layer_types"),
    # entries that cannot be sorted or hashed used to be a TypeError traceback; a string passed unread
    (lambda c: c.update(layer_types=[{"type": "sliding_attention"}]), UnsupportedArchitectureError,
     "layer_types ask for"),
    (lambda c: c.update(layer_types=["sliding_attention", 1]), UnsupportedArchitectureError, "layer_types ask for"),
    (lambda c: c.update(layer_types="sliding_attention"), CheckpointError, "layer_types must be a list"),
])
def test_broken_config_files_get_one_clear_line(tiny_dir, tmp_path, edit, error, message):
    d = with_config(tiny_dir, tmp_path, edit)
    with pytest.raises(error, match=message) as info:
        load_model(resolve(str(d)))
    assert "\n" not in str(info.value)


def test_a_config_in_transformers_5_form_reads_rope_theta_from_rope_parameters(tiny_dir, tmp_path):
    def edit(c):
        c["rope_parameters"] = {"rope_theta": c.pop("rope_theta"), "rope_type": "default"}
    d = with_config(tiny_dir, tmp_path, edit)
    assert load_model(resolve(str(d))).config.rope_theta == 10000.0


# ---------------------------------------------------------------- hostile or broken safetensors

def write_raw_safetensors(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_a_negative_shape_whose_product_matches_is_refused(tmp_path):
    from qwen_lab.load import read_safetensors
    write_raw_safetensors(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [-2, -3],
                                                             "data_offsets": [0, 24]}}, bytes(24))
    with pytest.raises(CheckpointError, match=r"negative dimension \[-2, -3\]"):
        read_safetensors(tmp_path / "m.safetensors")


def test_overlapping_tensors_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    write_raw_safetensors(tmp_path / "m.safetensors", header, bytes(24))
    with pytest.raises(CheckpointError, match="'a' and 'b' overlap"):
        read_safetensors(tmp_path / "m.safetensors")


@pytest.mark.parametrize("header_text", [b"[" * 100_000 + b"]" * 100_000, b'{"w": {"dtype": "F32", "shape": [1.5]}}',
                                         b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}'])
def test_a_hostile_header_gets_one_line(tmp_path, header_text):
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header_text).to_bytes(8, "little") + header_text + bytes(8))
    with pytest.raises(CheckpointError) as info:
        read_safetensors(path)
    assert "\n" not in str(info.value)


def test_a_header_length_never_shows_the_file_s_bytes(tmp_path):
    path = tmp_path / "secret.safetensors"
    path.write_bytes(b"password=hunter2 and more")  # not a safetensors file at all
    with pytest.raises(CheckpointError) as info:
        read_safetensors(path)
    leaked = str(int.from_bytes(b"password", "little"))
    assert leaked not in str(info.value) and "hunter2" not in str(info.value)


def test_a_bf16_tensor_labelled_f16_is_caught(tmp_path):
    from conftest import make_checkpoint
    from qwen_lab.tiny import train_tokenizer
    d = make_checkpoint(tmp_path / "m", train_tokenizer(["hello world"] * 3, 300), dtype=torch.bfloat16)
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"BF16"', b'"F16" ')  # same length: the same bytes, read as float16
    (d / "model.safetensors").write_bytes(raw[:8] + header + raw[8 + n:])
    with pytest.raises(CheckpointError, match="config.json says the weights are torch.bfloat16 but"):
        load_model(resolve(str(d)), "float32", "cpu")


def test_a_conversion_larger_than_the_memory_is_refused_with_figures(tiny_dir, monkeypatch):
    import qwen_lab.load as load
    monkeypatch.setattr(load, "available_memory", lambda: 10_000)  # 10 kB free
    with pytest.raises(CheckpointError, match=r"need 0.0 GiB as bfloat16 but only 0.0 GiB is available"):
        load_model(resolve(str(tiny_dir)), "bfloat16", "cpu")  # the file is float32: a conversion
    assert load_model(resolve(str(tiny_dir)), "float32", "cpu")  # its own dtype: mapped, nothing to copy


@pytest.mark.parametrize("model", ["Qwen/Qwen3-0.6B", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
                                   "meta-llama/Llama-3.2-3B-Instruct"])
def test_real_configs_of_the_other_architectures_build_like_transformers(model):
    transformers = pytest.importorskip("transformers")
    path = reference.path(model, "config.json")
    ours = build_model(read_config(path))
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path.parent))
    assert type(ours).__name__ == type(theirs).__name__
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters())
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == \
        {n: tuple(p.shape) for n, p in theirs.named_parameters()}


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float64"), "dtype 'float64' is not one of auto, float32, bfloat16, float16"),
    (dict(device="tpu"), "device 'tpu'"),
    (dict(device="not a device"), "is not a device name"),
    (dict(matvec="blas"), "matvec 'blas' is not one of auto, torch, none"),
])
def test_bad_load_settings_are_setting_errors(kwargs, message):
    from qwen_lab.errors import SettingError
    with pytest.raises(SettingError, match=message):
        load_model(resolve("qwen-lab/tiny-chat"), **kwargs)


def test_asking_for_cuda_without_a_gpu_says_so(monkeypatch):
    from qwen_lab.errors import SettingError
    from qwen_lab.load import parse_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingError, match="no usable CUDA GPU: use 'cpu'"):
        parse_device("cuda")
    assert parse_device(None) == torch.device("cpu")


# ---------------------------------------------------------------- more hostile files (the adversarial pass)

def test_an_empty_tensor_with_a_shape_torch_cannot_describe_is_refused(tmp_path):
    write_raw_safetensors(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [0, 2**62, 2**62],
                                                             "data_offsets": [0, 0]}}, b"")
    with pytest.raises(CheckpointError, match=r"'w' has the shape \[0, 4611686018427387904, .*which no model has"):
        read_safetensors(tmp_path / "m.safetensors")  # used to be torch's RuntimeError: Stride calculation overflowed


def test_a_tensor_stored_in_two_shards_is_refused(sharded_dir, tmp_path):
    """Which copy counted used to depend on the order of the shards: silently one or the other."""
    d = copy(sharded_dir, tmp_path)
    first, last = d / "model-00001-of-00003.safetensors", d / "model-00003-of-00003.safetensors"
    stolen = next(iter(read_safetensors(last)))
    tensors = {k: v.clone() for k, v in read_safetensors(first).items()}
    tensors[stolen] = torch.full_like(read_safetensors(last)[stolen], 7.0)  # a different copy
    save_file(tensors, first)
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(stolen)}' is stored in both "
                                              rf"model-00001-of-00003.safetensors and model-00003-of-00003"):
        load_model(resolve(str(d)))


def test_a_bf16_file_labelled_float32_still_gets_the_memory_check(tmp_path, monkeypatch):
    """config.json's torch_dtype is a label: converting the real bf16 bytes to float32 is a copy."""
    import qwen_lab.load as load
    from conftest import make_checkpoint
    from qwen_lab.tiny import train_tokenizer
    d = make_checkpoint(tmp_path / "m", train_tokenizer(["hello world"] * 3, 300), dtype=torch.bfloat16)
    config = json.loads((d / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (d / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(load, "available_memory", lambda: 10_000)  # 10 kB free
    with pytest.raises(CheckpointError, match=r"need 0.0 GiB as float32 but only 0.0 GiB is available"):
        load_model(resolve(str(d)), "float32", "cpu")  # used to convert without a check
    assert load.stored_dtype(resolve(str(d)).weights) == torch.bfloat16


def test_megabyte_names_in_a_hostile_file_give_a_short_line(tiny_dir, tmp_path):
    d = copy(tiny_dir, tmp_path)
    edit_weights(d, lambda t: t.update({"Z" * 5_000_000: torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'ZZZZ.*\.\.\. in the weights") as info:
        load_model(resolve(str(d)))
    assert len(str(info.value)) < 500  # used to be a 5 MB line
    d = with_config(tiny_dir, tmp_path / "arch", lambda c: c.update(architectures=["X" * 1000] * 1000))
    with pytest.raises(UnsupportedArchitectureError, match="config.json names XXXX.*; qwen_lab supports") as info:
        load_model(resolve(str(d)))
    assert len(str(info.value)) < 500  # used to be 1 MB


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_in_place_of_a_weights_file_is_refused_not_waited_on(tmp_path):
    """Its open used to wait forever for a writer (swapped in after resolve, or passed by hand)."""
    from conftest import refusal_within
    from qwen_lab.load import read_safetensors_header
    os.mkfifo(tmp_path / "m.safetensors")
    for read in (read_safetensors, read_safetensors_header):
        message = refusal_within(lambda: read(tmp_path / "m.safetensors"), CheckpointError)  # noqa: B023 (run now)
        assert message and "is not a regular file (a folder, a pipe or a device)" in message, read.__name__
    with pytest.raises(CheckpointError, match="is not a regular file"):
        read_safetensors(tmp_path)


@pytest.fixture(scope="module")
def large_bf16_dir(tmp_path_factory, tokenizer):
    """A bf16 checkpoint whose MLP matrices hold 4 MiB as float32 (2 MiB as bf16): large enough for huge pages."""
    from conftest import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("large"), tokenizer, dtype=torch.bfloat16, hidden_size=512,
                           intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_weights_are_asked_for_in_huge_pages_and_given_back_with_the_model(large_bf16_dir, monkeypatch):
    from conftest import vm_flags
    import gc
    from qwen_lab import load
    if not pages.huge_pages():
        pytest.skip(f"transparent huge pages are off here ({pages.THP_SETTING})")
    files = resolve(str(large_bf16_dir))
    model = load_model(files, "float32", "cpu")  # a conversion: a private copy
    gate = model.model.layers[0].mlp.gate_proj.weight
    assert gate.nbytes >= 2 * pages.HUGE_PAGE and gate.data_ptr() % pages.HUGE_PAGE == 0
    assert "hg" in vm_flags(gate.data_ptr())  # MADV_HUGEPAGE
    reference = load_model(files, "bfloat16", "cpu")  # the file's own dtype: views on its mapping, advised too
    assert torch.equal(gate, reference.model.layers[0].mlp.gate_proj.weight.float())
    assert "hg" in vm_flags(reference.model.layers[0].mlp.gate_proj.weight.data_ptr())
    small = model.model.layers[0].self_attn.k_proj.weight  # under 2 MiB: torch's own memory
    assert small.nbytes < pages.HUGE_PAGE and "hg" not in (vm_flags(small.data_ptr()) or [])
    address = gate.data_ptr()
    del model, gate
    gc.collect()
    assert vm_flags(address) is None or "hg" not in vm_flags(address)  # the copy's memory went with the model
    monkeypatch.setenv("QWEN_LAB_HUGE_PAGES", "0")  # as before: torch's allocation, no advice
    plain = load_model(files, "float32", "cpu").model.layers[0].mlp.gate_proj.weight
    assert "hg" not in vm_flags(plain.data_ptr())
    assert torch.equal(plain, reference.model.layers[0].mlp.gate_proj.weight.float())


def test_huge_pages_follow_the_system_s_setting(monkeypatch, tmp_path):
    from qwen_lab import load
    setting = tmp_path / "enabled"
    monkeypatch.setattr(pages, "THP_SETTING", setting)
    monkeypatch.delenv("QWEN_LAB_HUGE_PAGES", raising=False)
    for text, on in (("always [madvise] never", True), ("[always] madvise never", True),
                     ("always madvise [never]", False)):
        setting.write_text(text + "\n")
        assert pages.huge_pages() is on, text
    setting.unlink()
    assert pages.huge_pages() is False  # no such file: not Linux's THP
    view = torch.arange(pages.HUGE_PAGE, dtype=torch.bfloat16)
    assert torch.equal(pages.huge_copy(view, torch.float32), view.float())  # off: torch's plain conversion


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_a_weights_file_truncated_while_its_cached_pages_are_counted_is_no_crash(tmp_path):
    """cached_in_huge_pages read a byte of each 2 MiB block the page cache held: a file truncated between
    that count and the read (a folder extracted again while the doctor looks) killed the process with SIGBUS,
    the doctor's other lines unprinted. Here the file is truncated right after the count."""
    import subprocess
    import sys
    if not pages.huge_pages():
        pytest.skip(f"transparent huge pages are off here ({pages.THP_SETTING})")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(8 * pages.HUGE_PAGE))  # just written: in memory
    script = f"""if True:
        import os
        from qwen_lab import load
        real = load._libc

        class Truncating:  # counts, then the file shrinks under the mapping
            def __getattr__(self, name):
                return getattr(real, name)

            def mincore(self, *args):
                done = real.mincore(*args)
                os.truncate({str(weights)!r}, 0)
                return done

        load._libc = Truncating()
        print(load.cached_in_huge_pages({str(weights)!r}))
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "None", (run.returncode, run.stdout, run.stderr[-500:])


REWRITTEN = r'''
import os, sys
from pathlib import Path
from qwen_lab.errors import CheckpointError
from qwen_lab.generation import ChatModel, PromptCache
folder, dtype, how = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
chat = ChatModel.load(str(folder), dtype=dtype, device="cpu")
cache, ask = PromptCache(), [{"role": "user", "content": "What is 2 plus 3?"}]
print("first:", chat.generate(ask, cache=cache, max_new_tokens=6, do_sample=False).token_ids, flush=True)
stream = chat.stream(ask, cache=cache, max_new_tokens=12, do_sample=False, eos_token_id=[])
next(stream)  # a reply under way, its prompt fed
for path in sorted(folder.glob("*.safetensors")):
    data = path.read_bytes()
    if how in ("in place", "same size"):  # as cp over it writes: cut to nothing, then the new bytes
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data[:len(data) // 2] if how == "in place" else data[::-1])
    else:  # a new file renamed into place: the loaded weights keep their own, which nobody truncates
        (folder / "new.tmp").write_bytes(data[:len(data) // 2])
        os.replace(folder / "new.tmp", path)
for name, go in [("the reply under way", lambda: list(stream)),
                 ("the next turn", lambda: chat.generate(ask, cache=cache, max_new_tokens=6, do_sample=False))]:
    try:
        go()
        print(name, "ok", flush=True)
    except CheckpointError as e:
        print(name, "refused:", e, flush=True)
'''


@pytest.mark.parametrize("dtype, how, refused", [("bfloat16", "in place", True),  # views on the file: refused
                                                 ("bfloat16", "same size", True),  # no SIGBUS, other weights
                                                 ("float32", "in place", False),   # a converted copy: unaffected
                                                 ("bfloat16", "renamed", False)])  # the safe update
def test_a_weights_file_rewritten_in_place_is_refused_in_one_line_not_a_dead_process(tmp_path, dtype, how, refused):
    """A bfloat16 checkpoint loaded as bfloat16 is read from the file's own pages. A teacher's ``cp`` over a
    model folder's file cuts it first: every learner's next token read pages that no longer existed, and the
    process died of SIGBUS (a notebook's "kernel died", not a word why)."""
    import subprocess
    import sys
    folder = tmp_path / "model"
    shutil.copytree(resolve("qwen-lab/tiny-chat").config.parent, folder)
    run = subprocess.run([sys.executable, "-c", REWRITTEN, str(folder), dtype, how], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])  # -7: SIGBUS
    lines = run.stdout.splitlines()
    assert lines[0].startswith("first:") and len(lines) == 3, run.stdout
    for line in lines[1:]:
        if refused:
            assert "refused:" in line and "was changed on disk after the model was loaded" in line \
                and "model.safetensors" in line and "rename it into place" in line, line
            # the same size is not shown as a change ("4,042,304 bytes now, 4,042,304 then"): what changed is said
            assert ("bytes now" in line) == (how != "same size") and ("modified" in line) == (how == "same size")
        else:
            assert line.endswith(" ok"), line


def test_a_weights_file_that_can_no_longer_be_checked_is_refused_in_one_line(monkeypatch):
    """On NFS, a file removed or replaced on the server answers ``fstat`` with ESTALE (and its pages with
    SIGBUS): the check before every token raised that OSError as it came, a traceback in place of a reason."""
    import errno
    from qwen_lab.load import check_weight_files, weight_files_changed
    model = load_model(resolve("qwen-lab/tiny-chat"), "bfloat16", "cpu", matvec="none")
    watched = {f.fd for f in model._weight_files}
    real = os.fstat

    def stale(fd, *args, **kwargs):
        if fd in watched:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fstat", stale)  # the module load.py calls it through
    assert weight_files_changed(model)  # the panel and the exercises then load it anew
    with pytest.raises(CheckpointError) as e:
        check_weight_files(model)
    line = str(e.value)
    assert "\n" not in line and "model.safetensors can no longer be read from" in line \
        and os.strerror(errno.ESTALE) in line and "load the model again" in line
    float32 = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu", matvec="none")
    check_weight_files(float32)  # converted copies read nothing from the file: nothing to refuse


def test_a_copy_of_a_model_watches_no_file_and_outlives_the_original():
    """``copy.deepcopy`` (or pickle) copies a model's weights out of the file, and copied the kept file's
    descriptor number with them: once the original was gone, its descriptor closed, the copy's check looked
    at a closed descriptor (or another file that got its number) before every token."""
    import copy
    import gc
    import weakref
    from qwen_lab.load import check_weight_files
    model = load_model(resolve("qwen-lab/tiny-chat"), "bfloat16", "cpu", matvec="none")
    assert model._weight_files and all(f.viewed_by(model) for f in model._weight_files)  # views: watched
    twin = copy.deepcopy(model)
    assert not any(f.viewed_by(twin) for f in twin._weight_files)  # copies
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the original's descriptor is closed
    check_weight_files(twin)  # raised OSError (a closed descriptor) before every token
    for f in twin._weight_files:
        assert f.fd is None

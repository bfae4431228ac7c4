"""tiny.py's checkpoint writers: reshard gives the sharded layout of large models, same tensors."""
import json

import pytest
import torch

from qwen_lab.errors import SettingError
from qwen_lab.hub import resolve, shard_names
from qwen_lab.load import load_model, read_safetensors
from qwen_lab.tiny import reshard


@pytest.mark.parametrize("shards", [1, 3, 50])
def test_reshard_writes_the_same_tensors_as_shards_and_an_index(tmp_path, shards):
    source = resolve("qwen-lab/tiny-chat")
    out = reshard(source.root, tmp_path / "sharded", shards)
    files = resolve(out)
    names = [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    assert files.sharded and [p.name for p in files.weights] == names
    assert shard_names(files.weights_index) == names  # every shard named in the map, none empty
    index = json.loads(files.weights_index.read_text())
    original = read_safetensors(source.weights[0])
    copied = {}
    for path in files.weights:
        part = read_safetensors(path)
        assert all(index["weight_map"][name] == path.name for name in part)
        copied.update(part)
    assert copied.keys() == original.keys() == index["weight_map"].keys()
    assert all(torch.equal(copied[k], original[k]) and copied[k].dtype == original[k].dtype for k in original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    for other in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / other).read_bytes() == (source.root / other).read_bytes()
    assert not (out / "model.safetensors").exists()


def test_the_resharded_model_computes_the_same_logits(tmp_path):
    source = resolve("qwen-lab/tiny-chat")
    ids = torch.tensor([[5, 17, 300, 2046]])
    with torch.inference_mode():
        before = load_model(source, "float32", "cpu", matvec="none")(ids)
        after = load_model(resolve(reshard(source.root, tmp_path / "s", 3)), "float32", "cpu", matvec="none")(ids)
    assert torch.equal(before, after)


@pytest.mark.parametrize("shards", [0, -1, 51, 1.5, True, "3"])
def test_a_shard_count_that_cannot_be_is_refused_and_nothing_is_written(tmp_path, shards):
    with pytest.raises(SettingError, match="shards must be a whole number from 1 to 50"):
        reshard(resolve("qwen-lab/tiny-chat").root, tmp_path / "out", shards)
    assert not (tmp_path / "out").exists()


def test_reshard_never_writes_into_an_existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        reshard(resolve("qwen-lab/tiny-chat").root, tmp_path / "out", 2)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]

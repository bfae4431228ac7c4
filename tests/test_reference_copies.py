"""The repo's copies of the real models' files are verbatim (the tests and the tiny model rely on them)."""
import json

import pytest

from conftest import ROOT, qwen_template, reference_file


@pytest.mark.parametrize("model", ["qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct"])
def test_chat_template_copy_is_verbatim(model):
    config = json.loads(reference_file(model, "tokenizer_config.json").read_text())
    assert config["chat_template"] == qwen_template()


@pytest.mark.parametrize("model, copy", [("qwen2.5-0.5b-instruct", "qwen2.5-0.5b.json"),
                                         ("qwen2.5-1.5b-instruct", "qwen2.5-1.5b.json")])
def test_config_copies_are_verbatim(model, copy):
    assert json.loads(reference_file(model, "config.json").read_text()) == \
        json.loads((ROOT / "benchmarks" / "configs" / copy).read_text())


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_notebook_copies_are_verbatim(name):
    """notebooks/data holds the real model's small files for learners, who have no reference folder."""
    import hashlib
    folder = ROOT / "notebooks" / "data" / "qwen2.5-1.5b-instruct"
    data = (folder / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() in (folder / "SOURCE.md").read_text()  # the stated hash
    assert data == reference_file("qwen2.5-1.5b-instruct", name).read_bytes()

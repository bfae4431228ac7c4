"""The repo's copies of the real models' files are verbatim (the tests and the tiny model rely on them)."""
import json

import pytest

from conftest import ROOT, qwen_template, reference_file
from qwen_lab import reference


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
def test_package_copies_are_verbatim(name):
    """qwen_lab/reference ships the real model's small files to learners, who have no reference folder."""
    import hashlib
    data = reference.path("Qwen/Qwen2.5-1.5B-Instruct", name).read_bytes()
    source = reference.path("Qwen/Qwen2.5-1.5B-Instruct", "SOURCE.md").read_text()
    assert hashlib.sha256(data).hexdigest() in source  # the stated hash
    assert data == reference_file("qwen2.5-1.5b-instruct", name).read_bytes()

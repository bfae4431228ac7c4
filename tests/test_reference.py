"""qwen_lab.reference: the real models' small files inside the package, found by Hub id, nothing else."""
import json
from fnmatch import fnmatch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same module, from PyPI (the test extra)
    import tomli as tomllib

import pytest

from conftest import ROOT
from qwen_lab import reference
from qwen_lab.errors import QwenLabError

MODELS = ["HuggingFaceTB/SmolLM2-1.7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen3-0.6B",
          "meta-llama/Llama-3.2-3B-Instruct"]


def test_the_four_models_each_with_their_files_and_where_they_come_from():
    assert reference.models() == MODELS
    for model in MODELS:
        folder = reference.path(model)
        assert folder.parent == ROOT / "qwen_lab" / "reference" and folder.name == model.replace("/", "--")
        config = json.loads(reference.path(model, "config.json").read_text())
        assert config["architectures"][0].endswith("ForCausalLM")
        assert "chat_template" in json.loads(reference.path(model, "tokenizer_config.json").read_text())
        assert "eos_token_id" in json.loads(reference.path(model, "generation_config.json").read_text())
        assert model in reference.path(model, "SOURCE.md").read_text()
    # the Llama 3.2 licence asks for its agreement to travel with its files
    assert "LLAMA 3.2 COMMUNITY LICENSE" in reference.path("meta-llama/Llama-3.2-3B-Instruct", "LICENSE.txt").read_text().upper()
    assert reference.path("meta-llama/Llama-3.2-3B-Instruct", "NOTICE").is_file()


@pytest.mark.parametrize("model, filename, message", [
    ("Qwen/Qwen2.5-7B-Instruct", None, "no reference files for 'Qwen/Qwen2.5-7B-Instruct': the kit ships "
                                       "HuggingFaceTB/SmolLM2-1.7B-Instruct, Qwen/Qwen2.5-1.5B-Instruct"),
    ("Qwen--Qwen3-0.6B", "config.json", "no reference files for 'Qwen--Qwen3-0.6B'"),  # a Hub id, not the folder
    ("qwen/qwen3-0.6b", None, "no reference files for 'qwen/qwen3-0.6b'"),
    ("../reference", None, "no reference files for '../reference'"),
    (None, None, "no reference files for None"),
    ("Qwen/Qwen3-0.6B", "tokenizer.json", "Qwen/Qwen3-0.6B has no reference file 'tokenizer.json': the kit ships "
                                          "SOURCE.md, config.json, generation_config.json, tokenizer_config.json of it"),
    ("Qwen/Qwen3-0.6B", "../Qwen--Qwen2.5-1.5B-Instruct/config.json", "Qwen/Qwen3-0.6B has no reference file '../Qwen--"),
    ("Qwen/Qwen3-0.6B", "../__init__.py", "Qwen/Qwen3-0.6B has no reference file '../__init__.py'"),
    ("Qwen/Qwen3-0.6B", "", "Qwen/Qwen3-0.6B has no reference file ''"),
])
def test_anything_else_is_one_line_saying_what_there_is(model, filename, message):
    with pytest.raises(QwenLabError) as error:
        reference.path(model, filename)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_every_reference_file_is_package_data():
    """A file the package-data patterns miss would be in the clone but not in the wheel (Colab, the workshop)."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["qwen_lab.reference"]
    files = [p.relative_to(ROOT / "qwen_lab" / "reference").as_posix()
             for p in (ROOT / "qwen_lab" / "reference").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) == 4 * 4 + 2 + 1  # four files a model, Llama's licence and notice, __init__.py
    assert [f for f in files if f != "__init__.py" and not any(fnmatch(f, p) for p in shipped)] == []

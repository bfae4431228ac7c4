"""The kit's own wheel carries what the notebooks read, and works installed without the clone.

Colab (``pip install``), the workshop's image and a wheelhouse install the package alone: no
``notebooks/`` or ``tests/`` beside it. Here the wheel is built from a copy of the package's sources
(what ``workshop/z2jh/Dockerfile`` copies), installed into a folder of its own with ``pip install
--target``, and imported from there by a Python working far from the clone. It runs the code of
notebook 02's and 06's cells that read real models' files, taken from the notebooks themselves, and
must print what the notebooks show; and ``exercises.real_model_file()`` must find its file there.

A few seconds: the wheel is built with this environment's setuptools (``--no-build-isolation``),
no registry involved. The full offline room (every wheel, a fresh venv) is ``test_wheelhouse.py``.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

# What a cell needs from the cells before it, in the notebook.
NOTEBOOK_CELLS = {
    "02_load.ipynb": "from qwen_lab.load import architecture_of, read_config\n",
    "06_eos_pitfalls.ipynb": "MODEL = 'qwen-lab/tiny-chat'\n",
}


def reading_cell(notebook: str) -> tuple[str, str]:
    """The code cell of ``notebook`` that reads the shipped reference files, and the stdout it committed."""
    cells = json.loads((ROOT / "notebooks" / notebook).read_text(encoding="utf-8"))["cells"]
    [cell] = [c for c in cells if c["cell_type"] == "code" and "reference.path(" in "".join(c["source"])]
    shown = "".join("".join(o["text"]) for o in cell["outputs"] if o.get("name") == "stdout")
    return "".join(cell["source"]), shown


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="77")  # pyproject's build requirement
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "qwen_lab", source / "qwen_lab", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [built] = (tmp / "dist").glob("qwen_lab-*.whl")
    return built


def package_files() -> set[str]:
    """The package's files as committed (all of them, when git cannot say), without Python's caches."""
    listed = subprocess.run(["git", "ls-files", "qwen_lab"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return set(listed.stdout.split("\n")) - {""}
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "qwen_lab").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_the_wheel_holds_the_whole_package_reference_files_and_c_sources_too(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = {n for n in archive.namelist() if n.startswith("qwen_lab/")}
    shipped = package_files()
    assert {"qwen_lab/reference/Qwen--Qwen2.5-1.5B-Instruct/config.json",
            "qwen_lab/reference/meta-llama--Llama-3.2-3B-Instruct/LICENSE.txt", "qwen_lab/csrc/pool.h"} <= shipped
    assert sorted(shipped - names) == []  # pyproject.toml's package-data missed these
    assert sorted(names - shipped) == []


def test_installed_without_the_clone_the_notebooks_and_exercises_find_their_files(wheel, tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "-q",
                           "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = {name: reading_cell(name) for name in NOTEBOOK_CELLS}
    script = (
        "import contextlib, io, json, qwen_lab\n"
        "from qwen_lab import exercises\n"
        "from qwen_lab import kernels\n"
        "out = {'package': qwen_lab.__file__, 'real_model_file': str(exercises.real_model_file()),\n"
        "       'kernels': kernels.available()}\n"
        "for name, code in CELLS.items():\n"
        "    printed = io.StringIO()\n"
        "    with contextlib.redirect_stdout(printed):\n"
        "        exec(code, {})\n"
        "    out[name] = printed.getvalue()\n"
        "print(json.dumps(out))\n")
    code = {name: NOTEBOOK_CELLS[name] + source for name, (source, _) in cells.items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWEN_LAB_", "PYTHON"))}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", QWEN_LAB_MODEL="qwen-lab/tiny-chat")
    run = subprocess.run([sys.executable, "-c", f"CELLS = {code!r}\n{script}"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(site)  # the installed wheel answered, not the clone
    assert Path(report["real_model_file"]) == site / "qwen_lab/reference/Qwen--Qwen2.5-1.5B-Instruct/config.json"
    from qwen_lab import kernels
    assert report["kernels"] == kernels.available()  # its C sources compile there as here (csrc/pool.h was missed)
    for name, (_, shown) in cells.items():
        assert shown and report[name] == shown, name  # what the committed notebook shows

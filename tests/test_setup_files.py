"""The install recipes outside pyproject.toml say the same as it: environment.yml (conda, and Binder through
repo2docker), Binder's ``start``, the Colab first cell, and where torch's CPU-only build comes from.

These files are read by tools that do not run here (conda, repo2docker, Colab), so drift would
show only on the day of a workshop; the checks below catch it at the commit.
"""
import os
import re
import subprocess
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same module, from PyPI (the test extra)
    import tomli as tomllib

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def conda_pip_lines() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    [pip] = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return pip


def test_environment_yml_mirrors_pyproject_but_pins_torch_from_the_cpu_index():
    project = pyproject()
    wanted = [*project["dependencies"], *project["optional-dependencies"]["notebooks"],
              *project["optional-dependencies"]["test"]]
    wanted = {r.name.lower(): r for r in map(Requirement, wanted) if r.name != "qwen-lab"}
    wanted.pop("jupyterhub", None)  # the `workshop` extra: Binder brings its own hub (environment.yml says why)
    lines = conda_pip_lines()
    listed = {r.name.lower(): r for r in (Requirement(line) for line in lines if not line.startswith("-"))}
    assert set(listed) == set(wanted)
    for name, requirement in listed.items():
        if name != "torch":
            assert requirement.specifier == wanted[name].specifier, name
    # torch: the version the Makefile installs, in range for pyproject, from the CPU index (given before it)
    makefile_torch = re.search(r"^TORCH\s+\?=\s+torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert str(listed["torch"].specifier) == f"=={makefile_torch}"
    assert wanted["torch"].specifier.contains(makefile_torch)
    assert lines.index(f"--extra-index-url {CPU_INDEX}") < lines.index(f"torch=={makefile_torch}")
    assert lines[-1] == "-e ."  # the kit itself: repo2docker copies the whole repository for it


def test_the_cpu_only_torch_is_named_with_its_index_wherever_torch_is_installed():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH\s+\?=", makefile, re.M)  # still the override
    for path in ("README.md", "Makefile", "pyproject.toml", "environment.yml", "docs/workshop.md",
                 "workshop/z2jh/Dockerfile"):
        text = (ROOT / path).read_text()
        assert CPU_INDEX in text, path
        assert not re.search(r"torch==[\d.]+`? is (the|a) CPU build", text), path  # the old claim


def test_binder_start_makes_the_embedded_model_the_default_unless_one_is_chosen():
    start = ROOT / "start"
    assert os.access(start, os.X_OK)  # repo2docker runs it as the container's entrypoint
    env = {k: v for k, v in os.environ.items() if k != "QWEN_LAB_MODEL"}
    default = subprocess.run([str(start), "sh", "-c", 'echo "$QWEN_LAB_MODEL"'], env=env, capture_output=True,
                             text=True, timeout=30)
    chosen = subprocess.run([str(start), "sh", "-c", 'echo "$QWEN_LAB_MODEL"'],
                            env=dict(env, QWEN_LAB_MODEL="Qwen/Qwen2.5-0.5B-Instruct"), capture_output=True,
                            text=True, timeout=30)
    assert (default.stdout, chosen.stdout) == ("qwen-lab/tiny-chat\n", "Qwen/Qwen2.5-0.5B-Instruct\n")


def test_the_colab_first_cell_is_the_same_in_the_readme_and_the_guide_and_keeps_colab_s_torch():
    cells = [re.findall(r"^\s*(%pip install .+)$", (ROOT / p).read_text(), re.M) for p in ("README.md",
                                                                                          "docs/workshop.md")]
    assert cells[0] == cells[1] and len(cells[0]) == 1
    [cell] = cells[0]
    assert "torch" not in cell  # Colab's CUDA torch satisfies torch>=2.5: reinstalling it would break the runtime
    assert "ipywidgets>=8.1" in cell

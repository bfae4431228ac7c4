"""The offline room: `make wheelhouse` packs every wheel the kit needs, and a fresh venv installs the kit
from that folder alone (pip --no-index, no configuration, no registry), then chats with the embedded model.

Slow (a wheelhouse of about 100 wheels and a venv with torch and JupyterLab: a minute or two), so it
runs only where QWEN_LAB_SLOW=1 or CI=true (.ci/run sets QWEN_LAB_SLOW=1). Building the wheelhouse
needs the package registry (it is what a machine with network does before the workshop).
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (os.environ.get("QWEN_LAB_SLOW") == "1" or os.environ.get("CI") == "true"),
                                reason="slow (a venv with torch): set QWEN_LAB_SLOW=1 to run it")


def clean_env(**more) -> dict:
    """No PIP_* settings and no pip configuration file: only what the command line says counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "QWEN_LAB_", "HF_", "VIRTUAL_ENV"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **more)
    return env


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offline") / "wheelhouse"
    # setuptools builds in build/lib and keeps what an earlier build left there: a module deleted since
    # must not ride along into the room's wheel
    stale = ROOT / "build" / "lib" / "qwen_lab" / "stale_module.py"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("raise ImportError('deleted long ago')\n")
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "wheelhouse", f"WHEELHOUSE={folder}",
                           f"VENV={Path(sys.executable).parent.parent}"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # its last line is the doctor's: pip can install the kit from the folder alone
    assert done.stdout.strip().splitlines()[-1].startswith(f"ok    wheelhouse  {folder}: ")
    return folder


def test_a_fresh_venv_installs_the_kit_from_the_wheelhouse_alone_and_chats(wheelhouse, tmp_path):
    names = {p.name.split("-")[0].lower() for p in wheelhouse.glob("*.whl")}
    assert {"qwen_lab", "torch", "jupyterlab", "ipywidgets", "ipykernel", "tokenizers"} <= names
    [torch_wheel] = wheelhouse.glob("torch-*.whl")
    assert "+cpu" in torch_wheel.name  # the CPU-only build, not PyPI's CUDA one
    assert not list(wheelhouse.glob("*.tar.gz")) and not list(wheelhouse.glob("*.zip"))  # nothing to build in the room
    assert not [n for n in names if n.startswith("nvidia")]
    [kit] = wheelhouse.glob("qwen_lab-*.whl")
    with zipfile.ZipFile(kit) as wheel:  # the package's modules as they are now, no more, no fewer
        modules = {n for n in wheel.namelist() if n.endswith(".py")}
    assert modules == {str(p.relative_to(ROOT)) for p in (ROOT / "qwen_lab").rglob("*.py")}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
                              "--no-compile", "-q", "qwen-lab[notebooks]"],
                             cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]

    # the installed package, not this checkout, answers
    env = clean_env(HF_HUB_OFFLINE="1", QWEN_LAB_MODEL="qwen-lab/tiny-chat")
    where = subprocess.run([str(python), "-c", "import qwen_lab; print(qwen_lab.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(venv), where
    reply = subprocess.run([str(venv / "bin" / "qwen-lab"), "generate", "--prompt", "What is the capital of France?",
                            "--temperature", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout.strip() == "The capital of France is Paris."
    # and the doctor, inside that venv, says the machine is ready
    ready = subprocess.run([str(venv / "bin" / "qwen-lab"), "doctor"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert [line.split()[0] for line in ready.stdout.splitlines()].count("FAIL") == 0


def test_a_wheelhouse_missing_a_wheel_gets_one_line(wheelhouse, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for wheel in wheelhouse.glob("*.whl"):
        if not wheel.name.lower().startswith("jinja2-"):
            (partial / wheel.name).symlink_to(wheel)
    done = subprocess.run([str(Path(sys.executable).with_name("qwen-lab")), "doctor", "--wheelhouse", str(partial),
                           "qwen-lab/tiny-chat"], env=clean_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1
    [line] = [line for line in done.stdout.splitlines() if line.split()[1] == "wheelhouse"]
    assert line.startswith(f"FAIL  wheelhouse  {partial} lacks a wheel for jinja2")
    assert line.endswith(f"run `make wheelhouse WHEELHOUSE={partial}` where there is network, or add that wheel")

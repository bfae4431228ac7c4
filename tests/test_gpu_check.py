"""`make gpu-check` where there is no GPU (this machine, CI): one line saying so and what to do, exit code 1,
nothing written. The checks themselves need a GPU (scripts/gpu_check.py, tests/test_gpu.py)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_a_gpu_refuses_in_one_line(tmp_path):
    venv = Path(sys.executable).parent.parent
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine that has one
    # the make target as a user runs it; -o: the venv counts as made (nothing is installed by this test)
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "-o", f"{venv}/.test", "gpu-check", f"VENV={venv}",
                           f"GPU_CHECK_OUT={tmp_path / 'out'}"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    lines = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert lines == [f"gpu_check: error: no CUDA GPU is visible to torch {torch.__version__} ({build}): run `make "
                     f"gpu-check` on a machine with an NVIDIA GPU, in a .venv made with a CUDA build of torch (on "
                     f"Linux, PyPI's torch==2.13.0)"], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "out").exists()

"""Start a learner's Jupyter server, after copying the workshop's notebooks into ``~/notebooks``.

JupyterHub runs this as the learner, in the learner's home (the spawner's ``cmd``): on one server
(``jupyterhub_config.py``) and in the Kubernetes image (``z2jh/Dockerfile``) alike, so both rooms
give the same folder. The notebooks come from ``QWEN_LAB_NOTEBOOKS``. A notebook already in
``~/notebooks`` is never overwritten, so a learner's edits survive a restart of their server; one
they deleted comes back fresh. Then this process becomes ``jupyterhub-singleuser`` with the
arguments JupyterHub gave.

    python learner_start.py [jupyterhub-singleuser arguments...]
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

FOLDER = "notebooks"  # in the learner's home; also the start page's folder (Spawner.default_url)


def copy_notebooks(source: Path, dest: Path) -> list[str]:
    """Copy each ``*.ipynb`` of ``source`` that ``dest`` lacks; return the names copied."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for notebook in sorted(source.glob("*.ipynb")):
        target = dest / notebook.name
        if not target.exists():
            shutil.copyfile(notebook, target)  # contents only: the copy is the learner's, with their permissions
            copied.append(notebook.name)
    return copied


def main(argv: list[str]) -> None:
    source = os.environ.get("QWEN_LAB_NOTEBOOKS")
    if source and Path(source).is_dir():
        copied = copy_notebooks(Path(source), Path.home() / FOLDER)
        print(f"learner_start: copied {len(copied)} notebook(s) into ~/{FOLDER}", file=sys.stderr, flush=True)
    else:  # the server still starts: a learner without notebooks can still be helped
        print(f"learner_start: warning: QWEN_LAB_NOTEBOOKS={source!r} is not a folder: no notebooks copied",
              file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "jupyterhub.singleuser", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])

"""Start a learner's Jupyter server, after copying the workshop's notebooks into ``~/notebooks``.

JupyterHub runs this as the learner, in the learner's home (the spawner's ``cmd``): on one server
(``jupyterhub_config.py``) and in the Kubernetes image (``z2jh/Dockerfile``) alike, so both rooms
give the same folder. The notebooks come from ``QWEN_LAB_NOTEBOOKS`` (the kit's ``notebooks/``),
laid out as there: the English notebooks, ``GLOSSARY.md``, the Traditional Chinese edition in
``zh-TW/`` (a notebook run from a folder of that name speaks Chinese: ``qwen_lab/lang.py``), and the
worked solutions in ``solutions/`` only where ``QWEN_LAB_SOLUTIONS=1`` (the instructor's choice:
``QWEN_LAB_HUB_SOLUTIONS`` in ``room.py``). A file already in ``~/notebooks`` is never overwritten,
so a learner's edits survive a restart of their server; one they deleted comes back fresh. The
notebooks link to the kit's files beside their folder (``../README.md``, ``../qwen_lab/hub.py``,
``../training/corpus.py``): those are linked into the home from ``QWEN_LAB_SOURCE`` (the kit's
checkout; by default the notebooks' parent folder), so the links open, on the kit's own read-only
files. Then this process becomes ``jupyterhub-singleuser`` with the arguments JupyterHub gave.

    python learner_start.py [jupyterhub-singleuser arguments...]
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

FOLDER = "notebooks"  # in the learner's home; also the start page's folder (Spawner.default_url)
#: What every learner gets, relative to the notebooks folder; the solutions only when the room says so.
GIVEN = ("*.ipynb", "GLOSSARY.md", "zh-TW/*.ipynb")
SOLUTIONS = "solutions/*.ipynb"
#: What the notebooks' links reach outside their folder, linked (never copied) into the learner's home.
LINKED = ("README.md", "qwen_lab", "training")


def copy_notebooks(source: Path, dest: Path, solutions: bool = False) -> list[str]:
    """Copy each file of ``GIVEN`` (and ``SOLUTIONS`` if asked) that ``dest`` lacks; return the paths copied."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in GIVEN + ((SOLUTIONS,) if solutions else ()):
        for file in sorted(source.glob(pattern)):
            target = dest / file.relative_to(source)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)  # contents only: the copy is the learner's, with their permissions
                copied.append(file.relative_to(source).as_posix())
    return copied


def link_sources(source: Path, home: Path) -> list[str]:
    """Link each of ``LINKED`` that ``source`` has and ``home`` lacks into ``home``; return the names linked.

    A link, not a copy: the learner reads the kit's own files (read-only to them), never a stale copy
    that looks editable. Whatever the learner already has under that name is left alone.
    """
    linked = []
    for name in LINKED:
        target, link = source / name, home / name
        if target.exists() and not link.exists() and not link.is_symlink():
            link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
            linked.append(name)
    return linked


def main(argv: list[str]) -> None:
    source = os.environ.get("QWEN_LAB_NOTEBOOKS")
    if source and Path(source).is_dir():
        solutions = os.environ.get("QWEN_LAB_SOLUTIONS") == "1"
        copied = copy_notebooks(Path(source), Path.home() / FOLDER, solutions)
        print(f"learner_start: copied {len(copied)} file(s) into ~/{FOLDER}", file=sys.stderr, flush=True)
        kit = Path(os.environ.get("QWEN_LAB_SOURCE") or Path(source).parent)
        try:
            linked = link_sources(kit, Path.home())
        except OSError as e:  # the links are a convenience: the server starts without them
            print(f"learner_start: warning: cannot link the kit's files from {kit}: {e}", file=sys.stderr, flush=True)
        else:
            print(f"learner_start: linked {', '.join(linked) or 'nothing new'} from {kit}", file=sys.stderr, flush=True)
    else:  # the server still starts: a learner without notebooks can still be helped
        print(f"learner_start: warning: QWEN_LAB_NOTEBOOKS={source!r} is not a folder: no notebooks copied",
              file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "jupyterhub.singleuser", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])

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

Kernels are the room's memory: each notebook a learner opens starts its own (about 0.3 GiB each,
``benchmarks/RESULTS.md``), and JupyterLab keeps it running when the notebook's tab is closed, so a
learner reaching notebook 07 could hold seven. Two settings keep that down: a learner who has no
JupyterLab settings of their own for notebooks gets one saying that closing a notebook's tab shuts
its kernel down (``KERNEL_SHUTDOWN_SETTING``), and the server stops kernels left idle with no
connection for ``CULL_IDLE_SECONDS`` (``KERNEL_CULLING``: a kernel behind an open tab is never
stopped, however long it idles).

    python learner_start.py [jupyterhub-singleuser arguments...]
"""
from __future__ import annotations

import json
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
#: JupyterLab's setting "Shut down kernel" when closing a notebook: the notebook plugin's settings file, under
#: the user-settings folder, and its value (schema: share/jupyter/lab/schemas/@jupyterlab/notebook-extension/
#: tracker.json, key kernelShutdown, false by default).
KERNEL_SHUTDOWN_SETTING = (Path("@jupyterlab") / "notebook-extension" / "tracker.jupyterlab-settings",
                           {"kernelShutdown": True})
#: Longer than a break: a laptop that slept through one finds its kernels still there.
CULL_IDLE_SECONDS = 30 * 60
#: jupyter_server's culling of idle kernels; cull_connected=False spares every kernel an open tab is connected to.
KERNEL_CULLING = (f"--MappingKernelManager.cull_idle_timeout={CULL_IDLE_SECONDS}",
                  "--MappingKernelManager.cull_interval=300",
                  "--MappingKernelManager.cull_connected=False")


def copy_notebooks(source: Path, dest: Path, solutions: bool = False) -> list[str]:
    """Copy each file of ``GIVEN`` (and ``SOLUTIONS`` if asked) that ``dest`` lacks; return the paths copied."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in GIVEN + ((SOLUTIONS,) if solutions else ()):
        for file in sorted(source.glob(pattern)):
            target = dest / file.relative_to(source)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_whole(file, target)
                copied.append(file.relative_to(source).as_posix())
    return copied


def _copy_whole(file: Path, target: Path) -> None:
    """Copy ``file`` to ``target`` whole or not at all. A copy cut short (a full disk) left in place would never be
    replaced, since a file already there is the learner's: they would open an empty notebook at every start."""
    part = target.with_name(f".{target.name}.part")
    try:
        shutil.copyfile(file, part)  # contents only: the copy is the learner's, with their permissions
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


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


def lab_settings_dir() -> Path:
    """JupyterLab's user-settings folder, found as ``jupyterlab.commands.get_user_settings_dir`` finds it
    (that module takes seconds to import; every learner's start waits on this one)."""
    from jupyter_core.paths import jupyter_config_dir
    return Path(os.environ.get("JUPYTERLAB_SETTINGS_DIR") or Path(jupyter_config_dir()) / "lab" / "user-settings")


def shut_kernels_down_on_close(settings_dir: Path) -> bool:
    """Write the notebook plugin's setting that shuts a kernel down with its tab, unless the learner has
    that settings file already (their own choices, whatever they are, stay theirs); True if written."""
    name, values = KERNEL_SHUTDOWN_SETTING
    path = settings_dir / name
    if os.path.lexists(path):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    return True


def main(argv: list[str]) -> None:
    source = os.environ.get("QWEN_LAB_NOTEBOOKS")
    if source and Path(source).is_dir():
        solutions = os.environ.get("QWEN_LAB_SOLUTIONS") == "1"
        try:
            copied = copy_notebooks(Path(source), Path.home() / FOLDER, solutions)
        except OSError as e:  # the server still starts: the learner sees what is there, and can be helped
            print(f"learner_start: error: cannot copy the notebooks into {Path.home() / FOLDER}: "
                  f"{e.strerror or e}; fix that (free space on that disk), then restart this learner's server: "
                  f"what is missing is copied then", file=sys.stderr, flush=True)
        else:
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
    try:
        if shut_kernels_down_on_close(lab_settings_dir()):
            print("learner_start: closing a notebook's tab shuts its kernel down (JupyterLab setting written)",
                  file=sys.stderr, flush=True)
    except OSError as e:  # a convenience too: the culling below still stops the kernels left behind
        print(f"learner_start: warning: cannot write JupyterLab's settings: {e}", file=sys.stderr, flush=True)
    # the room's own arguments last, so that they win over these
    os.execv(sys.executable, [sys.executable, "-m", "jupyterhub.singleuser", *KERNEL_CULLING, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])

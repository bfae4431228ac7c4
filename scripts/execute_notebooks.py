"""Run notebooks top to bottom and save their outputs in place, as they are committed (nbval checks them).

    python scripts/execute_notebooks.py                       # every edition's notebooks
    python scripts/execute_notebooks.py notebooks/05_generate.ipynb notebooks/zh-TW/05_generate.ipynb

What ``jupyter nbconvert --to notebook --execute --inplace`` does, offline on the embedded model
(``QWEN_LAB_MODEL=qwen-lab/tiny-chat``, ``HF_HUB_OFFLINE=1``), each notebook in its own folder
(where a Chinese notebook learns its language), with one difference. nbconvert's executor
(nbclient) plays the browser's part for an ``ipywidgets.Output`` widget (``interactive`` draws into
one): it records what the widget shows, and also sends each change back to the kernel, on the
shell channel that its wait for the cell's reply reads. On a busy 2-core machine the run then
sometimes sits idle, kernel and client both (py-spy shows both waiting), until the cell's timeout
(300 s here), and goes on as if nothing happened: a lost wake-up, it seems (not traced further
than this). Measured here (2 cores, beside two busy
processes; nbclient 0.11.0, jupyter_client 8.10.0, pyzmq 27.3.0): a 3-cell notebook with one
``interactive`` stalled in 8 of 21 nbconvert runs and in none of 24 without the send-back; notebook
05 in 3 of 9 runs with ipykernel 7.4 and 1 of 10 with ipykernel 6.31. So this script records the
widget's outputs the same way and sends nothing back (no notebook here reads a widget's outputs
from the kernel). nbval, which checks the notebooks in CI, plays no widget and is not affected.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 300  # seconds; every cell here takes seconds


def recording_output_widget():
    """nbclient's Output-widget mimic, without the send-back to the kernel."""
    from nbclient.output_widget import OutputWidget

    class RecordingOutputWidget(OutputWidget):
        def sync_state(self) -> None:
            """The browser would tell the kernel what the widget now shows; a recording needs only its copy."""

    return RecordingOutputWidget


def execute(path: Path) -> float:
    """Run the notebook at ``path`` in its folder and write it back with its outputs; the seconds it took."""
    import nbformat
    from nbclient import NotebookClient
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(path.parent)}})
    client.widget_registry["@jupyter-widgets/output"]["OutputModel"] = recording_output_widget()
    start = time.perf_counter()
    client.execute()
    nbformat.write(notebook, path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook of every edition")
    args = p.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb")) + sorted(NOTEBOOKS.glob("*/*.ipynb"))
    os.environ.setdefault("QWEN_LAB_MODEL", "qwen-lab/tiny-chat")  # the kernels inherit these
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for path in paths:
        print(f"{path}: {execute(path.resolve()):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/execute_notebooks.py: outputs saved in place, in the notebook's folder, the Output widget recorded
and nothing sent back to the kernel (the send-back that stalled nbconvert's runs on a busy machine)."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipywidgets")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import execute_notebooks  # noqa: E402

CELLS = [
    "import os\nimport ipywidgets as w\n\ndef f(x=1.0):\n    print('x is', x)\n",
    "ui = w.interactive(f, x=w.FloatSlider(value=1.5, min=0, max=2))\nui",
    "print(os.path.basename(os.getcwd()), os.environ['HF_HUB_OFFLINE'], len(ui.out.outputs))",
]


def test_a_notebook_runs_in_its_folder_and_its_output_widget_is_recorded_not_sent_back(tmp_path):
    folder = tmp_path / "zh-TW"
    folder.mkdir()
    path = folder / "n.ipynb"
    path.write_text(json.dumps({
        "cells": [{"cell_type": "code", "metadata": {}, "source": c, "outputs": [], "execution_count": None,
                   "id": f"c{i}"} for i, c in enumerate(CELLS)],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}))
    assert execute_notebooks.main([str(path)]) == 0
    saved = json.loads(path.read_text())
    # its folder's name; offline; the kernel's copy of the widget's outputs empty (nothing sent back)
    assert "".join(saved["cells"][2]["outputs"][0]["text"]) == "zh-TW 1 0\n"
    state = saved["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    shown = [m["state"]["outputs"] for m in state.values() if m["model_name"] == "OutputModel"]
    assert [[(o["output_type"], "".join(o["text"])) for o in outputs] for outputs in shown] == \
        [[("stream", "x is 1.5\n")]]  # what a reader sees in the widget

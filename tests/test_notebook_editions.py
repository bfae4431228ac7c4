"""The notebook editions: English, Traditional Chinese (zh-TW/) and solved (solutions/), kept in step.

nbval executes every edition (``--nbval notebooks`` recurses into both folders) and compares the
outputs with the committed ones; these tests check what nbval cannot: that the editions run the
same code, that each exercise's check answers "not yet" while unsolved (run here, cell by cell)
and "right" once solved, and that the Chinese edition is translated.
"""
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ENGLISH = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
NAMES = [p.name for p in ENGLISH]
CJK = re.compile(r"[\u4e00-\u9fff]")

sys.path.insert(0, str(NOTEBOOKS.parent / "scripts"))
import sync_editions  # noqa: E402


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def tagged(path: Path, tag: str) -> list[dict]:
    return [c for c in cells(path) if tag in c.get("metadata", {}).get("tags", [])]


def printed(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o["output_type"] == "stream")


def test_there_are_seven_notebooks_in_each_edition():
    assert len(NAMES) == 7
    for edition in ("zh-TW", "solutions"):
        assert sorted(p.name for p in (NOTEBOOKS / edition).glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_the_chinese_edition_runs_the_english_code(name):
    english, chinese = cells(NOTEBOOKS / name), cells(NOTEBOOKS / "zh-TW" / name)
    assert [c["cell_type"] for c in chinese] == [c["cell_type"] for c in english]
    for k, (en, zh) in enumerate(zip(english, chinese)):
        if en["cell_type"] == "code":
            assert source(zh) == source(en), f"{name}, cell {k}: the code differs from the English edition"
            assert zh.get("metadata", {}).get("tags", []) == en.get("metadata", {}).get("tags", []), f"cell {k}"
        else:
            assert CJK.search(source(zh)), f"zh-TW/{name}, cell {k}: not translated"


@pytest.mark.parametrize("name", NAMES)
def test_solutions_differ_from_the_notebook_only_in_the_exercise_cells(name):
    english, solved = cells(NOTEBOOKS / name), cells(NOTEBOOKS / "solutions" / name)
    assert [c["cell_type"] for c in solved] == [c["cell_type"] for c in english]
    exercises = 0
    for k, (en, so) in enumerate(zip(english, solved)):
        if en["cell_type"] != "code":
            continue
        if "exercise" in en.get("metadata", {}).get("tags", []):
            exercises += 1
            assert source(so) != source(en), f"solutions/{name}, cell {k}: the exercise is not solved"
        else:
            assert source(so) == source(en), f"solutions/{name}, cell {k}: differs outside an exercise"
    assert 2 <= exercises <= 3


def test_the_editions_are_in_step():
    """What scripts/sync_editions.py would copy: nothing (run it after changing an English notebook)."""
    for path in ENGLISH:
        for kind in sync_editions.EDITIONS:
            _, changes = sync_editions.synced(json.loads(path.read_text(encoding="utf-8")),
                                              json.loads((NOTEBOOKS / kind / path.name).read_text(encoding="utf-8")),
                                              kind, path.name)
            assert changes == [], f"{kind}/{path.name}: {changes}"


@pytest.mark.parametrize("edition, verdict", [("", "✗ not yet: "), ("zh-TW", "✗ 還沒："), ("solutions", "✓ right: ")])
def test_the_committed_checks_say_not_yet_or_right(edition, verdict):
    for name in NAMES:
        checks = tagged(NOTEBOOKS / edition / name, "exercise-check")
        assert len(checks) == len(tagged(NOTEBOOKS / name, "exercise")) >= 2
        for cell in checks:
            out = printed(cell)
            assert out.startswith(verdict) and out.count("\n") == 1, f"{edition}/{name}: {out!r}"


# ---------------------------------------------------------------- the unsolved exercises, run

@pytest.fixture(scope="module")
def notebook_names():
    """What a check cell may use besides the learner's answer: the notebooks' own objects, made here."""
    pytest.importorskip("ipywidgets")
    from qwen_lab.generation import ChatModel
    from qwen_lab.hub import resolve
    from qwen_lab.panel import ChatPanel
    chat = ChatModel.load("qwen-lab/tiny-chat", dtype="float32", device="cpu")
    panel = ChatPanel(chat)
    return {"MODEL": "qwen-lab/tiny-chat", "files": resolve("qwen-lab/tiny-chat"), "chat": chat,
            "model": chat.model, "panel": panel}


@pytest.mark.parametrize("name", NAMES)
def test_unsolved_exercises_run_and_their_checks_say_not_yet(name, notebook_names, monkeypatch, tmp_path):
    monkeypatch.delenv("QWEN_LAB_LANG", raising=False)
    monkeypatch.chdir(tmp_path)
    notebook = cells(NOTEBOOKS / name)
    pairs = [(c, notebook[k + 1]) for k, c in enumerate(notebook)
             if "exercise" in c.get("metadata", {}).get("tags", [])]
    assert pairs and all("exercise-check" in check["metadata"]["tags"] for _, check in pairs)
    for exercise, check in pairs:
        names = dict(notebook_names)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(source(exercise), names)  # as committed: a blank (...) or a stub function
            exec(source(check), names)
        lines = out.getvalue().splitlines()
        assert lines and lines[-1].startswith("✗ not yet: "), f"{name}: {out.getvalue()!r}"


LINK = re.compile(r"\]\(([^)\s]+)\)")
ALL_NOTEBOOKS = ENGLISH + sorted(NOTEBOOKS.glob("zh-TW/*.ipynb")) + sorted(NOTEBOOKS.glob("solutions/*.ipynb"))


def heading_anchors(markdown: Path) -> set[str]:
    """The anchors GitHub and JupyterLab give a Markdown file's headings ("## Teaching a workshop" ->
    teaching-a-workshop)."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in markdown.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def local_links(path: Path) -> list[str]:
    return [link for c in cells(path) if c["cell_type"] == "markdown" for link in LINK.findall(source(c))
            if not re.match(r"[a-z]+:|#", link)]


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: str(p.relative_to(NOTEBOOKS)))
def test_every_link_of_a_notebook_opens_a_file_of_the_repository(path):
    """A link to a missing file, or out of the repository (one ``../`` too many), is a 404 in JupyterLab."""
    root = NOTEBOOKS.parent
    for link in local_links(path):
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(root) and resolved.exists(), f"{path.name}: {link} is not a file of the kit"
        if anchor and resolved.suffix == ".md":
            assert anchor in heading_anchors(resolved), f"{path.name}: {link}: no such heading in {target}"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS + [NOTEBOOKS / "GLOSSARY.md", NOTEBOOKS.parent / "README.md"],
                         ids=lambda p: str(p.relative_to(NOTEBOOKS.parent)))
def test_bold_and_italics_render_as_such(path):
    """CommonMark closes ``**`` after punctuation only before a space or more punctuation: ``**導覽。**輸入``
    showed its asterisks in JupyterLab (the Chinese edition had six). Rendered here by a CommonMark parser."""
    import markdown_it  # the test extra
    md = markdown_it.MarkdownIt("commonmark").enable("table")
    texts = ([source(c) for c in cells(path) if c["cell_type"] == "markdown"] if path.suffix == ".ipynb"
             else [path.read_text(encoding="utf-8")])
    for text in texts:
        rendered = re.sub(r"<code>.*?</code>|<pre>.*?</pre>", "", md.render(text), flags=re.S)
        left = [line for line in rendered.splitlines() if "**" in line]
        assert not left, f"{path.name}: asterisks shown as text: {left[0][:120]}"

"""Keep the notebook editions in step with the English notebooks.

    python scripts/sync_editions.py           # copy the English code into notebooks/zh-TW/ and notebooks/solutions/
    python scripts/sync_editions.py --check   # only say what differs (exit 1 if anything does)

The English notebooks (``notebooks/NN_name.ipynb``) are the source. Every edition has the same cells
in the same order:

* ``notebooks/zh-TW/`` — Traditional Chinese: its markdown is its own (the translation), its code
  cells are the English ones, byte for byte, with their tags (``tests/test_notebook_editions.py``
  checks it);
* ``notebooks/solutions/`` — the English notebooks with the exercises solved: every cell is the
  English one, except the code cells tagged ``exercise``, which hold the solutions; markdown links
  that leave the folder get one more ``../``.

A code cell copied here loses its outputs when its code changed: re-execute the notebook afterwards
(``python scripts/execute_notebooks.py PATH``). A change in the *number or kind* of the
English cells cannot be copied blindly: the script names the notebook and stops, so a translator
adds or removes the Chinese cell by hand.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EDITIONS = ("zh-TW", "solutions")
EXERCISE = "exercise"  # the tag of a cell the learner completes


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write(path: Path, notebook: dict) -> None:
    path.write_text(json.dumps(notebook, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def lines(text: str) -> list[str]:
    """A cell's source as nbformat writes it (one string per line), so a copy diffs like an edit."""
    return text.splitlines(keepends=True)


def tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def one_folder_down(markdown: str) -> str:
    """Markdown links out of ``notebooks/`` (``../qwen_lab/...``) or to its folders, seen from a subfolder."""
    markdown = re.sub(r"\]\(solutions/", "](", markdown)  # a link to the solutions, from inside them
    return re.sub(r"\]\((\.\./|data/|GLOSSARY\.md|zh-TW/)", lambda m: "](../" + m.group(1), markdown)


def solutions_markdown(english: str, name: str, first: bool) -> str:
    """The markdown of a solved notebook: the English, one folder down; the title cell says what this is."""
    text = one_folder_down(english)
    if first:
        text += (f"\n\n*Solutions: this is [{name}](../{name}) with its exercises worked out; every check at the "
                 f"end says ✓ right.*")
    return text


def synced(english: dict, edition: dict, kind: str, name: str) -> tuple[dict, list[str]]:
    """``edition`` with the English code (and, for solutions, markdown) copied in, and what changed."""
    ours, theirs = english["cells"], edition["cells"]
    if [c["cell_type"] for c in ours] != [c["cell_type"] for c in theirs]:
        raise SystemExit(f"the cells of the {kind} edition no longer match the English ones (count or kind): "
                         f"add or remove the cell there by hand, then run this again")
    out, changes = copy.deepcopy(edition), []
    for k, (en, cell) in enumerate(zip(ours, out["cells"])):
        if cell["cell_type"] == "markdown":
            wanted = solutions_markdown(source(en), name, k == 0) if kind == "solutions" else source(cell)
            if source(cell) != wanted:
                cell["source"] = lines(wanted)
                changes.append(f"cell {k} (markdown)")
            continue
        keep_solution = kind == "solutions" and EXERCISE in tags(en)
        if not keep_solution and source(cell) != source(en):
            cell["source"], cell["outputs"], cell["execution_count"] = lines(source(en)), [], None
            changes.append(f"cell {k} (code)")
        if tags(cell) != tags(en):  # nbval-ignore-output, exercise... (the rest of the metadata is the run's)
            cell.setdefault("metadata", {})["tags"] = list(tags(en))
            changes.append(f"cell {k} (tags)")
    return out, changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if an edition differs")
    args = parser.parse_args(argv)
    differs = False
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        english = read(path)
        for kind in EDITIONS:
            other = NOTEBOOKS / kind / path.name
            if not other.exists():
                print(f"{other.relative_to(NOTEBOOKS)}: missing")
                differs = True
                continue
            notebook, changes = synced(english, read(other), kind, path.name)
            if changes:
                differs = True
                print(f"{other.relative_to(NOTEBOOKS)}: {', '.join(changes)}"
                      + ("" if args.check else " copied from English; re-execute it"))
                if not args.check:
                    write(other, notebook)
    return 1 if differs and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

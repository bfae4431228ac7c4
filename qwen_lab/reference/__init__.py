"""Small files of real models, shipped inside the package: their configs and chat templates, no weights.

The notebooks set the embedded tiny-chat beside the models it imitates: notebook 02 builds the real
``config.json`` of four models on the meta device, notebook 06 reads Qwen2.5's end-of-turn ids, the
exercises compute from Qwen2.5-1.5B's sizes. Those few kilobytes live here, in the package, rather
than in the repository's folders, so that they are found wherever qwen_lab is installed: from a clone,
with ``pip install qwen-lab`` on Colab, in the workshop's image, from a wheelhouse.

Each model has a folder named after its Hub id (``/`` written ``--``, as in the Hugging Face cache)
holding what was copied and a ``SOURCE.md`` saying where each file comes from and how sure that is;
Llama's folder also carries its licence agreement and notice, which travel with its files.

>>> from qwen_lab import reference
>>> reference.models()
['HuggingFaceTB/SmolLM2-1.7B-Instruct', 'Qwen/Qwen2.5-1.5B-Instruct', 'Qwen/Qwen3-0.6B', 'meta-llama/Llama-3.2-3B-Instruct']
>>> reference.path("Qwen/Qwen2.5-1.5B-Instruct", "config.json").name
'config.json'
>>> reference.path("Qwen/Qwen2.5-7B-Instruct")
Traceback (most recent call last):
...
qwen_lab.errors.QwenLabError: no reference files for 'Qwen/Qwen2.5-7B-Instruct': the kit ships HuggingFaceTB/SmolLM2-1.7B-Instruct, Qwen/Qwen2.5-1.5B-Instruct, Qwen/Qwen3-0.6B, meta-llama/Llama-3.2-3B-Instruct (download another model's files with `qwen-lab download`)
"""
from __future__ import annotations

from pathlib import Path

from ..errors import QwenLabError

__all__ = ["models", "path"]

HERE = Path(__file__).resolve().parent


def models() -> list[str]:
    """The Hub ids of the models whose small files ship here, sorted."""
    return sorted(folder.name.replace("--", "/", 1) for folder in HERE.iterdir()
                  if folder.is_dir() and (folder / "SOURCE.md").is_file())


def path(model: str, filename: str | None = None) -> Path:
    """The folder of ``model`` (a Hub id, e.g. ``"Qwen/Qwen3-0.6B"``), or its file ``filename`` in it.

    Only the names listed by ``models()``, and only files of their folders: anything else (another
    model, a file that was not copied, a path like ``../x``) is a one-line ``QwenLabError``.
    """
    known = models()
    if model not in known:
        raise QwenLabError(f"no reference files for {model!r}: the kit ships {', '.join(known)} "
                           f"(download another model's files with `qwen-lab download`)"[:400])
    folder = HERE / model.replace("/", "--", 1)
    if filename is None:
        return folder
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    if filename not in files:  # a name from the listing, never a path: nothing outside the folder
        raise QwenLabError(f"{model} has no reference file {filename!r}: the kit ships {', '.join(files)} "
                           f"of it (the weights and tokenizer.json come with `qwen-lab download`)"[:400])
    return folder / filename

"""Which language the kit speaks to a learner: English, or Traditional Chinese (Taiwan).

The chat panel's labels and the exercises' one-line verdicts come in two languages. The
notebooks of both editions run *the same code* (a test keeps their code cells identical), so
the Chinese edition cannot pass ``lang="zh-TW"`` by hand. The language is therefore, first
found first:

1. the ``lang`` argument, when the caller gives one;
2. the environment variable ``QWEN_LAB_LANG`` (``en`` or ``zh-TW``);
3. the name of the working directory: Jupyter runs a notebook in the notebook's folder, so a
   notebook of ``notebooks/zh-TW/`` speaks Chinese;
4. English.

>>> choose_language("zh_tw")
'zh-TW'
>>> choose_language("fr")
Traceback (most recent call last):
...
qwen_lab.errors.SettingError: lang must be 'en' or 'zh-TW', not 'fr'
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import SettingError

LANGUAGES = ("en", "zh-TW")
DEFAULT = "en"
ENV = "QWEN_LAB_LANG"


def _known(code: str) -> str | None:
    """The language a code names, written any common way (zh-TW, zh_tw, ZH-tw), or None."""
    wanted = code.strip().replace("_", "-").lower()
    return next((lang for lang in LANGUAGES if lang.lower() == wanted), None)


def choose_language(lang: str | None = None) -> str:
    """``lang`` if given, else ``QWEN_LAB_LANG``, else the working directory's name, else English."""
    choices = " or ".join(repr(code) for code in LANGUAGES)
    if lang is not None:
        if not isinstance(lang, str) or _known(lang) is None:
            raise SettingError(f"lang must be {choices}, not {lang!r}"[:200])
        return _known(lang)
    env = os.environ.get(ENV, "")
    if env.strip():
        if _known(env) is None:
            raise SettingError(f"{ENV} is {env!r}, a language qwen_lab does not speak: set it to {choices}, "
                               f"or unset it"[:200])
        return _known(env)
    try:
        folder = Path.cwd().name
    except OSError:  # the working directory was deleted: no hint there
        folder = ""
    return _known(folder) or DEFAULT

"""The errors qwen_lab raises: each says what is wrong and what to do, in one line.

Catch ``QwenLabError`` to handle them all; the CLI prints ``str(error)`` and exits.

A name put into a message (a folder's path, a model's) may hold a newline, a terminal's escape or
bytes that are not UTF-8: ``shown`` and ``shell_word`` write it on one line, and ``one_line`` makes
sure of a whole message, so that a folder named ``"x\nok    model       ..."`` cannot print a
line of its own that reads as another verdict.
"""
import os
import shlex

#: How the shell's ``$'...'`` writes the characters it must escape; any other is written as its bytes, ``\xHH``.
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", "'": "\\x27"}


class QwenLabError(Exception):
    """Base class of every error qwen_lab raises on bad input."""


class DownloadError(QwenLabError):
    """A model's files cannot be had: repo missing or gated, offline and not cached, file absent."""


class CheckpointError(QwenLabError):
    """A weights file is missing, truncated, corrupt, or does not fit the config."""


class UnsupportedArchitectureError(QwenLabError):
    """``config.json`` names an architecture this kit does not implement."""


class TemplateError(QwenLabError):
    """The chat template failed to render, or tried something the sandbox forbids."""


class ContextTooLongError(QwenLabError):
    """The prompt does not leave room for even one new token in the model's context."""


class SettingError(QwenLabError, ValueError):
    """A setting has a value it cannot have (temperature, dtype, device, threads...); the message names it.

    Also a ``ValueError``, as a bad argument value is in Python.
    """


class ModelReleasedError(QwenLabError):
    """A chat panel's model was released (``ChatPanel.load`` keeps one model in memory): load it again."""


class NumericalError(QwenLabError):
    """The model computed NaN or infinite logits: its weights or its config are broken."""


def shown(name) -> str:
    r"""``name`` (a path, a model) as a message shows it: as it is, or, where it holds a character that is
    not printable, as ``shell_word`` quotes it, on one line.

    >>> print(shown("/srv/models/Qwen2.5 0.5B"), shown("/tmp/x\nok  model"))
    /srv/models/Qwen2.5 0.5B $'/tmp/x\nok  model'
    """
    name = str(name)
    return name if name.isprintable() else shell_word(name)


def shell_word(name) -> str:
    r"""``name`` as one word of a shell command, on one line, to be copied and pasted: ``shlex.quote``'s, or,
    where it holds a character that is not printable (a newline, a terminal's escape, a byte that is not
    UTF-8, which Python reads as a lone surrogate), the ``$'...'`` of bash, zsh and POSIX 2024, each such
    character written as its bytes. A quote inside is ``\x27``, never ``\'``: a shell without ``$'...'``
    (dash) reads ``$`` and then one quoted word, a wrong name but never a command.

    >>> print(shell_word("my models/it's"), shell_word("a\tb\udcff'"))
    'my models/it'"'"'s' $'a\tb\xff\x27'
    """
    name = str(name)
    if name.isprintable():
        return shlex.quote(name)
    return "$'" + "".join(_escaped(c) if c in _ESCAPES or not c.isprintable() else c for c in name) + "'"


def one_line(text) -> str:
    r"""``text`` with each character that is not printable written as its escape (``\n``, ``\x1b``...): the
    last guard of a message printed as one line, whatever names went into it."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    try:
        data = os.fsencode(char)  # a byte of a file's name that is not UTF-8: that byte
    except UnicodeError:  # a lone surrogate no file name holds (from JSON): its code point's bytes
        data = char.encode("utf-8", "surrogatepass")
    return "".join(f"\\x{b:02x}" for b in data)

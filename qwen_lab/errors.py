"""The errors qwen_lab raises: each says what is wrong and what to do, in one line.

Catch ``QwenLabError`` to handle them all; the CLI prints ``str(error)`` and exits.
"""


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

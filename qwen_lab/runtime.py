"""Speed-ups, applied as one explicit conversion after a model is built and loaded.

``qwen_lab.layers`` and ``qwen_lab.architectures`` describe the computation and stay the
reference. ``convert_for_runtime`` then replaces some modules of a loaded model with
*twins* that compute the same thing faster on this machine, and says what it replaced:

    on a CPU, every ``nn.Linear``      -> ``kernels.Linear``    one row (a decode step) by a C loop that
                                                                streams the weights at memory speed, in the
                                                                way measured fastest for its shape on this
                                                                CPU (``tuning``); a bf16 prompt in float32
                                                                where the CPU lacks bf16
               every ``layers.RMSNorm`` -> ``kernels.RMSNorm``   one row in one C call
               every ``layers.Attention`` -> ``kernels.Attention`` a token's attention step in one C call
               every ``layers.DecoderLayer`` -> ``kernels.DecoderLayer`` a token's whole layer in one C call,
                                                                once its parts are the twins above
               ``layers.DecoderModel`` -> ``kernels.DecoderModel``  and every layer in one, once each
                                                                layer is that twin

A twin holds the very same parameter tensors (nothing is copied, tied weights stay tied)
and falls back to its original's code whenever its fast path does not apply (a prompt,
gradients, a dtype it does not handle). What both sides rely on is written down where both
can see it: the KV cache's layout in ``layers.KVCache``, the C signatures in ``kernels.py``.

>>> from qwen_lab.hub import resolve
>>> from qwen_lab.load import load_model
>>> model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu", matvec="none")  # the reference
>>> ids = torch.tensor([[5, 17, 300]])
>>> with torch.inference_mode():
...     before = model(ids)
...     replaced = convert_for_runtime(model, "cpu")        # what, and by what: see summary()
...     torch.allclose(model(ids), before, atol=1e-5)
True
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from . import kernels, layers, tuning
from .errors import SettingError

MATVECS = ("auto", "torch", "none")


def twin(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A new module of class ``cls`` holding ``module``'s very parameters, buffers and submodules."""
    new = cls.__new__(cls)
    # each dict copied as its own type: torch keeps hooks in OrderedDicts that a hook's handle refers to weakly
    new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    return new


def choose_twin(module: nn.Module, device: torch.device, matvec: str) -> type[nn.Module] | None:
    """The twin class that should replace ``module`` here, or None to keep it."""
    if device.type != "cpu" or matvec == "none":
        return None
    c_kernels = matvec == "auto" and kernels.available()
    weight = next(module.parameters(recurse=False), None)
    if type(module) is nn.Linear:
        if c_kernels and weight.dtype in kernels.DTYPES:
            return kernels.Linear
        if weight.dtype == torch.bfloat16 and not kernels.native_bf16():  # bf16 prompts in float32
            return TorchLinear
    elif c_kernels and type(module) is layers.RMSNorm and weight.dtype in kernels.DTYPES:
        return kernels.RMSNorm
    elif c_kernels and type(module) is layers.Attention and kernels.attention_applies(module) \
            and module.q_proj.weight.dtype in kernels.DTYPES:
        return kernels.Attention
    elif c_kernels and type(module) is layers.DecoderLayer and kernels.layer_applies(module):
        return kernels.DecoderLayer
    elif c_kernels and type(module) is layers.DecoderModel \
            and all(type(layer) is kernels.DecoderLayer for layer in module.layers):
        return kernels.DecoderModel
    return None


class TorchLinear(kernels.Linear):
    """``kernels.Linear`` without the C kernel (``matvec="torch"``, or none could be built)."""

    use_kernel = False


def convert_for_runtime(model: nn.Module, device: torch.device | str = "cpu", matvec: str = "auto"
                        ) -> list[tuple[str, str, str]]:
    """Replace modules with their faster twins, in place; returns ``(name, from, to)`` for each.

    ``matvec``: ``auto`` uses the C kernels where they can be built; ``torch`` keeps torch's own
    products (only the bf16-prompt twin); ``none`` converts nothing (the plain reference model).
    Children are converted before their parents, so an attention twin holds converted projections.
    """
    if matvec not in MATVECS:
        raise SettingError(f"matvec {matvec!r} is not one of {', '.join(MATVECS)}")
    device = torch.device(device)
    replaced = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            visit(child, path + ".")
            cls = choose_twin(child, device, matvec)
            if cls is not None:
                new = twin(cls, child)
                if cls is kernels.Linear:  # the fastest way for this weight shape on this machine, measured once
                    new.plan = tuning.plan_for(child.out_features, child.in_features, child.weight.dtype)
                setattr(parent, name, new)
                replaced.append((path, _label(type(child)), _label(cls)))

    visit(model, "")
    return replaced


def _label(cls: type) -> str:
    return {nn.Linear: "nn.Linear"}.get(cls, f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}")


def summary(replaced: list[tuple[str, str, str]]) -> list[str]:
    """``["nn.Linear -> kernels.Linear", ...]`` with a count where a kind of swap repeats."""
    counts = Counter(f"{old} -> {new}" for _, old, new in replaced)
    return [f"{swap} (x{n})" if n > 1 else swap for swap, n in sorted(counts.items())]

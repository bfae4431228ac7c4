"""A room's shared cache: the decode kernels compiled, and their plans measured, once, before the day.

Each learner's kernel, at its first model with the C kernels, compiles them (``kernels``) and
measures a plan for each weight shape of 1 MiB and more (``tuning``) in its own
``~/.cache/qwen_lab``. In a room that is 30 learners at notebook 02 at once (tiny-chat's head,
2048 x 192 in float32, is 1.5 MiB: measured), and again at notebook 07 with a real model: 30
compilers, and 30 measurements each slowed by the 29 others, so that each learner may keep a
worse plan for good, each cycling through 128-512 MiB of copies of its matrix.

``prepare`` (the command ``qwen-lab tune``) does it once, quietly, for the room's models and the
learners' thread count (plans are kept per CPU, thread count and kernel build), into a folder the
learners read through ``QWEN_LAB_SHARED_CACHE`` (``kernels.shared_cache_dir``) and never write.
Only each model's ``config.json`` is read: the shapes come from the architecture built on the
meta device, in the dtype the notebooks load the model in. ``missing`` says, without building or
measuring anything, what a folder lacks (the hub's start check).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import kernels, tuning
from .errors import DownloadError, QwenLabError, shell_word, shown
from .hub import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID
from .hub_guard import is_repo_id
from .load import build_model, checkpoint_dtype, choose_dtype, read_config, suggested_dtype


def model_config(model: str, cache_dir: str | os.PathLike | None = None) -> dict:
    """``model``'s ``config.json``, and nothing else of it: the embedded model's, a model folder's, or a Hub
    model's from the Hugging Face cache (``cache_dir``, default ``HF_HUB_CACHE``)."""
    name = str(model)
    if name == EMBEDDED_MODEL_ID:
        return read_config(EMBEDDED_MODEL_DIR / "config.json")
    folder = Path(name).expanduser()
    if folder.is_dir():
        return read_config(folder / "config.json")
    if not is_repo_id(name):
        raise DownloadError(f"{name!r} is neither a model directory nor a Hub repo id like 'Qwen/Qwen2.5-1.5B-Instruct'")
    from huggingface_hub import constants, try_to_load_from_cache
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    found = try_to_load_from_cache(name, "config.json", cache_dir=cache)
    if not isinstance(found, str):
        raise DownloadError(f"{name} is not in the cache {shown(cache)}: `qwen-lab download --cache-dir "
                            f"{shell_word(cache)} {name}` first")
    return read_config(found)


def weight_shapes(model: str, cache_dir: str | os.PathLike | None = None) -> list[tuple[int, int, torch.dtype]]:
    """``(out, in, dtype)`` of each matrix of ``model`` that ``tuning`` measures on a CPU, in the dtype the
    notebooks load it in (``load.suggested_dtype``: float32 for tiny-chat, the checkpoint's own for a real one).

    >>> weight_shapes("qwen-lab/tiny-chat")   # its head; the other matrices are under tuning.TUNE_MIN_BYTES
    [(2048, 192, torch.float32)]
    """
    config = model_config(model, cache_dir)
    dtype = choose_dtype(suggested_dtype(str(model)), torch.device("cpu"), checkpoint_dtype(config))
    if dtype not in kernels.DTYPES:
        return []
    shapes = []
    for m in build_model(config, "meta").modules():  # shapes only: no memory
        shape = (m.out_features, m.in_features, dtype) if type(m) is nn.Linear else None
        if shape and shape not in shapes and m.out_features * m.in_features * dtype.itemsize >= tuning.TUNE_MIN_BYTES:
            shapes.append(shape)
    return shapes


def _kernels_can_run() -> bool:
    """Could the kernels run here (a compiler, a CPU with AVX2 and FMA), asked without building them?"""
    return kernels.library_name() is not None and set(kernels.VARIANTS["avx2"][2]) <= kernels.cpu_flags()


def missing(directory: Path, models: list[str], threads: int, cache_dir: str | os.PathLike | None = None
            ) -> str | None:
    """What ``directory`` lacks for learners of ``models`` with ``threads`` threads each on this machine, in
    words (None: nothing, or the kernels cannot run here anyway). Builds and measures nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} does not exist"
    if not _kernels_can_run():
        return None
    name = kernels.library_name()
    if not (directory / name).is_file():
        return f"{directory} holds no build of this kit's kernels ({name})"
    wanted = {}  # model -> the keys of its shapes
    for model in models:
        try:
            wanted[model] = [tuning.shape_key(*shape) for shape in weight_shapes(model, cache_dir)]
        except (QwenLabError, ValueError):
            continue  # a model not in the cache: the hub's own check says so
    if not any(wanted.values()):
        return None  # no matrix large enough to be measured: the kernels are all it takes
    try:
        plans = json.loads((directory / tuning.plans_file_name(threads)).read_text())
    except (OSError, ValueError):
        plans = None
    if not isinstance(plans, dict):
        return (f"{directory} holds no plans for {kernels.cpu_model() or 'this CPU'} with {threads} "
                f"thread{'s' if threads > 1 else ''} per learner")
    for model, keys in wanted.items():
        absent = [key for key in keys if key not in plans]
        if absent:
            return f"{directory} holds no plan for {model}'s {', '.join(absent)}"
    return None


@contextlib.contextmanager
def _filling(directory: Path, threads: int):
    """This process builds into and measures for ``directory`` with ``threads`` threads, and reads no other
    cache; everything as it was afterwards."""
    names = ("QWEN_LAB_CACHE", "QWEN_LAB_SHARED_CACHE", "QWEN_LAB_TUNING")
    saved_env, saved_threads, saved_memory = {n: os.environ.get(n) for n in names}, kernels._threads, dict(tuning._memory)
    os.environ["QWEN_LAB_CACHE"] = str(directory)
    os.environ.pop("QWEN_LAB_SHARED_CACHE", None)
    os.environ.pop("QWEN_LAB_TUNING", None)
    kernels.set_num_threads(threads)
    kernels._library.cache_clear()
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        kernels._threads = saved_threads
        tuning._memory.clear()
        tuning._memory.update(saved_memory)
        kernels._library.cache_clear()


#: What ``cannot_write`` writes: more than a room's folders first need (the kernels, 0.3 MB; the hub's database; a
#: learner's copy of the notebooks, 2 MB), so that a disk all but full is caught too.
PROBE_BYTES = 4 << 20


def cannot_write(folder: Path) -> str | None:
    """Why this user cannot write ``PROBE_BYTES`` into ``folder`` now, in the system's words ("Read-only file
    system", "No space left on device", "Permission denied"), or None. The probe is a file without a name:
    nothing is left behind, even if this process dies."""
    try:
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        return e.strerror or str(e)
    return None


def _readable(path: Path) -> None:
    """Readable by everyone (the learners are other users), whatever umask or mkstemp gave it."""
    path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def prepare(directory: Path, models: list[str], threads: int, cache_dir: str | os.PathLike | None = None,
            say=print) -> Path:
    """Compile the kernels into ``directory`` and measure afresh, with ``threads`` threads, a plan for each
    weight shape of ``models``; ``say`` gets one line per step. Returns the plans file (what learners with
    ``QWEN_LAB_THREADS=threads`` on a CPU like this one read). Run it on a quiet machine: what it measures,
    every learner uses."""
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise QwenLabError(f"the threads per learner must be a whole number, at least 1, not {threads!r}")
    directory = Path(directory).expanduser().absolute()
    shapes = {model: weight_shapes(model, cache_dir) for model in models}  # a missing model stops it here
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= 1:
        say(f"warning: this machine is busy (load average {load:.1f} over the last minute): plans measured now "
            f"may be worse ones, and every learner would keep them; run this again when it is quiet")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QwenLabError(f"cannot create {directory}: {e.strerror}") from None
    reason = cannot_write(directory)  # else the build fails, and says the kernels cannot be built here at all
    if reason is not None:
        raise QwenLabError(f"cannot write into {directory}: {reason}; give `--kernel-cache` a folder this user can "
                           f"write, on a disk with space left")
    name = kernels.library_name()
    built_before = name is not None and (directory / name).is_file()
    with _filling(directory, threads):
        try:
            kernels._library()
        except kernels.KernelUnavailable as e:
            raise QwenLabError(f"the C kernels cannot be built here ({e}): learners decode with torch, there is "
                               f"nothing to prepare") from None
        say(f"kernels: {directory / name} ({'already built' if built_before else 'compiled now'})")
        plans_file = directory / tuning.plans_file_name()
        done, busy = set(), {}
        for model, model_shapes in shapes.items():
            if not model_shapes:
                say(f"{model}: no matrix of {tuning.TUNE_MIN_BYTES >> 20} MiB or more: each takes the default plan, "
                    f"unmeasured")
            for out_features, in_features, dtype in model_shapes:
                key = tuning.shape_key(out_features, in_features, dtype)
                if key not in done:
                    plan, speeds, share = tuning.measure_watched(out_features, in_features, dtype)
                    done.add(key)
                    if not tuning._save(key, plan, speeds, share):  # busy: the plan measured before stays
                        say(f"{key}: measured while other programs kept this machine busy: the plan measured "
                            f"before is kept ({model})")
                        continue
                    if share is not None:
                        busy[key] = share
                    say(f"{key}: {plan} ({speeds[str(plan)] / 1e9:.1f} GB/s; {model})")
        if busy:  # the plans are kept marked "busy"; a room's learners use them as they are all the same
            say(f"warning: other programs kept this machine busy while measuring {', '.join(busy)} (up to "
                f"{max(busy.values()):.2f} cores on average): these plans may be worse ones, and a room's learners "
                f"use them as they are; run this again when it is quiet")
        kept = set()
        with contextlib.suppress(OSError, ValueError):
            kept = set(json.loads(plans_file.read_text()))
        if not done <= kept:
            raise QwenLabError(f"cannot write the plans into {plans_file}: is {directory} writable by this user?")
    for path in (directory, directory / name, *([plans_file] if done else [])):
        _readable(path)
    say(f"plans: {plans_file} (for {kernels.cpu_model() or 'this CPU'}, {threads} thread"
        f"{'s' if threads > 1 else ''}); learners read this folder with QWEN_LAB_SHARED_CACHE={directory}")
    return plans_file


__all__ = ["cannot_write", "missing", "model_config", "prepare", "weight_shapes"]

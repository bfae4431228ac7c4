"""``qwen-lab doctor``: is this machine ready for the walkthrough? Asked offline, answered one line per check.

    qwen-lab doctor                                     # the notebooks' model (QWEN_LAB_MODEL, else Qwen2.5-1.5B)
    qwen-lab doctor --cache-dir /srv/hf-cache Qwen/Qwen2.5-1.5B-Instruct
    qwen-lab doctor --wheelhouse wheelhouse/            # also: can pip install the kit from this folder alone?

A room without network finds out what is missing before the workshop, not during it. Nothing
here touches the network: models are looked up in the cache only, the wheelhouse is resolved
by pip with ``--no-index``. Each check prints one line: ``ok``, ``warn`` (it works, but read the
line) or ``FAIL`` (the walkthrough will not run here; the line says what to do). The exit code
is 1 when a check failed. A name the report quotes (a folder's, a model's) that holds a newline or
another character that is not printable is written as the shell would (``errors.shown``): a folder
cannot print a line of its own.

>>> check = check_model("qwen-lab/tiny-chat", cache_dir=None, required=True)
>>> check.status, check.detail.startswith("qwen-lab/tiny-chat: the embedded model")
('ok', True)
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import QwenLabError, one_line, shell_word, shown
from .hub import (EMBEDDED_MODEL_ID, REQUIRED_FILES, SINGLE_WEIGHTS, WALKTHROUGH_MODEL_ID, WEIGHTS_INDEX, ModelFiles,
                  resolve, shard_names)
from .hub_guard import blob_of, check_blob, is_repo_id

#: What a notebook holds on a CPU beside its model's weights: its Jupyter kernel's own memory (Python, torch and
#: qwen_lab, 0.22 GiB before any model; then the tokenizer, a KV cache: 0.26-0.38 GiB in all) and the Jupyter
#: server it runs in (0.11 GiB), measured through the workshop's hub (benchmarks/RESULTS.md, "Memory shared
#: between learners"); counted as 0.5.
RUNTIME_BYTES = int(0.5 * 2**30)
#: A safetensors header larger than this is not a language model's (as in load.py).
MAX_HEADER_BYTES = 100_000_000
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass
class Check:
    """One line of the report: ``status`` is ``ok``, ``warn`` or ``FAIL``."""

    name: str
    status: str
    detail: str
    files: ModelFiles | None = None  # a model check's files, for the checks that read them

    def line(self) -> str:
        return one_line(f"{self.status:<4}  {self.name:<10}  {self.detail}")  # names are shown() already: a guard


# ---------------------------------------------------------------- the models

def check_model(model: str, cache_dir: str | os.PathLike | None, required: bool, verify: bool = False) -> Check:
    """Are ``model``'s files all here, whole? ``required``: FAIL if not (else warn).

    Sizes are checked (every weights file as long as its safetensors header says);
    ``verify`` also hashes each cached file against the name the Hub gave it (about 1 s per GB).
    """
    from huggingface_hub import constants
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    fail = "FAIL" if required else "warn"
    try:
        files = resolve(model, cache_dir=cache, local_files_only=True)
    except QwenLabError as e:
        if not is_repo_id(model) or Path(model).expanduser().exists():
            return Check("model", fail, str(e))
        return Check("model", fail, f"{shown(model)}: {_what_is_missing(cache, model, e)}; "
                                    f"{_fill_advice(cache, model)}")
    paths = [files.config, files.tokenizer, files.tokenizer_config, files.generation_config, files.chat_template,
             files.weights_index, *files.weights]
    paths = [p for p in paths if p is not None]
    from_cache = model != EMBEDDED_MODEL_ID and not Path(model).expanduser().is_dir()
    for weights in files.weights:
        problem = weights_problem(weights)
        if problem:
            fix = _fill_advice(cache, model) if from_cache else f"copy the model folder {shown(files.root)} again"
            return Check("model", fail, f"{shown(model)}: {shown(weights.name)} {problem}; {fix}")
    hashed = ""
    if verify:
        blobs = [(path, blob_of(path)) for path in paths]
        for path, blob in blobs:
            problem = check_blob(blob) if blob is not None else None
            if problem:
                return Check("model", fail, f"{shown(model)}: {shown(path.name)} is damaged ({problem}); "
                             f"`{_download_command(cache, model)}` fetches it again")
        # only a cache's blobs are named by their hash; a folder's files have nothing to check against
        hashed = "; hashes checked" if any(b is not None for _, b in blobs) else "; not in a cache: no hashes to check"
    size = sum(p.stat().st_size for p in paths)
    if model == EMBEDDED_MODEL_ID:
        where = "the embedded model (inside the package: nothing to download)"
    else:
        where = f"complete in the cache {shown(cache)}" if from_cache else f"complete in the folder {shown(files.root)}"
    return Check("model", "ok", f"{shown(model)}: {where}; {len(paths)} files, {_size(size)} (sizes checked{hashed})",
                 files=files)


def weights_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file is not whole (shorter than its header says), or None.

    The header (8 bytes of length, then JSON) gives each tensor's byte range; a download cut
    short leaves a file that ends before the last one does.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                return f"is truncated or not a safetensors file ({size:,} bytes cannot hold its header)"
            header = json.loads(f.read(n))
        end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (ValueError, KeyError, TypeError, IndexError, RecursionError, AttributeError):
        return "has a corrupt header"
    expected = 8 + n + int(end)
    if size < expected:
        return f"is truncated: {size:,} of its {expected:,} bytes"
    return None


def _what_is_missing(cache: Path, repo_id: str, error: Exception) -> str:
    """Which of a model's files the cache lacks, in a few words (or the error, when none is missing)."""
    if not cache.is_dir():
        return f"the cache {shown(cache)} does not exist"
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    if not storage.is_dir():
        return f"not in the cache {shown(cache)}"
    present: set[str] = set()
    snapshot = None
    try:
        commit = (storage / "refs" / "main").read_text().strip()
        snapshot = storage / "snapshots" / commit
        present = {p.name for p in snapshot.iterdir() if p.is_file()}  # is_file follows the link to its blob
    except (OSError, ValueError):
        pass
    needed = list(REQUIRED_FILES)
    if SINGLE_WEIGHTS not in present and WEIGHTS_INDEX in present:
        try:
            needed += shard_names(snapshot / WEIGHTS_INDEX)
        except QwenLabError:
            needed.append(WEIGHTS_INDEX)
    elif SINGLE_WEIGHTS not in present:
        needed.append(SINGLE_WEIGHTS)
    missing = [name for name in needed if name not in present]
    interrupted = len(list((storage / "blobs").glob("*.incomplete")))
    if not missing:
        return str(error)
    names = ", ".join(map(shown, missing[:3])) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    more = f" ({interrupted} download(s) interrupted)" if interrupted else ""
    return f"incomplete in the cache {shown(cache)}: {names} missing{more}"


def _fill_advice(cache: Path, model: str) -> str:
    command = f"`{_download_command(cache, model)}`"
    if cache.is_dir() and not os.access(cache, os.W_OK):
        return f"the cache is read-only here: whoever owns it runs {command} where there is network"
    return f"fill it once where there is network: {command}"


def _download_command(cache: Path, model: str) -> str:
    return f"qwen-lab download --cache-dir {shell_word(cache)} {shell_word(model)}"


# ---------------------------------------------------------------- what will run

def check_runtime(model: str, files: ModelFiles) -> list[Check]:
    """The device, dtype and decoding path ``model`` will get here, and whether memory suffices."""
    import torch

    from . import kernels
    from .load import (available_memory, build_model, checkpoint_dtype, choose_dtype, count_parameters,
                       default_device, read_config, suggested_dtype)
    name = shown(model)
    try:
        config = read_config(files.config)
        device = default_device()
        saved = checkpoint_dtype(config)
        dtype = choose_dtype(suggested_dtype(model), device, saved)
        default = choose_dtype("auto", device, saved)  # `qwen-lab generate`'s and ChatModel.load's default
        params = count_parameters(build_model(config, "meta"))  # shapes only: no memory
    except (QwenLabError, ValueError) as e:
        return [Check("device", "FAIL", f"{name}: {e}")]
    dtype_name = str(dtype).removeprefix("torch.")
    status = "ok"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"the GPU {torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
        runs = "torch on CUDA"
        free, free_where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
        need = params * dtype.itemsize
    else:
        where = "the CPU" + (" (bf16 in hardware)" if kernels.native_bf16() else "")
        runs = kernels.status()
        status = "ok" if kernels.available() else "warn"
        free, free_where = available_memory(), "available"
        need = params * dtype.itemsize + RUNTIME_BYTES
    if default != dtype:  # tiny-chat: float32 in the notebooks (the same outputs everywhere), its own bf16 elsewhere
        dtype_name += (f" in the notebooks and the panel ({str(default).removeprefix('torch.')} in "
                       "`qwen-lab generate` and ChatModel.load unless --dtype or dtype= says otherwise)")
    checks = [Check("device", status, f"{name} runs in {dtype_name} on {where}; decoding: {runs}")]
    shared = " (one copy, shared by every process that loads this file)" if device.type == "cpu" and dtype == saved \
        else ""
    runtime = f" + about {RUNTIME_BYTES / 2**30:.2f} GiB for the notebook's Jupyter kernel and server"
    parts = f"{_count(params)} parameters x {dtype.itemsize} bytes{shared}" + (runtime if device.type == "cpu" else "")
    if free is None:
        checks.append(Check("memory", "warn", f"{name} needs {_gib(need)} ({parts}); this machine does not say "
                                              f"how much memory is free"))
    elif need > free:
        checks.append(Check("memory", "FAIL", f"{name} needs {_gib(need)} ({parts}) but only {_gib(free)} is "
                                              f"{free_where}: close other programs, or choose a smaller model "
                                              f"(QWEN_LAB_MODEL=Qwen/Qwen2.5-0.5B-Instruct)"))
    else:
        checks.append(Check("memory", "ok", f"{name} needs {_gib(need)} ({parts}); {_gib(free)} {free_where}"))
    return checks


def check_threads() -> Check:
    from .errors import SettingError
    from .threads import choose_threads
    try:
        count, why = choose_threads()
    except SettingError as e:
        return Check("threads", "FAIL", str(e))
    return Check("threads", "ok", f"{count} ({why})")


def check_plans(models: list[str], cache_dir: str | os.PathLike | None = None) -> list[Check]:
    """A line for each plans file of this machine holding plans measured while the machine was busy
    (``tuning``: provisional), naming them and how ``models`` (in ``cache_dir``) measure them again; no line
    where there are none."""
    from . import kernels, tuning
    from .errors import SettingError
    try:
        name, threads = tuning.plans_file_name(), kernels.num_threads()
    except SettingError:  # a bad QWEN_LAB_THREADS: the threads line says so
        return []
    shared, checks = kernels.shared_cache_dir(), []
    for path in ([shared / name] if shared is not None else []) + [kernels.cache_dir() / name]:
        busy = tuning.provisional(path)
        if not busy:
            continue
        what = (f"{', '.join(map(shown, busy))} in {shown(path)} measured while other programs kept the CPUs busy "
                f"(up to {max(busy.values()):.2f} cores on average)")
        covering, uncovered = _models_measuring(set(busy), models, cache_dir)
        tune = " ".join(["qwen-lab tune", *(["--kernel-cache", shell_word(shared), "--threads", str(threads)]
                                            if path.parent == shared else []),
                         *(["--cache-dir", shell_word(cache_dir)] if cache_dir else []),
                         *map(shell_word, covering or models)])
        if path.parent == shared:
            checks.append(Check("plans", "warn", f"{what}: the room's plans, used as they are; the instructor "
                                                 f"measures them again on a quiet machine: `{tune}`"))
            continue
        again = "load their model once with QWEN_LAB_TUNING=again in its environment"
        how = (f"`{tune}`" + (f"; {', '.join(map(shown, uncovered))}: {again}" if uncovered else "")
               if covering else again)
        checks.append(Check("plans", "warn", f"{what}: kept provisionally, measured again at a load that finds the "
                                             f"machine quiet; to measure them now, on a quiet machine: {how}"))
    return checks


def _models_measuring(keys: set[str], models: list[str], cache_dir) -> tuple[list[str], list[str]]:
    """Of ``models`` and the embedded one, those whose weight shapes (as the notebooks load them) include some of
    ``keys``; and the keys none of them has (a model not named, or loaded in another dtype)."""
    from . import shared_cache, tuning
    covering, covered = [], set()
    for model in dict.fromkeys([*models, EMBEDDED_MODEL_ID]):
        try:
            shapes = {tuning.shape_key(*shape) for shape in shared_cache.weight_shapes(model, cache_dir)}
        except (QwenLabError, OSError, ValueError):  # not in the cache: its shapes are not known here
            continue
        if shapes & keys:
            covering.append(model)
            covered |= shapes & keys
    return covering, sorted(keys - covered)


#: Weights in memory in small pieces are worth a line from this much (and a tenth of a model's weights): below
#: it, 4 KiB pages cost a decoding step little.
SMALL_PIECES_WORTH = 64 * 2**20


def check_pages(models: dict[str, list[Path]] | None = None) -> Check:
    """Whether weights on the CPU are asked for in 2 MiB pages (``pages.huge_pages``), and if not, why not.

    ``models``: each model's weights files. One whose weights sit in memory in small pieces (just
    extracted from the room's archive, or copied: ``load.cached_in_huge_pages``) maps them in 4 KiB
    pages however it asks, until they are dropped: a warning, with the command that drops them.
    ``sync`` first, as the kernel drops only pages already written to disk.
    """
    from .pages import huge_pages_and_why
    on, why = huge_pages_and_why()
    if not on:
        return Check("pages", "ok", f"weights in 4 KiB pages: {why}")
    for model, weights in (models or {}).items():
        held = {path: _cached(path) for path in weights}
        small = {path: in_memory - huge for path, (in_memory, huge) in held.items() if in_memory > huge}
        if sum(small.values()) >= max(SMALL_PIECES_WORTH, sum(map(_file_size, weights)) / 10):
            drop = "dd if={} iflag=nocache count=0 status=none"  # GNU dd's way to "drop cache for whole file"
            files, each = " ".join(map(shell_word, small)), drop.format('"$f"')
            command = f"sync && {drop.format(files)}" if len(small) == 1 else \
                f"sync && for f in {files}; do {each}; done"
            return Check("pages", "warn", f"{shown(model)}: {sum(small.values()) / 2**20:,.0f} MiB of its weights "
                                          f"sit in memory in pieces under 2 MiB, as a copy or an archive's extraction "
                                          f"wrote them, and map in 4 KiB pages until dropped; with no notebook "
                                          f"holding the model, `{command}` drops them, and its next load reads "
                                          f"them afresh in 2 MiB pages where the kernel caches files so (ext4: "
                                          f"Linux 6.16 and later)")
    return Check("pages", "ok", f"weights in 2 MiB pages where they are that large ({why})")


def _file_size(path: Path) -> int:
    """``path``'s size, 0 where it went since the model's check, or cannot be looked at: a line, not a traceback."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _cached(path: Path) -> tuple[int, int]:
    """``load.cached_in_huge_pages``, ``(0, 0)`` where it cannot be told or the file cannot be read."""
    from .load import cached_in_huge_pages
    try:
        return cached_in_huge_pages(path) or (0, 0)
    except (QwenLabError, OSError):
        return 0, 0


def check_torch() -> Check:
    import torch
    version = torch.__version__
    if torch.version.cuda is None:
        return Check("torch", "ok", f"{version} (CPU-only build), Python {platform.python_version()}")
    build = f"{version} (CUDA {torch.version.cuda} build)"
    if torch.cuda.is_available():
        return Check("torch", "ok", f"{build}, Python {platform.python_version()}")
    return Check("torch", "warn", f"{build} on a machine without a usable GPU: it runs, but the CPU-only build is "
                                  f"gigabytes smaller: pip install torch=={version.split('+')[0]} --index-url "
                                  f"{CPU_INDEX}")


def check_cache(cache_dir: str | os.PathLike | None) -> Check:
    """Where the models are looked up, whether it can be written, and whether the network will be tried."""
    from huggingface_hub import constants
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    offline = ("offline mode on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE
               else "offline mode off: a notebook whose model is not cached waits up to 3 s for the Hub")
    if not cache.exists():
        return Check("cache", "warn", f"{shown(cache)} does not exist; {offline}")
    if not cache.is_dir():
        return Check("cache", "FAIL", f"{shown(cache)} is a file, not a folder: point HF_HUB_CACHE (--cache-dir) "
                                      f"at the cache folder")
    access = "writable" if os.access(cache, os.W_OK) else "read-only here (fine: learners only read it)"
    return Check("cache", "ok", f"{shown(cache)}: {access}; {offline}")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_jupyter() -> list[Check]:
    install = "pip install 'qwen-lab[notebooks]' (offline: from the wheelhouse, see docs/workshop.md)"
    kernel, lab, notebook = _version("ipykernel"), _version("jupyterlab"), _version("notebook")
    colab = importlib.util.find_spec("google") is not None and importlib.util.find_spec("google.colab") is not None
    if kernel is None:
        jupyter = Check("jupyter", "FAIL", f"ipykernel is not installed: {install}")
    elif not (lab or notebook or colab):
        jupyter = Check("jupyter", "FAIL", f"neither JupyterLab nor Notebook is installed: {install}")
    else:
        front = f"JupyterLab {lab}" if lab else f"Notebook {notebook}" if notebook else "Colab"
        jupyter = Check("jupyter", "ok", f"{front}, ipykernel {kernel}")
    widgets = _version("ipywidgets")
    if widgets is None:
        panel = Check("ipywidgets", "FAIL", f"not installed: the chat panel (notebook 07) needs it: {install}")
    elif int(widgets.split(".")[0]) < 8:
        panel = Check("ipywidgets", "warn", f"{widgets}: the chat panel is made for ipywidgets 8: "
                                            f"pip install 'ipywidgets>=8.1'")
    else:
        panel = Check("ipywidgets", "ok", widgets)
    return [jupyter, panel]


# ---------------------------------------------------------------- the wheelhouse

def check_wheelhouse(folder: Path, requirement: str = "qwen-lab[notebooks]") -> Check:
    """Can pip install ``requirement`` from ``folder`` alone, with no index? (pip's own resolver, dry run)

    pip runs with no configuration file and no ``PIP_*`` variables, so that a find-links or index
    configured on this machine cannot hide a missing wheel.
    """
    where, rebuild = shown(folder), f"run `make wheelhouse WHEELHOUSE={shell_word(folder)}` where there is network"
    if not folder.is_dir():
        return Check("wheelhouse", "FAIL", f"{where} is not a folder: {rebuild}")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return Check("wheelhouse", "FAIL", f"{where} holds no wheels: {rebuild}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index",
               "--disable-pip-version-check", "--find-links", str(folder), requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("wheelhouse", "FAIL", f"pip could not be run to check {where}: {e}")
    if done.returncode == 0:
        return Check("wheelhouse", "ok", f"{where}: {len(wheels)} wheels; pip installs {requirement} from them "
                                         f"alone (--no-index)")
    missing = re.search(r"No matching distribution found for (\S+)", done.stderr)
    if missing:
        name = missing.group(1)
        return Check("wheelhouse", "FAIL", f"{where} lacks a wheel for {name} (needed by {requirement} on Python "
                                           f"{platform.python_version()}, {sys.platform} {platform.machine()}): "
                                           f"{rebuild}, or add that wheel")
    if "No module named pip" in done.stderr:
        return Check("wheelhouse", "FAIL", f"pip is not installed in {shown(sys.prefix)}, so {where} cannot be "
                                           f"checked: python -m ensurepip")
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    return Check("wheelhouse", "FAIL", f"pip cannot install {requirement} from {where}: {last[:300]}; {rebuild}")


# ---------------------------------------------------------------- all together

def run(models: list[str], cache_dir: str | os.PathLike | None = None, wheelhouse: Path | None = None,
        verify: bool = False) -> list[Check]:
    """Every check, in the order a newcomer would fix them.

    ``models``: the ones asked for (each must be ready); none: ``QWEN_LAB_MODEL`` if set (must be
    ready), else the walkthrough's Qwen2.5-1.5B (a warning if absent: the notebooks then fall
    back to the embedded model).
    """
    if models:
        wanted = [(m, True) for m in models]
    elif os.environ.get("QWEN_LAB_MODEL"):
        wanted = [(os.environ["QWEN_LAB_MODEL"], True)]
    else:
        wanted = [(WALKTHROUGH_MODEL_ID, False)]
    checks, weights = [check_torch(), check_cache(cache_dir)], {}
    for model, required in wanted:
        found = check_model(model, cache_dir, required, verify)
        if found.status != "ok" and not required:
            found.detail += f" (until then the notebooks use the embedded {EMBEDDED_MODEL_ID})"
        checks.append(found)
        if found.files is not None:
            checks += check_runtime(model, found.files)
            weights[model] = found.files.weights
    checks.append(check_threads())
    checks += check_plans([model for model, _ in wanted], cache_dir)
    checks.append(check_pages(weights))
    checks += check_jupyter()
    if wheelhouse is not None:
        checks.append(check_wheelhouse(Path(wheelhouse)))
    return checks


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"

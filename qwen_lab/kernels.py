"""C kernels for decoding on a CPU: the matrix-vector product, RMSNorm, and attention.

Decoding one token multiplies every weight matrix by one vector: two flops per
weight read, so a decode step takes as long as streaming the weights from
memory. torch's CPU BLAS is built for matrix-matrix products and, measured on
the shapes of a Qwen2.5 decode step, streams them at about half the machine's
read bandwidth (``benchmarks/RESULTS.md``). ``csrc/kernels.c`` is the plain loop
instead: each thread takes a block of rows of the row-major weight and reads
them front to back with fused multiply-adds (AVX2 or AVX-512 variants: those the
CPU's flags allow at run time, the fastest measured per weight shape by ``tuning``;
bfloat16 pairs by AVX512-BF16 where the CPU has it),
summing in float32, for float32 and bfloat16 weights (``benchmarks/bench_gemv.py``
compares them with torch).
It also does in one call each what takes many small torch operations per token:
RMSNorm of one row, a layer's attention step for one new token (rotary,
KV-cache write, softmax(q K^T / sqrt(d)) V), a decoder layer's whole
one-token step (norms, products, attention, residual adds, silu x up), the
whole stack of layers for one token, and with it the final norm and the head
(``TokenStep``, a generation's step); and the token's choice from the logits
(``argmax`` when greedy, ``top_k`` for sampling's candidates). Each small operation costs a few
microseconds whatever its size, and a 24-layer step runs about 1,500 of them;
even one Python call per layer left the memory idle for ~5% of a step.

The C files are compiled on first use with the system's C compiler (about a
second) into a per-user cache (``cache_dir``), unless a room's shared cache already
holds them (``shared_cache_dir``), and called through ``ctypes``; calls are shared
over threads by the pool of ``csrc/pool.c``. The classes at the end (``Linear``,
``RMSNorm``, ``Attention``, ``DecoderLayer``, ``DecoderModel``) are twins of ``nn.Linear`` and of ``qwen_lab.layers``'
pieces that use them: same parameters, same math up to float rounding.
``qwen_lab.runtime.convert_for_runtime`` swaps them in, once, after a CPU model is
loaded. Where the C code cannot be used — no compiler, a CPU without AVX2, a GPU,
float16, more than one row, or gradients wanted — a twin runs its torch original.

>>> import torch
>>> layer = Linear(64, 32, bias=True)
>>> x = torch.randn(1, 1, 64)
>>> torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
True
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module  # its global forward hooks (_hooked)

from . import layers, threads
from .errors import SettingError
from .threads import choose_threads

CSRC = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-pthread", "-fno-math-errno", "-ffp-contract=fast", "-fPIC", "-std=gnu11", "-Wno-psabi"]
AVX2 = ["-mavx2", "-mfma"]
#: The instruction sets csrc/gemv.c is compiled for: name -> (floats per vector register, compiler
#: flags, CPU flags it needs, macros). ``avx512bf16`` multiplies bf16 weights in pairs against the bf16 x
#: with AVX512-BF16's ``vdpbf16ps`` (``-DDPBF16=2``) instead of widening them. Two stand-ins run the same
#: C code with AVX2 alone, so that it is tested on every CPU: ``avx2x16``, the 16-wide code of ``avx512``
#: on pairs of AVX2 registers (on some shapes also the fastest AVX2 variant), and ``avx2dp``, the pair walk
#: of ``avx512bf16`` with the pair sums done by AVX2 arithmetic (``-DDPBF16=1``).
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
AVX512_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq")
VARIANTS = {
    "avx2": (8, AVX2, ("avx2", "fma"), []),
    "avx2x16": (16, AVX2, ("avx2", "fma"), []),
    "avx2dp": (8, AVX2, ("avx2", "fma"), ["-DDPBF16=1"]),
    "avx512": (16, AVX512, AVX512_FLAGS, []),
    "avx512bf16": (16, AVX512 + ["-mavx512bf16"], AVX512_FLAGS + ("avx512_bf16",), ["-DDPBF16=2"]),
}
#: The variants that walk bf16 weights in pairs; on float32 weights they run the code of their width's plain
#: variant, so they are measured for bf16 shapes only (tuning.candidates).
PAIR_VARIANTS = frozenset(v for v, (*_, macros) in VARIANTS.items() if any(m.startswith("-DDPBF16") for m in macros))
#: Weight dtypes the kernel handles; float16 and others go to F.linear.
DTYPES = (torch.float32, torch.bfloat16)
#: How a call is shared over threads (measured in benchmarks/bench_contention.py): a job that
#: reads fewer bytes than SOLO_BYTES is not cut into chunks (one matrix runs on the calling thread alone:
#: waking a helper would cost more than it saves; a group such as q, k and v is one chunk each); larger
#: ones are cut into chunks that threads claim one at a time, so a thread that loses its core to another
#: program leaves little undone: about an eighth of each thread's share, from CHUNK_BYTES up to
#: CHUNK_MAX_BYTES (csrc/gemv.h: larger chunks stream faster).
SOLO_BYTES = 256 * 1024
CHUNK_BYTES = 64 * 1024
CHUNK_MAX_BYTES = 1024 * 1024
#: The last chunks of a job (a chunk per thread's worth of rows) are this many times smaller, so that
#: threads finish a job together (csrc/gemv.c); 1: every chunk the same size.
TAIL_SPLIT = 4
#: How two threads claim a job's chunks (csrc/pool.c): ``halves``, each thread its own half front to back,
#: then what is left of the other's, so that each reads one stream a job; ``counter``, all in one order.
CLAIMS = "halves"
#: A thread with nothing left to claim of a job prefetches its part of the next product of a decode step
#: into its cache, this many bytes at most, while it spins waiting, and never longer than it would have spun
#: (csrc/pool.c); 0: it only waits.
WARM_BYTES = 2 * 1024 * 1024
#: The attention step is shared over threads from this many multiply-adds (heads x positions x head_dim).
SOLO_WORK = 1 << 16
#: The most rows of x (tokens of a short prompt) the kernels' few-rows walk can take (csrc/gemv.c: each weight
#: read once for all of them; FEW_MAX in csrc/gemv.h), and how many ``Linear`` gives it (``configure``'s
#: ``few_rows``); more go to torch's product. Measured on AMD Zen 4 (benchmarks/bench_prompt.py,
#: benchmarks/RESULTS.md): up to 8 tokens the walk was ahead of torch's products by 8% or more in every run
#: (0.5B and 1.5B shapes, both dtypes); at 12 and 16, by 1-15% in bf16.
FEW_MAX = 16
FEW_ROWS = 8
#: How the few-rows walk goes through the weight rows: where the rows of x it dots them with hold more than
#: this many bytes (rows of x times a weight row's bytes), 4 weight rows side by side, each vector of x loaded
#: then serving four of them; else as the one-row plan walks them (on AMD Zen 4, one at a time, one stream per
#: thread). Measured there (C harness, 2 threads, cold bf16 weights, GB/s, one at a time against four side by
#: side): 896-wide rows, 2 to 8 rows of x (3.6-14 KB) 21-47 against 16-22; 1536-wide, 2 and 4 rows of x (6-12 KB)
#: 27-34 against 24-27, 8 rows (24 KB) 15 against 18-20; 4864-wide, 4 and 8 rows (39-78 KB) 12-19 against 23-29.
FEW_X_BYTES = 16 * 1024
#: The largest k ``top_k`` takes (Qwen2.5 samples with top-k 20; past a few hundred, torch's topk wins).
TOP_K_MAX = 256


def cache_dir() -> Path:
    """Where this user's compiled kernel and measured plans (``tuning``) are kept: ``$QWEN_LAB_CACHE``, else
    ``~/.cache/qwen_lab``."""
    if os.environ.get("QWEN_LAB_CACHE"):
        return Path(os.environ["QWEN_LAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen_lab"


def shared_cache_dir() -> Path | None:
    """A room's cache, read before ``cache_dir`` and never written: ``$QWEN_LAB_SHARED_CACHE``, or None.

    Filled once by the instructor (``qwen-lab tune --kernel-cache DIR``: the kernel compiled, the plans of the
    room's models measured on a quiet machine), it spares every learner's kernel its own compile and its
    own measurements, which 30 learners starting together would run at once, each disturbing the others'.
    What it lacks (a kernel of other sources, plans of another CPU or thread count, a shape not measured)
    is built or measured into ``cache_dir`` as without it.
    """
    return Path(os.environ["QWEN_LAB_SHARED_CACHE"]) if os.environ.get("QWEN_LAB_SHARED_CACHE") else None


class KernelUnavailable(RuntimeError):
    """The C kernel cannot be used on this machine; the message says why."""


@functools.lru_cache(maxsize=None)
def _cpuinfo(field: str) -> str:
    """The first value of ``field`` in /proc/cpuinfo ("" where there is none, or no Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU, as Linux lists them (``avx2``, ``avx512f``...)."""
    return frozenset(_cpuinfo("flags").split())


def cpu_model() -> str:
    """This CPU's model name, as Linux gives it ("" where it does not)."""
    return _cpuinfo("model name")


def _library() -> ctypes.CDLL:
    """The built kernels, loaded once per process; raises KernelUnavailable (the same reason
    every time) where they cannot run. A failed build is remembered too: a model has ~50
    modules asking, and retrying a compile that failed cost 30 s per load (a missing header)."""
    lib, why = _outcome()
    if why is not None:
        raise KernelUnavailable(why)
    return lib


@functools.lru_cache(maxsize=None)
def _outcome() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        return _load_library(), None
    except (KernelUnavailable, OSError) as error:  # OSError: a built library the loader refuses
        return None, str(error)


_library.cache_clear = _outcome.cache_clear  # tests and measurements build afresh


def _load_library() -> ctypes.CDLL:
    if os.environ.get("QWEN_LAB_KERNELS", "").lower() in ("0", "off", "torch"):
        raise KernelUnavailable("turned off by QWEN_LAB_KERNELS")
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailable(f"written for x86-64 Linux, this is {platform.machine()} {sys.platform}")
    if not set(VARIANTS["avx2"][2]) <= cpu_flags():
        raise KernelUnavailable("needs a CPU with AVX2 and FMA")
    cc = _compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (install gcc, or set CC)")
    lib = _shared_library()
    if lib is None:
        target = cache_dir() / library_name()
        if not target.exists():
            _build(cc.split(), target)
        lib = ctypes.CDLL(str(target))
    return _declare(lib)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with its functions' argument types declared and this process's pool settings handed over.
    (benchmarks/bench_step.py ``--against`` also opens another checkout's build with it, to time the two side
    by side: ``KernelUnavailable`` where that build lacks a function this checkout calls.)"""
    try:
        return _declared(lib)
    except AttributeError as e:  # ctypes: "<path>: undefined symbol: <name>"
        if "undefined symbol" not in str(e):
            raise
        raise KernelUnavailable(f"{str(e).rsplit(': ', 1)[-1]} is missing from {lib._name}: it was built from "
                                "other sources than these") from None


def _declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.variants = [v for v in VARIANTS if hasattr(lib, f"qwen_gemv_f32_{v}")]  # those the compiler could build
    gemv_args = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 3 + [ctypes.c_int64] * 4
    lib.gemv = {}  # (bf16?, variant) -> the function, looked up once: _run is on the hot path
    for v in lib.variants:
        for bf16, name in ((False, f"qwen_gemv_f32_{v}"), (True, f"qwen_gemv_bf16_{v}")):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = gemv_args, ctypes.c_int
            lib.gemv[bf16, v] = fn
    norm_args = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_float]
    lib.qwen_rmsnorm_f32.argtypes, lib.qwen_rmsnorm_f32.restype = norm_args, None
    lib.qwen_rmsnorm_bf16.argtypes, lib.qwen_rmsnorm_bf16.restype = norm_args, ctypes.c_int
    attend_args = ([ctypes.c_void_p] * 7 + [ctypes.c_float] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
                   + [ctypes.c_int])
    for fn in (lib.qwen_attend_one_f32, lib.qwen_attend_one_bf16):
        fn.argtypes, fn.restype = attend_args, ctypes.c_int
    few_args = ([ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int64]
                + [ctypes.c_int] * 2 + [ctypes.c_int64] * 4)
    lib.few = {}  # variant -> the few-rows product (a short prompt's)
    for v in lib.variants:
        fn = getattr(lib, f"qwen_gemm_few_{v}")
        fn.argtypes, fn.restype = few_args, ctypes.c_int
        lib.few[v] = fn
    lib.gemv_group = {v: ctypes.cast(getattr(lib, f"qwen_gemv_group_{v}"), ctypes.c_void_p).value
                      for v in lib.variants}  # addresses the layer step calls through
    lib.qwen_layer_step.argtypes, lib.qwen_layer_step.restype = [ctypes.c_void_p], ctypes.c_int
    lib.qwen_silu_times.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]
    lib.qwen_silu_times.restype = None
    lib.qwen_layer_step_size.argtypes, lib.qwen_layer_step_size.restype = [], ctypes.c_int64
    lib.qwen_stack_step.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 4
    lib.qwen_stack_step.restype = ctypes.c_int
    lib.qwen_argmax.argtypes, lib.qwen_argmax.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_int64
    lib.qwen_top_k.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
                               + [ctypes.c_float] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 2)
    lib.qwen_top_k.restype = ctypes.c_int64
    for name in ("qwen_stack_call_size", "qwen_stack_tail_size"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [], ctypes.c_int64
    for c_size, py in ((lib.qwen_layer_step_size(), LayerStep), (lib.qwen_stack_call_size(), StackCall),
                       (lib.qwen_stack_tail_size(), StackTail)):
        if c_size != ctypes.sizeof(py):  # the two declarations drifted apart
            raise KernelUnavailable(f"csrc/kernels.c's struct for {py.__name__} is {c_size} bytes, "
                                    f"kernels.{py.__name__} {ctypes.sizeof(py)}: reinstall qwen_lab")
    lib.qwen_pool_stats.argtypes, lib.qwen_pool_stats.restype = [ctypes.c_void_p], None
    lib.qwen_pool_configure.argtypes, lib.qwen_pool_configure.restype = [ctypes.c_int64] * 2, None
    lib.qwen_pool_set_halves.argtypes, lib.qwen_pool_set_halves.restype = [ctypes.c_int], None
    lib.qwen_pool_set_warm.argtypes, lib.qwen_pool_set_warm.restype = [ctypes.c_int64], None
    lib.qwen_kernels_configure.argtypes, lib.qwen_kernels_configure.restype = [ctypes.c_int64], None
    _hand_over_sharing(lib)
    return lib


def _compiler() -> str | None:
    """The C compiler command: ``$CC``, else ``cc`` or ``gcc`` on PATH; None where there is none."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return cc if cc and shutil.which(cc.split()[0]) else None


def library_name() -> str | None:
    """The file these sources, flags and compiler build: ``kernels-<hash>.so`` (None: no compiler).

    Any other sources or compiler give another name, so a cache never hands out a stale build.
    """
    cc = _compiler()
    if cc is None:
        return None
    source = b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()) if p.suffix in (".c", ".h"))
    return f"kernels-{hashlib.sha256(source + repr([cc, FLAGS, VARIANTS]).encode()).hexdigest()[:16]}.so"


def _shared_library() -> ctypes.CDLL | None:
    """The room's build of these sources (``shared_cache_dir``), used as it is; None where there is none, or
    where it does not load (a folder mounted noexec, a damaged copy): the user's own build then."""
    shared = shared_cache_dir()
    built = None if shared is None else shared / library_name()
    if built is None or not built.is_file():
        return None
    try:
        return ctypes.CDLL(str(built))
    except OSError:
        return None


def _build(cc: list[str], target: Path) -> None:
    """Compile kernels.c and pool.c, and gemv.c once per variant the compiler accepts, into ``target``.

    Written to a temporary name, then renamed: a concurrent process sees all of it or nothing.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        def compile_(source: str, out: str, flags: list[str]) -> subprocess.CompletedProcess:
            return subprocess.run([*cc, *FLAGS, *flags, "-c", str(CSRC / source), "-o", f"{work}/{out}"],
                                  capture_output=True, text=True)

        objects = []
        for source, out, flags in [("kernels.c", "kernels.o", AVX2), ("pool.c", "pool.o", AVX2)] + [
                ("gemv.c", f"gemv_{v}.o", [*f, *macros, f"-DVEC={width}", f"-DVARIANT={v}"])
                for v, (width, f, _, macros) in VARIANTS.items()]:
            done = compile_(source, out, flags)
            if done.returncode == 0:
                objects.append(f"{work}/{out}")
            elif out in ("kernels.o", "pool.o", "gemv_avx2.o"):  # the others are optional (an old compiler)
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise KernelUnavailable(f"{cc[0]} could not build {source}: {first}")
        tmp = f"{work}/kernels.so"
        done = subprocess.run([*cc, "-shared", "-pthread", "-o", tmp, *objects, "-lm"], capture_output=True, text=True)
        if done.returncode:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise KernelUnavailable(f"{cc[0]} could not link the kernels: {first}")
        os.replace(tmp, target)


@functools.lru_cache(maxsize=None)
def variants() -> list[str]:
    """The gemv variants built here that this CPU can run, e.g. ``['avx2', 'avx2x16', 'avx2dp', 'avx512']``."""
    flags = cpu_flags()
    return [v for v in _library().variants if set(VARIANTS[v][2]) <= flags]


_sharing = {"solo": SOLO_BYTES, "chunk": CHUNK_BYTES, "chunk_max": CHUNK_MAX_BYTES, "solo_work": SOLO_WORK,
            "tail_split": TAIL_SPLIT, "claims": CLAIMS, "warm": WARM_BYTES, "few": FEW_ROWS}


def configure(solo_bytes: int = SOLO_BYTES, chunk_bytes: int = CHUNK_BYTES, solo_work: int | None = None,
              chunk_max_bytes: int | None = None, tail_split: int = TAIL_SPLIT, claims: str = CLAIMS,
              warm_bytes: int = WARM_BYTES, few_rows: int = FEW_ROWS) -> None:
    """Change how calls are shared over threads (for tests and measurements; see SOLO_BYTES).

    ``solo_work`` defaults to SOLO_WORK, or 0 (share every attention step) when ``solo_bytes`` is 0.
    ``chunk_max_bytes`` defaults to CHUNK_MAX_BYTES with the default ``chunk_bytes``, else to
    ``chunk_bytes`` (every chunk that size, as a test of chunk edges wants). ``tail_split``: see TAIL_SPLIT;
    ``claims``: see CLAIMS; ``warm_bytes``: see WARM_BYTES; ``few_rows``: the most rows ``Linear`` gives the
    few-rows walk (FEW_ROWS), at most FEW_MAX (1: none, every product of several rows by torch).
    """
    if claims not in ("halves", "counter"):
        raise SettingError(f"claims {claims!r} is not 'halves' or 'counter'")
    if not 1 <= few_rows <= FEW_MAX:
        raise SettingError(f"few_rows {few_rows!r} is not between 1 and {FEW_MAX}")
    if solo_work is None:
        solo_work = 0 if solo_bytes == 0 else SOLO_WORK
    chunk = max(1, int(chunk_bytes))
    if chunk_max_bytes is None:
        chunk_max_bytes = CHUNK_MAX_BYTES if chunk_bytes == CHUNK_BYTES else chunk
    _sharing.update(solo=int(solo_bytes), chunk=chunk, chunk_max=max(chunk, int(chunk_max_bytes)),
                    solo_work=int(solo_work), tail_split=max(1, int(tail_split)), claims=claims,
                    warm=max(0, int(warm_bytes)), few=int(few_rows))
    _hand_over_sharing(_library())


def _hand_over_sharing(lib: ctypes.CDLL) -> None:
    """Give the library the settings of ``_sharing`` that it keeps itself (the rest go with each call)."""
    lib.qwen_kernels_configure(_sharing["solo_work"])
    lib.qwen_pool_set_halves(_sharing["claims"] == "halves")
    lib.qwen_pool_set_warm(_sharing["warm"])


_threads: int | None = None


def num_threads() -> int:
    """How many threads the kernels share a call over (``threads.choose_threads()`` unless set)."""
    global _threads
    if _threads is None:
        _threads = choose_threads()[0]
    return _threads


@contextlib.contextmanager
def threads_set(count: int):
    """Share kernel calls over ``count`` threads inside the block (``set_num_threads``), then as before."""
    global _threads
    before = _threads
    set_num_threads(count)
    try:
        yield
    finally:
        _threads = before


def set_num_threads(count: int) -> None:
    """Share each kernel call over ``count`` threads (the calling thread included)."""
    global _threads
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise SettingError(f"the number of threads must be a whole number, at least 1, not {count!r}")
    _threads = int(count)


def pool_stats() -> dict[str, int]:
    """Counters of the kernels' thread pool since start (for tests and measurements)."""
    out = (ctypes.c_int64 * 6)()
    _library().qwen_pool_stats(out)
    return dict(zip(("jobs", "solo_jobs", "helper_chunks", "caller_sleeps", "warmed_by_callers",
                     "warmed_by_helpers"), out))


def status() -> str:
    """One line: are the kernels in use here, which variants this CPU runs, and if not, why not."""
    try:
        lib = _library()
    except KernelUnavailable as e:  # _library turns a loader's OSError into one too
        return f"torch alone (the C kernels are not used: {e})"
    shared = shared_cache_dir()
    origin = f", the room's build in {shared}" if shared is not None and Path(lib._name).parent == shared else ""
    return (f"qwen_lab's C kernels (csrc/, for {', '.join(variants())}{origin}; each weight shape uses whichever "
            f"of them or torch measured fastest here: qwen_lab.tuning)")


def available() -> bool:
    try:
        _library()
    except KernelUnavailable:
        return False
    return True


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Does this CPU multiply bfloat16 matrices in hardware (AVX-512 BF16 or AMX)?

    Measured on 2-core machines of this project (``benchmarks/RESULTS.md``): with
    those instructions a bf16 prompt (prefill) runs 2x faster than float32; without
    them (AVX2 only) torch emulates each product and runs it 3-5x slower, so
    ``Linear`` computes a bf16 prompt in float32 there.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclass(frozen=True)
class Plan:
    """How one weight shape is multiplied by a row: a gemv variant and way of walking it, or torch."""

    variant: str = "avx2"   # a VARIANTS name, or "torch" (F.linear)
    rows: int = 1           # rows walked side by side (csrc/gemv.c)
    prefetch: int = 0       # 1: software prefetch 1 KiB ahead

    def __str__(self) -> str:
        if self.variant == "torch":
            return "torch"
        return f"{self.variant}, {self.rows} row{'s' if self.rows > 1 else ''}{', prefetch' if self.prefetch else ''}"


DEFAULT_PLAN = Plan()


def _matrix_shape(name: str, weight: torch.Tensor) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ValueError(f"{name} takes an (out x in) weight matrix, got {tuple(weight.shape)}")
    return weight.shape


def _check_operands(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """What ``gemv`` and ``gemm_few`` both refuse, in one line: a weight that is not a contiguous CPU matrix, an x
    off the CPU, a bias that does not fit (``_bias_fits``), an empty weight."""
    out_features, in_features = weight.shape
    if not weight.is_contiguous() or not weight.is_cpu or not x.is_cpu:
        raise ValueError(f"{name} needs a contiguous CPU weight matrix and a CPU x")
    if bias is not None and not _bias_fits(bias.contiguous(), weight):
        raise ValueError(f"{name} takes a CPU bias of {out_features} {weight.dtype} values, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if not weight.numel():
        raise ValueError(f"{name} takes no empty weight ({out_features} x {in_features}): use F.linear")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, plan: Plan = DEFAULT_PLAN
         ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for an ``x`` holding one row, by the C kernel (or as ``plan`` says).

    ``weight`` must be a contiguous (out x in) CPU matrix of float32 or bfloat16,
    ``x`` and ``bias`` of the same dtype. Raises ``KernelUnavailable`` where the
    kernel cannot be built.
    """
    out_features, in_features = _matrix_shape("gemv", weight)
    if x.numel() != in_features or x.dtype != weight.dtype or weight.dtype not in DTYPES:
        raise ValueError(f"gemv takes one row of {in_features} {weight.dtype} values, got {tuple(x.shape)} {x.dtype}")
    _check_operands("gemv", x, weight, bias)
    if plan.variant != "torch" and plan.variant not in variants():
        raise ValueError(f"gemv variant {plan.variant!r} does not run here; this CPU runs {', '.join(variants())}")
    return _run(_library(), x, weight, None if bias is None else bias.contiguous(), plan)


def _run(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """The call itself, inputs already checked: it runs ~170 times per token, so it is kept short."""
    if plan.variant == "torch":  # measured faster here for this shape: torch's product, on all the threads
        with threads.torch_threads(_threads or num_threads()):
            return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    x = x.contiguous()
    y = x.new_empty(x.shape[:-1] + (out_features,))
    fn = lib.gemv[weight.dtype == torch.bfloat16, plan.variant]
    failed = fn(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                out_features, in_features, _threads or num_threads(), plan.rows, plan.prefetch, _sharing["solo"],
                _sharing["chunk"], _sharing["chunk_max"], _sharing["tail_split"])
    if failed:
        raise MemoryError(f"gemv: no memory for a float32 copy of {in_features} inputs") if failed == -1 else \
            ValueError(f"gemv refused the plan {plan}")
    return y


def _bias_fits(b: torch.Tensor | None, w: torch.Tensor) -> bool:
    """Can the C kernels take ``b`` as ``w``'s bias? They read N values of ``w``'s dtype from its first byte."""
    return b is None or (b.shape == w.shape[:1] and b.dtype == w.dtype and b.is_cpu and b.is_contiguous())


def gemm_few(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, plan: Plan = DEFAULT_PLAN
             ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for an ``x`` of 1 to FEW_MAX rows (any leading shape), by the C kernel's
    few-rows walk (csrc/gemv.c): each weight row read from memory once, for every row of ``x``. ``plan`` gives
    the instruction set and the weight rows walked side by side (up to 4; its prefetch is the one-row
    product's alone); the same checks as ``gemv``. ``Linear`` walks 4 weight rows side by side past FEW_X_BYTES
    of x, else as its plan does, with the widest instruction set this CPU runs (``_few_variant``).
    """
    out_features, in_features = _matrix_shape("gemm_few", weight)
    _check_operands("gemm_few", x, weight, bias)  # an empty weight first: its rows of x are not counted
    rows = x.numel() // in_features if x.dim() and x.shape[-1] == in_features else 0
    if not 1 <= rows <= FEW_MAX or x.dtype != weight.dtype or weight.dtype not in DTYPES:
        raise ValueError(f"gemm_few takes 1 to {FEW_MAX} rows of {in_features} {weight.dtype} values, got "
                         f"{tuple(x.shape)} {x.dtype}")
    if plan.variant == "torch" or plan.variant not in variants():
        raise ValueError(f"gemm_few variant {plan.variant!r} does not run here; this CPU runs {', '.join(variants())}")
    if plan.rows not in (1, 2, 4, 8):
        raise ValueError(f"gemm_few walks 1, 2, 4 or 8 weight rows side by side, not {plan.rows}")
    return _run_few(_library(), x, weight, None if bias is None else bias.contiguous(), plan.rows, plan.variant)


def _run_few(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int,
             variant: str) -> torch.Tensor:
    """The few-rows call, inputs already checked; ``rows``: weight rows walked side by side."""
    out_features, in_features = weight.shape
    x = x.contiguous()
    y = x.new_empty(x.shape[:-1] + (out_features,))
    bf16 = weight.dtype == torch.bfloat16
    failed = lib.few[variant](bf16, weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                              out_features, in_features, x.data_ptr(), x.numel() // in_features,
                              _threads or num_threads(), rows, _sharing["solo"], _sharing["chunk"],
                              _sharing["chunk_max"], _sharing["tail_split"])
    if failed:
        raise MemoryError(f"gemm_few: no memory for a float32 copy of {x.numel()} inputs") if failed == -1 else \
            ValueError(f"gemm_few refused {x.numel() // in_features} rows")
    return y


@functools.lru_cache(maxsize=None)
def _few_variant(bf16: bool) -> str:
    """The few-rows walk's instruction set: the widest this CPU runs (several rows of x make it arithmetic as
    much as streaming; the one-row plan's variant was chosen for streaming alone)."""
    order = ("avx512bf16", "avx512", "avx2") if bf16 else ("avx512", "avx2")
    return next(v for v in order if v in variants())


_here = threading.local()  # few_rows_off's mark, for the calling thread alone


@contextlib.contextmanager
def few_rows_off():
    """Within the block, this thread's products of several rows go to torch (``generation``: a prompt after a
    long cache, whose attention wants torch's threads, and torch's spinning workers would slow the walk)."""
    before = getattr(_here, "few_off", False)
    _here.few_off = True
    try:
        yield
    finally:
        _here.few_off = before


def _applies_few(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Can the few-rows walk take ``x`` (2 to ``configure``'s ``few_rows`` rows) with parameter ``w``?"""
    k = w.shape[-1]
    return (x.dim() > 0 and x.shape[-1] == k and 2 * k <= x.numel() <= _sharing["few"] * k
            and not getattr(_here, "few_off", False) and x.dtype == w.dtype
            and w.dtype in DTYPES and w.is_cpu and x.is_cpu and w.is_contiguous()
            and w.numel() > 0  # not (0 x K): the C side cuts the N rows into chunks of rows (0: divides by 0)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and available())


def _applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Can a kernel take ``x`` (one row) with parameter ``w``? Else the torch code runs."""
    return (x.numel() == x.shape[-1] == w.shape[-1] and x.dtype == w.dtype and w.dtype in DTYPES and w.is_cpu
            and x.is_cpu and w.is_contiguous()
            and w.numel() > 0  # (N x 0): any x of 0 values passed as "one row"; (0 x K): see _applies_few
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and available())


class Linear(nn.Linear):
    """``nn.Linear`` for a CPU: a single row by the C kernel, a few rows (a short prompt: up to
    FEW_ROWS) by its few-rows walk unless the plan is torch's, and a longer bf16 prompt in float32 where the
    CPU has no bf16 instructions (torch would emulate each product, 3-5x slower).

    ``use_kernel = False`` keeps the last and drops the others (``matvec="torch"``).
    """

    use_kernel = True
    plan = DEFAULT_PLAN  #: set per layer by ``runtime.convert_for_runtime`` (``tuning.plan_for`` its shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        grad_b = b is not None and b.requires_grad and torch.is_grad_enabled()  # autograd cannot go through C
        if self.use_kernel and _bias_fits(b, w) and not grad_b:  # else torch's, which refuses a bias that does not fit
            if _applies(x, w):
                return _run(_library(), x, w, b, self.plan)
            if self.plan.variant != "torch" and _applies_few(x, w):  # a short prompt: each weight read once
                rows = 4 if x.numel() * w.element_size() > FEW_X_BYTES else self.plan.rows
                return _run_few(_library(), x, w, b, rows, _few_variant(w.dtype == torch.bfloat16))
        if w.dtype == torch.bfloat16 and x.dtype == w.dtype and not w.is_cuda and not native_bf16():
            # bf16 in, float32 sums, bf16 out: what bf16 hardware computes, at float32's speed. The
            # float32 copy of the weight lives for this one product (55 MB at most for 1.5B).
            return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
        return F.linear(x, w, b)


class RMSNorm(layers.RMSNorm):
    """``layers.RMSNorm`` that normalises a single row in C when it can (one call for ~8 small ops)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if _applies(x, w):
            lib = _library()
            x = x.contiguous()
            y = torch.empty_like(x)
            fn = lib.qwen_rmsnorm_f32 if w.dtype == torch.float32 else lib.qwen_rmsnorm_bf16
            if fn(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[-1], self.eps):
                raise MemoryError(f"rmsnorm: no memory for a float32 copy of {x.shape[-1]} values")
            return y
        return super().forward(x)


def attention_applies(attention: layers.Attention) -> bool:
    """Can the C step serve this attention at all (head size, norms)? Checked once, at conversion."""
    norms = [n for n in (attention.q_norm, attention.k_norm) if n is not None]
    return attention.head_dim % 8 == 0 and attention.head_dim <= 512 and len(norms) in (0, 2)


class Attention(layers.Attention):
    """``layers.Attention`` whose one-token step — q/k norms (Qwen3), rotary, cache write and
    attention over the cache — is one C call between the projections and ``o_proj`` (instead
    of ~30 small ops). It writes the cache in ``layers.KVCache``'s declared layout."""

    def one_token_applies(self, x, cache, start) -> bool:
        """Can the C attention step take this call: one row, no gradients, a cache in the layout it writes?"""
        return (_applies(x, self.q_proj.weight) and not torch.is_grad_enabled()
                and _cache_fits(cache, x.dtype, self.n_kv_heads, self.head_dim, start))

    def forward(self, x, cos, sin, cache, start):
        if not self.one_token_applies(x, cache, start):
            return super().forward(x, cos, sin, cache, start)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # one row each: the gemv kernel
        cos, sin = cos.contiguous(), sin.contiguous()
        y = torch.empty_like(q)
        lib = _library()
        fn = lib.qwen_attend_one_f32 if x.dtype == torch.float32 else lib.qwen_attend_one_bf16
        qn = None if self.q_norm is None else self.q_norm.weight.data_ptr()
        kn = None if self.k_norm is None else self.k_norm.weight.data_ptr()
        eps = 0.0 if self.q_norm is None else self.q_norm.eps
        failed = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), qn, kn, eps,
                    cache.k.data_ptr(), cache.v.data_ptr(), y.data_ptr(), self.n_heads, self.n_kv_heads,
                    self.head_dim, start, cache.max_len, _threads or num_threads())
        if failed == -1:
            raise MemoryError(f"attention: no memory for {start + 1} scores")
        if failed:  # attention_applies() keeps head_dim in range; the C code checks again
            raise RuntimeError(f"attention kernel refused head_dim {self.head_dim}")
        return self.o_proj(y)


def _cache_fits(cache, dtype: torch.dtype, kv_heads: int, head_dim: int, start: int) -> bool:
    """Is ``cache`` one the C attention step can write position ``start`` of (layers.KVCache's layout)?"""
    return (cache is not None and cache.k.dtype == dtype and cache.k.is_contiguous() and cache.v.is_contiguous()
            and cache.k.shape[:2] == (1, kv_heads) and cache.k.shape[-1] == head_dim and start < cache.max_len)


class _Product(ctypes.Structure):
    _fields_ = [("fn", ctypes.c_void_p), ("rows", ctypes.c_int64), ("prefetch", ctypes.c_int64)]


class LayerStep(ctypes.Structure):
    """``struct layer_step`` of csrc/kernels.c, field for field (all 8 bytes wide: no padding)."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("in_norm", "post_norm", "wq", "bq", "wk", "bk", "wv", "bv", "wo",
                                                "bo", "qnorm", "knorm", "wg", "bg", "wu", "bu", "wd", "bd")]
                + [("eps", ctypes.c_double), ("qk_eps", ctypes.c_double)]
                + [(n, _Product) for n in ("qkv", "o", "gate_up", "down")]
                + [(n, ctypes.c_int64) for n in ("hidden", "inter", "H", "KV", "d", "bf16")]
                + [(n, ctypes.c_void_p) for n in ("x", "cos", "sin", "out", "kc", "vc", "scratch")]
                + [(n, ctypes.c_int64) for n in ("pos", "max_len", "scratch_bytes", "threads", "solo_bytes",
                                                 "chunk_bytes", "chunk_max", "tail_split")])


class StackCall(ctypes.Structure):
    """``struct stack_call`` of csrc/kernels.c: what one token's call gives every layer (all 8 bytes wide)."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "cos", "sin", "out", "scratch", "between")]
                + [(n, ctypes.c_int64) for n in ("pos", "threads", "solo_bytes", "chunk_bytes", "chunk_max",
                                                 "tail_split")])


class StackTail(ctypes.Structure):
    """``struct stack_tail`` of csrc/kernels.c: the final norm and the head, after the stack, in the same call."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("norm", "head_w", "head_b", "normed", "logits")]
                + [("eps", ctypes.c_double), ("head", _Product), ("vocab", ctypes.c_int64)])


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _share(s: LayerStep | StackCall) -> None:
    """Write how this call is shared over threads (``set_num_threads``, ``configure``) into ``s``'s fields."""
    s.threads, s.solo_bytes, s.chunk_bytes = _threads or num_threads(), _sharing["solo"], _sharing["chunk"]
    s.chunk_max, s.tail_split = _sharing["chunk_max"], _sharing["tail_split"]


def _stack_prepared(stack: list, caches: list, start: int) -> tuple[list, torch.dtype] | None:
    """Every layer's kept fields and the stack's dtype, where the stack can run as one call from position
    ``start`` on ``caches`` (every layer the one-call twin without hooks, of one dtype and width, each cache
    of the layout the C attention writes); None where the layers must run one by one."""
    if len(caches) != len(stack) or not all(type(layer) is DecoderLayer and not _hooked(layer) for layer in stack):
        return None
    prepared = [layer._prepared() for layer in stack]
    first = prepared[0] if prepared else None
    if first is None or any(p is None or p.bf16 != first.bf16 or p.hidden != first.hidden for p in prepared):
        return None
    dtype = torch.bfloat16 if first.bf16 else torch.float32
    if not all(_cache_fits(c, dtype, p.KV, p.d, start) for c, p in zip(caches, prepared)):
        return None
    return prepared, dtype


def _layer_array(prepared: list) -> ctypes.Array:
    """The C array of pointers to each layer's kept fields that a stack call reads."""
    return (ctypes.POINTER(LayerStep) * len(prepared))(*map(ctypes.pointer, prepared))


def _cache_arrays(caches: list) -> tuple[ctypes.Array, ctypes.Array]:
    """The C arrays of a stack call's caches: each layer's k and v (k0, v0, k1, v1...), each one's length."""
    return ((ctypes.c_void_p * (2 * len(caches)))(*[t.data_ptr() for c in caches for t in (c.k, c.v)]),
            (ctypes.c_int64 * len(caches))(*[c.max_len for c in caches]))


def _step_succeeded(failed: int, start: int) -> None:
    """Raise for a failure code of qwen_layer_step or qwen_stack_step (0: done)."""
    if failed == -1:
        raise MemoryError(f"layer step: no memory for {start + 1} attention scores or a float32 copy of a row")
    if failed:  # the checks before the call (layer_applies, the plans', the caches') keep this from happening
        raise RuntimeError(f"the layer step refused its inputs (code {failed})")


def layer_applies(layer: layers.DecoderLayer) -> bool:
    """Is ``layer`` built of the twins the one-call step drives (checked once, at conversion)?"""
    attention, mlp = layer.self_attn, layer.mlp
    linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
               getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None)]
    parts = [layer.input_layernorm, layer.post_attention_layernorm, attention.q_norm, attention.k_norm, *linears]
    params = [p for m in parts if m is not None for p in m.parameters(recurse=False)]
    return (type(attention) is Attention and type(mlp) is layers.SwiGLU
            and type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm
            and all(type(m) is Linear for m in linears)
            and len({p.dtype for p in params}) == 1 and params[0].dtype in DTYPES
            and all(p.is_contiguous() and p.device.type == "cpu" for p in params))


class DecoderLayer(layers.DecoderLayer):
    """``layers.DecoderLayer`` whose one-token step is one C call (``qwen_layer_step``): the two
    norms, the q/k/v products as one shared job, attention, o_proj, the residual adds, gate and up
    as one job, silu x up and down_proj. It runs the same kernels as the module-by-module path;
    what it saves is ~15 Python calls and small torch operations per layer, and the memory's idle
    time between them: 8-14% of a bf16 step, 3% of a float32 one, here (``benchmarks/bench_step.py``). A prompt,
    gradients, a plan that chose torch for a shape: the modules run."""

    def forward(self, x, cos, sin, cache, start):
        prepared = self._prepared()
        if prepared is None or x.shape[-1] != prepared.hidden or not self.self_attn.one_token_applies(x, cache, start):
            return super().forward(x, cos, sin, cache, start)
        s = LayerStep.from_buffer_copy(prepared)  # a copy: two threads may call one model
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        scratch = torch.empty(s.scratch_bytes, dtype=torch.uint8, device="cpu")
        out = torch.empty_like(x)
        s.x, s.cos, s.sin, s.out = x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr()
        s.kc, s.vc, s.scratch, s.pos, s.max_len = cache.k.data_ptr(), cache.v.data_ptr(), scratch.data_ptr(), start, \
            cache.max_len
        _share(s)
        _step_succeeded(_library().qwen_layer_step(ctypes.byref(s)), start)
        return out

    def _parts(self) -> tuple:
        """The norms and products the step reads, through the modules' own dictionaries: this runs on every
        call, and ``nn.Module.__getattr__`` costs a microsecond a time."""
        a, mlp = self._modules["self_attn"], self._modules["mlp"]
        am, mm = a._modules, mlp._modules
        return (self._modules["input_layernorm"], self._modules["post_attention_layernorm"], am["q_proj"],
                am["k_proj"], am["v_proj"], am["o_proj"], am.get("q_norm"), am.get("k_norm"), mm["gate_proj"],
                mm["up_proj"], mm["down_proj"])

    def _prepared(self) -> LayerStep | None:
        """The call's fields that belong to the layer (its tensors, plans, sizes), filled once and filled again
        whenever something they come from changes: a part replaced, a tensor's memory (``.to()`` swaps it), a
        plan. None when a part must run as a module (a product whose plan is torch's, or ``use_kernel`` off).
        Filling them took ~150 us of Python per layer and call, 5-10% of a 0.5B bf16 step, during which the
        memory streamed nothing."""
        parts = self._parts()
        norms, linears = (parts[0], parts[1], parts[6], parts[7]), parts[2:6] + parts[8:]
        key = (tuple(None if m is None else (m._parameters["weight"].data_ptr(), m.eps) for m in norms),
               tuple((m._parameters["weight"].data_ptr(), _ptr(m._parameters["bias"]), m.plan, m.use_kernel)
                     for m in linears))
        cached = self.__dict__.get("_step")
        if cached is None or cached[0] != key:
            cached = (key, self._fill(parts))
            self.__dict__["_step"] = cached
        return cached[1]

    def _fill(self, parts: tuple) -> LayerStep | None:
        in_norm, post_norm, wq, wk, wv, wo, q_norm, k_norm, wg, wu, wd = parts
        if not all(m.use_kernel and m.plan.variant != "torch" for m in (wq, wk, wv, wo, wg, wu, wd)) \
                or not layer_applies(self):  # a part or a weight replaced since the conversion checked them
            return None
        lib, a = _library(), self.self_attn
        hidden, inter = in_norm.weight.numel(), wg.weight.shape[0]
        q_dim, kv_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        shapes = {wq: (q_dim, hidden), wk: (kv_dim, hidden), wv: (kv_dim, hidden), wo: (hidden, q_dim),
                  wg: (inter, hidden), wu: (inter, hidden), wd: (hidden, inter)}
        if (any(m.weight.shape != shape or (m.bias is not None and m.bias.shape != shape[:1])
                for m, shape in shapes.items()) or post_norm.weight.shape != (hidden,)
                or any(n is not None and n.weight.shape != (a.head_dim,) for n in (q_norm, k_norm))):
            return None  # a weight replaced by one of another shape: the modules run, and say what is wrong
        s = LayerStep()
        s.in_norm, s.post_norm = _ptr(in_norm.weight), _ptr(post_norm.weight)
        s.wq, s.bq, s.wk, s.bk = _ptr(wq.weight), _ptr(wq.bias), _ptr(wk.weight), _ptr(wk.bias)
        s.wv, s.bv, s.wo, s.bo = _ptr(wv.weight), _ptr(wv.bias), _ptr(wo.weight), _ptr(wo.bias)
        s.qnorm = None if q_norm is None else q_norm.weight.data_ptr()
        s.knorm = None if k_norm is None else k_norm.weight.data_ptr()
        s.wg, s.bg, s.wu = _ptr(wg.weight), _ptr(wg.bias), _ptr(wu.weight)
        s.bu, s.wd, s.bd = _ptr(wu.bias), _ptr(wd.weight), _ptr(wd.bias)
        s.eps = in_norm.eps
        s.qk_eps = 0.0 if q_norm is None else q_norm.eps
        for field, m in zip(("qkv", "o", "gate_up", "down"), (wq, wo, wg, wd)):
            product = getattr(s, field)
            product.fn, product.rows, product.prefetch = lib.gemv_group[m.plan.variant], m.plan.rows, m.plan.prefetch
        s.hidden, s.inter, s.H, s.KV, s.d = hidden, inter, a.n_heads, a.n_kv_heads, a.head_dim
        s.bf16 = wq.weight.dtype == torch.bfloat16
        s.scratch_bytes = wq.weight.element_size() * (4 * hidden + 2 * q_dim + 2 * kv_dim + 3 * inter)
        return s


def _global_hooks() -> bool:
    """Is a forward hook registered for every module (``register_module_forward_hook``)?"""
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


def _hooked(module: nn.Module) -> bool:
    """Does something wait to see ``module`` called (a forward hook on it, or on every module)?"""
    return bool(module._forward_hooks or module._forward_pre_hooks) or _global_hooks()


class DecoderModel(layers.DecoderModel):
    """``layers.DecoderModel`` whose one-token step runs the whole stack of layers in one C call
    (``qwen_stack_step``): each layer as ``DecoderLayer``'s one call, from the fields each layer keeps,
    with no Python between them (~150 us a layer inside a step, while the memory streamed nothing).
    Whenever a layer could not take its one call (a prompt, gradients, a part on torch's product, a
    forward hook on a layer, a cache of another layout), the layers run one by one, as in the original."""

    def forward(self, input_ids, caches, start):
        stack = list(self._modules["layers"]._modules.values())
        found = None if caches is None or input_ids.numel() != 1 or torch.is_grad_enabled() \
            else _stack_prepared(stack, caches, start)
        if found is None:
            return super().forward(input_ids, caches, start)
        prepared, dtype = found
        x = self.embed_tokens(input_ids)
        if x.dtype != dtype or x.shape[-1] != prepared[0].hidden or not available():
            return super().forward(input_ids, caches, start)
        cos, sin = self.rotary_emb(torch.arange(start, start + 1, device=input_ids.device), x.dtype)
        cos, sin, x = cos.contiguous(), sin.contiguous(), x.contiguous()
        out, between = torch.empty_like(x), x.new_empty(2, x.shape[-1])
        scratch = torch.empty(max(p.scratch_bytes for p in prepared), dtype=torch.uint8, device="cpu")
        kept = self.__dict__.get("_stack")  # the array of the layers' kept fields, while they are the same
        if kept is None or len(kept[0]) != len(prepared) or any(a is not b for a, b in zip(kept[0], prepared)):
            kept = (prepared, _layer_array(prepared))
            self.__dict__["_stack"] = kept
        kv, lengths = _cache_arrays(caches)
        call = StackCall(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), scratch.data_ptr(),
                         between.data_ptr(), start)
        _share(call)
        _step_succeeded(_library().qwen_stack_step(kept[1], len(prepared), kv, lengths, ctypes.byref(call), None),
                        start)
        return self.norm(out)


def _takes_row(logits: torch.Tensor) -> bool:
    """Can the choice's C passes read ``logits``: one non-empty contiguous CPU row of float32 or bfloat16?"""
    return (logits.dim() == 1 and logits.numel() > 0 and logits.dtype in DTYPES and logits.device.type == "cpu"
            and logits.is_contiguous() and available())


def argmax(logits: torch.Tensor) -> int | None:
    """``int(logits.argmax())`` of one row of float32 or bfloat16 CPU logits by one C pass (the first of equal
    largest values, as torch), or None: where the largest is not finite (a NaN, an infinity: the caller says
    what is wrong) or the kernels cannot take the row (another dtype or device, no kernels here)."""
    if not _takes_row(logits):
        return None
    at = _library().qwen_argmax(logits.data_ptr(), logits.numel(), logits.dtype == torch.bfloat16)
    return None if at < 0 else at


def top_k(logits: torch.Tensor, seen: torch.Tensor, penalty: float, temperature: float, k: int
          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``torch.topk(scaled, k)`` of one row of float32 or bfloat16 CPU logits, where ``scaled`` is what
    ``sampling``'s repetition penalty (on the ids in ``seen``) and temperature make of them in float32: the
    same values, bit for bit, in one C pass. ``(values, ids)``, values descending (among equal values the
    lower id first); None where a logit is NaN or infinite (the caller says what is wrong), where an id
    in ``seen`` is not one of the row's, where ``k`` is above ``TOP_K_MAX`` (the pass keeps its best
    values sorted by insertion, k steps each: torch's topk is faster for a large k), or where the kernels
    cannot take the row."""
    if not _takes_row(logits) or not 0 < k <= min(logits.numel(), TOP_K_MAX) or seen.device.type != "cpu":
        return None
    seen = seen.to(torch.int64).contiguous()
    if seen.numel() and not 0 <= int(seen.min()) <= int(seen.max()) < logits.numel():
        return None  # ids outside the row: torch's indexing says what it makes of them
    values = torch.empty(k, dtype=torch.float32, device="cpu")  # explicit: torch's defaults may say otherwise
    ids = torch.empty(k, dtype=torch.int64, device="cpu")
    got = _library().qwen_top_k(logits.data_ptr(), logits.numel(), logits.dtype == torch.bfloat16, seen.data_ptr(),
                                seen.numel(), penalty, temperature, k, values.data_ptr(), ids.data_ptr())
    if got == -1:
        raise MemoryError(f"top_k: no memory to mark {seen.numel()} ids")
    return None if got < 0 else (values, ids)


class TokenStep:
    """One generation's decode step: ``model(token, caches, pos, last_only=True)[0, -1]`` (the
    embedding row, the stack of layers, the final norm and the head) in one C call, with the checks
    done once, when the generation starts, instead of for every token.

    ``DecoderModel.forward`` checks, for every token, that each layer, cache and hook is still as it
    was, then runs the embedding, the rotary angles, the final norm and the head as modules. After a
    step has streamed the whole model through the CPU's caches, that Python runs from main memory:
    measured in a 0.5B bf16 generation on a 2-core Zen 3, 3.5-4.4 ms a token outside the C calls
    (6.6% of the token, the memory streaming nothing), 1.0-1.4 ms with this step (benchmarks/RESULTS.md):
    the rest is the choice of the token and the loop around it. The logits are the same numbers, bit for bit
    (``tests/test_kernels.py``); ``benchmarks/bench_step.py`` times it beside ``DecoderModel``.

    What the model is made of is read once: a weight replaced, a plan or a hook changed during a
    generation counts from the next one (the step keeps the tensors it started with alive, so it
    never reads freed memory; a weight's values changed in place are read at the next token). A hook
    registered for every module (``register_module_forward_hook``) is seen at once: while there is
    one, the token runs through the modules. A model whose forward is its own (a subclass's, or one
    set on the object) is left to it: ``for_model`` says None.
    """

    ROTARY_BLOCK = 256  #: positions whose cos/sin are computed at once, when the first of them is reached

    @classmethod
    def for_model(cls, model: nn.Module, caches: list) -> "TokenStep | None":
        """The step for ``model`` decoding into ``caches``, or None where only the modules can run it."""
        inner, head = getattr(model, "model", None), getattr(model, "lm_head", None)
        if (not isinstance(model, layers.CausalLM) or type(model).forward is not layers.CausalLM.forward
                or type(inner) is not DecoderModel or type(head) is not Linear or not head.use_kernel
                or any("forward" in m.__dict__ for m in (model, inner)) or not available()
                or any(_hooked(m) for m in model.modules())):
            return None  # a forward of its own (a subclass's, or patched on the object) must run
        embed, norm = inner.embed_tokens, inner.norm
        found = _stack_prepared(list(inner.layers), caches, 0)
        if (found is None or type(embed) is not nn.Embedding or embed.max_norm is not None
                or type(norm) is not RMSNorm or type(inner.rotary_emb) is not layers.RotaryEmbedding):
            return None
        prepared, dtype = found
        hidden = prepared[0].hidden
        tensors = [embed.weight, norm.weight, head.weight] + ([] if head.bias is None else [head.bias])
        vocab = head.weight.shape[0]  # the weight's own shape: a replaced weight leaves out_features as it was
        if (any(t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu" for t in tensors)
                or embed.weight.dim() != 2 or embed.weight.shape[1] != hidden or norm.weight.shape != (hidden,)
                or head.weight.shape != (vocab, hidden) or (head.bias is not None and head.bias.shape != (vocab,))):
            return None
        return cls(model, caches, prepared, dtype)

    def __init__(self, model: nn.Module, caches: list, prepared: list, dtype: torch.dtype) -> None:
        inner, head = model.model, model.lm_head
        lib = self.lib = _library()
        self.model, self.caches, self.rotary, self.dtype = model, caches, inner.rotary_emb, dtype
        self.embed = inner.embed_tokens.weight.detach()
        self.vocab, self.max_len = head.weight.shape[0], min(c.max_len for c in caches)
        self.tokens = self.embed.shape[0]
        self.row_bytes = prepared[0].hidden * self.embed.element_size()
        # every tensor a pointer below reaches into, alive for as long as this step is
        self.keep = [p.detach() for p in model.parameters()] + [t for c in caches for t in (c.k, c.v)]
        self.prepared = prepared
        self.layers, (self.kv, self.lengths) = _layer_array(prepared), _cache_arrays(caches)
        hidden = prepared[0].hidden
        # explicitly on the CPU, whatever torch.set_default_device says: C writes here
        self.out = torch.empty(1, 1, hidden, dtype=dtype, device="cpu")
        self.normed = torch.empty(1, 1, hidden, dtype=dtype, device="cpu")
        self.between = torch.empty(2, hidden, dtype=dtype, device="cpu")
        self.scratch = torch.empty(max(p.scratch_bytes for p in prepared), dtype=torch.uint8, device="cpu")
        self.call = StackCall(0, 0, 0, self.out.data_ptr(), self.scratch.data_ptr(), self.between.data_ptr())
        self.tail = StackTail(_ptr(inner.norm.weight), _ptr(head.weight), _ptr(head.bias), self.normed.data_ptr(),
                              0, inner.norm.eps)
        self.tail.head.rows, self.tail.head.prefetch, self.tail.vocab = head.plan.rows, head.plan.prefetch, self.vocab
        # the head by its plan's C variant in the same call; a head whose plan is torch's runs after it
        self.head_by_torch = head.plan.variant == "torch"
        if self.head_by_torch:
            self.head = (head.weight.detach(), None if head.bias is None else head.bias.detach(), head.plan)
        else:
            self.tail.head.fn = lib.gemv_group[head.plan.variant]
        self.block = (0, None, None)  # (first position, cos rows, sin rows)

    def _rotary(self, pos: int) -> tuple[int, int]:
        """Addresses of cos and sin for ``pos``: rows of a block computed by the model's own rotary module,
        on one torch thread (the same elementwise operations as for one position: the same numbers)."""
        first, cos, sin = self.block
        if cos is None or not first <= pos < first + self.ROTARY_BLOCK:
            first = pos - pos % self.ROTARY_BLOCK
            with threads.torch_threads(1):
                cos, sin = self.rotary(torch.arange(first, first + self.ROTARY_BLOCK, device="cpu"), self.dtype)
            cos, sin = cos.contiguous(), sin.contiguous()
            self.block = (first, cos, sin)
        offset = (pos - first) * cos.shape[-1] * cos.element_size()
        return cos.data_ptr() + offset, sin.data_ptr() + offset

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """The logits (vocab,) after ``token`` at position ``pos``; its key and value go into the caches."""
        if not 0 <= token < self.tokens or not 0 <= pos < self.max_len:
            raise ValueError(f"token {token} at position {pos}: this step takes ids below {self.tokens} and "
                             f"positions below {self.max_len} (the caches' length)")
        if _global_hooks():
            with threads.torch_threads(1):
                return self.model(torch.tensor([[token]], device="cpu"), self.caches, pos, last_only=True)[0, -1]
        call, tail = self.call, self.tail
        call.x = self.embed.data_ptr() + token * self.row_bytes
        call.cos, call.sin = self._rotary(pos)
        call.pos = pos
        _share(call)
        logits = None if self.head_by_torch else torch.empty(self.vocab, dtype=self.dtype, device="cpu")
        tail.logits = None if logits is None else logits.data_ptr()
        _step_succeeded(self.lib.qwen_stack_step(self.layers, len(self.prepared), self.kv, self.lengths,
                                                 ctypes.byref(call), ctypes.byref(tail)), pos)
        return _run(self.lib, self.normed, *self.head)[0, 0] if logits is None else logits


def few_rows_prompt(model: nn.Module, tokens: int) -> bool:
    """Does a prompt of ``tokens`` tokens run every product of ``model``'s layers by the few-rows walk (2 to
    ``configure``'s ``few_rows`` tokens, each such weight's plan one of the kernels')? Its torch operations
    between the products then belong on one thread, as a token's do (``generation``): torch's OpenMP
    workers, spinning after a parallel operation, would take the core the kernels' pool needs."""
    head = getattr(model, "lm_head", None)  # the prompt's last row only: a one-row product
    return (available() and 2 <= tokens <= _sharing["few"] and in_use(model)
            and all(isinstance(m, Linear) and m.use_kernel and m.plan.variant != "torch" for m in model.modules()
                    if isinstance(m, nn.Linear) and m is not head))


def in_use(model: nn.Module) -> bool:
    """Does ``model`` decode with the C kernels (a twin that uses them, and they are available)?"""
    return available() and any(isinstance(m, (RMSNorm, Attention)) or (isinstance(m, Linear) and m.use_kernel)
                               for m in model.modules())

"""Which way of multiplying a row by each weight shape is fastest on this machine, measured once.

A decode step multiplies every weight matrix by one row, at the speed the weights stream from
memory. How to keep memory busy differs between CPUs: one sequential stream per core reaches
the memory's speed on AMD Zen, while one core of an Intel Xeon reads far below the socket's
bandwidth unless it has several streams in flight (and torch's own F.linear, which uses
AVX-512 there, was measured faster than a plain AVX2 loop). So for each weight shape the C
kernels' variants (``kernels.VARIANTS``: the instruction set; ``kernels.Plan``: rows walked
side by side, software prefetch) and torch's F.linear are timed here, on matrices of that shape
large enough to leave the caches, and the fastest is used — so qwen_lab is never slower than
F.linear on a shape. Each candidate is first checked against F.linear on random data: a variant
that computes a wrong answer on this CPU is never chosen.

The memory's speed is not the machine's to choose: on a shared host it moves between runs and
within one (27-68 GB/s on a 2-core AMD EPYC Zen 4). With it slow, every plan streams at its speed
and the ranking is near ties; with it fast, each core's own rate limits a plan and the plans part
(float32 4864x896 in a decode step: 60 GB/s against 48). So near ties are timed again on one
thread, limited by its core at any memory speed, and a decisive difference there decides
(``measure``); and nothing is timed while torch's OpenMP workers still spin on a core after its
own product (``threads.wait_until_quiet``).

The answers are kept in ``kernels.cache_dir()`` per CPU, thread count, kernel build and page size
(plans timed with 2 MiB pages off are kept apart: ``pages.huge_pages``): a
machine measures once (8-11 s for the four large shapes of Qwen2.5-1.5B on a 2-core AMD EPYC Zen 4). A room's shared
cache (``kernels.shared_cache_dir()``, filled by ``qwen-lab tune``) is read first: a shape it
holds for this CPU, thread count and build is used as it is, never measured; the others are
measured and kept in the user's own cache, never in the shared one. Matrices under
``TUNE_MIN_BYTES`` stay in the caches whatever the walk, so they take the default plan untimed.
A measurement taken while other programs keep the CPUs busy (a browser, a second notebook, 30 learners
on one server) ranks the plans by who got the CPU. So the CPU time of the CPUs this process may run
on (``/proc/stat``, a hypervisor's steal included) is compared with this process's own across each
measurement: where other programs took a quarter of a core (``BUSY``) or more beyond the CPUs the
kernels' threads leave free (``busy_threshold``), the plan is kept *provisional* (``"busy"``: their
share, in its entry). It is used as it is, and measured again at the first load of its shape in a
later process that finds the machine quiet (``quiet_now``: 0.1 s watched), at most once a process;
a measurement made while busy never replaces a plan already kept, so a machine that stays busy keeps
its plan and costs no measurement. Where ``/proc/stat`` cannot be read (not Linux) every measurement
counts as quiet.
The room's plans are used as they are, provisional or not: ``qwen-lab tune`` warns the instructor.
Run once with ``QWEN_LAB_TUNING=again`` to measure every shape afresh (and keep the new answers in
the user's own cache; a shape the shared cache holds is still read from it afterwards: measuring
the room's plans again is the instructor's ``qwen-lab tune``); ``QWEN_LAB_TUNING=off`` uses the
default plan everywhere, nothing measured.

>>> plan_for(64, 64, torch.float32)        # small: the default, nothing measured
Plan(variant='avx2', rows=1, prefetch=0)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import kernels, pages, threads

TUNE_MIN_BYTES = 1 << 20
#: The timed matrices cycle through copies adding up to at least this many bytes, so that each is
#: out of the caches when its turn comes; None: three times this CPU's last-level cache, within
#: 128-512 MiB (``stream_bytes``).
STREAM_BYTES: int | None = None
ROUNDS = 5
#: A timing covers products of at least this many bytes in all (a 3 MB matrix's single product lasts ~50 us,
#: while the memory's speed moves from one millisecond to the next on a shared machine).
SAMPLE_BYTES = 32 << 20
#: Plans timed within this fraction of the fastest are timed again on one thread, where one faster by more
#: than it is chosen instead (``measure``).
TIE = 0.10
#: How ``measure``'s speeds name a plan's time on one thread: ``"avx2, 1 row alone"``.
ALONE = "alone"
#: Rows of the float64 reference computed at once when a plan's answer is checked (``measure``).
CHECK_ROWS = 4096
#: Part of the cache's key: a change to how plans are measured measures them again (2: timed copies
#: never the matrix the checks just read, which on a CPU with a large L3 could still be there; 3: timed
#: in 2 MiB pages where the weights are, ``pages.huge_pages``; 4: no plan timed while torch's OpenMP workers
#: still spin after its own product or the checks, ``threads.wait_until_quiet``; 5: a near tie decided on one
#: thread goes to the fastest on all threads of the plans that tie there, not to the fastest alone).
METHOD = 5
#: Other programs' CPU time during a measurement, in cores on average beyond the CPUs this process leaves
#: free (those it may use, less the kernels' threads: ``busy_threshold``), from which the machine counts as
#: busy and the plan as provisional. Measured on a 2-core AMD EPYC Zen 4 (three shapes, twice each): others
#: took 0.00-0.06 cores during a quiet measurement, 0.71-0.87 beside one ``python -c "while 1: pass"``
#: (1.54-1.59 beside two); a quarter of a core lies far from both.
BUSY = 0.25
#: Seconds ``quiet_now`` watches the machine before a provisional plan is measured again.
QUIET_CHECK_S = 0.1

#: The walks ``candidates`` times per variant: (rows side by side, prefetch).
ROWS_AND_PREFETCH = ((1, 0), (1, 1), (2, 0), (2, 1), (4, 0), (4, 1), (8, 0))

_memory: dict[str, kernels.Plan] = {}


def candidates(dtype: torch.dtype | None = None) -> list[kernels.Plan]:
    """Every plan this CPU can run: each variant x 1, 2 or 4 rows x prefetch off/on, and 8 rows without
    prefetch (one walk more per variant, not two: prefetch at 8 rows was not measured), and torch; for
    float32 weights, without the bf16 pair variants (``kernels.PAIR_VARIANTS``: the same code there)."""
    names = [v for v in kernels.variants() if dtype != torch.float32 or v not in kernels.PAIR_VARIANTS]
    plans = [kernels.Plan(v, rows, prefetch) for v in names for rows, prefetch in ROWS_AND_PREFETCH]
    return plans + [kernels.Plan("torch")]


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache this machine reports (``/sys/devices/system/cpu/cpu0/cache``), or None."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes, default=None)


def stream_bytes() -> int:
    """How many bytes of copies the timed matrices cycle through (``STREAM_BYTES``)."""
    if STREAM_BYTES is not None:
        return STREAM_BYTES
    return min(max(3 * (last_level_cache_bytes() or 0), 128 << 20), 512 << 20)


def _machine_key(threads: int | None = None) -> str:
    """The CPU, the threads, the kernel build and the pages that a measurement holds for (the build by its file's
    name, not its folder: the same build, from a room's shared cache or from the user's own, plays the same)."""
    parts = [f"method {METHOD}", kernels.cpu_model(), " ".join(sorted(kernels.cpu_flags())),
             str(threads or kernels.num_threads()), str(kernels.library_name()), torch.__version__]
    if not pages.huge_pages():  # timed in 4 KiB pages, as the weights then are: kept apart (2 MiB: as before)
        parts.append("4 KiB pages")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def shape_key(out_features: int, in_features: int, dtype: torch.dtype) -> str:
    """How a plans file names a weight shape: ``"bfloat16 896x4864"``."""
    return f"{str(dtype).removeprefix('torch.')} {out_features}x{in_features}"


def plans_file_name(threads: int | None = None) -> str:
    """The name of the file holding this machine's plans for ``threads`` (default: ``kernels.num_threads()``)."""
    return f"plans-{_machine_key(threads)}.json"


def _cache_file() -> Path:
    return kernels.cache_dir() / plans_file_name()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _load() -> dict:
    return _read(_cache_file())


def _cached(key: str, dtype: torch.dtype) -> tuple[kernels.Plan, float | None] | None:
    """The plan kept for ``key``, and its ``"busy"`` (None: measured quietly, or the room's, used as it is):
    the room's shared cache first, then the user's own; None where neither holds one this CPU runs (a
    damaged or hand-edited entry counts as none: it is measured again)."""
    shared = kernels.shared_cache_dir()
    for path in ([shared / plans_file_name()] if shared is not None else []) + [_cache_file()]:
        entry = _read(path).get(key)
        plan = _plan_of(entry)
        if plan is not None and plan in candidates(dtype):
            return plan, None if path.parent == shared else _busy_of(entry)
    return None


def _plan_of(entry) -> kernels.Plan | None:
    """The plan a plans file's entry holds, or None where it holds none (damaged, hand-edited)."""
    try:
        return kernels.Plan(entry["variant"], int(entry.get("rows", 1)), int(entry.get("prefetch", 0)))
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def _busy_of(entry) -> float | None:
    """The cores other programs took while an entry's plan was measured, where it says so (a number, at least
    ``BUSY``); None: measured quietly (a hand-edited ``"busy"`` of 0, a negative one or NaN counts as quiet)."""
    try:
        busy = float(entry["busy"])
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    return busy if math.isfinite(busy) and busy >= BUSY else None


def _save(key: str, plan: kernels.Plan, speeds: dict[str, float], busy: float | None = None) -> bool:
    """Add one answer to the cache file, written atomically (another process may be tuning too); ``busy``:
    measured while other programs took that many cores (``measure_watched``), kept provisional. An answer
    measured while busy never replaces one already kept (measured quietly, or while busy too): False, the
    file left as it was."""
    path = _cache_file()
    data = _load()
    if busy is not None and _plan_of(data.get(key)) is not None:
        return False
    data[key] = {"variant": plan.variant, "rows": plan.rows, "prefetch": plan.prefetch,
                 "gb_per_s": {name: round(v / 1e9, 2) for name, v in speeds.items()}}
    if busy is not None:
        data[key]["busy"] = round(busy, 2)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only cache, a full disk: the answer still holds for this process
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return True


def plan_for(out_features: int, in_features: int, dtype: torch.dtype) -> kernels.Plan:
    """The plan for an (out x in) weight of ``dtype``: remembered, read from the cache, or measured now."""
    setting = os.environ.get("QWEN_LAB_TUNING", "").lower()
    if out_features * in_features * torch.empty((), dtype=dtype).element_size() < TUNE_MIN_BYTES \
            or setting in ("0", "off"):
        return kernels.DEFAULT_PLAN
    key = shape_key(out_features, in_features, dtype)
    if key not in _memory:
        kept = _cached(key, dtype) if setting != "again" else None  # again: once per shape and process
        if kept is not None and (kept[1] is None or not quiet_now()):
            _memory[key] = kept[0]  # measured quietly; or provisional, and the machine still busy
        else:
            plan, speeds, busy = measure_watched(out_features, in_features, dtype)
            if not _save(key, plan, speeds, busy) and kept is not None:
                plan = kept[0]  # busy again: the provisional plan stays, for a quiet moment
            _memory[key] = plan
    return _memory[key]


def measure(out_features: int, in_features: int, dtype: torch.dtype,
            plans: list[kernels.Plan] | None = None) -> tuple[kernels.Plan, dict[str, float]]:
    """Time every plan on this shape; the fastest, and each one's bytes per second (best of ``ROUNDS``; for
    the plans timed again on one thread, their speed there too, as ``"<plan> alone"``)."""
    plans = candidates(dtype) if plans is None else plans
    if out_features < 1 or in_features < 1:
        raise ValueError(f"tuning.measure: a {out_features} x {in_features} matrix has no weights to time; "
                         "give it at least one row and one column")
    g = torch.Generator().manual_seed(0)
    # in memory like the model's weights (2 MiB pages where load asks for them), since that is what the plan
    # will stream: on an AMD EPYC Zen 4 a plan chosen on 4 KiB pages streamed 0-11% slower on 2 MiB pages than
    # the one chosen there (mostly 1-3%: near ties; benchmarks/bench_gemv.py --pages, RESULTS.md)
    weight = pages.huge_empty((out_features, in_features), dtype).normal_(generator=g)
    x = torch.randn(in_features, generator=g).to(dtype)
    nbytes = weight.numel() * weight.element_size()
    # The reference in float64, a block of rows at a time: the whole matrix in float64 was four times a
    # bf16 weight (1.9 GB for Qwen2.5-1.5B's head: a 2.4 GiB peak on a learner's first load of it)
    want = torch.cat([F.linear(x.double(), weight[i:i + CHECK_ROWS].double())
                      for i in range(0, out_features, CHECK_ROWS)])
    correct = []
    for plan in plans:  # a wrong answer on this CPU rules a plan out, whatever its speed
        got = kernels._run(kernels._library(), x, weight, None, plan).double()
        if torch.allclose(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-2):
            correct.append(plan)
    # Timed on copies the checks above never read, each last read (or written) a whole cycle of
    # stream_bytes() earlier: a matrix still in the cache would time its plan at the cache's speed.
    # A matrix larger than that cycle is itself out of the caches; it is timed as it is, with no copy.
    wanted = stream_bytes()
    copies = [weight] if nbytes >= wanted else [pages.huge_copy(weight, dtype) for _ in range(-(-wanted // nbytes))]
    best = {plan: float("inf") for plan in correct}
    calls = max(1, -(-SAMPLE_BYTES // nbytes))
    turn = 0

    def timed(plan: kernels.Plan) -> float:
        """Seconds per product of ``plan``, over ``calls`` products on the next copies."""
        nonlocal turn
        start = time.perf_counter()
        for _ in range(calls):
            kernels._run(kernels._library(), x, copies[turn % len(copies)], None, plan)
            turn += 1
        return (time.perf_counter() - start) / calls

    ours, torch_s = [p for p in correct if p.variant != "torch"], [p for p in correct if p.variant == "torch"]
    threads.wait_until_quiet()  # the checks' torch products leave its OpenMP workers spinning a while
    with torch.inference_mode():
        # rounds of every plan in turn: a noisy moment hurts them all alike, and no plan is always first;
        # torch's is last in each, its workers left to settle after it
        for r in range(ROUNDS):
            for plan in _rotated(ours, r) + torch_s:
                best[plan] = min(best[plan], timed(plan))
                if plan.variant == "torch":
                    threads.wait_until_quiet()
    speeds = {str(plan): nbytes / t for plan, t in best.items()}
    chosen = min(best, key=best.get)
    close = [plan for plan in correct if best[plan] <= best[chosen] * (1 + TIE)]
    if len(close) > 1 and kernels.num_threads() > 1:
        # With the memory slow, every plan streams at its speed: near ties that say nothing of the memory
        # being fast, when each core's own rate limits a plan. One thread alone is limited mostly by its core,
        # so the plans within TIE of the fastest are timed again on one, and those slower there than the
        # fastest by more than TIE are ruled out (RESULTS.md: on a 2-core AMD EPYC Zen 4, float32 896x896
        # timed 35.5 against 30.8 GB/s on two threads with the memory at 35 GB/s, 31.9 against 23.2 on one;
        # in a decode step with the memory at 68 GB/s, 44.8 against 35). Closer than that, one thread's rates
        # are noise too (bf16 plans: 27-36 GB/s, ranked differently from one measurement to the next).
        alone = {plan: float("inf") for plan in close}
        with kernels.threads_set(1), torch.inference_mode():
            for r in range(ROUNDS):
                for plan in _rotated(close, r):
                    alone[plan] = min(alone[plan], timed(plan))
        speeds.update({f"{plan} {ALONE}": nbytes / t for plan, t in alone.items()})
        # Of the plans within TIE of the fastest there, the fastest on all threads: one thread alone is partly
        # held by the memory too when it is slow. On the Zen 4 above, with the memory at ~36 GB/s, float32
        # 896x896's "avx2, 1 row, prefetch" timed 29.3 GB/s alone against "avx2, 1 row"'s 27.9 and was chosen
        # as the fastest alone (over "avx512, 1 row", 24.7 there), though on two threads with the memory fast it
        # streams 44 GB/s against 52; the two tie alone, and two threads rank them as the step does.
        fastest_alone = min(alone.values())
        chosen = min((plan for plan in close if alone[plan] <= fastest_alone * (1 + TIE)), key=best.get)
    return chosen, speeds


def _rotated(plans: list, r: int) -> list:
    """``plans`` starting at the ``r``-th (round ``r``'s order: no plan is always timed first)."""
    k = r % len(plans) if plans else 0
    return plans[k:] + plans[:k]


def _cpu_now() -> tuple[float, str, float, set[int] | None]:
    """The clock, the text of ``/proc/stat``, this process's CPU seconds and the CPUs it may run on (None:
    unknown), read together (OSError: no /proc)."""
    own = os.times()
    ours = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return time.monotonic(), Path("/proc/stat").read_text(), own.user + own.system, ours


def cpu_seconds() -> tuple[float, float, float, int] | None:
    """``(clock, the CPUs' seconds of work, this process's, how many CPUs)``: summed over the CPUs this process
    may run on (its affinity; all of the machine's where /proc/stat does not list those), steal included (a
    hypervisor running another guest while this one wanted the CPU); None where unknown."""
    try:
        clock, stat, own, ours = _cpu_now()
        per_cpu = {}
        for fields in map(str.split, stat.splitlines()):
            if fields and fields[0].startswith("cpu"):
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(t) for t in fields[1:9])
                per_cpu[fields[0][3:]] = user + nice + system + irq + softirq + steal
        wanted = [str(cpu) for cpu in ours] if ours else []
        if wanted and all(cpu in per_cpu for cpu in wanted):
            work, count = sum(per_cpu[cpu] for cpu in wanted), len(wanted)
        else:  # the machine's line: all of its CPUs
            work, count = per_cpu[""], sum(1 for cpu in per_cpu if cpu)
    except (OSError, ValueError, KeyError):  # no /proc/stat (not Linux), or not in the format it has there
        return None
    return clock, work / os.sysconf("SC_CLK_TCK"), own, count


def others_busy(before: tuple | None, after: tuple | None) -> float | None:
    """Cores' worth of CPU time other programs took between two ``cpu_seconds()``, on average; None: unknown."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0])


def busy_threshold(cpus: int) -> float:
    """Other programs' cores from which a measurement on ``cpus`` CPUs counts as disturbed: ``BUSY`` beyond the
    CPUs the kernels' threads leave free (2 CPUs, 2 threads: a quarter of a core; 16 CPUs: 14.25)."""
    return BUSY + max(0, cpus - kernels.num_threads())


def _busy_share(before: tuple | None, after: tuple | None) -> float | None:
    """Others' cores between two ``cpu_seconds()`` where they reach ``busy_threshold``; None: quiet, or unknown."""
    share = others_busy(before, after)
    return share if share is not None and share >= busy_threshold(after[3]) else None


def quiet_now() -> bool:
    """Did other programs stay under ``busy_threshold`` in the ``QUIET_CHECK_S`` seconds just watched? (True:
    unknown.)"""
    before = cpu_seconds()
    if before is None:
        return True
    time.sleep(QUIET_CHECK_S)
    return _busy_share(before, cpu_seconds()) is None


def measure_watched(out_features: int, in_features: int, dtype: torch.dtype
                    ) -> tuple[kernels.Plan, dict[str, float], float | None]:
    """``measure``, and the cores other programs took meanwhile where they reached ``busy_threshold`` (None:
    quiet, or unknown)."""
    before = cpu_seconds()
    plan, speeds = measure(out_features, in_features, dtype)
    return plan, speeds, _busy_share(before, cpu_seconds())


def provisional(path: Path) -> dict[str, float]:
    """The plans of a plans file that were measured while the machine was busy: ``{shape: cores others took}``."""
    shares = {key: _busy_of(entry) for key, entry in _read(path).items()}
    return {key: share for key, share in shares.items() if share is not None}


def describe(model) -> dict[str, str]:
    """``{"bfloat16 896x4864": "avx2, 4 rows", ...}``: the plan each weight shape of ``model`` uses."""
    out = {}
    for m in model.modules():
        if isinstance(m, kernels.Linear) and m.use_kernel:
            out[shape_key(m.out_features, m.in_features, m.weight.dtype)] = str(m.plan)
    return out


__all__ = ["BUSY", "TUNE_MIN_BYTES", "busy_threshold", "candidates", "cpu_seconds", "describe", "measure",
           "measure_watched", "others_busy", "plan_for", "plans_file_name", "provisional", "quiet_now", "shape_key"]

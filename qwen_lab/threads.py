"""How many threads this process may really use, and why.

``os.cpu_count()`` is the machine's size, not this process's share of it. A
container or a JupyterHub limit (a cgroup CPU *quota*) may grant 2 CPUs on a
64-core host; ``taskset`` or a batch system may pin the process to some cores
(the *affinity* mask). A thread pool sized past that share does not run
faster: its threads take turns on the CPUs they may use, and every parallel
step waits for the one that is off a CPU. Measured on a 2-core machine: one
busy process beside a 2-thread decode cut it to a fifth of its speed
(``benchmarks/RESULTS.md``).

So the count is: ``QWEN_LAB_THREADS`` if set; else ``OMP_NUM_THREADS`` if the
user set it; else the smaller of the affinity mask and the quota.

>>> n, why = choose_threads()
>>> n >= 1 and isinstance(why, str)
True
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

from .errors import SettingError

CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (``taskset``, cpusets); the CPU count where unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_quota(proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup quota grants (e.g. 1.5), or None where there is no quota.

    cgroup v2: ``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``; v1:
    ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us``. A limit on any
    ancestor cgroup applies too, so the smallest along the path counts.
    ``proc_cgroup`` is the text of ``/proc/self/cgroup`` (read when not given).

    >>> import tempfile; root = Path(tempfile.mkdtemp())
    >>> (root / "hub" / "learner").mkdir(parents=True)
    >>> _ = (root / "hub" / "cpu.max").write_text("150000 100000\\n")
    >>> _ = (root / "hub" / "learner" / "cpu.max").write_text("max 100000\\n")
    >>> cgroup_quota("0::/hub/learner\\n", root)
    1.5
    """
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    limits = []
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "" and hierarchy == "0":  # v2: one unified hierarchy
            base, files = root, ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            base = next((root / d for d in (controllers, "cpu,cpuacct", "cpu") if (root / d).is_dir()), None)
            if base is None:
                continue
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        parts = [p for p in path.strip("/").split("/") if p]
        for depth in range(len(parts), -1, -1):  # the cgroup itself, then each ancestor
            limit = _read_limit(base.joinpath(*parts[:depth]), files)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _read_limit(directory: Path, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:  # v2 cpu.max
            quota, period = (directory / files[0]).read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((directory / files[0]).read_text())
        return None if quota < 0 else quota / int((directory / files[1]).read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _env_count(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        count = int(value.split(",")[0])  # OMP_NUM_THREADS may list counts per nesting level
    except ValueError:
        raise SettingError(f"{name}={value!r} is not a number of threads; set it to e.g. 2, or unset it") from None
    if count < 1:
        raise SettingError(f"{name}={value!r}: the number of threads must be at least 1")
    return count


def explicit_threads() -> tuple[int, str] | None:
    """The count the user set (``QWEN_LAB_THREADS``, else ``OMP_NUM_THREADS``), and by which variable."""
    for name in ("QWEN_LAB_THREADS", "OMP_NUM_THREADS"):
        count = _env_count(name)
        if count is not None:
            return count, name
    return None


def choose_threads() -> tuple[int, str]:
    """The number of threads to compute with, and the reason, in words."""
    explicit = explicit_threads()
    if explicit is not None:
        return explicit[0], f"set by {explicit[1]}"
    cpus, quota = affinity_cpus(), cgroup_quota()
    if quota is not None and math.floor(quota) < cpus:
        # A fractional share (1.5 CPUs) runs one thread well; two would be throttled in turns.
        return max(1, math.floor(quota)), f"the cgroup CPU quota ({quota:g} CPUs)"
    return cpus, f"the CPUs this process may use ({cpus})"


def _runnable_here() -> int:
    """Threads of this process that are running or waiting for a CPU right now."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        count += stat[stat.rindex(")") + 2] == "R"  # the state follows the command name
    return max(count, 1)


def runnable_elsewhere(samples: int = 3) -> int | None:
    """How many threads of *other* processes want a CPU right now (None where unknown).

    ``/proc/loadavg``'s fourth field counts the tasks running or waiting to run
    at this instant, machine-wide; this process's own are subtracted. A few
    samples, the smallest kept: a kernel worker that runs for a moment is not
    a competitor, a busy program or a second notebook generating text is.
    """
    counts = []
    for i in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(0, running - _runnable_here()))
        if i + 1 < samples:
            time.sleep(0.0002)
    return min(counts)


def threads_now(limit: int) -> int:
    """Threads worth using for a parallel step starting now, at most ``limit``.

    A fork-join step (a prompt's matrix products in torch) waits at its end for
    its slowest thread, and a thread that shares its CPU with another program is
    slow: measured on 2 cores beside one busy process, a 100-token prompt ran at
    24% of its quiet speed on 2 threads and 53% on 1. So the threads are the CPUs
    left free by other programs' runnable threads, at least one.
    """
    if limit <= 1:
        return 1
    others = runnable_elsewhere()
    if others is None:
        return limit
    return max(1, min(limit, affinity_cpus() - others))


def wait_until_quiet(timeout: float = 0.3, window: float = 0.001) -> float:
    """Wait until no other thread of this process wants a CPU; the seconds waited.

    After a parallel torch operation its OpenMP workers keep spinning for a while, waiting for the next
    one (GNU OpenMP: about 10 ms, measured on a 2-core AMD EPYC Zen 4; Intel's: up to 200 ms). A kernel
    call timed in that while shares a core with them: there, a 3 MB product right after a 2-thread
    ``torch.sum`` streamed at 15-23 GB/s instead of 32, and ``tuning`` chose against the plan it always
    timed right after torch's own. So measurements wait here first: until two looks ``window`` seconds
    apart find no other thread of the process running or runnable (``/proc/self/task/*/stat``), at most
    ``timeout`` seconds (a busy thread of the program's own would not stop for waiting). The CPU time in
    ``schedstat`` would not do: a running thread's is brought up to date only at the scheduler's tick.
    """
    start, quiet = time.perf_counter(), 0
    while quiet < 2 and time.perf_counter() - start < timeout:
        quiet = quiet + 1 if _runnable_here() <= 1 else 0
        if quiet < 2:
            time.sleep(window)
    return time.perf_counter() - start


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with torch's intra-op thread count set to ``count``, then put it back."""
    import torch
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

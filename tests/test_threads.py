"""Thread counts: from the affinity mask, the cgroup quota and the user's settings; adapting to others."""
import os

import pytest
import torch

from qwen_lab import threads


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path):
    write(tmp_path / "kubepods" / "cpu.max", "400000 100000\n")
    write(tmp_path / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    write(tmp_path / "kubepods" / "pod1" / "learner" / "cpu.max", "max 100000\n")
    assert threads.cgroup_quota("0::/kubepods/pod1/learner\n", tmp_path) == 1.5


def test_cgroup_v2_without_a_quota(tmp_path):
    write(tmp_path / "user.slice" / "cpu.max", "max 100000\n")
    assert threads.cgroup_quota("0::/user.slice\n", tmp_path) is None
    assert threads.cgroup_quota("0::/not-mounted\n", tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    base = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    write(base / "cpu.cfs_quota_us", "200000\n")
    write(base / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")  # the root: no limit
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    assert threads.cgroup_quota(text, tmp_path) == 2.0


def test_garbage_in_cgroup_files_means_no_quota(tmp_path):
    write(tmp_path / "x" / "cpu.max", "lots 0\n")
    assert threads.cgroup_quota("0::/x\n", tmp_path) is None


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("QWEN_LAB_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_quota_below_the_affinity_mask_wins(clean_env):
    clean_env.setattr(threads, "affinity_cpus", lambda: 16)
    clean_env.setattr(threads, "cgroup_quota", lambda: 2.5)  # a fractional share: run 2 threads well
    assert threads.choose_threads() == (2, "the cgroup CPU quota (2.5 CPUs)")
    clean_env.setattr(threads, "cgroup_quota", lambda: 0.5)  # less than one CPU: still one thread
    assert threads.choose_threads()[0] == 1


def test_affinity_mask_below_the_quota_wins(clean_env):
    clean_env.setattr(threads, "affinity_cpus", lambda: 3)
    clean_env.setattr(threads, "cgroup_quota", lambda: 8.0)
    assert threads.choose_threads() == (3, "the CPUs this process may use (3)")
    clean_env.setattr(threads, "cgroup_quota", lambda: None)
    assert threads.choose_threads()[0] == 3


def test_explicit_settings_win_qwen_lab_first(clean_env):
    clean_env.setattr(threads, "affinity_cpus", lambda: 2)
    clean_env.setenv("OMP_NUM_THREADS", "4,2")  # per nesting level: the first counts
    assert threads.choose_threads() == (4, "set by OMP_NUM_THREADS")
    clean_env.setenv("QWEN_LAB_THREADS", "3")
    assert threads.choose_threads() == (3, "set by QWEN_LAB_THREADS")
    assert threads.explicit_threads() == (3, "QWEN_LAB_THREADS")


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_a_bad_setting_is_named(clean_env, value):
    clean_env.setenv("QWEN_LAB_THREADS", value)
    with pytest.raises(ValueError, match="QWEN_LAB_THREADS"):
        threads.choose_threads()


def test_real_machine_answer_is_within_the_affinity_mask(clean_env):
    count, why = threads.choose_threads()
    assert 1 <= count <= len(os.sched_getaffinity(0)) and why


def test_threads_now_leaves_busy_cpus_to_others(monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 4)
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: 0)
    assert threads.threads_now(4) == 4 and threads.threads_now(2) == 2
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: 3)
    assert threads.threads_now(4) == 1
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: 9)  # oversubscribed: never below one
    assert threads.threads_now(4) == 1
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: None)  # unknown: the limit
    assert threads.threads_now(4) == 4


def test_runnable_elsewhere_sees_a_busy_process():
    import subprocess
    import sys
    import time
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc/loadavg")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert threads.runnable_elsewhere() >= 1
    finally:
        hog.kill()


def test_torch_threads_are_put_back():
    before = torch.get_num_threads()
    with threads.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with threads.torch_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def _busy_thread(seconds):
    """A thread of this process that wants a CPU for ``seconds`` (as torch's OpenMP workers spin after an
    operation), started; it holds the GIL only in turns, so the caller still runs."""
    import threading
    import time

    def spin():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    t = threading.Thread(target=spin, daemon=True)
    t.start()
    return t


def test_waiting_until_quiet_outlasts_a_busy_thread_of_the_process():
    if not os.path.exists("/proc/self/task"):
        pytest.skip("no /proc/self/task")
    spinner = _busy_thread(0.15)
    waited = threads.wait_until_quiet(timeout=5.0)
    assert not spinner.is_alive() and 0.1 < waited < 5.0
    assert threads.wait_until_quiet(timeout=5.0) < 1.0  # quiet now: two looks, not the timeout


def test_waiting_until_quiet_gives_up_after_its_timeout():
    """A thread of the program's own that never stops: waiting longer would not help."""
    if not os.path.exists("/proc/self/task"):
        pytest.skip("no /proc/self/task")
    spinner = _busy_thread(3.0)
    waited = threads.wait_until_quiet(timeout=0.2)
    assert spinner.is_alive() and 0.2 <= waited < 2.0
    spinner.join()


def test_torch_s_spinning_workers_are_waited_for():
    """The case it is for: after a 2-thread torch operation, its OpenMP workers spin a while (GNU OpenMP:
    about 10 ms on a 2-core AMD EPYC); the wait ends once they sleep."""
    if not os.path.exists("/proc/self/task") or torch.get_num_threads() < 2:
        pytest.skip("no /proc/self/task, or torch on one thread")
    big = torch.ones(1 << 24)
    with threads.torch_threads(2):
        big.sum()
    threads.wait_until_quiet(timeout=2.0)
    assert threads._runnable_here() == 1  # only this thread, that looks

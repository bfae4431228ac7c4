"""Which plan multiplies a row by each weight shape (tuning.py): measured once, out of the caches, never
beside torch's spinning workers or while other programs keep the CPUs busy; remembered per machine, shared
by a room."""
import json
import os
import time

import pytest
import torch

from qwen_lab import kernels
from qwen_lab.hub import resolve
from qwen_lab.load import load_model

from conftest import needs_kernel, read_only, tree


@needs_kernel
def test_tuning_measures_once_and_remembers(tmp_path, monkeypatch, machine):
    from qwen_lab import tuning
    monkeypatch.setenv("QWEN_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setattr(tuning, "STREAM_BYTES", 8 << 20)
    monkeypatch.setattr(tuning, "ROUNDS", 2)
    assert tuning.plan_for(64, 64, torch.float32) == kernels.DEFAULT_PLAN  # small: nothing measured
    calls = []
    real = tuning.measure
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: calls.append(a) or real(*a, **k))
    plan = tuning.plan_for(1024, 512, torch.bfloat16)
    assert plan in tuning.candidates() and len(calls) == 1
    assert tuning.plan_for(1024, 512, torch.bfloat16) == plan and len(calls) == 1  # remembered in memory
    monkeypatch.setattr(tuning, "_memory", {})
    assert tuning.plan_for(1024, 512, torch.bfloat16) == plan and len(calls) == 1  # and on disk
    (cache,) = tmp_path.glob("plans-*.json")
    entry = json.loads(cache.read_text())["bfloat16 1024x512"]
    assert entry["variant"] == plan.variant and "torch" in entry["gb_per_s"]
    # QWEN_LAB_TUNING=again: measured afresh in a new process (not read from disk), once, and kept
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setenv("QWEN_LAB_TUNING", "again")
    planted = {**json.loads(cache.read_text()), "bfloat16 1024x512": {"variant": "torch", "gb_per_s": {"torch": 0.1}}}
    cache.write_text(json.dumps(planted))  # as if an earlier, noisy measurement had chosen torch
    again = tuning.plan_for(1024, 512, torch.bfloat16)
    assert len(calls) == 2 and tuning.plan_for(1024, 512, torch.bfloat16) == again and len(calls) == 2
    assert json.loads(cache.read_text())["bfloat16 1024x512"]["gb_per_s"] != {"torch": 0.1}
    monkeypatch.setenv("QWEN_LAB_TUNING", "off")
    monkeypatch.setattr(tuning, "_memory", {})
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.DEFAULT_PLAN and len(calls) == 2


@needs_kernel
@pytest.mark.parametrize("stream_mib, copies", [(12, 3), (2, 0)])
def test_plans_are_timed_on_matrices_out_of_the_cache(monkeypatch, stream_mib, copies):
    """Never on the matrix the correctness checks just read (a large L3 can still hold it, and the
    plan timed on it first would win at the cache's speed): on copies made after them, each used
    once a cycle, with no plan first in every round; a matrix as large as the cycle is timed as is."""
    from qwen_lab import tuning
    monkeypatch.setattr(tuning, "STREAM_BYTES", stream_mib << 20)
    monkeypatch.setattr(tuning, "ROUNDS", 3)
    monkeypatch.setattr(tuning, "SAMPLE_BYTES", 0)  # one product per timing
    monkeypatch.setattr(tuning, "TIE", 0.0)  # and no plan timed again on one thread
    real, calls = kernels._run, []

    def run(lib, x, w, b, plan):
        calls.append((torch.is_inference_mode_enabled(), w.data_ptr(), plan))
        return real(lib, x, w, b, plan)
    monkeypatch.setattr(kernels, "_run", run)
    plans = [kernels.Plan("avx2", rows, 0) for rows in (1, 2, 4)]
    tuning.measure(1024, 1024, torch.float32, plans)  # 4 MiB
    checks = [c for c in calls if not c[0]]
    timed = [c for c in calls if c[0]]
    assert [c[2] for c in checks] == plans and len({c[1] for c in checks}) == 1
    assert len(timed) == 3 * len(plans)
    if copies:
        assert checks[0][1] not in {c[1] for c in timed}
        assert len({c[1] for c in timed}) == copies  # 12 MiB of 4 MiB copies, in turn
        assert all(timed[i][1] != timed[i + 1][1] for i in range(len(timed) - 1))
    else:
        assert {c[1] for c in timed} == {checks[0][1]}
    assert len({timed[r * len(plans)][2] for r in range(3)}) == 3  # each round starts with another plan


def test_the_copies_outsize_the_last_level_cache(monkeypatch):
    from qwen_lab import tuning
    monkeypatch.setattr(tuning, "STREAM_BYTES", None)
    for llc, want in ((32 << 20, 128 << 20), (105 << 20, 315 << 20), (1 << 30, 512 << 20), (None, 128 << 20)):
        monkeypatch.setattr(tuning, "last_level_cache_bytes", lambda llc=llc: llc)
        assert tuning.stream_bytes() == want


@needs_kernel
def test_a_new_way_of_measuring_measures_again(monkeypatch):
    from qwen_lab import tuning
    before = tuning._cache_file()
    monkeypatch.setattr(tuning, "METHOD", tuning.METHOD + 1)  # plans kept from the old way are not read
    assert tuning._cache_file() != before


@needs_kernel
def test_plans_timed_without_2_mib_pages_are_kept_apart(monkeypatch):
    """Plans are timed in the pages the weights get; with 2 MiB pages off (QWEN_LAB_HUGE_PAGES=0, a system set
    to ``never``) they were timed in 4 KiB pages and kept under the same name, so turning them on again read
    plans ranked on the other kind of memory (0-11% slower there, benchmarks/RESULTS.md)."""
    from qwen_lab import pages, tuning
    monkeypatch.setattr(pages, "huge_pages", lambda: True)
    on = tuning.plans_file_name()
    monkeypatch.setattr(pages, "huge_pages", lambda: False)
    assert tuning.plans_file_name() != on


@needs_kernel
def test_plans_are_timed_in_memory_like_the_weights_2_mib_pages(monkeypatch):
    """load keeps large weights in 2 MiB pages; plans timed on torch's 4 KiB pages ranked otherwise there
    (benchmarks/RESULTS.md): every matrix a plan is timed on is in advised, 2 MiB-aligned memory."""
    from conftest import vm_flags
    from qwen_lab import pages, tuning
    if not pages.huge_pages():
        pytest.skip(f"transparent huge pages are off here ({pages.THP_SETTING})")
    monkeypatch.setattr(tuning, "STREAM_BYTES", 16 << 20)
    monkeypatch.setattr(tuning, "SAMPLE_BYTES", 0)
    monkeypatch.setattr(tuning, "TIE", 0.0)
    real, timed = kernels._run, []

    def run(lib, x, w, b, plan):
        timed.append((w.data_ptr(), vm_flags(w.data_ptr())))
        return real(lib, x, w, b, plan)
    monkeypatch.setattr(kernels, "_run", run)
    plans = [kernels.Plan("avx2", 1, 0), kernels.Plan("avx2", 4, 0)]
    tuning.measure(1024, 1024, torch.float32, plans)  # 4 MiB: four copies
    assert len(timed) == len(plans) * (1 + tuning.ROUNDS)  # the checks, then the rounds
    assert all(address % pages.HUGE_PAGE == 0 and "hg" in flags for address, flags in timed), timed


@needs_kernel
def test_no_plan_is_timed_while_torch_s_openmp_workers_still_spin(monkeypatch):
    """After a parallel torch product its OpenMP workers spin for milliseconds and share a core with the plan
    timed next: the plan that always came right after torch's own (and after the checks) lost every round
    (benchmarks/RESULTS.md). The timing starts once the workers are quiet, and torch's plan is each round's
    last, with a wait after it."""
    from qwen_lab import threads, tuning
    monkeypatch.setattr(tuning, "STREAM_BYTES", 8 << 20)
    monkeypatch.setattr(tuning, "ROUNDS", 3)
    monkeypatch.setattr(tuning, "SAMPLE_BYTES", 0)
    monkeypatch.setattr(tuning, "TIE", 0.0)
    real, events = kernels._run, []

    def run(lib, x, w, b, plan):
        events.append((torch.is_inference_mode_enabled(), plan))
        return real(lib, x, w, b, plan)
    monkeypatch.setattr(kernels, "_run", run)
    monkeypatch.setattr(threads, "wait_until_quiet", lambda: events.append("quiet") or 0.0)
    plans = [kernels.Plan("torch"), kernels.Plan("avx2", 1, 0), kernels.Plan("avx2", 4, 0)]
    tuning.measure(1024, 1024, torch.float32, plans)
    first_timed = next(i for i, e in enumerate(events) if e != "quiet" and e[0])
    assert events[first_timed - 1] == "quiet"  # after the checks
    rounds = events[first_timed:]
    for i, e in enumerate(rounds):
        if e != "quiet" and e[1].variant == "torch":
            assert i + 1 == len(rounds) or rounds[i + 1] == "quiet", rounds
    timed = [e[1] for e in rounds if e != "quiet"]
    assert [p.variant for p in timed[2::3]] == ["torch"] * 3  # the last of each round of three


def _paced_run(monkeypatch, seconds):
    """kernels._run computing as before, then taking ``seconds(plan, threads)`` in all (a plan's speed made up)."""
    real = kernels._run

    def run(lib, x, w, b, plan):
        start = time.perf_counter()
        y = real(lib, x, w, b, plan)
        while time.perf_counter() - start < seconds(plan, kernels.num_threads()):
            pass
        return y
    monkeypatch.setattr(kernels, "_run", run)


@needs_kernel
@pytest.mark.parametrize("slower_on_two, four_alone, chosen_rows", [(1.04, 0.008, 1), (1.5, 0.008, 4),
                                                                  (1.04, 0.0042, 4)])
def test_near_ties_are_decided_on_one_thread(monkeypatch, slower_on_two, four_alone, chosen_rows):
    """With the memory slow every plan streams at its speed, and their near ties say nothing of the memory
    fast, when each core's own rate limits a plan; one thread alone shows that rate at any memory speed. A
    plan 4% slower on two threads but twice as fast alone is chosen; 50% slower, it is not; only 5% faster
    alone (noise, there too), neither."""
    from qwen_lab import tuning
    monkeypatch.setattr(tuning, "STREAM_BYTES", 8 << 20)
    monkeypatch.setattr(tuning, "ROUNDS", 3)
    monkeypatch.setattr(tuning, "SAMPLE_BYTES", 0)
    monkeypatch.setattr(tuning, "TIE", 0.10)
    one, four = kernels.Plan("avx2", 1, 0), kernels.Plan("avx2", 4, 0)
    pace = {(one, 2): 0.004 * slower_on_two, (four, 2): 0.004, (one, 1): 0.004, (four, 1): four_alone}
    _paced_run(monkeypatch, lambda plan, threads: pace[plan, min(threads, 2)])
    with kernels.threads_set(2):
        plan, speeds = tuning.measure(1024, 1024, torch.float32, [one, four])
        assert kernels.num_threads() == 2  # back from one thread
    assert plan.rows == chosen_rows
    assert (f"{one} {tuning.ALONE}" in speeds) == (slower_on_two < 1 + tuning.TIE)


@needs_kernel
def test_a_near_tie_goes_to_the_fastest_on_all_threads_of_the_plans_that_tie_alone(monkeypatch):
    """With the memory slow, one thread alone is partly held by the memory too: a prefetching plan timed 5%
    faster alone than a plain one that two threads find faster (and that, with the memory fast, streams 18%
    faster). Alone rules out the plan that is slow there (the fastest on two threads); of the two that tie
    alone, two threads choose (the fastest alone was chosen before)."""
    from qwen_lab import tuning
    monkeypatch.setattr(tuning, "STREAM_BYTES", 8 << 20)
    monkeypatch.setattr(tuning, "ROUNDS", 3)
    monkeypatch.setattr(tuning, "SAMPLE_BYTES", 0)
    monkeypatch.setattr(tuning, "TIE", 0.10)
    wide, plain, ahead = kernels.Plan("avx2x16", 1, 0), kernels.Plan("avx2", 1, 0), kernels.Plan("avx2", 1, 1)
    pace = {(wide, 2): 0.0040, (plain, 2): 0.0041, (ahead, 2): 0.0043,  # all within TIE on two threads
            (wide, 1): 0.0070, (plain, 1): 0.0050, (ahead, 1): 0.00476}  # the wide one slow alone
    _paced_run(monkeypatch, lambda plan, threads: pace[plan, min(threads, 2)])
    with kernels.threads_set(2):
        plan, speeds = tuning.measure(1024, 1024, torch.float32, [wide, plain, ahead])
    assert plan == plain, speeds
    assert speeds[f"{ahead} {tuning.ALONE}"] > speeds[f"{plain} {tuning.ALONE}"] > speeds[f"{wide} {tuning.ALONE}"]


def test_a_matrix_without_weights_is_refused_in_one_line():
    from qwen_lab import tuning
    with pytest.raises(ValueError, match="no weights to time"):
        tuning.measure(0, 896, torch.float32)


@needs_kernel
def test_a_plan_that_computes_wrong_is_never_chosen(monkeypatch):
    from qwen_lab import tuning
    monkeypatch.setattr(tuning, "STREAM_BYTES", 4 << 20)
    real = kernels._run
    broken = kernels.Plan("avx2", 4, 0)

    def run(lib, x, w, b, plan):
        y = real(lib, x, w, b, plan)
        return y * 1.5 if plan == broken else y  # as if this variant miscomputed on this CPU
    monkeypatch.setattr(kernels, "_run", run)
    plan, speeds = tuning.measure(1024, 1024, torch.float32, [broken, kernels.Plan("avx2", 1, 0)])
    assert plan == kernels.Plan("avx2", 1, 0) and str(broken) not in speeds


def test_the_check_covers_every_row_though_its_reference_is_computed_a_block_at_a_time(monkeypatch):
    """The float64 reference of the whole matrix at once took 1.9 GB for Qwen2.5-1.5B's head (a 2.4 GiB
    peak at a learner's first load); in blocks of CHECK_ROWS rows, a wrong last row is still seen."""
    from qwen_lab import tuning
    monkeypatch.setattr(tuning, "STREAM_BYTES", 4 << 20)
    monkeypatch.setattr(tuning, "CHECK_ROWS", 300)  # 1024 rows: blocks of 300, 300, 300 and 124
    real = kernels._run
    broken = kernels.Plan("avx2", 4, 0)

    def run(lib, x, w, b, plan):
        y = real(lib, x, w, b, plan)
        if plan == broken:
            y[-1] += 1.0  # only the last row wrong
        return y
    monkeypatch.setattr(kernels, "_run", run)
    plan, speeds = tuning.measure(1024, 1024, torch.float32, [broken, kernels.Plan("avx2", 1, 0)])
    assert plan == kernels.Plan("avx2", 1, 0) and str(broken) not in speeds
    doubles = []
    double = torch.Tensor.double
    monkeypatch.setattr(torch.Tensor, "double", lambda t: doubles.append(t.numel()) or double(t))
    tuning.measure(1024, 1024, torch.float32, [kernels.Plan("avx2", 1, 0)])
    assert max(doubles) == 300 * 1024  # never the whole matrix in float64


@needs_kernel
def test_a_loaded_model_says_which_plan_each_shape_uses(tmp_path, monkeypatch):
    from qwen_lab import tuning
    monkeypatch.setenv("QWEN_LAB_CACHE", str(tmp_path))
    # tiny-chat's lm_head (2048 x 192 float32, 1.5 MiB) is over TUNE_MIN_BYTES, its other matrices are not
    monkeypatch.setattr(tuning, "STREAM_BYTES", 4 << 20)
    monkeypatch.setattr(tuning, "_memory", {})
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")
    plans = tuning.describe(model)
    assert plans["float32 2048x192"] in {str(p) for p in tuning.candidates()}  # lm_head: measured
    assert plans["float32 192x192"] == str(kernels.DEFAULT_PLAN)             # small: the default


def plant_plans(folder, entries, threads=None):
    """A plans file, as ``qwen-lab tune`` leaves it, for this machine (or ``threads``) in ``folder``."""
    from qwen_lab import tuning
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / tuning.plans_file_name(threads)
    path.write_text(json.dumps({key: {"variant": p.variant, "rows": p.rows, "prefetch": p.prefetch, "gb_per_s": {}}
                                for key, p in entries.items()}))
    return path


@pytest.fixture
def learner(tmp_path, monkeypatch, machine):
    """A learner's process on a quiet machine: its own cache, the room's shared one, nothing remembered;
    measuring counted."""
    from qwen_lab import tuning
    own, shared = tmp_path / "own", tmp_path / "shared"
    monkeypatch.setenv("QWEN_LAB_CACHE", str(own))
    monkeypatch.setenv("QWEN_LAB_SHARED_CACHE", str(shared))
    monkeypatch.delenv("QWEN_LAB_TUNING", raising=False)
    monkeypatch.setattr(tuning, "_memory", {})
    measured = []

    def measure(out_features, in_features, dtype, plans=None):  # a stand-in: the plan it "found", and its speed
        measured.append(f"{str(dtype).removeprefix('torch.')} {out_features}x{in_features}")
        return kernels.Plan("avx2", 4, 1), {"avx2, 4 rows, prefetch": 1e9}
    monkeypatch.setattr(tuning, "measure", measure)
    return own, shared, measured


@needs_kernel
def test_plans_from_a_room_s_shared_cache_are_used_as_they_are(learner):
    from qwen_lab import tuning
    own, shared, measured = learner
    chosen = kernels.Plan("avx2", 2, 1)  # not the default: it can only come from the file
    plant_plans(shared, {"bfloat16 1024x512": chosen, "float32 2048x192": kernels.Plan("torch")})
    read_only(shared)
    before = tree(shared)
    assert tuning.plan_for(1024, 512, torch.bfloat16) == chosen
    assert tuning.plan_for(2048, 192, torch.float32) == kernels.Plan("torch")
    assert measured == [] and not own.exists() and tree(shared) == before


@needs_kernel
def test_a_partial_shared_cache_measures_only_the_rest_into_the_learner_s_own(learner):
    from qwen_lab import tuning
    own, shared, measured = learner
    plant_plans(shared, {"bfloat16 1024x512": kernels.Plan("avx2", 2, 0)})
    read_only(shared)
    before = tree(shared)
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 2, 0)
    assert tuning.plan_for(2048, 512, torch.bfloat16) == kernels.Plan("avx2", 4, 1)  # not in the room's: measured
    assert measured == ["bfloat16 2048x512"] and tree(shared) == before
    assert set(json.loads((own / tuning.plans_file_name()).read_text())) == {"bfloat16 2048x512"}


@needs_kernel
def test_plans_of_another_cpu_thread_count_or_build_are_not_used(learner, monkeypatch):
    """Each is measured here instead (a plan is only as good as the machine it was measured on); the same
    entry under this machine's name is then used as it is, and a damaged entry is measured again, no error."""
    from qwen_lab import tuning
    own, shared, measured = learner
    planted = {"bfloat16 1024x512": kernels.Plan("avx2", 2, 1)}
    with monkeypatch.context() as m:
        m.setattr(kernels, "cpu_model", lambda: "Another CPU")
        plant_plans(shared, planted)
    plant_plans(shared, planted, threads=kernels.num_threads() + 1)
    with monkeypatch.context() as m:  # plans measured with an older build of the kernels
        m.setattr(kernels, "library_name", lambda: "kernels-0123456789abcdef.so")
        plant_plans(shared, planted)
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 4, 1)
    assert measured == ["bfloat16 1024x512"]
    tuning._memory.clear()
    (own / tuning.plans_file_name()).unlink()
    plant_plans(shared, planted)  # this machine's
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 2, 1) and len(measured) == 1
    tuning._memory.clear()
    path = plant_plans(shared, {})
    path.write_text(json.dumps({"bfloat16 1024x512": {"variant": "avx2", "rows": "many"},
                                "bfloat16 2048x512": {"variant": "avx2", "rows": 3}}))  # rows gemv refuses
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 4, 1)
    assert tuning.plan_for(2048, 512, torch.bfloat16) == kernels.Plan("avx2", 4, 1) and len(measured) == 3


@pytest.mark.parametrize("others, steal, busy", [
    (0.05, 0, None),  # quiet: a browser idling, the system's own threads
    (0.63, 0, 0.63),  # a second notebook, a spinning program
    (0.5, 0.5, 0.5),  # a hypervisor running its other guests on this one's CPUs (KVM, Firecracker): steal
    (None, 0, None),  # no /proc (macOS): unknown, taken as quiet
])
def test_other_programs_cpu_time_during_a_measurement_tells_a_busy_machine(monkeypatch, others, steal, busy):
    from conftest import FakeMachine
    from qwen_lab import tuning

    def unreadable():
        raise FileNotFoundError("/proc/stat")
    FakeMachine(others or 0, steal, own=1.5).install(monkeypatch)
    if others is None:
        monkeypatch.setattr(tuning, "_cpu_now", unreadable)
    found = kernels.Plan("avx2", 4, 1), {"avx2, 4 rows, prefetch": 1e9}
    monkeypatch.setattr(tuning, "measure", lambda *args: found)
    plan, speeds, got = tuning.measure_watched(1024, 512, torch.bfloat16)
    assert (plan, speeds) == found
    assert got is None if busy is None else got == pytest.approx(busy, abs=0.01)  # this process's 1.5 cores: its own
    assert tuning.quiet_now() == (busy is None)


@pytest.mark.parametrize("cpus, ours, threads, others, on, busy", [
    (8, None, 2, 3.0, None, False),      # a desktop: other programs on cores the kernels' two threads leave free
    (8, None, 2, 6.5, None, True),       # ... until they want more than those six
    (4, {0, 1}, 2, 2.0, {2, 3}, False),  # this process kept to two CPUs (taskset, a cpuset): work elsewhere
    (4, {0, 1}, 2, 0.5, {0}, True),      # ... and on one of its own
    (2, {0, 1}, 1, 1.0, None, False),    # one kernel thread on two CPUs: a second notebook on the other
    (2, {0, 1}, 1, 1.5, None, True),
])
def test_busy_counts_only_what_competes_for_the_kernels_cpus(monkeypatch, cpus, ours, threads, others, on, busy):
    """Other programs' time on the CPUs this process may use, beyond those its kernels' threads leave free."""
    from conftest import FakeMachine
    from qwen_lab import tuning
    FakeMachine(others, own=threads, cpus=cpus, on=on, ours=ours).install(monkeypatch, threads=threads)
    assert tuning.quiet_now() == (not busy)
    want = pytest.approx(others if on is None or on <= (ours or set(range(cpus))) else 0.0, abs=0.05)  # whole ticks
    assert tuning.others_busy(tuning.cpu_seconds(), tuning.cpu_seconds()) == want


def test_a_stat_file_without_this_process_s_cpus_is_read_whole(monkeypatch):
    """/proc/stat not listing the CPUs of this process's affinity (a container's view of its host): the machine's
    line, all of its CPUs."""
    from conftest import FakeMachine
    from qwen_lab import tuning
    FakeMachine(0.5, own=1.0, cpus=2, ours={5, 6}).install(monkeypatch)
    before = tuning.cpu_seconds()
    assert before[3] == 2 and tuning.others_busy(before, tuning.cpu_seconds()) == pytest.approx(0.5, abs=0.01)
    assert not tuning.quiet_now()


@needs_kernel
def test_a_plan_measured_while_busy_never_replaces_one_measured_quietly(learner, machine, monkeypatch):
    """QWEN_LAB_TUNING=again on a busy machine: the process uses what it measured, the file keeps the quiet plan;
    a read-only folder or a failed write leaves no temporary file behind."""
    from qwen_lab import tuning
    own, _, measured = learner
    found = iter([(kernels.Plan("avx2", 1, 0), 0.0), (kernels.Plan("torch"), 0.9)])

    def measure(out_features, in_features, dtype, plans=None):
        plan, machine.others = next(found)
        measured.append(plan)
        return plan, {str(plan): 1e9}
    monkeypatch.setattr(tuning, "measure", measure)
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 1, 0)
    plans = own / tuning.plans_file_name()
    quiet = plans.read_text()
    monkeypatch.setenv("QWEN_LAB_TUNING", "again")
    tuning._memory.clear()
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("torch") and len(measured) == 2
    assert plans.read_text() == quiet
    assert not tuning._save("bfloat16 1024x512", kernels.Plan("torch"), {"torch": 1e9}, busy=0.9)
    assert tuning._save("bfloat16 2048x512", kernels.Plan("torch"), {"torch": 1e9}, busy=0.9)  # none before: kept
    assert tuning.provisional(plans) == {"bfloat16 2048x512": 0.9}

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(json, "dump", full)
    assert tuning._save("bfloat16 4096x512", kernels.Plan("torch"), {"torch": 1e9})
    assert [p.name for p in own.iterdir() if p.suffix == ".json"] == [plans.name]


@pytest.mark.parametrize("busy", [0, -1, "nan", float("inf"), "many", None, 0.1])
def test_an_odd_busy_mark_counts_as_quiet(tmp_path, busy):
    from qwen_lab import tuning
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"bfloat16 1024x512": {"variant": "avx2", "busy": busy},
                                "bfloat16 2048x512": {"variant": "avx2", "busy": 0.5}}))
    assert tuning.provisional(path) == {"bfloat16 2048x512": 0.5}


@needs_kernel
def test_a_plan_measured_while_busy_is_provisional_until_a_quiet_measurement_replaces_it(learner, machine,
                                                                                        monkeypatch):
    """Used as it is meanwhile, and measured again only by a later process that finds the machine quiet; the
    room's plans, provisional or not, are used as they are and their folder is never written."""
    from qwen_lab import tuning
    own, shared, measured = learner
    room = plant_plans(shared, {"bfloat16 2048x512": kernels.Plan("avx2", 2, 1)})
    room.write_text(json.dumps({key: {**entry, "busy": 0.9} for key, entry in json.loads(room.read_text()).items()}))
    read_only(shared)
    before = tree(shared)
    # each measurement's plan, and the cores other programs take while it runs
    found = [(kernels.Plan("avx2", 4, 1), 0.9), (kernels.Plan("torch"), 0.7), (kernels.Plan("avx2", 1, 1), 0.0)]

    def measure(out_features, in_features, dtype, plans=None):
        plan, machine.others = found[len(measured)]
        measured.append(tuning.shape_key(out_features, in_features, dtype))
        return plan, {str(plan): 1e9, "torch": 0.5e9}
    monkeypatch.setattr(tuning, "measure", measure)
    machine.others = 0.9  # a second notebook busy from the start
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 4, 1) and len(measured) == 1
    plans = own / tuning.plans_file_name()
    kept = json.loads(plans.read_text())
    assert kept["bfloat16 1024x512"] == {"variant": "avx2", "rows": 4, "prefetch": 1, "busy": 0.9,
                                         "gb_per_s": {"avx2, 4 rows, prefetch": 1.0, "torch": 0.5}}
    tuning._memory.clear()  # a later process, the machine still busy: the plan used, nothing measured
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 4, 1) and len(measured) == 1
    machine.others = 0.0
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 4, 1) and len(measured) == 1  # once
    tuning._memory.clear()  # the next finds it quiet, measures, and is disturbed: the provisional plan stays
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 4, 1) and len(measured) == 2
    assert json.loads(plans.read_text()) == kept
    tuning._memory.clear()  # the next measures on a quiet machine: its plan replaces the provisional one
    machine.others = 0.0
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 1, 1) and len(measured) == 3
    assert json.loads(plans.read_text())["bfloat16 1024x512"] == {
        "variant": "avx2", "rows": 1, "prefetch": 1, "gb_per_s": {"avx2, 1 row, prefetch": 1.0, "torch": 0.5}}
    tuning._memory.clear()  # a quiet plan is kept for good, whatever the machine does later
    machine.others = 0.9
    assert tuning.plan_for(1024, 512, torch.bfloat16) == kernels.Plan("avx2", 1, 1) and len(measured) == 3
    machine.others = 0.0  # the room's provisional plan, on a quiet machine: used as it is
    assert tuning.plan_for(2048, 512, torch.bfloat16) == kernels.Plan("avx2", 2, 1) and len(measured) == 3
    assert set(json.loads(plans.read_text())) == {"bfloat16 1024x512"} and tree(shared) == before


@needs_kernel
def test_a_busy_machine_is_told_busy_with_a_process_spinning_on_each_core(monkeypatch):
    """This machine for real: programs spinning on its cores (two at most: about two cores of others' time,
    against a threshold of a quarter of one) are found, in the tenth of a second ``quiet_now`` watches."""
    import subprocess
    import sys
    from qwen_lab import tuning
    if tuning.cpu_seconds() is None:
        pytest.skip("no /proc/stat here: every measurement counts as quiet")
    spinners = []
    try:
        for _ in range(min(2, os.cpu_count() or 1)):
            spinners.append(subprocess.Popen([sys.executable, "-c", "print(flush=True)\nwhile 1: pass"],
                                             stdout=subprocess.PIPE))
        for spinner in spinners:
            spinner.stdout.readline()  # started: spinning from here on
        before = tuning.cpu_seconds()
        assert not tuning.quiet_now()
        assert tuning.others_busy(before, tuning.cpu_seconds()) > 2 * tuning.BUSY
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()

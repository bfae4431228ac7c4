"""A room's shared cache: `qwen-lab tune` fills it once; a learner's kernel then compiles and measures nothing."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import files_cut_at

from qwen_lab import cli, kernels, shared_cache, tuning
from qwen_lab.hub import resolve
from qwen_lab.load import load_model

REQUIRED = os.environ.get("QWEN_LAB_REQUIRE_KERNELS") == "1"
needs_kernel = pytest.mark.skipif(not REQUIRED and not kernels.available(), reason=f"C kernel: {kernels.status()}")
QWEN_1_5B = Path(__file__).resolve().parents[1] / "qwen_lab" / "reference" / "Qwen--Qwen2.5-1.5B-Instruct"


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def room(tmp_path, monkeypatch):
    """This process as the instructor, then as a learner: no cache of its own yet; the build copied, not compiled
    (seconds per test: test_kernels builds for real), the measurements short; each counted."""
    built = kernels._library()._name
    builds, measured = [], []

    def build(cc, target):
        builds.append(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)
    real_measure = tuning.measure

    def measure(*args, **kwargs):
        measured.append(args[:3])
        return real_measure(*args, **kwargs)
    monkeypatch.setattr(kernels, "_build", build)
    monkeypatch.setattr(tuning, "measure", measure)
    monkeypatch.setattr(tuning, "STREAM_BYTES", 4 << 20)
    monkeypatch.setattr(tuning, "ROUNDS", 2)
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setattr(kernels, "_threads", None)
    for name in ("QWEN_LAB_SHARED_CACHE", "QWEN_LAB_TUNING", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QWEN_LAB_CACHE", str(tmp_path / "instructor"))
    monkeypatch.setenv("QWEN_LAB_THREADS", "2")
    kernels._library.cache_clear()
    yield tmp_path, builds, measured
    monkeypatch.undo()
    kernels._library.cache_clear()


def test_the_shapes_tuned_are_those_a_loaded_model_asks_plans_for(monkeypatch):
    """Read from config.json alone: the shapes of 1 MiB and more, in the dtype the notebooks load the model in."""
    asked = []
    monkeypatch.setattr(tuning, "plan_for", lambda o, i, dtype: asked.append((o, i, dtype)) or kernels.DEFAULT_PLAN)
    load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")  # as the notebooks load it (suggested_dtype)
    big = [s for s in dict.fromkeys(asked) if s[0] * s[1] * s[2].itemsize >= tuning.TUNE_MIN_BYTES]
    if kernels.available():
        assert big == shared_cache.weight_shapes("qwen-lab/tiny-chat") == [(2048, 192, torch.float32)]
    # Qwen2.5-1.5B in bf16: k and v (256 x 1536, 768 KiB) are under the threshold; lm_head is the embedding's shape
    assert shared_cache.weight_shapes(str(QWEN_1_5B)) == [(1536, 1536, torch.bfloat16), (8960, 1536, torch.bfloat16),
                                                          (1536, 8960, torch.bfloat16), (151936, 1536, torch.bfloat16)]


@needs_kernel
def test_tune_fills_a_folder_that_learners_then_use_without_compiling_or_measuring(room, monkeypatch, capsys):
    tmp, builds, measured = room
    folder = tmp / "room" / "kernel-cache"
    assert cli.main(["tune", "--kernel-cache", str(folder), "--threads", "2", "qwen-lab/tiny-chat"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(builds) == 1 and measured == [(2048, 192, torch.float32)]
    plans_file = folder / tuning.plans_file_name(2)
    assert out[0] == f"kernels: {folder / kernels.library_name()} (compiled now)"
    assert out[1].startswith("float32 2048x192: ") and out[1].endswith(" GB/s; qwen-lab/tiny-chat)")
    assert out[-1].startswith(f"plans: {plans_file} (for ") and f"QWEN_LAB_SHARED_CACHE={folder}" in out[-1]
    assert not (tmp / "instructor").exists()  # everything went into the room's folder
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in [folder, *folder.iterdir()])  # readable by the learners
    room_plan = json.loads(plans_file.read_text())["float32 2048x192"]
    assert shared_cache.missing(folder, ["qwen-lab/tiny-chat"], 2) is None
    # the folder moved, as a volume mounted elsewhere, read-only; a learner with 2 threads, a cache of their own
    moved = tmp / "elsewhere"
    folder.rename(moved)
    for path in [moved, *moved.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = tree(moved)
    monkeypatch.setenv("QWEN_LAB_CACHE", str(tmp / "learner"))
    monkeypatch.setenv("QWEN_LAB_SHARED_CACHE", str(moved))
    kernels._library.cache_clear()
    tuning._memory.clear()
    model = load_model(resolve("qwen-lab/tiny-chat"), "float32", "cpu")
    assert kernels.in_use(model) and tuning.describe(model)["float32 2048x192"] == str(
        kernels.Plan(room_plan["variant"], room_plan["rows"], room_plan["prefetch"]))
    assert len(builds) == 1 and len(measured) == 1  # nothing compiled, nothing measured
    assert not (tmp / "learner").exists() and tree(moved) == before  # nothing written, anywhere


@needs_kernel
def test_missing_says_what_a_room_s_folder_lacks(room):
    tmp, _, _ = room
    folder = tmp / "kernel-cache"
    tiny = ["qwen-lab/tiny-chat"]
    assert shared_cache.missing(folder, tiny, 2) == f"{folder} does not exist"
    folder.mkdir()
    assert shared_cache.missing(folder, tiny, 2) == f"{folder} holds no build of this kit's kernels " \
                                                    f"({kernels.library_name()})"
    shared_cache.prepare(folder, tiny, 2, say=lambda line: None)
    assert shared_cache.missing(folder, tiny, 2) is None
    cpu = kernels.cpu_model() or "this CPU"
    assert shared_cache.missing(folder, tiny, 3) == f"{folder} holds no plans for {cpu} with 3 threads per learner"
    assert shared_cache.missing(folder, [*tiny, str(QWEN_1_5B)], 2) == (
        f"{folder} holds no plan for {QWEN_1_5B}'s bfloat16 1536x1536, bfloat16 8960x1536, bfloat16 1536x8960, "
        f"bfloat16 151936x1536")


@needs_kernel
@pytest.mark.parametrize("others", [0.9, 0.0])
def test_tune_says_in_one_line_when_it_measured_while_the_machine_was_busy(room, monkeypatch, capsys, others):
    """Its plans are every learner's, used as they are: the instructor is told, and the file marks them."""
    from conftest import FakeMachine
    tmp, _, measured = room
    FakeMachine(others).install(monkeypatch)
    folder = tmp / "room"
    assert cli.main(["tune", "--kernel-cache", str(folder), "--threads", "2", "qwen-lab/tiny-chat"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "float32 2048x192" in line]
    entry = json.loads((folder / tuning.plans_file_name(2)).read_text())["float32 2048x192"]
    assert measured == [(2048, 192, torch.float32)]
    if others:
        assert warned == ["qwen-lab: warning: other programs kept this machine busy while measuring float32 2048x192 "
                          "(up to 0.90 cores on average): these plans may be worse ones, and a room's learners use "
                          "them as they are; run this again when it is quiet"]
        assert entry["busy"] == 0.9
    else:
        assert warned == [] and "busy" not in entry


@needs_kernel
def test_tune_on_a_busy_machine_keeps_the_plans_measured_quietly_before(room, monkeypatch, capsys):
    from conftest import FakeMachine
    tmp, _, measured = room
    folder = tmp / "room"
    machine = FakeMachine(0.0).install(monkeypatch)
    args = ["tune", "--kernel-cache", str(folder), "--threads", "2", "qwen-lab/tiny-chat"]
    assert cli.main(args) == 0
    plans = folder / tuning.plans_file_name(2)
    quiet = plans.read_text()
    capsys.readouterr()
    machine.others = 0.9
    assert cli.main(args) == 0 and len(measured) == 2
    out, err = capsys.readouterr()
    assert ("float32 2048x192: measured while other programs kept this machine busy: the plan measured before "
            "is kept (qwen-lab/tiny-chat)") in out.splitlines()
    assert "warning: other programs" not in err and plans.read_text() == quiet


def test_tune_with_a_model_not_in_the_cache_is_one_line_and_makes_nothing(tmp_path, capsys):
    code = cli.main(["tune", "--kernel-cache", str(tmp_path / "k"), "--cache-dir", str(tmp_path / "hf"),
                     "Qwen/Qwen2.5-1.5B-Instruct"])
    err = capsys.readouterr().err
    assert code == 1 and err == (f"qwen-lab: error: Qwen/Qwen2.5-1.5B-Instruct is not in the cache {tmp_path / 'hf'}: "
                                 f"`qwen-lab download --cache-dir {tmp_path / 'hf'} Qwen/Qwen2.5-1.5B-Instruct` first\n")
    assert not (tmp_path / "k").exists()


def test_tune_into_a_folder_it_cannot_write_says_so_not_that_the_kernels_cannot_run(tmp_path, capsys):
    """A kernel cache on a read-only mount or a full disk was reported as "the C kernels cannot be built here
    (...could not link...): learners decode with torch, there is nothing to prepare": the wrong way to look, as
    learners would each build their own. Here the disk is "full": every file stops at 64 KiB (the kernels are
    more)."""
    folder = tmp_path / "kernel-cache"
    with files_cut_at(64 << 10):
        code = cli.main(["tune", "--kernel-cache", str(folder), "--threads", "1", "qwen-lab/tiny-chat"])
    err = capsys.readouterr().err
    assert code == 1 and err.splitlines()[-1] == (
        f"qwen-lab: error: cannot write into {folder}: File too large; give `--kernel-cache` a folder this user can "
        f"write, on a disk with space left"), err
    assert list(folder.iterdir()) == []  # nothing built, nothing left behind

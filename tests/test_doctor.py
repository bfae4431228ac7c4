"""``qwen-lab doctor``: one line per check, offline; a missing or damaged piece gets a line saying what to do."""
import os
import re
import zipfile
from pathlib import Path

import pytest

from qwen_lab import doctor
from qwen_lab.cli import main
from qwen_lab.hub import resolve
from qwen_lab.hub_server import LocalHub

REPO = "workshop/tiny"


@pytest.fixture
def cache(tmp_path, tiny_dir, online):
    """A Hugging Face cache holding workshop/tiny, downloaded from a LocalHub as `qwen-lab download` does."""
    folder = tmp_path / "hf-cache"
    with LocalHub({REPO: tiny_dir}) as hub:
        resolve(REPO, cache_dir=folder, endpoint=hub.url, check_cache=True)
    return folder


def snapshot_file(cache: Path, name: str) -> Path:
    [snapshot] = (cache / "models--workshop--tiny" / "snapshots").iterdir()
    return snapshot / name


def doctor_lines(capsys, *argv) -> tuple[int, dict[str, list[str]]]:
    """Exit code, and the lines by check name: {"model": ["ok  ..."], ...}."""
    code = main(["doctor", *argv])
    lines = capsys.readouterr().out.splitlines()
    by_name: dict[str, list[str]] = {}
    for line in lines:
        status, name, detail = line.split(None, 2)
        assert status in ("ok", "warn", "FAIL"), line
        by_name.setdefault(name, []).append(f"{status} {detail}")
    return code, by_name


def test_the_embedded_model_is_ready_everywhere(capsys):
    code, lines = doctor_lines(capsys, "qwen-lab/tiny-chat")
    assert code == 0
    assert lines["model"] == [lines["model"][0]] and lines["model"][0].startswith(
        "ok qwen-lab/tiny-chat: the embedded model (inside the package: nothing to download); 5 files")
    # suggested_dtype: float32 in the notebooks; the CLI's "auto" keeps the checkpoint's bf16, and says so
    assert lines["device"][0].startswith("ok qwen-lab/tiny-chat runs in float32 in the notebooks and the panel "
                                         "(bfloat16 in `qwen-lab generate` and ChatModel.load unless --dtype or "
                                         "dtype= says otherwise) on ")
    assert lines["memory"][0].startswith("ok qwen-lab/tiny-chat needs ")
    assert lines["threads"][0].startswith("ok ")
    assert lines["jupyter"][0].startswith("ok JupyterLab ") and lines["ipywidgets"][0].startswith("ok 8.")
    # and a "plans" warning where this machine's own cache holds plans measured while it was busy
    assert set(lines) - {"plans"} == {"torch", "cache", "model", "device", "memory", "threads", "pages", "jupyter",
                                      "ipywidgets"}
    assert all(line.startswith("warn ") for line in lines.get("plans", []))


def test_verify_says_when_there_were_no_hashes_to_check(capsys):
    """--verify said "hashes checked" for the embedded model and local folders, whose files no hash names."""
    code, lines = doctor_lines(capsys, "--verify", "qwen-lab/tiny-chat")
    assert code == 0 and lines["model"][0].endswith("(sizes checked; not in a cache: no hashes to check)")


def test_a_complete_cache_passes_with_sizes_and_hashes(capsys, cache):
    code, lines = doctor_lines(capsys, "--cache-dir", str(cache), "--verify", REPO)
    assert code == 0, lines
    assert lines["model"] == [f"ok {REPO}: complete in the cache {cache}; {len(_model_files(cache))} files, "
                              f"{doctor._size(sum(p.stat().st_size for p in _model_files(cache)))} "
                              f"(sizes checked; hashes checked)"]
    assert lines["cache"][0].startswith(f"ok {cache}: writable; ")


def _model_files(cache: Path) -> list[Path]:
    [snapshot] = (cache / "models--workshop--tiny" / "snapshots").iterdir()
    return list(snapshot.iterdir())


def test_an_incomplete_cache_names_the_missing_file_and_the_command(capsys, cache):
    snapshot_file(cache, "model.safetensors").unlink()
    code, lines = doctor_lines(capsys, "--cache-dir", str(cache), REPO)
    assert code == 1
    assert lines["model"] == [f"FAIL {REPO}: incomplete in the cache {cache}: model.safetensors missing; fill it once "
                              f"where there is network: `qwen-lab download --cache-dir {cache} {REPO}`"]
    assert "device" not in lines  # nothing to say about a model that is not there


def test_an_interrupted_download_is_named(capsys, cache):
    pointer = snapshot_file(cache, "model.safetensors")
    blob = pointer.resolve()
    pointer.unlink()
    blob.rename(blob.with_name(blob.name + ".incomplete"))  # what huggingface_hub leaves when cut off
    code, lines = doctor_lines(capsys, "--cache-dir", str(cache), REPO)
    assert code == 1
    assert "model.safetensors missing (1 download(s) interrupted); fill it once" in lines["model"][0]


def test_truncated_weights_are_found_by_their_size(capsys, cache):
    blob = snapshot_file(cache, "model.safetensors").resolve()
    size = blob.stat().st_size
    with open(blob, "r+b") as f:
        f.truncate(size - 100)
    code, lines = doctor_lines(capsys, "--cache-dir", str(cache), REPO)
    assert code == 1
    assert lines["model"] == [f"FAIL {REPO}: model.safetensors is truncated: {size - 100:,} of its {size:,} bytes; "
                              f"fill it once where there is network: `qwen-lab download --cache-dir {cache} {REPO}`"]


def test_damaged_bytes_of_the_right_size_are_found_by_verify(capsys, cache):
    blob = snapshot_file(cache, "tokenizer.json").resolve()
    data = bytearray(blob.read_bytes())
    data[-2] ^= 1
    blob.write_bytes(bytes(data))
    code, lines = doctor_lines(capsys, "--cache-dir", str(cache), REPO)
    assert code == 0  # sizes alone cannot see it
    code, lines = doctor_lines(capsys, "--cache-dir", str(cache), "--verify", REPO)
    assert code == 1
    assert lines["model"][0].startswith(f"FAIL {REPO}: tokenizer.json is damaged (its ")
    assert lines["model"][0].endswith(f"`qwen-lab download --cache-dir {cache} {REPO}` fetches it again")


def test_a_read_only_cache_is_fine_and_a_gap_in_it_says_who_fixes_it(capsys, cache, monkeypatch):
    snapshot_file(cache, "tokenizer.json").unlink()
    real_access = os.access
    # as the learners see it (root, who runs this sandbox, may write anywhere)
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK and Path(path) == cache
                        else real_access(path, mode))
    code, lines = doctor_lines(capsys, "--cache-dir", str(cache), REPO)
    assert code == 1
    assert lines["cache"][0].startswith(f"ok {cache}: read-only here (fine: learners only read it); ")
    assert lines["model"] == [f"FAIL {REPO}: incomplete in the cache {cache}: tokenizer.json missing; the cache is "
                              f"read-only here: whoever owns it runs `qwen-lab download --cache-dir {cache} {REPO}` "
                              f"where there is network"]


def test_a_cache_that_does_not_exist(capsys, tmp_path):
    code, lines = doctor_lines(capsys, "--cache-dir", str(tmp_path / "none"), REPO)
    assert code == 1
    assert lines["cache"][0].startswith(f"warn {tmp_path / 'none'} does not exist; ")
    assert lines["model"] == [f"FAIL {REPO}: the cache {tmp_path / 'none'} does not exist; fill it once where there "
                              f"is network: `qwen-lab download --cache-dir {tmp_path / 'none'} {REPO}`"]


def test_the_walkthrough_model_missing_is_a_warning_the_chosen_one_a_failure(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("QWEN_LAB_MODEL", raising=False)
    code, lines = doctor_lines(capsys, "--cache-dir", str(tmp_path))
    assert code == 0
    assert lines["model"] == [f"warn Qwen/Qwen2.5-1.5B-Instruct: not in the cache {tmp_path}; fill it once where "
                              f"there is network: `qwen-lab download --cache-dir {tmp_path} "
                              f"Qwen/Qwen2.5-1.5B-Instruct` (until then the notebooks use the embedded "
                              f"qwen-lab/tiny-chat)"]
    monkeypatch.setenv("QWEN_LAB_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
    code, lines = doctor_lines(capsys, "--cache-dir", str(tmp_path))
    assert code == 1 and lines["model"][0].startswith("FAIL Qwen/Qwen2.5-0.5B-Instruct: not in the cache")


def test_bad_threads_setting_fails_its_line(capsys, monkeypatch):
    monkeypatch.setenv("QWEN_LAB_THREADS", "many")
    code, lines = doctor_lines(capsys, "qwen-lab/tiny-chat")
    assert code == 1
    assert lines["threads"] == ["FAIL QWEN_LAB_THREADS='many' is not a number of threads; set it to e.g. 2, or unset it"]


def test_missing_jupyter_pieces_fail_with_the_install_command(capsys, monkeypatch):
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda d: None if d in ("ipywidgets", "ipykernel") else real(d))
    code, lines = doctor_lines(capsys, "qwen-lab/tiny-chat")
    assert code == 1
    install = "pip install 'qwen-lab[notebooks]' (offline: from the wheelhouse, see docs/workshop.md)"
    assert lines["jupyter"] == [f"FAIL ipykernel is not installed: {install}"]
    assert lines["ipywidgets"] == [f"FAIL not installed: the chat panel (notebook 07) needs it: {install}"]


def test_not_enough_memory_fails_with_the_figures(capsys, monkeypatch):
    import qwen_lab.load
    monkeypatch.setattr(qwen_lab.load, "available_memory", lambda: 100 * 2**20)
    code, lines = doctor_lines(capsys, "qwen-lab/tiny-chat")
    assert code == 1
    [line] = lines["memory"]
    assert line.startswith("FAIL qwen-lab/tiny-chat needs 0.51 GiB")
    assert line.endswith("but only 0.10 GiB is available: close other programs, or choose a smaller model "
                         "(QWEN_LAB_MODEL=Qwen/Qwen2.5-0.5B-Instruct)")
    assert "parameters x 4 bytes + about 0.50 GiB for the notebook's Jupyter kernel and server" in line  # `need`


def test_the_memory_line_counts_a_notebook_not_python_alone(capsys, monkeypatch):
    """A notebook on tiny-chat holds 0.37-0.39 GiB (its Jupyter kernel 0.26-0.28 GiB, the Jupyter server 0.11;
    measured through the workshop's hub, benchmarks/RESULTS.md): counting 0.25 GiB "for Python and torch", the
    line said ok with 0.35 GiB available, and for the real models 0.25 GiB short of what a laptop needs."""
    import qwen_lab.load
    monkeypatch.setattr(qwen_lab.load, "available_memory", lambda: int(0.35 * 2**30))
    code, lines = doctor_lines(capsys, "qwen-lab/tiny-chat")
    [line] = lines["memory"]
    assert code == 1 and line.startswith("FAIL qwen-lab/tiny-chat needs 0.51 GiB"), line


def test_a_cuda_torch_on_a_machine_without_gpu_points_to_the_cpu_build(monkeypatch):
    import torch
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check = doctor.check_torch()
    assert check.status == "warn"
    assert check.detail.endswith(f"the CPU-only build is gigabytes smaller: pip install "
                                 f"torch=={torch.__version__.split('+')[0]} --index-url "
                                 f"https://download.pytorch.org/whl/cpu")


# ---------------------------------------------------------------- the wheelhouse

def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal wheel: enough for pip's resolver to read its name, version and requirements."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    metadata = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", metadata)
        z.writestr(f"{dist}.dist-info/WHEEL", wheel)
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_a_wheelhouse_missing_a_wheel_names_it(tmp_path):
    folder = tmp_path / "wheelhouse"
    fake_wheel(folder, "qwen-lab", "0.1.0", ["qwen-lab-helper>=1.0"])
    check = doctor.check_wheelhouse(folder)
    assert (check.status, check.detail.split(" (")[0]) == ("FAIL", f"{folder} lacks a wheel for qwen-lab-helper>=1.0")
    assert check.detail.endswith(f"run `make wheelhouse WHEELHOUSE={folder}` where there is network, or add that wheel")
    fake_wheel(folder, "qwen-lab-helper", "1.2", [])
    check = doctor.check_wheelhouse(folder)
    assert (check.status, check.detail) == ("ok", f"{folder}: 2 wheels; pip installs qwen-lab[notebooks] from them "
                                                  f"alone (--no-index)")


def test_a_wheelhouse_that_is_not_there_or_empty(tmp_path):
    assert doctor.check_wheelhouse(tmp_path / "none").detail == (
        f"{tmp_path / 'none'} is not a folder: run `make wheelhouse WHEELHOUSE={tmp_path / 'none'}` where there is "
        f"network")
    assert doctor.check_wheelhouse(tmp_path).detail == (
        f"{tmp_path} holds no wheels: run `make wheelhouse WHEELHOUSE={tmp_path}` where there is network")


def test_the_wheelhouse_check_ignores_this_machine_s_pip_configuration(tmp_path, monkeypatch):
    """A find-links set here (as /opt/wheels is) must not hide a wheel missing from the folder."""
    elsewhere = tmp_path / "elsewhere"
    fake_wheel(elsewhere, "qwen-lab-helper", "1.2", [])
    monkeypatch.setenv("PIP_FIND_LINKS", str(elsewhere))
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nfind-links = {elsewhere}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    folder = tmp_path / "wheelhouse"
    fake_wheel(folder, "qwen-lab", "0.1.0", ["qwen-lab-helper>=1.0"])
    assert doctor.check_wheelhouse(folder).status == "FAIL"


def test_the_pages_line_says_whether_weights_get_2_mib_pages_and_how_to_turn_them_on(monkeypatch, tmp_path):
    from qwen_lab import doctor, pages
    setting = tmp_path / "enabled"
    monkeypatch.setattr(pages, "THP_SETTING", setting)
    monkeypatch.delenv("QWEN_LAB_HUGE_PAGES", raising=False)
    setting.write_text("always [madvise] never\n")
    assert "weights in 2 MiB pages" in doctor.check_pages().detail
    setting.write_text("always madvise [never]\n")
    line = doctor.check_pages().detail
    assert "4 KiB pages" in line and f"echo madvise > {setting}" in line
    monkeypatch.setenv("QWEN_LAB_HUGE_PAGES", "0")
    assert "QWEN_LAB_HUGE_PAGES=0" in doctor.check_pages().detail
    monkeypatch.delenv("QWEN_LAB_HUGE_PAGES")
    setting.unlink()
    assert "no transparent huge pages" in doctor.check_pages().detail


def _small_writes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:  # 64 KiB at a time, as an archive's extraction or a copy writes
        for start in range(0, len(data), 2**16):
            f.write(data[start:start + 2**16])


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_the_pages_line_names_weights_cached_in_small_pieces_and_its_command_drops_them(tmp_path, tiny_dir, capsys):
    """Weights extracted from the room's archive sit in the page cache in the small pieces they were
    written in, and a mapping of them gets 4 KiB pages until they are dropped (0 of 512 MiB in 2 MiB
    pages right after `tar -xf`, here). The line says so, and the command it gives makes the next load
    read them afresh in 2 MiB pages."""
    import mmap
    import shlex
    import shutil
    import subprocess
    from qwen_lab import load, pages
    if not pages.huge_pages():
        pytest.skip(f"transparent huge pages are off here ({pages.THP_SETTING})")
    if shutil.which("dd") is None or shutil.which("sync") is None:
        pytest.skip("the command the line gives needs dd and sync")
    folder = tmp_path / "extracted"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"  # the tiny model's weights, then 96 MiB more: a model that size
    _small_writes(weights, weights.read_bytes() + os.urandom(96 * 2**20))
    small = tmp_path / "small.safetensors"  # 4 MiB: too little to matter, whatever its pages
    _small_writes(small, os.urandom(4 * 2**20))
    in_memory, huge = load.cached_in_huge_pages(weights)
    if huge:
        pytest.skip("this file system keeps even small writes in 2 MiB pieces: nothing to drop")
    assert in_memory == weights.stat().st_size // pages.HUGE_PAGE * pages.HUGE_PAGE  # every whole 2 MiB block
    code, lines = doctor_lines(capsys, str(folder))
    assert code == 0 and lines["pages"][0].startswith(f"warn {folder}: {in_memory >> 20} MiB of its weights sit "
                                                      f"in memory in pieces under 2 MiB"), lines["pages"]
    assert doctor.check_pages({"lab/small": [small]}).status == "ok"
    [command] = re.findall(r"`([^`]+)`", lines["pages"][0])
    assert shlex.quote(str(weights)) in command and "small.safetensors" not in command
    subprocess.run(command, shell=True, check=True)
    assert load.cached_in_huge_pages(weights) == (0, 0)  # dropped: nothing of it in memory
    with open(weights, "rb") as f:  # the next load maps it so, and reads every page of it from disk
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    pages.advise_huge(mapping, 0, len(mapping))
    assert sum(mapping[i] for i in range(0, len(mapping), mmap.PAGESIZE)) >= 0
    mapping.close()
    again, huge = load.cached_in_huge_pages(weights)
    if not huge:
        pytest.skip("this kernel or file system reads files into 4 KiB pieces only: 2 MiB pages cannot be had")
    assert again == in_memory and huge >= in_memory - 2 * pages.HUGE_PAGE  # readahead may end in small pieces
    assert doctor_lines(capsys, str(folder))[1]["pages"][0].startswith("ok weights in 2 MiB pages")


def test_the_pages_line_is_one_line_when_a_weights_file_went_or_cannot_be_read(tmp_path, monkeypatch):
    """A weights file gone between the model's check and this one (replaced, or its folder re-extracted), or a
    dangling link, crashed the doctor with a traceback: every file's size was read unguarded."""
    import os
    from qwen_lab import doctor, pages
    monkeypatch.setattr(pages, "huge_pages_and_why", lambda: (True, "transparent huge pages: [always]"))
    gone, dangling, pipe = tmp_path / "gone.safetensors", tmp_path / "dangling.safetensors", tmp_path / "pipe"
    dangling.symlink_to(tmp_path / "nowhere")
    os.mkfifo(pipe)
    check = doctor.check_pages({"lab/m": [gone, dangling, pipe]})
    assert check.status == "ok" and check.detail.startswith("weights in 2 MiB pages"), check


# ---------------------------------------------------------------- hostile names

#: A folder's name that, printed as it is, ends the line and starts one that reads as the memory check's verdict
#: (then erases what a terminal shows of it), with a byte that is not UTF-8 after.
FORGING = os.fsdecode(b"model\nok    memory      all is well\x1b[2K\r\xff")


def test_a_folder_s_name_cannot_forge_a_line_of_the_report(capsys, tmp_path, tiny_dir):
    """A model folder whose name held a newline spread the doctor's report over several lines: one of them
    read as another check's verdict. Every line that names the folder now writes its name as the shell
    would quote it (and the name's byte that is not UTF-8 no longer stops the report with a traceback)."""
    import shutil
    from qwen_lab.errors import shell_word
    folder = tmp_path / FORGING
    shutil.copytree(tiny_dir, folder)
    code = main(["doctor", str(folder)])
    lines = capsys.readouterr().out.splitlines()  # at \r, \x1c... too: str.splitlines ends a line at each
    assert [line.split()[1] for line in lines] == ["torch", "cache", "model", "device", "memory", "threads",
                                                   "pages", "jupyter", "ipywidgets"], lines
    assert code == 0 and all(line.isprintable() for line in lines)
    quoted = shell_word(folder)
    assert quoted == "$'" + str(tmp_path) + r"/model\nok    memory      all is well\x1b[2K\r\xff'"
    [model] = [line for line in lines if line.split()[1] == "model"]
    assert model.startswith(f"ok    model       {quoted}: complete in the folder {quoted}; 5 files")
    assert sum(quoted in line for line in lines) == 3  # the model, device and memory lines name it, quoted


def test_a_hostile_name_in_a_command_is_one_shell_word_on_the_line(tmp_path, monkeypatch):
    """The commands the doctor gives are copied into a shell: each name in one is one word there, and the line
    stays one line, whatever the name holds (a newline, quotes, $(...), backquotes, a byte that is not UTF-8)."""
    import shutil
    import subprocess
    from qwen_lab import pages
    if shutil.which("bash") is None:
        pytest.skip("runs the commands in bash")
    names = [FORGING + ".safetensors", "it's; touch pwned; '.safetensors", "$(touch pwned)`touch pwned`\\ x\n",
             "-if=/dev/zero\t.safetensors"]
    monkeypatch.setattr(pages, "huge_pages_and_why", lambda: (True, "transparent huge pages: [always]"))
    monkeypatch.setattr(doctor, "_cached", lambda path: (256 << 20, 0))  # all of it in memory in 4 KiB pieces
    recorder = 'sync() { :; }; dd() { printf "%s\\0" "$@" >> "$LOG"; }; '  # what dd would be asked, not dd
    for files in ([tmp_path / names[0]], [tmp_path / n for n in names]):
        check = doctor.check_pages({"lab/m": files})
        line = check.line()
        assert check.status == "warn" and line.isprintable(), line
        [command] = re.findall(r"holding the model, `(.*)` drops them", line)
        log = tmp_path / "dd-arguments"
        log.unlink(missing_ok=True)
        subprocess.run(["bash", "-c", recorder + command], cwd=tmp_path, env={**os.environ, "LOG": str(log)},
                       check=True)
        asked = log.read_bytes().split(b"\0")[:-1]
        assert asked == [a for f in files for a in (b"if=" + os.fsencode(f), b"iflag=nocache", b"count=0",
                                                    b"status=none")]
        assert not (tmp_path / "pwned").exists()
    cache = tmp_path / FORGING  # and the download command of a cache so named, where the model is missing
    check = doctor.check_model("workshop/tiny", cache, required=True)
    [command] = re.findall(r"`(qwen-lab download .*)`$", check.line())
    result = subprocess.run(["bash", "-c", 'qwen-lab() { printf "%s\\0" "$@"; }; ' + command], capture_output=True,
                            check=True)
    assert result.stdout.split(b"\0")[:-1] == [b"download", b"--cache-dir", os.fsencode(cache), b"workshop/tiny"]


def test_an_error_naming_a_hostile_folder_is_one_line(capsys, tmp_path):
    """The CLI's error lines quote names that other modules put in their messages: written on one line."""
    folder = tmp_path / FORGING
    folder.mkdir()
    assert main(["doctor", str(folder)]) == 1
    [model] = [line for line in capsys.readouterr().out.splitlines() if line.split()[1] == "model"]
    assert model.startswith("FAIL  model       ") and "config.json" in model
    messages = tmp_path / "messages.json"
    messages.write_text('[{"role": "user", "content": "Hi"}]')
    assert main(["template", "--model", str(folder), "--messages", str(messages)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("qwen-lab: error: ") and r"\nok    memory" in err


def test_the_plans_line_names_plans_measured_while_busy_and_how_to_measure_them_again(tmp_path, monkeypatch):
    """The learner's own provisional plans (measured again by a later load that finds the machine quiet, or by
    `qwen-lab tune` of the models they are shapes of), and the room's (the instructor's `qwen-lab tune`); no
    line where every plan was quiet."""
    import json

    from qwen_lab import kernels, tuning
    own, room = tmp_path / "own", tmp_path / "room"
    model = str(Path(doctor.__file__).parent / "reference" / "Qwen--Qwen2.5-1.5B-Instruct")  # its config.json
    monkeypatch.setenv("QWEN_LAB_CACHE", str(own))
    monkeypatch.setenv("QWEN_LAB_SHARED_CACHE", str(room))
    monkeypatch.setattr(kernels, "_threads", 2)
    quiet = {"variant": "avx2", "rows": 4, "prefetch": 1, "gb_per_s": {"avx2, 4 rows, prefetch": 31.5}}
    assert doctor.check_plans(["qwen-lab/tiny-chat"]) == []  # nothing measured yet
    for folder in (own, room):
        folder.mkdir()
        (folder / tuning.plans_file_name()).write_text(json.dumps({"float32 2048x192": quiet}))
    assert doctor.check_plans(["qwen-lab/tiny-chat"]) == []
    (own / tuning.plans_file_name()).write_text(json.dumps({
        "float32 2048x192": {**quiet, "busy": 0.3}, "bfloat16 1536x8960": {**quiet, "busy": 0.63},
        "bfloat16 8960x1536": {**quiet, "busy": 0.41}, "bfloat16 2048x192": {**quiet, "busy": 0.5}}))
    (room / tuning.plans_file_name()).write_text(json.dumps({"bfloat16 151936x1536": {**quiet, "busy": 1.2}}))
    lines = [check.line() for check in doctor.check_plans([model], "/srv/hf cache")]
    assert lines == [
        f"warn  plans       bfloat16 151936x1536 in {room / tuning.plans_file_name()} measured while other programs "
        f"kept the CPUs busy (up to 1.20 cores on average): the room's plans, used as they are; the instructor "
        f"measures them again on a quiet machine: `qwen-lab tune --kernel-cache {room} --threads 2 --cache-dir "
        f"'/srv/hf cache' {model}`",
        # the walkthrough's model and the embedded one (its float32 head) by `qwen-lab tune`; tiny-chat's head in
        # bf16, the dtype its notebooks do not load it in, by a load of it
        f"warn  plans       float32 2048x192, bfloat16 1536x8960, bfloat16 8960x1536, bfloat16 2048x192 in "
        f"{own / tuning.plans_file_name()} measured while other programs kept the CPUs busy (up to 0.63 cores on "
        f"average): kept provisionally, measured again at a load that finds the machine quiet; to measure them now, "
        f"on a quiet machine: `qwen-lab tune --cache-dir '/srv/hf cache' {model} qwen-lab/tiny-chat`; bfloat16 "
        f"2048x192: load their model once with QWEN_LAB_TUNING=again in its environment"]
    (own / tuning.plans_file_name()).write_text(json.dumps({"bfloat16 2048x192": {**quiet, "busy": 0.5}}))
    assert [check.line() for check in doctor.check_plans([model])][1].endswith(
        "quiet; to measure them now, on a quiet machine: load their model once with QWEN_LAB_TUNING=again in its "
        "environment")  # no model named has that shape: nothing for `qwen-lab tune` to measure

"""Downloads that fail, or would succeed wrongly: a fault-injecting LocalHub against huggingface_hub's real client.

Each fault test asserts one clear line (no traceback, no second line), a bounded time (generous
margins: these take seconds now, and took minutes or never failed before), and that a rerun
against a good server leaves the right bytes in the cache, with nothing bad counted as complete.
"""
import errno
import hashlib
import os
import re
import subprocess
import sys
import time

import pytest

from qwen_lab.errors import DownloadError
from qwen_lab.hub import resolve
from qwen_lab.hub_server import LocalHub


@pytest.fixture
def hub(tiny_dir, online):
    with LocalHub({"lab/tiny": tiny_dir}) as server:
        yield server


def fetch(hub, tmp_path, **kw):
    kw.setdefault("timeout", 1)
    return resolve("lab/tiny", cache_dir=tmp_path / "cache", endpoint=hub.url, **kw)


def one_line_error(call, within: float) -> str:
    """The DownloadError ``call`` raises, checked to be one line and to come within ``within`` seconds."""
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        call()
    assert time.monotonic() - start < within
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def assert_cache_right(files, tiny_dir, cache):
    """The files are the repo's bytes, and every blob in the cache holds the bytes its name promises."""
    for path in (files.config, files.tokenizer, files.tokenizer_config, files.generation_config, *files.weights):
        assert path.read_bytes() == (tiny_dir / path.name).read_bytes(), path.name
    blobs = list((cache / "models--lab--tiny" / "blobs").iterdir())
    assert blobs and not [b for b in blobs if b.name.endswith(".incomplete")]
    for blob in blobs:
        data = blob.read_bytes()
        expected = (hashlib.sha256(data) if len(blob.name) == 64 else
                    hashlib.sha1(b"blob %d\0" % len(data) + data)).hexdigest()
        assert blob.name == expected


BODY_FAULTS = [
    ("truncate", "model.safetensors", r"stopped at [\d,]+ of [\d,]+ bytes after 3 tries \(the connection was cut"),
    ("stall", "model.safetensors", r"stopped at [\d,]+ of [\d,]+ bytes after 3 tries \(the transfer stalled, "
                                   r"no bytes for 1 s\)"),
    ("short", "model.safetensors", r"arrived corrupted: its [\d,]+ bytes have the sha256 \w+…, not the Hub's"),
    ("short", "config.json", r"arrived corrupted: its [\d,]+ bytes have the git blob hash \w+…, not the Hub's"),
    ("garbage", "model.safetensors", r"arrived corrupted: its [\d,]+ bytes have the sha256"),
    ("garbage", "tokenizer.json", r"arrived corrupted: its [\d,]+ bytes have the git blob hash"),
]


@pytest.mark.parametrize("kind, file, message", BODY_FAULTS, ids=[f"{k}-{f}" for k, f, _ in BODY_FAULTS])
def test_a_spoiled_transfer_is_one_line_and_a_rerun_repairs_it(hub, tmp_path, tiny_dir, kind, file, message):
    hub.inject(kind, file)
    error = one_line_error(lambda: fetch(hub, tmp_path), within=30)
    assert f"lab/tiny/{file}" in error and re.search(message, error), error
    assert "run the" in error and "again" in error
    # nothing of it counts as downloaded: offline, the cache does not have it
    with pytest.raises(DownloadError, match=f"lab/tiny/{file} is not in the local cache"):
        fetch(hub, tmp_path, local_files_only=True)
    hub.clear_faults()
    assert_cache_right(fetch(hub, tmp_path), tiny_dir, tmp_path / "cache")


def test_a_transfer_cut_once_is_retried_within_the_same_call(hub, tmp_path, tiny_dir):
    hub.inject("truncate", "model.safetensors", times=1)
    files = fetch(hub, tmp_path)
    assert_cache_right(files, tiny_dir, tmp_path / "cache")
    gets = [status for method, path, status in hub.requests if method == "GET" and path.endswith("/model.safetensors")]
    # huggingface_hub keeps what it received in 10 MB pieces: for this 4 MB file the retry starts over
    assert gets == [200, 200]


def test_a_hub_that_never_answers_a_head_is_given_up_in_bounded_time(hub, tmp_path, tiny_dir):
    hub.inject("hang_head")
    error = one_line_error(lambda: fetch(hub, tmp_path), within=20)  # 3 tries of 1 s, plus 1 + 2 s between
    assert error.startswith(f"{hub.url} cannot be reached (no answer within 1 s; 3 tries)")
    assert "lab/tiny/config.json is not in the local cache" in error
    hub.clear_faults()
    assert_cache_right(fetch(hub, tmp_path), tiny_dir, tmp_path / "cache")


def test_a_silent_hub_falls_back_to_the_cache_without_waiting_for_each_file(hub, tmp_path, tiny_dir):
    cached = fetch(hub, tmp_path)
    hub.inject("hang_head")
    hub.requests.clear()
    start = time.monotonic()
    files = fetch(hub, tmp_path)
    assert time.monotonic() - start < 15
    assert files.weights == cached.weights and files.config == cached.config
    assert len(hub.requests) == 1  # one HEAD went unanswered; the other files came from the cache at once


def test_http_500_is_retried_briefly(hub, tmp_path):
    hub.inject("error_500", "model.safetensors")
    error = one_line_error(lambda: fetch(hub, tmp_path), within=20)
    assert error.startswith(f"{hub.url} did not serve lab/tiny/model.safetensors: it answered HTTP 500 (3 tries)")
    assert [s for _, p, s in hub.requests if p.endswith("/model.safetensors")] == [500, 500, 500]


def test_a_corrupted_cached_file_is_found_and_fetched_again(hub, tmp_path, tiny_dir):
    files = fetch(hub, tmp_path)
    blob = files.weights[0].resolve()
    blob.write_bytes(blob.read_bytes()[::-1])  # bit rot, or a download from before files were checked
    assert fetch(hub, tmp_path).weights == files.weights  # loading does not re-hash (that would cost a read)
    hub.requests.clear()
    files = fetch(hub, tmp_path, check_cache=True)  # what `qwen-lab download` does
    assert_cache_right(files, tiny_dir, tmp_path / "cache")
    assert [p for m, p, s in hub.requests if m == "GET"] == ["/lab/tiny/resolve/main/model.safetensors"]


def test_a_corrupted_cached_file_offline_is_removed_with_one_line(hub, tmp_path):
    files = fetch(hub, tmp_path)
    files.config.resolve().write_text("{}")
    error = one_line_error(lambda: fetch(hub, tmp_path, check_cache=True, local_files_only=True), within=10)
    assert error.startswith("lab/tiny/config.json was found corrupted: its 2 bytes have the git blob hash")
    assert not files.config.exists()  # removed: it never counts again


def test_force_download_fetches_every_file_afresh(hub, tmp_path, tiny_dir):
    files = fetch(hub, tmp_path)
    files.weights[0].resolve().write_bytes(b"x" * files.weights[0].stat().st_size)
    hub.requests.clear()
    files = fetch(hub, tmp_path, force_download=True)
    assert_cache_right(files, tiny_dir, tmp_path / "cache")
    fetched = {p.rsplit("/", 1)[1] for m, p, s in hub.requests if m == "GET" and s == 200}
    assert fetched == {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                       "model.safetensors"}


def test_force_download_offline_is_one_line(hub, tmp_path):
    error = one_line_error(lambda: fetch(hub, tmp_path, force_download=True, local_files_only=True), within=5)
    assert "needs the network" in error and hub.requests == []


# -- a read-only cache ----------------------------------------------------------------------------

_READ_ONLY: list[str] = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_WRITES = {"os.mkdir": (0,), "os.rename": (0, 1), "os.symlink": (1,), "os.link": (1,), "os.remove": (0,),
                "os.rmdir": (0,), "os.chmod": (0,), "os.truncate": (0,), "os.utime": (0,)}


def _refuse_writes(event, args):
    """What a read-only mount does: any write under a folder of ``_READ_ONLY`` fails with EROFS."""
    if not _READ_ONLY:
        return
    if event == "open":
        paths = [args[0]] if isinstance(args[2], int) and args[2] & _WRITE_FLAGS else []
    else:
        paths = [args[i] for i in _PATH_WRITES.get(event, ())]
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if any(path == d or path.startswith(d + os.sep) for d in _READ_ONLY):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)


@pytest.fixture
def read_only():
    """Make a folder read-only: by its mode bits, or, as root (who ignores them), as a read-only mount would."""
    changed = []

    def make(folder):
        if os.geteuid() != 0:
            for path in [folder, *folder.rglob("*")]:
                if path.is_dir() and not path.is_symlink():
                    changed.append((path, path.stat().st_mode))
                    path.chmod(0o555)
        else:
            if not getattr(sys, "_qwen_lab_read_only_hook", False):
                sys.addaudithook(_refuse_writes)  # audit hooks cannot be removed: it idles when the list is empty
                sys._qwen_lab_read_only_hook = True
            _READ_ONLY.append(str(folder.resolve()))

    yield make
    _READ_ONLY.clear()
    for path, mode in reversed(changed):
        path.chmod(mode)


def test_a_read_only_cache_serves_what_it_has_and_says_what_is_missing(tiny_dir, tmp_path, read_only, online):
    cache = tmp_path / "room-cache"
    with LocalHub({"lab/tiny": tiny_dir, "lab/other": tiny_dir}) as hub:
        files = resolve("lab/tiny", cache_dir=cache, endpoint=hub.url)
        read_only(cache)
        again = resolve("lab/tiny", cache_dir=cache, endpoint=hub.url, check_cache=True)
        assert again.weights == files.weights  # complete: served, and checked, without writing
        error = one_line_error(lambda: resolve("lab/other", cache_dir=cache, endpoint=hub.url), within=10)
    assert error.startswith(f"cannot write to the cache {cache} (")
    assert "lab/other/config.json is not there yet" in error
    assert f"`qwen-lab download --model lab/other --cache-dir {cache}`" in error


def test_an_incomplete_offline_cache_names_what_is_missing(tiny_dir, tmp_path, online):
    cache = tmp_path / "room-cache"
    with LocalHub({"lab/tiny": tiny_dir}) as hub:
        files = resolve("lab/tiny", cache_dir=cache, endpoint=hub.url)
    files.weights[0].unlink()
    error = one_line_error(lambda: resolve("lab/tiny", cache_dir=cache, local_files_only=True), within=5)
    assert error.startswith("lab/tiny/model.safetensors is not in the local cache and offline mode is on")
    assert f"`qwen-lab download --model lab/tiny --cache-dir {cache}`" in error


# -- through the command, as a learner meets them -------------------------------------------------

def qwen_lab(hub, tmp_path, *args, timeout=120):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "qwen_lab.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    return done, time.monotonic() - start


@pytest.mark.parametrize("kind, file", [("hang_head", "config.json"), ("truncate", "model.safetensors"),
                                        ("stall", "model.safetensors"), ("error_500", "model.safetensors"),
                                        ("garbage", "model.safetensors")])
def test_the_download_command_reports_a_fault_in_one_line(hub, tmp_path, tiny_dir, kind, file):
    hub.inject(kind, file)
    done, seconds = qwen_lab(hub, tmp_path, "download", "--model", "lab/tiny")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("qwen-lab: error: ") and done.stderr.count("\n") == 1, done.stderr  # no warnings
    assert f"lab/tiny/{file}" in done.stderr
    assert seconds < 60  # HF_HUB_ETAG_TIMEOUT=2: 3 tries; a silent HEAD used to hold it for about 6 minutes
    hub.clear_faults()
    done, _ = qwen_lab(hub, tmp_path, "download", "--model", "lab/tiny")
    assert done.returncode == 0 and done.stderr == ""
    local = done.stdout.strip()
    assert open(os.path.join(local, file), "rb").read() == (tiny_dir / file).read_bytes()


def test_downloading_again_repairs_a_corrupted_cached_file(hub, tmp_path, tiny_dir):
    done, _ = qwen_lab(hub, tmp_path, "download", "--model", "lab/tiny")
    weights = os.path.join(done.stdout.strip(), "model.safetensors")
    blob = os.path.realpath(weights)
    with open(blob, "r+b") as f:  # what `generate` then reports as a corrupt checkpoint, "download it again"
        f.write(b"\xff" * 64)
    done, _ = qwen_lab(hub, tmp_path, "download", "--model", "lab/tiny")
    assert done.returncode == 0 and done.stderr == ""
    assert open(weights, "rb").read() == (tiny_dir / "model.safetensors").read_bytes()

"""Downloads through huggingface_hub's real client against a local server speaking the Hub's file protocol."""
import hashlib
import json
import os
import re
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import refusal_within
from qwen_lab.errors import DownloadError
from qwen_lab.hub import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID, resolve, shard_names
from qwen_lab.hub_server import LocalHub


@pytest.fixture
def hub(tiny_dir, sharded_dir, tmp_path, online):
    with_jinja = tmp_path / "with_jinja"
    shutil.copytree(tiny_dir, with_jinja)
    (with_jinja / "chat_template.jinja").write_text("{{ messages[0].content }}")
    no_gen = tmp_path / "no_gen"
    shutil.copytree(tiny_dir, no_gen)
    (no_gen / "generation_config.json").unlink()
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    repos = {"lab/single": tiny_dir, "lab/sharded": sharded_dir, "lab/jinja": with_jinja, "lab/nogen": no_gen,
             "lab/notok": no_tok, "lab/gated": tiny_dir}
    with LocalHub(repos, gated=("lab/gated",)) as server:
        yield server


def fetch(hub, repo, tmp_path, **kw):
    return resolve(repo, cache_dir=tmp_path / "cache", endpoint=hub.url, **kw)


def test_single_file_repo(hub, tmp_path, tiny_dir):
    files = fetch(hub, "lab/single", tmp_path)
    assert [p.name for p in files.weights] == ["model.safetensors"] and not files.sharded
    assert files.weights[0].read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert files.generation_config.name == "generation_config.json"
    assert files.chat_template is None
    assert str(files.root).startswith(str(tmp_path / "cache"))  # huggingface_hub's own cache layout
    assert "snapshots" in files.root.parts


def test_sharded_repo_fetches_each_shard_once(hub, tmp_path, sharded_dir):
    files = fetch(hub, "lab/sharded", tmp_path)
    assert files.sharded
    assert [p.name for p in files.weights] == shard_names(sharded_dir / "model.safetensors.index.json")
    assert len(files.weights) == 3
    gets = [path for method, path, status in hub.requests if method == "GET" and status == 200]
    for shard in files.weights:
        assert sum(path.endswith("/" + shard.name) for path in gets) == 1
    # model.safetensors was asked for first, and answered 404 EntryNotFound
    assert any(p.endswith("/model.safetensors") and s == 404 for _, p, s in hub.requests)


def test_cached_files_are_used_offline(hub, tmp_path):
    online = fetch(hub, "lab/sharded", tmp_path)
    hub.requests.clear()
    offline = fetch(hub, "lab/sharded", tmp_path, local_files_only=True)
    assert offline.weights == online.weights
    assert hub.requests == []  # nothing went over the network


def test_offline_without_cache_says_what_to_do(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"not in the local cache and offline mode is on.*qwen-lab download") as e:
        fetch(hub, "lab/single", tmp_path, local_files_only=True)
    assert "\n" not in str(e.value)


def test_unreachable_hub_says_what_to_do(tmp_path, online):
    with pytest.raises(DownloadError, match=r"cannot be reached.*qwen-lab/tiny-chat"):
        resolve("lab/single", cache_dir=tmp_path, endpoint="http://127.0.0.1:9")


def test_missing_repo(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"no repository 'lab/nothing'"):
        fetch(hub, "lab/nothing", tmp_path)


def test_gated_repo(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"lab/gated is gated: accept its licence"):
        fetch(hub, "lab/gated", tmp_path)


def test_missing_revision(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"lab/single has no revision 'v9' on http://127.*: use a branch, tag or"):
        fetch(hub, "lab/single", tmp_path, revision="v9")


def test_revision_by_commit(hub, tmp_path):
    files = fetch(hub, "lab/single", tmp_path, revision=hub.commit("lab/single"))
    assert hub.commit("lab/single") in str(files.root)


def test_missing_required_file(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"lab/notok has no tokenizer.json"):
        fetch(hub, "lab/notok", tmp_path)


def test_optional_files(hub, tmp_path):
    assert fetch(hub, "lab/nogen", tmp_path).generation_config is None
    assert fetch(hub, "lab/jinja", tmp_path).chat_template.name == "chat_template.jinja"


def test_local_directory_and_its_errors(tiny_dir, tmp_path):
    files = resolve(str(tiny_dir))
    assert files.root == tiny_dir and files.weights == [tiny_dir / "model.safetensors"]
    d = tmp_path / "broken"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(DownloadError, match=r"has no model.safetensors"):
        resolve(str(d))


@pytest.mark.parametrize("name", ["config.json", "model-00002-of-00003.safetensors"])
@pytest.mark.parametrize("kind", ["folder", "pipe"])
def test_a_model_file_that_is_not_a_plain_file_is_named_as_such(sharded_dir, tmp_path, name, kind):
    """It used to read "has no model-00002-of-00003.safetensors", sending one looking for a file that is there."""
    if kind == "pipe" and not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")
    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    (d / name).unlink()
    (d / name).mkdir() if kind == "folder" else os.mkfifo(d / name)
    with pytest.raises(DownloadError, match=rf"{re.escape(name)} is not a regular file \(a folder, a pipe or a dev"):
        resolve(str(d))


def test_not_a_repo_id(tmp_path):
    with pytest.raises(DownloadError, match="neither a model directory nor a Hub repo id"):
        resolve(str(tmp_path / "does" / "not" / "exist"))


def test_embedded_model_resolves_without_network():
    files = resolve(EMBEDDED_MODEL_ID, local_files_only=True)
    assert files.root == EMBEDDED_MODEL_DIR and files.weights[0].is_file()


def test_choose_model_env_var_wins(monkeypatch):
    from qwen_lab.hub import choose_model
    monkeypatch.setenv("QWEN_LAB_MODEL", "someone/else")
    assert choose_model() == ("someone/else", "chosen by QWEN_LAB_MODEL")


def test_choose_model_falls_back_quickly_when_the_hub_is_unreachable(monkeypatch, tmp_path, online):
    import socket
    import time
    from qwen_lab.hub import choose_model
    monkeypatch.delenv("QWEN_LAB_MODEL", raising=False)
    # a port that accepts connections and never answers: the worst case for a hang
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    start = time.monotonic()
    model, reason = choose_model(timeout=1.0, endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}",
                                 cache_dir=tmp_path)
    assert model == EMBEDDED_MODEL_ID and "cannot be reached" in reason
    assert time.monotonic() - start < 3
    silent.close()


def test_choose_model_takes_the_real_model_when_the_hub_answers(monkeypatch, tmp_path, tiny_dir, online):
    from qwen_lab.hub import WALKTHROUGH_MODEL_ID, choose_model
    monkeypatch.delenv("QWEN_LAB_MODEL", raising=False)
    with LocalHub({WALKTHROUGH_MODEL_ID: tiny_dir}) as hub:
        assert choose_model(endpoint=hub.url, cache_dir=tmp_path)[0] == WALKTHROUGH_MODEL_ID
        # once cached, it is chosen even with no Hub at all
        resolve(WALKTHROUGH_MODEL_ID, cache_dir=tmp_path, endpoint=hub.url)
    assert choose_model(endpoint="http://127.0.0.1:9", cache_dir=tmp_path) == \
        (WALKTHROUGH_MODEL_ID, "found in the Hugging Face cache")


def test_hf_hub_offline_is_honoured(tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with LocalHub({"lab/single": tiny_dir}) as server:
        with pytest.raises(DownloadError, match="offline mode is on"):
            resolve("lab/single", cache_dir=tmp_path, endpoint=server.url)
        assert server.requests == []


# -- untrusted model folders: every file a folder names stays inside it ---------------------------

_OPENED: list = []


def _record_opens(event, args):
    if event == "open" and _OPENED and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED[0].append(os.path.abspath(os.fsdecode(args[0])))


@pytest.fixture
def opened():
    """The paths opened while the test runs (an audit hook: it sees every open, by any code)."""
    if not getattr(sys, "_qwen_lab_open_hook", False):
        sys.addaudithook(_record_opens)  # audit hooks cannot be removed: it idles when _OPENED is empty
        sys._qwen_lab_open_hook = True
    paths: list[str] = []
    _OPENED.append(paths)
    yield paths
    _OPENED.clear()


def with_shard_named(sharded_dir, folder, name):
    """A copy of the sharded checkpoint whose index sends one tensor to the shard ``name``."""
    shutil.copytree(sharded_dir, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


SECRET = b"SECRET!!" + bytes(64)  # read as a safetensors header length, its first 8 bytes are this number:
SECRET_NUMBER = str(int.from_bytes(SECRET[:8], "little"))


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside/x.safetensors", "shards/../../outside/x.safetensors",
                                  "C:\\outside\\x.safetensors", "x.safetensors\n", "./model.bin", ""])
def test_an_index_naming_a_file_outside_the_folder_is_refused_unread(sharded_dir, tmp_path, opened, name):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.safetensors").write_bytes(SECRET)
    model = with_shard_named(sharded_dir, tmp_path / "model", name)
    opened.clear()  # from here on: what resolve opens
    with pytest.raises(DownloadError, match=r"which is not a \.safetensors file inside the model folder: refusing it"):
        resolve(str(model))
    message = str(pytest.raises(DownloadError, resolve, str(model)).value)
    assert "\n" not in message and "SECRET" not in message and SECRET_NUMBER not in message
    assert not [p for p in opened if "outside" in p or p == "/etc/passwd"]


@pytest.mark.parametrize("link", ["model.safetensors", "model-00002-of-00003.safetensors", "config.json"])
def test_a_link_out_of_the_folder_is_refused_unread(tiny_dir, sharded_dir, tmp_path, opened, link):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x").write_bytes(SECRET)
    model = tmp_path / "model"
    shutil.copytree(sharded_dir if "-of-" in link else tiny_dir, model)
    (model / link).unlink()
    (model / link).symlink_to(tmp_path / "outside" / "x")
    opened.clear()  # from here on: what resolve opens
    with pytest.raises(DownloadError, match=rf"{link} leads outside the model folder .*: refusing to read it") as e:
        resolve(str(model))
    assert "\n" not in str(e.value) and "SECRET" not in str(e.value)
    assert not [p for p in opened if "outside" in p]


def test_a_link_inside_the_folder_is_fine(tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "weights").mkdir()
    (model / "model.safetensors").rename(model / "weights" / "w.safetensors")
    (model / "model.safetensors").symlink_to("weights/w.safetensors")
    assert resolve(str(model)).weights == [model / "model.safetensors"]


def test_a_hub_snapshot_used_as_a_folder_follows_its_blob_links(hub, tmp_path):
    files = fetch(hub, "lab/sharded", tmp_path)
    assert all(p.is_symlink() for p in files.weights)  # snapshots/<commit>/x -> ../../blobs/<hash>
    again = resolve(str(files.root))
    assert again.weights == files.weights and again.sharded


def test_a_hub_index_naming_a_file_outside_is_refused_before_any_request(sharded_dir, tmp_path, online):
    repo = with_shard_named(sharded_dir, tmp_path / "repo", "../../outside/x.safetensors")
    with LocalHub({"lab/evil": repo}) as hub:
        with pytest.raises(DownloadError, match="refusing it") as e:
            resolve("lab/evil", cache_dir=tmp_path / "cache", endpoint=hub.url)
    assert "\n" not in str(e.value)
    assert not [p for _, p, _ in hub.requests if "outside" in p]
    assert not list(tmp_path.rglob("x.safetensors"))


@pytest.mark.parametrize("weight_map, what", [([["a", "model-1.safetensors"]], "it is a list"),
                                              ({"a": 3}, "maps 'a' to the number 3"),
                                              ({"a": None}, "maps 'a' to null"),
                                              ({}, "it is an empty object"),
                                              ("model.safetensors", "it is a string")])
def test_a_malformed_weight_map_is_one_line(sharded_dir, tmp_path, weight_map, what):
    model = tmp_path / "model"
    shutil.copytree(sharded_dir, model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(DownloadError, match="'weight_map'") as e:
        resolve(str(model))
    assert what in str(e.value) and "\n" not in str(e.value)


_PROC_IO = Path("/proc/self/io")


def _bytes_read() -> int:
    """The bytes this process has read so far (Linux's /proc/self/io): a test's proof that a file went unread."""
    if not _PROC_IO.is_file():
        pytest.skip("needs /proc/self/io to count the bytes a process reads")
    return int(next(line for line in _PROC_IO.read_text().splitlines() if line.startswith("rchar:")).split()[1])


def test_an_index_too_large_to_be_one_is_refused_unread(sharded_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(sharded_dir, model)
    with open(model / "model.safetensors.index.json", "r+b") as f:
        f.truncate(17 * 2**20)  # sparse: no disk used
    before = _bytes_read()
    with pytest.raises(DownloadError, match=r"is over 16 MB: not a safetensors index"):
        resolve(str(model))
    assert _bytes_read() - before < 2**20


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json"])
def test_a_json_file_too_large_to_be_a_model_s_is_refused_unread(tiny_dir, tmp_path, name):
    """A 2 GB config.json used to be read whole, then parsed: a MemoryError traceback, or the machine's memory."""
    from qwen_lab.errors import CheckpointError
    from qwen_lab.generation import ChatModel
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    with open(model / name, "r+b") as f:
        f.truncate(17 * 2**20)  # sparse: no disk used
    before = _bytes_read()
    with pytest.raises(CheckpointError, match=rf"{name} is 17 MB, far too large for .* \(at most 16 MB\)") as e:
        ChatModel.load(str(model))
    assert _bytes_read() - before < 2**20 and "\n" not in str(e.value)  # the other files are a few kB


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_pipe_in_place_of_a_small_file_is_refused_not_waited_on(tmp_path, name):
    """resolve skips what is not a file, but a file can be swapped after it, or read_json_object / shard_names
    called by hand (exercise 1.2's checker, doctor): reading a pipe used to wait forever for a writer."""
    from qwen_lab.errors import QwenLabError
    from qwen_lab.hub import read_json_object
    os.mkfifo(tmp_path / name)
    read = shard_names if name.endswith("index.json") else (lambda p: read_json_object(p, "the model's configuration"))
    message = refusal_within(lambda: read(tmp_path / name), QwenLabError)
    assert message and f"{name} is not a regular file (a folder, a pipe or a device)" in message


@pytest.mark.parametrize("name, message", [
    ("~qwen-lab-no-such-user/x", "there is no user 'qwen-lab-no-such-user' for '~qwen-lab-no-such-user'"),
    ("lab/ti\0ny", "contains a NUL character"),
    ("a" * 5000, "cannot be a model folder"),
    ("lab/tiny model", "neither a model directory nor a Hub repo id"),
    ("lab--x/y", "neither a model directory nor a Hub repo id"),
])
def test_a_model_name_no_path_or_repo_can_be_is_one_line(name, message):
    with pytest.raises(DownloadError, match=re.escape(message)) as e:
        resolve(name)
    assert "\n" not in str(e.value)


# -- revisions: a branch, tag or commit name, checked before use ----------------------------------

@pytest.mark.parametrize("revision", ["../../../../pwned_ref", "main/../../x", "..", "/main", "main/", "refs//x",
                                      "main\n", "ma in", "a:b", "x~1", "x^", "a*", "a?", "[a", "a\\b", ".hidden",
                                      "v1.lock", "a.", "@", "x@{1}", "", "\x7f", "a" * 300])
def test_a_revision_that_is_no_ref_name_is_refused_before_any_request(hub, tmp_path, revision):
    with pytest.raises(DownloadError, match="is not a branch, tag or commit name") as e:
        fetch(hub, "lab/single", tmp_path, revision=revision)
    assert "\n" not in str(e.value) and hub.requests == []


def test_a_path_revision_writes_nothing_even_where_the_endpoint_accepts_it(tiny_dir, tmp_path, online):
    # huggingface_hub writes refs/<revision> in the cache: this one would land in tmp_path/a/pwned_ref
    cache = tmp_path / "a" / "b" / "cache"
    with LocalHub({"lab/tiny": tiny_dir}, revisions=("../../../../pwned_ref",)) as hub:
        with pytest.raises(DownloadError, match=r"revision '\.\./\.\./\.\./\.\./pwned_ref' is not a branch"):
            resolve("lab/tiny", revision="../../../../pwned_ref", cache_dir=cache, endpoint=hub.url)
        assert hub.requests == []
    assert not [p for p in tmp_path.rglob("*") if "pwned" in p.name]


@pytest.mark.parametrize("revision", ["refs/pr/1", "v1.0", "release/2024-01", "main"])
def test_branch_tag_and_pr_revisions_still_work(tiny_dir, tmp_path, online, revision):
    with LocalHub({"lab/tiny": tiny_dir}, revisions=(revision,)) as hub:
        files = resolve("lab/tiny", revision=revision, cache_dir=tmp_path, endpoint=hub.url)
    assert files.weights[0].read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "models--lab--tiny" / "refs" / revision).read_text() == hub.commit("lab/tiny")


# -- LocalHub answers as the Hub does ---------------------------------------------------------------

def head(url):
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as response:
        return response.headers


def test_local_hub_sends_the_hubs_hashes(hub, tiny_dir):
    weights, config = (tiny_dir / "model.safetensors").read_bytes(), (tiny_dir / "config.json").read_bytes()
    lfs = head(f"{hub.url}/lab/single/resolve/main/model.safetensors")
    assert lfs["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert lfs["X-Linked-Size"] == str(len(weights))
    assert lfs["ETag"] != lfs["X-Linked-Etag"]  # the LFS pointer's git hash: huggingface_hub must prefer X-Linked-*
    plain = head(f"{hub.url}/lab/single/resolve/main/config.json")
    assert plain["ETag"] == f'"{hashlib.sha1(b"blob %d" % len(config) + bytes(1) + config).hexdigest()}"'
    assert "X-Linked-Etag" not in plain


def test_the_cache_names_blobs_by_the_hashes_the_hub_states(hub, tmp_path, tiny_dir):
    files = fetch(hub, "lab/single", tmp_path)
    weights, config = (tiny_dir / "model.safetensors").read_bytes(), (tiny_dir / "config.json").read_bytes()
    assert files.weights[0].resolve().name == hashlib.sha256(weights).hexdigest()
    assert files.config.resolve().name == hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()


def test_local_hub_serves_ranges_and_refuses_unknown_faults(hub, tiny_dir):
    request = urllib.request.Request(f"{hub.url}/lab/single/resolve/main/config.json", headers={"Range": "bytes=10-"})
    with urllib.request.urlopen(request) as response:
        data = (tiny_dir / "config.json").read_bytes()
        assert response.status == 206 and response.read() == data[10:]
        assert response.headers["Content-Range"] == f"bytes 10-{len(data) - 1}/{len(data)}"
    with pytest.raises(ValueError, match="unknown fault 'flaky'"):
        hub.inject("flaky")

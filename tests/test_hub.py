"""Downloads through huggingface_hub's real client against a local server speaking the Hub's file protocol."""
import shutil

import pytest

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
    with pytest.raises(DownloadError, match=r"no revision 'v9'"):
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

"""The qwen-lab command: stdout carries only the reply or the prompt; errors are one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_lab.cli import main
from qwen_lab.generation import ChatModel
from qwen_lab.hub import EMBEDDED_MODEL_DIR
from qwen_lab.hub_server import LocalHub


@pytest.fixture(scope="module")
def chat(tiny_dir):
    return ChatModel.load(str(tiny_dir), dtype="float32", device="cpu")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_only_the_reply(capsys, tiny_dir, chat):
    code, out, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "Hello", "--temperature", "0",
                         "--max-new-tokens", "12")
    expected = chat.generate([{"role": "user", "content": "Hello"}], do_sample=False, max_new_tokens=12)
    assert code == 0 and err == ""
    assert out == expected.text + "\n"


def test_stats_line_on_stderr(capsys, tiny_dir):
    code, out, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "Hi", "--max-new-tokens", "7",
                         "--ignore-eos", "--stats")
    stats = json.loads(err.strip().splitlines()[-1])
    assert code == 0
    assert stats["generated_tokens"] == 7 and stats["finish_reason"] == "length"
    assert {"prompt_tokens", "ttft_s", "decode_tokens_per_s"} <= set(stats)
    from qwen_lab import kernels
    from qwen_lab.load import choose_dtype, default_device
    device = default_device()
    assert stats["dtype"] == str(choose_dtype("auto", device)).removeprefix("torch.")
    assert stats["matvec"] == ("qwen_lab" if kernels.available() and device.type == "cpu" else "torch")


def test_sampling_defaults_come_from_generation_config_and_seed_reproduces(capsys, tiny_dir):
    argv = ["generate", "--model", tiny_dir, "--prompt", "Hi", "--max-new-tokens", "15", "--ignore-eos"]
    a = run(capsys, *argv, "--seed", "1")[1]
    b = run(capsys, *argv, "--seed", "1")[1]
    c = run(capsys, *argv, "--seed", "2")[1]
    greedy = run(capsys, *argv, "--temperature", "0")[1]
    assert a == b and a != c and a != greedy  # do_sample: true in generation_config.json


def test_raw_prompt_skips_the_template(capsys, tiny_dir, chat):
    code, out, _ = run(capsys, "generate", "--model", tiny_dir, "--prompt", "The capital of", "--raw",
                       "--temperature", "0", "--max-new-tokens", "10")
    expected = chat.generate("The capital of", do_sample=False, max_new_tokens=10)
    assert out == expected.text + "\n"


def test_eos_token_replaces_the_list(capsys, tiny_dir, chat):
    free = chat.generate([{"role": "user", "content": "Hi"}], do_sample=False, max_new_tokens=20, eos_token_id=[])
    token = chat.tokenizer.id_to_token(free.token_ids[4])
    code, _, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "Hi", "--temperature", "0",
                       "--max-new-tokens", "20", "--eos-token", token, "--eos-token", "<|im_end|>", "--stats")
    stats = json.loads(err.strip())
    assert stats["finish_reason"] == "eos"
    assert stats["generated_tokens"] == free.token_ids.index(free.token_ids[4]) + 1


def test_unknown_eos_token_is_one_line_error(capsys, tiny_dir):
    code, out, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "Hi", "--eos-token", "<|nope|>")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "'<|nope|>' is not a token" in err


def test_template_prints_exactly_the_prompt(capsys, tiny_dir, chat, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 <b>"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    (tmp_path / "m.json").write_text(json.dumps(messages, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "t.json").write_text(json.dumps(tools))
    _, out, _ = run(capsys, "template", "--model", tiny_dir, "--messages", tmp_path / "m.json")
    assert out == chat.render(messages)
    _, out, _ = run(capsys, "template", "--model", tiny_dir, "--messages", tmp_path / "m.json",
                    "--no-generation-prompt", "--tools", tmp_path / "t.json")
    assert out == chat.render(messages, add_generation_prompt=False, tools=tools)


def test_bad_messages_file(capsys, tiny_dir, tmp_path):
    (tmp_path / "bad.json").write_text("[{")
    code, out, err = run(capsys, "template", "--model", tiny_dir, "--messages", tmp_path / "bad.json")
    assert code == 1 and "is not valid JSON" in err and err.count("\n") == 1
    code, _, err = run(capsys, "template", "--model", tiny_dir, "--messages", tmp_path / "missing.json")
    assert code == 1 and "cannot read messages file" in err


def test_missing_model_is_one_line_error_without_traceback(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "--model", tmp_path / "nowhere" / "x", "--prompt", "Hi")
    assert code == 1 and out == "" and err.startswith("qwen-lab: error: ") and err.count("\n") == 1


def test_console_script_downloads_through_hf_endpoint(tiny_dir, tmp_path):
    with LocalHub({"lab/tiny": tiny_dir}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_PROGRESS_BARS="1")
        env.pop("HF_HUB_OFFLINE", None)
        done = subprocess.run([sys.executable, "-m", "qwen_lab.cli", "download", "--model", "lab/tiny"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        local = done.stdout.strip()
        assert local.startswith(str(tmp_path / "hf")) and os.path.isfile(os.path.join(local, "model.safetensors"))
        # and then offline, from the cache, generation works
        env["HF_HUB_OFFLINE"] = "1"
        done = subprocess.run([sys.executable, "-m", "qwen_lab.cli", "generate", "--model", "lab/tiny", "--prompt",
                               "Hi", "--max-new-tokens", "3", "--stats"], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stderr.strip().splitlines()[-1])["generated_tokens"] <= 3
        env.pop("HF_HUB_OFFLINE")
        done = subprocess.run([sys.executable, "-m", "qwen_lab.cli", "download", "--model", "lab/other"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip() == f"qwen-lab: error: no repository 'lab/other' on {hub.url} (or it is private): " \
                                      "check the id, or log in (`hf auth login`) if it is yours"


def test_embedded_model_id_works_everywhere(capsys):
    from qwen_lab.hub import EMBEDDED_MODEL_DIR
    code, out, _ = run(capsys, "download", "--model", "qwen-lab/tiny-chat")
    assert code == 0 and out.strip() == str(EMBEDDED_MODEL_DIR)
    code, out, _ = run(capsys, "generate", "--prompt", "What is 2 plus 3?", "--temperature", "0")
    assert code == 0 and out == "2 plus 3 is 5.\n"


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "qwen_lab.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_download_fills_a_shared_cache_with_several_models_for_an_offline_room(tiny_dir, sharded_dir, tmp_path):
    room = tmp_path / "room-cache"
    with LocalHub({"lab/tiny": tiny_dir, "lab/sharded": sharded_dir}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_PROGRESS_BARS="1")
        env.pop("HF_HUB_OFFLINE", None)
        done = cli(env, "download", "lab/tiny", "--model", "lab/sharded", "--cache-dir", room)
    assert done.returncode == 0 and done.stderr == ""
    landed = done.stdout.splitlines()  # one folder per model, in order
    assert [Path(p).parts[-3] for p in landed] == ["models--lab--tiny", "models--lab--sharded"]
    assert all(p.startswith(str(room)) for p in landed)
    assert not (tmp_path / "hf").exists()  # nothing went to the default cache
    # the room: no network, the shared cache
    room_env = dict(env, HF_HUB_CACHE=str(room), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    for model in ("lab/tiny", "lab/sharded"):
        done = cli(room_env, "generate", "--model", model, "--prompt", "Hi", "--max-new-tokens", "2")
        assert done.returncode == 0, done.stderr
    done = cli(room_env, "download", "lab/tiny", "lab/sharded")  # checks what the room has, offline
    assert done.returncode == 0 and done.stdout.splitlines() == landed
    # a model the room lacks: one line naming it and what to do; the others still land
    done = cli(room_env, "download", "lab/tiny", "lab/missing")
    assert done.returncode == 1 and done.stdout.splitlines() == landed[:1]
    assert done.stderr == ("qwen-lab: error: lab/missing/config.json is not in the local cache and offline mode is on "
                           "(HF_HUB_OFFLINE): download it once with network (`qwen-lab download --model lab/missing`), "
                           "pass a local directory, or use the embedded model qwen-lab/tiny-chat\n")


def test_download_options(capsys, tmp_path):
    code, out, err = run(capsys, "download", "--model", "~qwen-lab-no-such-user/x")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "there is no user 'qwen-lab-no-such-user'" in err
    code, out, err = run(capsys, "download", "--revision", "../../x")
    assert code == 1 and err.count("\n") == 1 and "is not a branch, tag or commit name" in err
    (tmp_path / "file").write_text("")
    code, _, err = run(capsys, "download", "lab/x", "--cache-dir", tmp_path / "file")
    assert code == 1 and err.count("\n") == 1 and "is a file, not a folder" in err
    code, out, err = run(capsys, "download", "--force-download")  # the embedded model: nothing to fetch
    assert code == 0 and out.strip() == str(EMBEDDED_MODEL_DIR)

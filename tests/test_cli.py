"""The qwen-lab command: stdout carries only the reply or the prompt; errors are one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    from qwen_lab.load import checkpoint_dtype, choose_dtype, default_device, read_config
    device = default_device()
    saved = checkpoint_dtype(read_config(tiny_dir / "config.json"))  # tiny_dir is a float32 checkpoint
    assert stats["dtype"] == str(choose_dtype("auto", device, saved)).removeprefix("torch.")
    assert stats["matvec"] == ("qwen_lab" if kernels.available() and device.type == "cpu" else "torch")
    assert 1 <= stats["prefill_threads"] <= stats["decode_threads"] == kernels.num_threads()


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


@pytest.fixture
def thinking_dir(tiny_dir, tmp_path):
    """A model whose template reads a variable, as Qwen3's reads enable_thinking."""
    import shutil
    d = tmp_path / "thinking"
    shutil.copytree(tiny_dir, d)
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
    return d


def test_template_vars_reach_the_template(capsys, thinking_dir, tmp_path):
    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    plain = run(capsys, "template", "--model", thinking_dir, "--messages", messages)[1]
    off = run(capsys, "template", "--model", thinking_dir, "--messages", messages,
              "--template-var", "enable_thinking=false")[1]
    assert "<think>" not in plain and off == plain + "<think>\n\n</think>\n\n"
    as_text = run(capsys, "template", "--model", thinking_dir, "--messages", messages,
                  "--template-var", "enable_thinking=no")[1]  # not JSON: the string "no", which is not false
    assert "<think>" not in as_text


def test_template_vars_reach_generate(capsys, thinking_dir):
    from qwen_lab.generation import ChatModel
    chat = ChatModel.load(str(thinking_dir))
    expected = chat.generate([{"role": "user", "content": "Hi"}], template_vars={"enable_thinking": False},
                             do_sample=False, max_new_tokens=6)
    out = run(capsys, "generate", "--model", thinking_dir, "--prompt", "Hi", "--temperature", "0",
              "--max-new-tokens", "6", "--template-var", "enable_thinking=false")[1]
    assert out == expected.text + "\n"
    assert chat.render([{"role": "user", "content": "Hi"}], enable_thinking=False).endswith("</think>\n\n")


@pytest.mark.parametrize("bad", ["enable_thinking", "=1", "messages=[]", "two words=1"])
def test_a_bad_template_var_is_a_usage_error(capsys, tiny_dir, bad):
    with pytest.raises(SystemExit) as info:
        main(["template", "--model", str(tiny_dir), "--messages", "x.json", "--template-var", bad])
    assert info.value.code == 2 and "--template-var" in capsys.readouterr().err


def run_cli(*argv, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", QWEN_LAB_MODEL="qwen-lab/tiny-chat")
    return subprocess.run([sys.executable, "-m", "qwen_lab.cli", *map(str, argv)], capture_output=True, env=env,
                          timeout=120, **kw)


def one_line_error(done, *fragments):
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 1, err
    assert err.startswith("qwen-lab: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_prompt_that_is_not_utf8_is_one_line(tiny_dir):
    done = run_cli("generate", "--model", tiny_dir, "--prompt", os.fsdecode(b"caf\xe9"), "--max-new-tokens", "2")
    one_line_error(done, "half of a character")


def test_stdout_closed_is_one_line(tiny_dir):
    done = run_cli("generate", "--model", tiny_dir, "--prompt", "Hi", "--max-new-tokens", "2", stdout=None,
                   stdin=subprocess.DEVNULL, close_fds=True, preexec_fn=lambda: os.close(1))
    one_line_error(done, "standard output is closed")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--seed", str(2**70), "seed must be a whole number from 0 to 2**64 - 1"),
    ("--temperature", "inf", "temperature must be a finite number"),
    ("--repeat-penalty", "inf", "repetition_penalty must be a finite number"),
    ("--top-p", "0", "top_p must be a number in (0, 1]"),
    ("--max-new-tokens", "0", "max_new_tokens must be a whole number, at least 1"),
])
def test_bad_flag_values_are_named(capsys, tiny_dir, flag, value, fragment):
    code, out, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "Hi", flag, value)
    assert code == 1 and out == "" and fragment in err and err.count("\n") == 1


def test_bad_generation_config_names_the_file(tiny_dir, tmp_path, capsys):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": ["<|im_end|>"]}))
    code, _, err = run(capsys, "generate", "--model", d, "--prompt", "Hi")
    assert code == 1 and "generation_config.json: eos_token_id must be a token id" in err
    (d / "generation_config.json").write_text(json.dumps({"top_k": "20"}))
    code, _, err = run(capsys, "generate", "--model", d, "--prompt", "Hi")
    assert code == 1 and "generation_config.json: top_k must be a whole number >= 0" in err
    (d / "generation_config.json").write_text("[]")
    code, _, err = run(capsys, "generate", "--model", d, "--prompt", "Hi")
    assert code == 1 and "generation_config.json must hold a JSON object" in err


def test_nan_weights_stop_with_one_line(tiny_dir, tmp_path, capsys):
    import shutil
    from safetensors.torch import load_file, save_file
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"][:] = float("nan")
    save_file(tensors, d / "model.safetensors")
    for temperature in ("0", "0.7"):  # greedy used to print "!!!!!", sampling to raise IndexError
        code, out, err = run(capsys, "generate", "--model", d, "--prompt", "Hi", "--temperature", temperature)
        assert code == 1 and "computed nan logits" in err and err.count("\n") == 1


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_dir, tmp_path, capsys):
    import shutil
    from safetensors.torch import load_file, save_file
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["vocab_size"] = 300  # the tokenizer has 400 tokens
    (d / "config.json").write_text(json.dumps(config))
    tensors = load_file(d / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:300].clone()
    save_file(tensors, d / "model.safetensors")
    code, _, err = run(capsys, "generate", "--model", d, "--prompt", "Hi")
    assert code == 1 and "tokenizer.json has 400 tokens but config.json's vocab_size is 300" in err


def test_ctrl_c_while_loading_is_one_line(tiny_dir):
    import signal
    import time
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # a load that takes a minute, interrupted once it has begun (it says so: on a busy machine the imports
    # alone may take longer than any fixed wait, and an interrupt during them is not what this tests)
    proc = subprocess.Popen([sys.executable, "-c", "import qwen_lab.cli as c, sys, time; "
                             "import qwen_lab.generation as g; "
                             "g.ChatModel.load = lambda *a, **k: (print('loading', flush=True), time.sleep(60)); "
                             "sys.exit(c.main(['generate', '--prompt', 'Hi']))"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"loading\n"
    time.sleep(0.5)  # inside the sleep by now; an interrupt a little earlier is still inside the load
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.decode() == "qwen-lab: interrupted\n"


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


def test_top_logprobs_are_json_lines_on_stderr(capsys, tiny_dir, chat):
    code, out, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "Hi", "--temperature", "0",
                         "--max-new-tokens", "6", "--ignore-eos", "--top-logprobs", "3")
    lines = [json.loads(line) for line in err.splitlines()]
    expected = chat.generate([{"role": "user", "content": "Hi"}], do_sample=False, max_new_tokens=6, eos_token_id=[],
                             top_logprobs=3)
    assert code == 0 and out == expected.text + "\n" and len(lines) == 6
    for line, c in zip(lines, expected.choices):
        assert line["token"] == c.token_id and len(line["top"]) == 3 and line["top"][0]["token"] == c.token_id
        assert line["logprob"] == pytest.approx(c.logprob, abs=1e-5) and line["text"] == chat.tokenizer.decode([c.token_id])
    code, _, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "Hi", "--top-logprobs", "99")
    assert code == 1 and "top_logprobs must be a whole number from 0 to 20" in err


def test_the_help_says_what_auto_picks():
    """--help said auto picks bfloat16 only on CPUs with bf16 instructions; load.choose_dtype keeps a bf16
    checkpoint's dtype on every CPU (its pages shared, memory-mapped)."""
    import torch

    from qwen_lab.load import choose_dtype
    done = subprocess.run([sys.executable, "-m", "qwen_lab.cli", "generate", "--help"], capture_output=True,
                          text=True, timeout=120)
    help_text = " ".join(done.stdout.split())
    assert "on a CPU the checkpoint's own dtype (bfloat16 or float32; float32 for others)" in help_text
    cpu = torch.device("cpu")
    assert [choose_dtype("auto", cpu, saved) for saved in (torch.bfloat16, torch.float32, torch.float16)] == \
        [torch.bfloat16, torch.float32, torch.float32]

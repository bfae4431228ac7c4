"""The self-checking exercises: right, wrong with the why, not done, and the learner's errors, each one line."""
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from qwen_lab import exercises as ex
from qwen_lab.generation import ChatModel
from qwen_lab.hub import resolve
from qwen_lab.hub_server import git_blob_hash


@pytest.fixture(scope="module")
def chat():
    return ChatModel.load("qwen-lab/tiny-chat", dtype="float32", device="cpu")


@pytest.fixture(autouse=True)
def english(monkeypatch, tmp_path):
    """Each test speaks English unless it says otherwise (no QWEN_LAB_LANG, a neutral working directory)."""
    monkeypatch.delenv("QWEN_LAB_LANG", raising=False)
    monkeypatch.chdir(tmp_path)


def verdict(capsys, check, *args, **kwargs) -> str:
    """Run a check; it must print exactly one line and return nothing."""
    assert check(*args, **kwargs) is None
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, out
    return out.rstrip("\n")


def stub(*args):
    raise NotImplementedError  # what an exercise cell holds before the learner writes it


# ---------------------------------------------------------------- the right answers, written as a learner would

SIZES = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8, "U8": 1}


def shard_names(index_path):
    return sorted(set(json.loads(index_path.read_text())["weight_map"].values()))


def count_by_hand(c):
    h, layers, vocab, mlp = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * mlp + 2 * h
    return vocab * h + layers * layer + h + (0 if c["tie_word_embeddings"] else vocab * h)


def tensor_bytes(header):
    return sum(math.prod(t["shape"]) * SIZES[t["dtype"]] for name, t in header.items() if name != "__metadata__")


def top_p(logits, p):
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < p  # the mass before a token is still short of p
    out = torch.full_like(logits, float("-inf"))
    out[order[keep]] = logits[order[keep]]
    return out


def penalty(logits, previous, penalty):
    out = logits.clone()
    for i in set(previous.tolist()):
        out[i] = out[i] / penalty if out[i] > 0 else out[i] * penalty
    return out


def cut_at_eos(ids, eos):
    out = []
    for i in ids:
        if i in eos:
            break
        out.append(i)
    return out


def render(messages):
    text = ""
    if messages[0]["role"] != "system":
        text += "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def context_used(panel):
    return len(panel.chat.prompt_ids(json.loads(panel.export()), add_generation_prompt=False))


@pytest.fixture(scope="module")
def panel(chat):
    pytest.importorskip("ipywidgets")
    from qwen_lab.panel import ChatPanel
    p = ChatPanel(chat)
    p.send("What is the capital of France?")
    p.wait(60)
    return p


def exercises(chat, panel):
    """(check, right answer, extra arguments) for every exercise of the notebooks."""
    files = resolve("qwen-lab/tiny-chat")
    from qwen_lab.panel import ChatPanel
    return [
        (ex.check_eos_ids, json.loads(files.generation_config.read_text())["eos_token_id"], ()),
        (ex.check_shard_names, shard_names, ()),
        (ex.check_blob_name, hashlib.sha256(files.weights[0].read_bytes()).hexdigest(), ()),
        (ex.check_parameter_count, count_by_hand, ()),
        (ex.check_tensor_bytes, tensor_bytes, ()),
        (ex.check_kv_cache_bytes, 2 * 28 * 2 * 128 * 2, ()),  # this one number is the issue's own example
        (ex.check_kv_head, lambda j, n_heads, n_kv: j // (n_heads // n_kv), ()),
        (ex.check_rows_changed, lambda T, position: list(range(position, T)), (chat,)),
        (ex.check_render, render, (chat,)),
        (ex.check_next_role, "user", (chat,)),
        (ex.check_top_p, top_p, ()),
        (ex.check_repetition_penalty, penalty, ()),
        (ex.check_reply_end_id, chat.tokenizer.token_to_id("<|im_end|>"), (chat,)),
        (ex.check_cut_at_eos, cut_at_eos, (chat,)),
        (ex.check_context_used, context_used, (panel,)),
        (ex.check_brief_panel, ChatPanel(chat, stop_strings=["."]), ()),
    ]


def test_every_check_is_tried_here(chat, panel):
    assert {check.__name__ for check, _, _ in exercises(chat, panel)} == {n for n in ex.__all__ if n.startswith("check_")}


def test_the_real_models_files_ship_with_the_package():
    """Colab and the workshop image install the package without the clone: the files are inside it."""
    import qwen_lab
    path = ex.real_model_file("config.json")
    assert path.is_relative_to(Path(qwen_lab.__file__).parent / "reference")
    assert json.loads(path.read_text())["architectures"] == ["Qwen2ForCausalLM"]
    from qwen_lab.errors import QwenLabError
    with pytest.raises(QwenLabError, match="has no reference file 'model.safetensors'"):
        ex.real_model_file("model.safetensors")


def test_right_answers_are_right(capsys, chat, panel):
    for check, answer, extra in exercises(chat, panel):
        line = verdict(capsys, check, answer, *extra)
        assert line.startswith("✓ right: "), (check.__name__, line)


def test_unanswered_exercises_say_not_yet_and_what_to_try(capsys, chat, panel):
    for check, answer, extra in exercises(chat, panel):
        for blank in [..., None] + ([stub] if callable(answer) else []):
            line = verdict(capsys, check, blank, *extra)
            assert line.startswith("✗ not yet: ") and len(line) > 30, (check.__name__, blank, line)
            assert "Traceback" not in line and "raised" not in line  # a hint, not an error report


def test_the_verdict_follows_the_language(capsys, chat, panel, monkeypatch):
    monkeypatch.setenv("QWEN_LAB_LANG", "zh-TW")
    for check, answer, extra in exercises(chat, panel)[:6]:
        assert verdict(capsys, check, answer, *extra).startswith("✓ 答對了：")
        assert verdict(capsys, check, ..., *extra).startswith("✗ 還沒：")
    monkeypatch.setenv("QWEN_LAB_LANG", "klingon")  # a bad setting: the panel refuses it, a check still answers
    assert verdict(capsys, ex.check_kv_cache_bytes, 28672).startswith("✓ right: ")


# ---------------------------------------------------------------- wrong answers get the why

def test_eos_ids_from_config_json_are_named_as_such(capsys):
    assert "config.json's eos_token_id, one id" in verdict(capsys, ex.check_eos_ids, [2047])
    assert "list of token ids" in verdict(capsys, ex.check_eos_ids, "2047")
    assert "not the ids generation_config.json lists" in verdict(capsys, ex.check_eos_ids, [1, 2])


def test_shard_names_listed_once_per_tensor_or_unsorted(capsys):
    each = lambda path: list(json.loads(path.read_text())["weight_map"].values())  # noqa: E731
    assert "50 names for 3 shards" in verdict(capsys, ex.check_shard_names, each)
    assert "in another order" in verdict(capsys, ex.check_shard_names, lambda path: shard_names(path)[::-1])


def test_a_git_hash_or_another_files_hash_is_told_apart(capsys):
    files = resolve("qwen-lab/tiny-chat")
    assert "git blob hash" in verdict(capsys, ex.check_blob_name, git_blob_hash(files.weights[0].read_bytes()))
    config_hash = hashlib.sha256(files.config.read_bytes()).hexdigest()
    assert "SHA-256 of config.json" in verdict(capsys, ex.check_blob_name, config_hash)


@pytest.mark.parametrize("mistake, why", [
    (lambda c: count_by_hand(c) + c["vocab_size"] * c["hidden_size"], "lm_head"),
    (lambda c: count_by_hand({**c, "tie_word_embeddings": True}), "lm_head"),
    (lambda c: count_by_hand(c) - c["hidden_size"], "final RMSNorm"),
    (lambda c: count_by_hand({**c, "num_key_value_heads": c["num_attention_heads"]}), "grouped-query"),
])
def test_parameter_count_mistakes(capsys, mistake, why):
    line = verdict(capsys, ex.check_parameter_count, mistake)
    assert line.startswith("✗ not yet: ") and why in line, line


def test_tensor_bytes_mistakes(capsys):
    every_entry = lambda h: sum(math.prod(t["shape"]) * SIZES[t["dtype"]] for t in h.values())  # noqa: E731
    line = verdict(capsys, ex.check_tensor_bytes, every_entry)
    assert "raised KeyError: 'shape'" in line and "'__metadata__' is not a tensor" in line
    as_bf16 = lambda h: sum(math.prod(t["shape"]) * 2 for k, t in h.items() if k != "__metadata__")  # noqa: E731
    assert "right for the bf16 weights" in verdict(capsys, ex.check_tensor_bytes, as_bf16)
    numbers = lambda h: sum(math.prod(t["shape"]) for k, t in h.items() if k != "__metadata__")  # noqa: E731
    assert "counts numbers, not bytes" in verdict(capsys, ex.check_tensor_bytes, numbers)


@pytest.mark.parametrize("answer, why", [
    (28 * 2 * 128 * 2, "keys only"),
    (2 * 2 * 128 * 2, "one layer"),
    (2 * 28 * 12 * 128 * 2, "2 key/value heads only"),
    (2 * 28 * 2 * 128 * 4, "float32"),
    (12345, "how many numbers"),
    (28672.5, "whole number"),
])
def test_kv_cache_mistakes(capsys, answer, why):
    line = verdict(capsys, ex.check_kv_cache_bytes, answer)
    assert line.startswith("✗ not yet: ") and why in line, line


def test_kv_cache_answer_is_computed_from_the_config(capsys, tmp_path):
    config = json.loads(ex.real_model_file("config.json").read_text())
    other = tmp_path / "config.json"
    other.write_text(json.dumps({**config, "num_hidden_layers": 10}))
    assert verdict(capsys, ex.check_kv_cache_bytes, 2 * 10 * 2 * 128 * 2, other).startswith("✓ right: ")
    assert verdict(capsys, ex.check_kv_cache_bytes, 2 * 28 * 2 * 128 * 2, other).startswith("✗ not yet: ")


def test_kv_head_dealt_in_turn(capsys):
    assert "in turn" in verdict(capsys, ex.check_kv_head, lambda j, n_heads, n_kv: j % n_kv)


def test_rows_changed_before_the_position(capsys, chat):
    assert "causal mask" in verdict(capsys, ex.check_rows_changed, lambda T, p: list(range(T)), chat)
    assert "rows after it attend" in verdict(capsys, ex.check_rows_changed, lambda T, p: [p], chat.model)


def test_render_mistakes(capsys, chat):
    no_header = lambda ms: render(ms)[:-len("<|im_start|>assistant\n")]  # noqa: E731
    assert "goes on after yours: '<|im_start|>assistant\\n'" in verdict(capsys, ex.check_render, no_header, chat)
    plain = lambda ms: "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in ms) + \
        "<|im_start|>assistant\n"  # noqa: E731
    assert "adds its own" in verdict(capsys, ex.check_render, plain, chat)
    squashed = lambda ms: render(ms).replace("<|im_end|>\n", "<|im_end|>")  # noqa: E731
    assert "differ at character" in verdict(capsys, ex.check_render, squashed, chat)


def test_next_role_assistant_is_explained(capsys, chat):
    line = verdict(capsys, ex.check_next_role, "assistant", chat)
    assert "closed by <|im_end|>" in line and "<|im_start|>user" in line


def top_p_within_p(logits, p):
    """The usual slip: keep the tokens whose running total stays within p (the favourite may be dropped)."""
    sorted_probs, order = logits.softmax(-1).sort(descending=True)
    keep = sorted_probs.cumsum(-1) <= p
    out = torch.full_like(logits, float("-inf"))
    out[order[keep]] = logits[order[keep]]
    return out


@pytest.mark.parametrize("mistake, why", [
    (lambda l, p: top_p(l, p).softmax(-1), "returned probabilities"),
    (lambda l, p: top_p(l, min(p, 0.2)), "you keep"),
    (top_p_within_p, "most likely token was cut"),
    (lambda l, p: top_p(l, p) * 2, "logits changed"),
    (lambda l, p: torch.where(torch.isinf(l), torch.zeros_like(l), top_p(l, p)), "already at -inf"),
    (lambda l, p: l.fill_(0.0), "changed the logits it was given"),
    (lambda l, p: top_p(l, p)[:5], "same shape"),
])
def test_top_p_mistakes(capsys, mistake, why):
    line = verdict(capsys, ex.check_top_p, mistake)
    assert line.startswith("✗ not yet: ") and why in line, line


def test_repetition_penalty_mistakes(capsys):
    def divide_all(logits, previous, p):
        out = logits.clone()
        out[previous.unique()] /= p
        return out

    def every_time(logits, previous, p):
        out = logits.clone()
        for i in previous.tolist():
            out[i] = out[i] / p if out[i] > 0 else out[i] * p
        return out
    assert "multiply the negative ones" in verdict(capsys, ex.check_repetition_penalty, divide_all)
    assert "penalised once" in verdict(capsys, ex.check_repetition_penalty, every_time)


def test_reply_end_id_mistakes(capsys, chat):
    assert "ends a whole document" in verdict(capsys, ex.check_reply_end_id, chat.tokenizer.token_to_id("<|endoftext|>"),
                                              chat)
    assert "token_to_id('<|im_end|>')" in verdict(capsys, ex.check_reply_end_id, "<|im_end|>", chat)


def test_cut_at_eos_mistakes(capsys, chat):
    with_eos = lambda ids, eos: ids[:next((k + 1 for k, i in enumerate(ids) if i in eos), len(ids))]  # noqa: E731
    assert "only the ids before the EOS" in verdict(capsys, ex.check_cut_at_eos, with_eos, chat)
    first_only = lambda ids, eos: ids[:ids.index(eos[0])] if eos[0] in ids else list(ids)  # noqa: E731
    assert "any id of eos_ids" in verdict(capsys, ex.check_cut_at_eos, first_only, chat)

    def in_place(ids, eos):
        del ids[3:]
        return ids
    assert "changed the list it was given" in verdict(capsys, ex.check_cut_at_eos, in_place, chat)


def test_context_used_mistakes(capsys, panel):
    assert "counts characters" in verdict(capsys, ex.check_context_used, lambda p: len(p.export()), panel)
    contents = lambda p: sum(len(p.chat.tokenizer.encode(m["content"])) for m in json.loads(p.export()))  # noqa: E731
    assert "the template's part takes tokens too" in verdict(capsys, ex.check_context_used, contents, panel)


def test_a_panel_without_a_stop_string(capsys, chat):
    from qwen_lab.panel import ChatPanel
    line = verdict(capsys, ex.check_brief_panel, ChatPanel(chat))
    assert "went on past the first '.'" in line and "stop_strings" in line
    assert "should be a ChatPanel" in verdict(capsys, ex.check_brief_panel, chat)


def test_a_panel_that_stops_at_another_string_before_the_first_dot(capsys, chat):
    """A stop string met before the reply's '.' ends it too, with no '.' in it: not the panel asked for."""
    from qwen_lab.panel import ChatPanel
    for early in (["Paris"], ["is"]):
        line = verdict(capsys, ex.check_brief_panel, ChatPanel(chat, stop_strings=early))
        assert line.startswith("✗ not yet") and "before its first '.'" in line, line


def test_a_panel_that_ends_on_the_dot_token_is_not_said_to_go_past_it(capsys, chat):
    """An EOS id on the token '.' ends the reply before any '.': the line says so, not that it went past one."""
    from qwen_lab.panel import ChatPanel
    line = verdict(capsys, ex.check_brief_panel, ChatPanel(chat, eos_token_id=[chat.tokenizer.token_to_id(".")]))
    assert line.startswith("✗ not yet") and "went on past" not in line and "finish: eos" in line, line
    assert "stop_strings" in line


# ---------------------------------------------------------------- the learner's code failing, the check failing

def test_an_error_in_the_learners_function_is_one_line_with_its_line(capsys):
    def my_top_p(logits, p):
        probs = logits.softmax(-1)
        return probs[len(probs) + 5]  # an IndexError two lines into the learner's function
    line = verdict(capsys, ex.check_top_p, my_top_p)
    assert line.startswith("✗ not yet: my_top_p raised IndexError: ")
    assert "(line " in line and "return probs[len(probs) + 5]" in line


def test_a_function_that_returns_nothing(capsys):
    def my_top_p(logits, p):
        logits.softmax(-1)  # forgot the return
    assert "returned None: does it end with a return?" in verdict(capsys, ex.check_top_p, my_top_p)


def test_not_a_function(capsys):
    assert "should be a function" in verdict(capsys, ex.check_top_p, 0.9)


def test_ctrl_c_still_stops_a_check():
    def my_top_p(logits, p):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ex.check_top_p(my_top_p)


def test_a_check_that_cannot_run_says_so_in_one_line(capsys, tmp_path):
    line = verdict(capsys, ex.check_kv_cache_bytes, 28672, tmp_path / "missing.json")
    assert line.startswith("✗ cannot check: ") and "missing.json" in line


def test_the_model_the_checks_load_is_loaded_anew_once_its_weights_file_was_rewritten(tmp_path, tokenizer,
                                                                                    monkeypatch):
    """The checks load the notebooks' model once and keep it; a real model's weights are read from its file,
    and one rewritten in place under it (a teacher's cp) made every check that runs the model refused,
    "load the model again", which no cell could do: the checks kept giving back the same model."""
    import os

    from conftest import make_checkpoint, rewrite_in_place
    from qwen_lab.errors import CheckpointError
    folder = make_checkpoint(tmp_path / "model", tokenizer, dtype=torch.bfloat16)
    path = folder / "model.safetensors"
    os.utime(path, ns=(10**18, 10**18))  # written long before the room started
    monkeypatch.setenv("QWEN_LAB_MODEL", str(folder))
    monkeypatch.setattr(ex, "_loaded", {})
    ask = [{"role": "user", "content": "Hi"}]
    first = ex._chat()
    assert ex._chat() is first and first.model.lm_head.weight.dtype == torch.bfloat16  # kept; views on the file
    rewrite_in_place(path)  # as cp over it writes
    with pytest.raises(CheckpointError, match="load the model again"):
        first.generate(ask, max_new_tokens=2, do_sample=False)
    again = ex._chat()
    assert again is not first and again.generate(ask, max_new_tokens=2, do_sample=False).token_ids
    assert ex._chat() is again

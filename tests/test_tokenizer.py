"""Tokenizer: same ids as transformers' tokenizer; streaming never emits a broken character."""
import pytest

from conftest import SAMPLE_TEXTS
from qwen_lab.hub import resolve
from qwen_lab.tokenizer import Tokenizer

TEXTS = SAMPLE_TEXTS[:5] + ["早安 🌞🌍 繁體中文測試", "<|im_start|>user\nHi<|im_end|>\n", "  spaces\n\nand\ttabs "]


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_files(resolve(str(tiny_dir)))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_same_ids_as_transformers(tok, tiny_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)


def test_special_tokens(tok):
    ids = tok.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user"
    assert tok.special_tokens["eos_token"] == "<|im_end|>" and tok.special_tokens["pad_token"] == "<|endoftext|>"
    assert tok.special_tokens["bos_token"] is None
    assert {tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")} <= tok.special_ids


@pytest.mark.parametrize("text", TEXTS)
def test_stream_emits_only_whole_characters(tok, text):
    ids = tok.encode(text)
    stream = tok.stream(skip_special_tokens=False)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_really_are_split_across_tokens(tok):
    # The point of the stream decoder: with this vocabulary an emoji takes several byte-level tokens.
    ids = tok.encode("🌍")
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])


def test_unfinished_bytes_are_flushed_at_the_end(tok):
    ids = tok.encode("🌍")
    stream = tok.stream()
    assert stream.push(ids[0]) == ""
    assert stream.flush() == tok.decode(ids[:1])  # the replacement character, reported rather than lost


def test_corrupt_tokenizer_file(tiny_dir, tmp_path):
    import shutil
    from qwen_lab.errors import CheckpointError
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="cannot read .*tokenizer.json"):
        Tokenizer.from_files(resolve(str(d)))


# ---------------------------------------------------------------- hostile or odd tokenizer.json

def with_tokenizer(tiny_dir, tmp_path, edit):
    import json
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    data = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (d / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return resolve(str(d))


def test_truncation_and_padding_saved_in_tokenizer_json_are_not_applied(tok, tiny_dir, tmp_path):
    """Many repos' tokenizer.json keep the max_length they were last used with; transformers ignores it."""
    def edit(data):
        data["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
        data["padding"] = {"strategy": {"Fixed": 1000}, "direction": "Right", "pad_to_multiple_of": None,
                           "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    saved = Tokenizer.from_files(with_tokenizer(tiny_dir, tmp_path, edit))
    text = TEXTS[1]
    assert len(tok.encode(text)) > 2
    assert saved.encode(text) == tok.encode(text)  # used to be cut to 2 ids, or padded to 1,000


@pytest.mark.parametrize("edit, reason", [
    # a regex that backtracks past Oniguruma's limit: a Rust panic inside tokenizers
    (lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(pattern={"Regex": "(a+)+$"}), "retry-limit"),
    # replacing the empty string: an index out of bounds inside tokenizers
    (lambda d: d.update(normalizer={"type": "Replace", "pattern": {"String": ""}, "content": "x"}), "index"),
])
def test_a_tokenizer_whose_rules_cannot_run_is_one_line(tiny_dir, tmp_path, edit, reason):
    from qwen_lab.errors import CheckpointError
    broken = Tokenizer.from_files(with_tokenizer(tiny_dir, tmp_path, edit))
    with pytest.raises(CheckpointError, match=f"tokenizer.json cannot encode this text .*{reason}.*broken") as info:
        broken.encode("a" * 5000 + "!")  # used to raise pyo3's PanicException, past every `except Exception`
    assert "\n" not in str(info.value)


def test_a_tokenizer_file_too_large_to_be_one_is_refused_unread(tiny_dir, tmp_path):
    import shutil
    from qwen_lab.errors import CheckpointError
    from qwen_lab.tokenizer import MAX_TOKENIZER_BYTES
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    with open(d / "tokenizer.json", "r+b") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)  # sparse: nothing written, nothing to read
    with pytest.raises(CheckpointError, match="tokenizer.json is 256 MB, over the 256 MB a tokenizer can be"):
        Tokenizer.from_files(resolve(str(d)))


def test_the_highest_id_counts_ids_that_skip_numbers(tiny_dir, tmp_path, tok):
    assert tok.highest_id == tok.vocab_size - 1
    sparse = Tokenizer.from_files(with_tokenizer(tiny_dir, tmp_path, lambda d: d["model"]["vocab"].update(a=100_000)))
    assert sparse.encode("a") == [100_000]
    assert sparse.vocab_size == tok.vocab_size and sparse.highest_id == 100_000


def test_a_pipe_in_place_of_tokenizer_json_is_refused_not_waited_on(tiny_dir, tmp_path):
    """A pipe swapped in after resolve checked the folder: tokenizers' own open of it waited forever for a
    writer, holding the GIL, so the whole process froze (a notebook's kernel too). Hence a child process."""
    import os
    import shutil
    import subprocess
    import sys
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "tokenizer.json").unlink()
    os.mkfifo(d / "tokenizer.json")
    code = ("import sys; from pathlib import Path; from qwen_lab.hub import ModelFiles; "
            "from qwen_lab.tokenizer import Tokenizer; d = Path(sys.argv[1])\n"
            "files = ModelFiles(root=d, config=d / 'config.json', tokenizer=d / 'tokenizer.json', "
            "tokenizer_config=d / 'tokenizer_config.json', generation_config=None, chat_template=None)\n"
            "try:\n    Tokenizer.from_files(files)\nexcept Exception as e:\n    print(e)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a pipe in place of tokenizer.json still waits forever")
    assert "tokenizer.json is not a regular file" in done.stdout, done.stderr

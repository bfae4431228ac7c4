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

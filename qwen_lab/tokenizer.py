"""Step 2, second half — the tokenizer: text <-> ids with ``tokenizers``, plus streaming.

Qwen2's tokenizer is byte-level BPE: a Chinese character or an emoji is 3 or 4
UTF-8 bytes and may be split over two tokens. Decoding the first token alone
gives U+FFFD (the replacement character). ``StreamDecoder`` therefore emits
text only once it forms whole characters, like Candle's ``TokenOutputStream``.

>>> from qwen_lab.hub import resolve
>>> tok = Tokenizer.from_files(resolve("qwen-lab/tiny-chat"))
>>> tok.decode(tok.encode("hello 你好"))
'hello 你好'
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError, SettingError
from .hub import ModelFiles, read_bounded, read_json_object


#: A tokenizer.json larger than this is refused unread (Qwen2.5's is 7 MB, the largest known about 35 MB).
MAX_TOKENIZER_BYTES = 256 * 2**20

#: The named special tokens of tokenizer_config.json (transformers' list); chat templates may read each.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def special_tokens(tokenizer_config: dict) -> dict[str, str | None]:
    """Each named special token's text; tokenizer_config.json writes one as a string or as {"content": ...}."""
    def text(value):
        if isinstance(value, dict):
            return value.get("content")
        return value if isinstance(value, str) else None
    return {k: text(tokenizer_config.get(k)) for k in SPECIAL_TOKEN_KEYS}


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus what ``tokenizer_config.json`` says about it."""

    def __init__(self, backend: _HFTokenizer, tokenizer_config: dict | None = None) -> None:
        # A tokenizer.json may keep the truncation or padding it was last used with (saved after
        # encoding with max_length=512, say): transformers turns both off unless a call asks for
        # them, and so does this kit, so a long prompt never loses its end without a word.
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.config = tokenizer_config or {}
        #: e.g. {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, ...}
        self.special_tokens = special_tokens(self.config)
        self.special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_files(cls, files: ModelFiles) -> "Tokenizer":
        path = Path(files.tokenizer)
        data = _read_tokenizer_file(path)
        try:
            backend = _HFTokenizer.from_buffer(data)
        except BaseException as e:  # tokenizers raises a bare Exception (or ValueError) on a bad file
            if not (isinstance(e, Exception) or _failed_inside(e)):
                raise
            raise CheckpointError(f"cannot read {path}: {_first_line(e)}; download the model again") from e
        return cls(backend, read_json_object(files.tokenizer_config, "the special tokens and the chat template"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def highest_id(self) -> int:
        """The largest id the tokenizer can produce: ids need not be contiguous, so it may exceed ``vocab_size``."""
        return max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special-token strings in it become their single ids.

        No BOS is added: Qwen2 uses none (``add_bos_token`` is false); templates that want one
        (Llama 3's ``<|begin_of_text|>``) write it as text, which becomes its id here.
        """
        if not isinstance(text, str):
            raise SettingError(f"the text to encode must be a str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from bytes that were not UTF-8
            raise SettingError(f"the text holds {text[e.start]!r} at position {e.start}, half of a character "
                               f"(not valid Unicode): remove it or fix the text's encoding") from None
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except BaseException as e:
            if not _failed_inside(e):
                raise
            raise CheckpointError(f"tokenizer.json cannot encode this text ({_first_line(e)}): its rules are broken; "
                                  f"download the model again") from None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        try:
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except BaseException as e:
            if not _failed_inside(e):
                raise
            raise CheckpointError(f"tokenizer.json cannot decode ids {str(list(ids))[:60]} ({_first_line(e)}): its "
                                  f"rules are broken; download the model again") from None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def tokens(self, ids: list[int]) -> list[str]:
        """Each id as the readable text it stands for (special tokens verbatim)."""
        return [self.decode([i]) for i in ids]

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


def _read_tokenizer_file(path: Path) -> bytes:
    """The bytes of tokenizer.json, read here rather than by ``tokenizers``: a pipe in its place would
    block the open forever, and a huge file could take all the memory; both are refused unread."""
    data, size = read_bounded(path, MAX_TOKENIZER_BYTES)
    if data is not None:
        return data
    raise CheckpointError(f"{path} is {size / 2**20:,.0f} MB, over the {MAX_TOKENIZER_BYTES // 2**20} MB a "
                          f"tokenizer can be: it is not one; download the model again")


def _failed_inside(error: BaseException) -> bool:
    """Whether ``error`` is the ``tokenizers`` library failing on a broken tokenizer.json.

    It raises a plain ``Exception``; and a rule it cannot run ends in a Rust panic (a regex that
    backtracks past Oniguruma's limit, a replacement of the empty string...), which pyo3 raises
    as ``PanicException``: a ``BaseException``, like ``KeyboardInterrupt``, which must go through.
    A caller's mistake (``decode([-1])``: OverflowError) goes through too.
    """
    return type(error) is Exception or type(error).__name__ == "PanicException"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class StreamDecoder:
    """Turns ids, one at a time, into text deltas that are always whole characters.

    >>> from qwen_lab.hub import resolve
    >>> tok = Tokenizer.from_files(resolve("qwen-lab/tiny-chat"))
    >>> dec = tok.stream()
    >>> "".join(dec.push(i) for i in tok.encode("早安 🌞")) + dec.flush()
    '早安 🌞'
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.start = 0  # first id not yet turned into emitted text

    def push(self, token_id: int) -> str:
        """Add one id; return the new complete text (possibly "")."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        # Byte-level BPE decodes each token to its own bytes, so the pending
        # window's text is exactly what the full text gained.
        self.start = len(self.ids)
        return text

    def flush(self) -> str:
        """Whatever is left at the end, even if it is not valid UTF-8."""
        text = self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=self.skip)
        self.start = len(self.ids)
        return text

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)

"""Exercises that check themselves: one line, right or not yet, never a traceback.

Each notebook has two or three exercises. An exercise is a cell the learner completes — a value
left as ``...``, or a function whose body is ``raise NotImplementedError`` — and a check cell that
calls one function of this module. A check prints exactly one line::

    ✓ right: <what the answer shows>
    ✗ not yet: <what is wrong, or what to try>

and never raises. A learner who skips an exercise still runs the notebook top to bottom; an error
inside the learner's own function comes back as that one line, naming the exception and the line
of their cell it came from. (Ctrl-C still stops a check: only ``Exception`` is caught.)

Every check computes the answer it expects from the library or from the model's own files —
``apply_top_p``, ``build_model`` on the meta device, ``generation_config.json`` — never from a
number typed in here, so a check stays right for whichever model is in use. Beyond right or
wrong, a check looks for the usual mistakes and says which one it saw (keys without values,
a lm_head counted twice, negative logits divided by the penalty...).

The lines are in English or Traditional Chinese, like the chat panel: ``qwen_lab.lang`` (so a
notebook of ``notebooks/zh-TW/`` answers in Chinese with the very same code).

>>> eos_ids = ...                  # the learner has not answered yet
>>> check_eos_ids(eos_ids)
✗ not yet: find the file of `files` that holds the sampling defaults and the EOS ids (the table above), read it with json and take its eos_token_id
>>> check_eos_ids(json.loads(resolve(EMBEDDED_MODEL_ID).generation_config.read_text())["eos_token_id"])
✓ right: eos_token_id [2047, 2045] = <|im_end|>, <|endoftext|>: a reply ends at the first of them the model writes

The checks, by notebook: 01 ``check_eos_ids``, ``check_shard_names``, ``check_blob_name``;
02 ``check_parameter_count``, ``check_tensor_bytes``; 03 ``check_kv_cache_bytes``,
``check_kv_head``, ``check_rows_changed``; 04 ``check_render``, ``check_next_role``;
05 ``check_top_p``, ``check_repetition_penalty``; 06 ``check_reply_end_id``, ``check_cut_at_eos``;
07 ``check_context_used``, ``check_brief_panel``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import traceback
from pathlib import Path

import torch

from . import reference
from .errors import SettingError
from .hub import EMBEDDED_MODEL_ID, WALKTHROUGH_MODEL_ID, ModelFiles, resolve
from .lang import choose_language

__all__ = ["NotYet", "real_model_file", "check_blob_name", "check_brief_panel", "check_context_used", "check_cut_at_eos",
           "check_eos_ids", "check_kv_cache_bytes", "check_kv_head", "check_next_role", "check_parameter_count",
           "check_render", "check_repetition_penalty", "check_reply_end_id", "check_rows_changed",
           "check_shard_names", "check_tensor_bytes", "check_top_p"]

_VERDICTS = {"en": ("✓ right: ", "✗ not yet: ", "✗ cannot check: "), "zh-TW": ("✓ 答對了：", "✗ 還沒：", "✗ 無法檢查：")}
_LONGEST = 400  # characters of a verdict line; a longer one is cut with "…"


class NotYet(Exception):
    """What a check says when the answer is missing or wrong: the line, in English and in Chinese."""

    def __init__(self, en: str, zh: str) -> None:
        super().__init__(en)
        self.lines = {"en": en, "zh-TW": zh}


def _language() -> str:
    try:
        return choose_language()
    except SettingError:  # a bad QWEN_LAB_LANG: the panel says so; a check still gives its verdict
        return "en"


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _LONGEST else text[:_LONGEST - 1] + "…"


def _check(grade):
    """Turn ``grade`` (returns ``(en, zh)`` when right, raises ``NotYet`` otherwise) into a check that prints."""
    @functools.wraps(grade)
    def check(*args, **kwargs) -> None:
        lang = _language()
        right, not_yet, cannot = _VERDICTS[lang]
        try:
            en, zh = grade(*args, **kwargs)
            line = right + (en if lang == "en" else zh)
        except NotYet as e:
            line = not_yet + e.lines[lang]
        except Exception as e:  # the check itself failed (a missing file...): not the learner's fault
            line = f"{cannot}{type(e).__name__}: {e}"
        print(_one_line(line))
    return check


# ---------------------------------------------------------------- the learner's values and functions

def _answered(value, todo: tuple[str, str]) -> None:
    """``...`` or ``None``: the exercise cell was left as it came."""
    if value is ... or value is None:
        raise NotYet(*todo)


def _where(fn, error: BaseException) -> tuple[str, str]:
    """`` (line 4: x = probs[k])``: the last line of the learner's function the error passed through."""
    code = getattr(fn, "__code__", None)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if code and f.filename == code.co_filename]
    if not frames:
        return "", ""
    number, line = frames[-1].lineno, (frames[-1].line or "").strip()
    return (f" (line {number}: {line})" if line else f" (line {number})",
            f"（第 {number} 行：{line}）" if line else f"（第 {number} 行）")


def _call(fn, name: str, todo: tuple[str, str], *args, hint: tuple[str, str] = ("", ""),
          hint_on: tuple[type, ...] = (Exception,)):
    """Run the learner's function ``name``; a stub, a non-function, ``None`` or an exception becomes ``NotYet``.

    ``hint`` is added to the line when the exception is one of ``hint_on``.
    """
    _answered(fn, todo)
    if not callable(fn):
        raise NotYet(f"{name} should be a function (def {name}(...): ...), not {type(fn).__name__}",
                     f"{name} 應該是一個函式（def {name}(...): ...），而不是 {type(fn).__name__}")
    try:
        result = fn(*args)
    except NotImplementedError:
        raise NotYet(*todo) from None
    except Exception as e:
        what = f"{type(e).__name__}: {_one_line(e)[:160]}"
        where = _where(fn, e)
        en, zh = hint if isinstance(e, hint_on) else ("", "")
        raise NotYet(f"{name} raised {what}{where[0]}{en}", f"{name} 丟出了 {what}{where[1]}{zh}") from None
    if result is None:
        raise NotYet(f"{name} returned None: does it end with a return?", f"{name} 回傳了 None：最後有 return 嗎？")
    return result


def _whole(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value)
        raise NotYet(f"{name} should be a whole number, not {value!r}"[:200],
                     f"{name} 應該是一個整數，而不是 {value!r}"[:200])
    return value


def _chat(chat=None):
    """The ``ChatModel`` a check runs: the notebook's, or the model in use, loaded once."""
    if chat is not None:
        return chat
    from .generation import ChatModel
    from .hub import choose_model
    from .load import suggested_dtype, weight_files_changed
    model, _ = choose_model()
    key = ("chat", model)
    # a weights file rewritten in place under it makes it refuse every reply ("load the model again"): load it anew
    if key not in _loaded or weight_files_changed(_loaded[key].model):
        _loaded[key] = ChatModel.load(model, dtype=suggested_dtype(model))
    return _loaded[key]


_loaded: dict = {}


def _files(files: ModelFiles | None) -> ModelFiles:
    return files if files is not None else resolve(EMBEDDED_MODEL_ID)


def real_model_file(name: str = "config.json") -> Path:
    """A small file of the real Qwen2.5-1.5B-Instruct (``config.json``...), for the exercises about it.

    Its verbatim copy shipped with the package (``qwen_lab.reference``), so the exercises work
    wherever the kit is installed, offline too: from a clone, on Colab, in the workshop's image.
    """
    return reference.path(WALKTHROUGH_MODEL_ID, name)


def _real_config(path: str | Path | None = None) -> dict:
    from .load import read_config
    return read_config(Path(path) if path is not None else real_model_file("config.json"))


# ---------------------------------------------------------------- 01 download

@_check
def check_eos_ids(eos_ids, files: ModelFiles | None = None):
    """Exercise 1.1: the EOS ids, read from the model's files by hand (default: the embedded model's)."""
    from .generation import GenerationConfig
    from .load import read_config
    from .tokenizer import Tokenizer
    _answered(eos_ids, ("find the file of `files` that holds the sampling defaults and the EOS ids (the table "
                        "above), read it with json and take its eos_token_id",
                        "從 `files` 找出存放取樣預設值與 EOS id 的檔案（見上面的表），用 json 讀它，取出 eos_token_id"))
    files = _files(files)
    expected = GenerationConfig.from_files(files).eos_token_id
    tok = Tokenizer.from_files(files)
    given = [eos_ids] if isinstance(eos_ids, int) else eos_ids
    if not isinstance(given, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in given):
        raise NotYet(f"eos_ids should be a list of token ids (whole numbers), not {eos_ids!r}"[:200],
                     f"eos_ids 應該是 token id（整數）的 list，而不是 {eos_ids!r}"[:200])
    names = ", ".join(str(tok.id_to_token(i)) for i in expected)
    if set(given) == set(expected):
        return (f"eos_token_id {expected} = {names}: a reply ends at the first of them the model writes",
                f"eos_token_id {expected} = {names}：模型寫出其中任何一個，回覆就結束")
    in_config = read_config(files.config).get("eos_token_id")
    in_config = [in_config] if isinstance(in_config, int) else in_config
    if in_config is not None and set(given) == set(in_config):
        raise NotYet(f"{given} is config.json's eos_token_id, one id; generation_config.json lists every id that "
                     f"ends a reply",
                     f"{given} 是 config.json 的 eos_token_id，只有一個 id；generation_config.json 才列出所有會結束回覆的 id")
    raise NotYet(f"{given} are not the ids generation_config.json lists as eos_token_id; open that file and look",
                 f"{given} 不是 generation_config.json 在 eos_token_id 列出的 id；打開那個檔案看看")


def _index(folder: Path, name: str, tensors: int, shards: int) -> tuple[Path, int]:
    """An index whose weight_map sends tensor k to shard k % shards (so each shard appears many times)."""
    weight_map = {f"model.layers.{k // 7}.tensor_{k % 7}.weight": f"model-{k % shards + 1:05d}-of-{shards:05d}.safetensors"
                  for k in range(tensors)}
    path = folder / name
    path.write_text(json.dumps({"metadata": {"total_size": 4 * tensors}, "weight_map": weight_map}))
    return path, tensors


@_check
def check_shard_names(my_shard_names):
    """Exercise 1.2: ``my_shard_names(index_path)`` -> the shard files to fetch, each once, in order."""
    from .hub import shard_names
    todo = ("write my_shard_names: read the index's weight_map (json) and list the shard files it names",
            "寫出 my_shard_names：用 json 讀 index 的 weight_map，列出它提到的分片檔案")
    _answered(my_shard_names, todo)
    with tempfile.TemporaryDirectory() as folder:
        for name, tensors, shards in (("small.index.json", 50, 3), ("large.index.json", 339, 12)):
            path, _ = _index(Path(folder), name, tensors, shards)
            expected = shard_names(path)
            got = _call(my_shard_names, "my_shard_names", todo, path)
            if not isinstance(got, (list, tuple)) or not all(isinstance(n, str) for n in got):
                raise NotYet(f"my_shard_names should return a list of file names, not {type(got).__name__}",
                             f"my_shard_names 應該回傳檔名的 list，而不是 {type(got).__name__}")
            got = list(got)
            if got == expected:
                continue
            if len(got) > len(set(got)) and sorted(set(got)) == expected:
                raise NotYet(f"{len(got)} names for {len(expected)} shards: the weight_map names each shard once per "
                             f"tensor; fetch each shard once",
                             f"{len(expected)} 個分片卻列了 {len(got)} 個名字：weight_map 每個張量都提一次分片；每個分片只該下載一次")
            if sorted(got) == expected:
                raise NotYet("the right shards, in another order: sort them, model-00001-… first",
                             "分片對了，順序不對：排序一下，model-00001-… 在最前面")
            raise NotYet(f"for an index of {tensors} tensors in {shards} shards: expected {expected[:3]}…, got "
                         f"{got[:3]}…",
                         f"一個 {tensors} 個張量、{shards} 個分片的 index：應該是 {expected[:3]}…，你的是 {got[:3]}…")
    return ("each shard once, in order: 3 files for an index of 50 tensors, 12 for one of 339",
            "每個分片只列一次、依序排好：50 個張量的 index 有 3 個檔案，339 個的有 12 個")


@_check
def check_blob_name(blob_name, files: ModelFiles | None = None):
    """Exercise 1.3: the SHA-256 of the weights file, the name of its blob in the Hub cache."""
    from .hub_server import git_blob_hash
    _answered(blob_name, ("hash the bytes of the weights file with hashlib's sha256, written as hex digits",
                          "用 hashlib 的 sha256 對權重檔的位元組做雜湊，寫成十六進位數字"))
    if not isinstance(blob_name, str):
        raise NotYet(f"blob_name should be the hash as a string of hex digits, not {type(blob_name).__name__}",
                     f"blob_name 應該是十六進位數字組成的字串，而不是 {type(blob_name).__name__}")
    files = _files(files)
    weights = files.weights[0]
    data = weights.read_bytes()
    expected = hashlib.sha256(data).hexdigest()
    given = blob_name.strip().strip('"').lower()
    if given == expected:
        return (f"blobs/{expected[:12]}… holds {weights.name}: a file is stored once, under the hash of its bytes, "
                f"and a download is checked against it",
                f"blobs/{expected[:12]}… 就是 {weights.name}：每個檔案只存一份，以內容的雜湊命名，下載完也用它來驗證")
    if given == git_blob_hash(data):
        raise NotYet("that is the git blob hash (sha1 of 'blob <size>\\0' + the bytes), which names small files; "
                     "weights are stored with Git LFS and named by the SHA-256 of their bytes",
                     "那是 git 的 blob 雜湊（'blob <大小>\\0' 加上內容的 sha1），用在小檔案；"
                     "權重用 Git LFS 存放，以內容的 SHA-256 命名")
    for other in sorted(files.root.iterdir()):
        if other.is_file() and other != weights and hashlib.sha256(other.read_bytes()).hexdigest() == given:
            raise NotYet(f"that is the SHA-256 of {other.name}; hash {weights.name}",
                         f"那是 {other.name} 的 SHA-256；要雜湊的是 {weights.name}")
    raise NotYet(f"not the SHA-256 of {weights.name}'s bytes: hash the whole file, in binary (read_bytes)",
                 f"這不是 {weights.name} 內容的 SHA-256：要對整個檔案的位元組（read_bytes）做雜湊")


# ---------------------------------------------------------------- 02 load

def _parameter_cases(config_path) -> list[tuple[tuple[str, str], dict]]:
    from .load import read_config
    tiny = read_config(resolve(EMBEDDED_MODEL_ID).config)
    real = _real_config(config_path)
    return [(("Qwen2.5-1.5B-Instruct", "Qwen2.5-1.5B-Instruct"), real), (("tiny-chat", "tiny-chat"), tiny),
            (("tiny-chat with its own lm_head", "lm_head 不共用的 tiny-chat"), {**tiny, "tie_word_embeddings": False}),
            (("Qwen2.5-1.5B with its own lm_head", "lm_head 不共用的 Qwen2.5-1.5B"),
             {**real, "tie_word_embeddings": False})]


@_check
def check_parameter_count(count_by_hand, config_path: str | Path | None = None):
    """Exercise 2.1: ``count_by_hand(config)`` -> the parameters of a Qwen2 model, from config.json alone."""
    from .load import build_model, count_parameters
    todo = ("write count_by_hand(config): the embedding, then per layer q, k, v, o (with their biases), the MLP's "
            "gate, up, down and two RMSNorm gains, then the final norm and lm_head",
            "寫出 count_by_hand(config)：嵌入矩陣；每一層的 q、k、v、o（含偏差）、MLP 的 gate、up、down 與兩個 "
            "RMSNorm 增益；最後的 norm 和 lm_head")
    _answered(count_by_hand, todo)
    for name, config in _parameter_cases(config_path):
        expected = count_parameters(build_model(config))  # on the meta device: shapes, no memory
        got = _whole(_call(count_by_hand, "count_by_hand", todo, dict(config)), "count_by_hand(config)")
        if got == expected:
            continue
        h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
        off = got - expected
        known = {
            vocab * h: ("lm_head: with tie_word_embeddings it *is* the embedding matrix, counted once; without, "
                        "it is a matrix of its own",
                        "lm_head：tie_word_embeddings 為 true 時它就是嵌入矩陣，只算一次；為 false 時是另一個矩陣"),
            layers * (h + 2 * kv): ("the biases of q, k and v (Qwen2 has them; o has none)",
                                    "q、k、v 的偏差（Qwen2 有；o 沒有）"),
            (2 * layers + 1) * h: ("the RMSNorm gains: two per layer, and the final norm",
                                   "RMSNorm 的增益：每層兩個，加上最後的 norm"),
            2 * layers * h: ("the RMSNorm gains: two per layer", "RMSNorm 的增益：每層兩個"),
            h: ("the final RMSNorm (model.norm)", "最後的 RMSNorm（model.norm）"),
            layers * 3 * h * config["intermediate_size"]: ("the MLP: gate, up and down, each hidden × intermediate",
                                                           "MLP：gate、up、down，各是 hidden × intermediate"),
        }
        gqa = ("k and v: with grouped-query attention they have num_key_value_heads heads, fewer than the queries",
               "k 和 v：分組查詢注意力（GQA）下它們只有 num_key_value_heads 個頭，比 q 少")
        known[2 * layers * (h + 1) * (h - kv)] = known[2 * layers * h * (h - kv)] = gqa
        why = known.get(abs(off))
        en = f"for {name[0]}: {got:,} instead of {expected:,} ({off:+,})"
        zh = f"{name[1]}：你算出 {got:,}，應為 {expected:,}（差 {off:+,}）"
        if why:
            raise NotYet(f"{en}: check {why[0]}", f"{zh}：檢查 {why[1]}")
        raise NotYet(en, zh)
    return ("the same count as build_model on the meta device, for tiny-chat, Qwen2.5-1.5B and both with an untied "
            "lm_head",
            "和 build_model 在 meta 裝置上數出來的一樣：tiny-chat、Qwen2.5-1.5B，以及兩者的 lm_head 不共用時")


def _read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


@_check
def check_tensor_bytes(tensor_bytes, files: ModelFiles | None = None):
    """Exercise 2.2: ``tensor_bytes(header)`` -> the bytes of tensor data a safetensors header describes."""
    from safetensors.torch import save_file
    todo = ("write tensor_bytes(header): for each tensor, the product of its shape × the bytes of its dtype "
            "(BF16: 2, F32: 4...)",
            "寫出 tensor_bytes(header)：每個張量 shape 的乘積 × 其 dtype 的位元組數（BF16：2、F32：4…）")
    _answered(tensor_bytes, todo)
    skip_meta = (" — '__metadata__' is not a tensor: skip it", "——'__metadata__' 不是張量：跳過它")
    with tempfile.TemporaryDirectory() as folder:
        mixed = Path(folder) / "mixed.safetensors"
        save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.int64), "c": torch.zeros(2, 4, dtype=torch.bfloat16),
                   "d": torch.zeros(11, dtype=torch.uint8), "e": torch.zeros(4, 4, dtype=torch.float16)}, mixed,
                  metadata={"format": "pt"})
        for path in (_files(files).weights[0], mixed):
            header = _read_header(path)
            expected = max(info["data_offsets"][1] for key, info in header.items() if key != "__metadata__")
            got = _whole(_call(tensor_bytes, "tensor_bytes", todo, header, hint=skip_meta,
                               hint_on=(KeyError, TypeError, IndexError)), "tensor_bytes(header)")
            if got == expected:
                continue
            elements = sum(_numel(info["shape"]) for key, info in header.items() if key != "__metadata__")
            if got == elements:
                raise NotYet("that counts numbers, not bytes: multiply each tensor's size by its dtype's bytes",
                             "這算的是數值的個數，不是位元組：每個張量還要乘上其 dtype 的位元組數")
            if path == mixed:
                raise NotYet(f"right for the bf16 weights, not for a file of F32, I64, BF16, U8 and F16 tensors "
                             f"({got:,} instead of {expected:,}): take each tensor's bytes from its own dtype",
                             f"對 bf16 的權重檔是對的，但對一個混合 F32、I64、BF16、U8、F16 的檔案不對"
                             f"（{got:,}，應為 {expected:,}）：每個張量要看它自己的 dtype")
            raise NotYet(f"{got:,} instead of {expected:,} bytes for {path.name}",
                         f"{path.name}：你算出 {got:,} 位元組，應為 {expected:,}")
    return ("the header alone gives the size of the data: the file is 8 bytes + the header + exactly that many bytes",
            "光看標頭就知道資料多大：檔案 = 8 個位元組 + 標頭 + 剛好這麼多位元組")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------- 03 forward pass

@_check
def check_kv_cache_bytes(kv_bytes_per_token, config_path: str | Path | None = None):
    """Exercise 3.1: the KV-cache bytes one token takes in Qwen2.5-1.5B-Instruct, in its own dtype (bf16)."""
    from .load import build_model, checkpoint_dtype
    _answered(kv_bytes_per_token, ("read the real config (`real`, Qwen2.5-1.5B-Instruct's config.json) and count "
                                   "the numbers one token leaves in the cache, times their bytes",
                                   "讀真正的 config（`real`，Qwen2.5-1.5B-Instruct 的 config.json），數一個 token "
                                   "在快取裡留下多少數值，再乘上每個數值的位元組數"))
    got = _whole(kv_bytes_per_token, "kv_bytes_per_token")
    config = _real_config(config_path)
    dtype = checkpoint_dtype(config) or torch.float32
    model = build_model(config).to(dtype)  # the meta device: shapes only
    caches = model.new_caches(batch=1, max_len=1)  # what generation allocates, for a one-token context
    expected = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in caches)
    if got == expected:
        context = config["max_position_embeddings"]
        return (f"{expected:,} bytes per token, so the full {context:,}-token context holds "
                f"{expected * context / 2**30:.2f} GiB of keys and values",
                f"每個 token {expected:,} 位元組，完整的 {context:,} 個 token 上下文要 "
                f"{expected * context / 2**30:.2f} GiB 的鍵與值")
    cfg = model.config
    ratio = got / expected
    known = {
        0.5: ("half: keys only (the cache keeps keys and values), or numbers rather than bytes (bf16: 2 each)?",
              "一半：只算了鍵（快取鍵和值都存）？還是算了數值個數而不是位元組（bf16 每個 2 位元組）？"),
        1 / cfg.num_hidden_layers: (f"that is one layer; each of the {cfg.num_hidden_layers} layers keeps its own",
                                    f"這是一層的量；{cfg.num_hidden_layers} 層每層都有自己的快取"),
        cfg.num_attention_heads / cfg.num_key_value_heads: (
            f"{cfg.num_attention_heads} query heads, but the cache holds the {cfg.num_key_value_heads} key/value "
            f"heads only (grouped-query attention)",
            f"有 {cfg.num_attention_heads} 個查詢頭，但快取只存 {cfg.num_key_value_heads} 個鍵/值頭（分組查詢注意力）"),
        2.0: ("4 bytes per number is float32; the checkpoint is bf16, 2 bytes", "每個數 4 位元組是 float32；這個檢查點是 bf16，2 位元組"),
    }
    why = next((v for k, v in known.items() if abs(ratio - k) < 1e-9), None)
    if why:
        raise NotYet(f"{got:,} bytes: {why[0]}", f"{got:,} 位元組：{why[1]}")
    raise NotYet(f"not {got:,}: count, for one token, the keys and the values of every layer — how many numbers, "
                 f"and how many bytes each?",
                 f"不是 {got:,}：對一個 token，數每一層的鍵和值——共有多少數值，每個數值幾個位元組？")


@_check
def check_kv_head(kv_head_of):
    """Exercise 3.2: ``kv_head_of(query_head, n_heads, n_kv_heads)`` -> the key/value head that query head reads."""
    todo = ("write kv_head_of: look at how attend lines the KV heads up with the query heads (repeat_interleave)",
            "寫出 kv_head_of：看看 attend 怎麼讓 KV 頭對齊查詢頭（repeat_interleave）")
    _answered(kv_head_of, todo)
    interleaved = True
    for n_heads, n_kv in ((4, 2), (12, 2), (14, 2), (16, 8), (24, 8), (32, 8), (8, 8), (8, 1)):
        # what the model does: k.repeat_interleave(group, dim=0) lines KV heads up with the query heads
        expected = torch.arange(n_kv).repeat_interleave(n_heads // n_kv).tolist()
        got = [_call(kv_head_of, "kv_head_of", todo, j, n_heads, n_kv) for j in range(n_heads)]
        got = [_whole(g, "kv_head_of(...)") for g in got]
        interleaved &= got == [j % n_kv for j in range(n_heads)]
        if got != expected:
            if interleaved:
                raise NotYet(f"with {n_heads} query heads and {n_kv} KV heads you give {got[:6]}…: that deals the KV "
                             f"heads out in turn; repeat_interleave keeps neighbours together: {expected[:6]}…",
                             f"{n_heads} 個查詢頭、{n_kv} 個 KV 頭時你給 {got[:6]}…：這是輪流分配；"
                             f"repeat_interleave 讓相鄰的頭在一起：{expected[:6]}…")
            raise NotYet(f"with {n_heads} query heads and {n_kv} KV heads: expected {expected}, got {got}",
                         f"{n_heads} 個查詢頭、{n_kv} 個 KV 頭：應為 {expected}，你的是 {got}")
    return ("query head j reads KV head j // (n_heads / n_kv_heads): in Qwen2.5-1.5B, heads 0–5 share KV head 0 "
            "and heads 6–11 share KV head 1",
            "查詢頭 j 讀 KV 頭 j // (n_heads / n_kv_heads)：在 Qwen2.5-1.5B 裡，頭 0–5 共用 KV 頭 0，頭 6–11 共用 KV 頭 1")


def _causal_lm(model):
    """The network of a ``ChatModel``, or the network itself."""
    return getattr(model, "model", None) if hasattr(model, "tokenizer") else model


@_check
def check_rows_changed(rows_changed, model=None):
    """Exercise 3.3: ``rows_changed(T, position)`` -> the rows of the logits that change when one token changes."""
    todo = ("write rows_changed(T, position): which of the T rows of logits can see the token at `position`?",
            "寫出 rows_changed(T, position)：T 列 logits 中，哪些列看得到位置 `position` 的 token？")
    _answered(rows_changed, todo)
    T = 12
    answers = {}
    for position in (0, T // 2, T - 1):  # the learner's rule first: a stub costs no forward pass
        got = _call(rows_changed, "rows_changed", todo, T, position)
        try:
            answers[position] = sorted(int(r) for r in got)
        except (TypeError, ValueError):
            raise NotYet(f"rows_changed should return a list of row numbers, not {got!r}"[:200],
                         f"rows_changed 應該回傳列號的 list，而不是 {got!r}"[:200]) from None
    net = _causal_lm(_chat(None) if model is None else model)
    vocab = min(net.config.vocab_size, 1000)
    ids = torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(0)).to(net.lm_head.weight.device)
    with torch.inference_mode():
        before = net(ids[None])[0]
        for position, got in answers.items():
            changed = ids.clone()
            changed[position] = (int(ids[position]) + 1) % vocab
            after = net(changed[None])[0]
            expected = [t for t in range(T) if not torch.equal(before[t], after[t])]
            if got == expected:
                continue
            early = [r for r in got if r < position]
            if early:
                raise NotYet(f"a token at position {position} changed, and you say row {early[0]} changes too; a token "
                             f"never sees the tokens after it (the causal mask), so the rows before stay equal",
                             f"位置 {position} 的 token 變了，你說第 {early[0]} 列也會變；但 token 看不到它後面的 token"
                             f"（因果遮罩），所以前面的列不變")
            if got == [position] and position < T - 1:
                raise NotYet(f"only row {position}? The rows after it attend to position {position} too",
                             f"只有第 {position} 列？後面的列也會注意到位置 {position}")
            raise NotYet(f"T={T}, a change at position {position}: rows {expected} change, you say {got}",
                         f"T={T}，位置 {position} 改變：變的是第 {expected} 列，你說 {got}")
    return ("the rows from the changed position on change, the rows before stay bit-identical: the causal mask, and "
            "the reason a KV cache stays valid",
            "從改變的位置起的列都變了，之前的列一個位元都沒變：這就是因果遮罩，也是 KV 快取一直有效的原因")


# ---------------------------------------------------------------- 04 chat template

_CONVERSATIONS = [
    ("a system and a user message", [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "What is the capital of France?"}]),
    ("a user message alone", [{"role": "user", "content": "Hi!"}]),
    ("two turns", [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "What is 2 plus 3?"},
                   {"role": "assistant", "content": "2 plus 3 is 5."},
                   {"role": "user", "content": "And 4 plus 4?"}]),
]
_CONVERSATIONS_ZH = {"a system and a user message": "一則系統訊息加一則使用者訊息",
                     "a user message alone": "只有一則使用者訊息", "two turns": "兩輪對話"}


@_check
def check_render(my_render, chat=None):
    """Exercise 4.1: ``my_render(messages)`` -> the prompt text, by hand, byte-identical to the model's template."""
    todo = ("write my_render(messages): each message as <|im_start|>role↵content<|im_end|>↵, then the assistant's "
            "header",
            "寫出 my_render(messages)：每則訊息寫成 <|im_start|>角色↵內容<|im_end|>↵，最後加上助理的標頭")
    _answered(my_render, todo)
    chat = _chat(chat)
    for name, messages in _CONVERSATIONS:
        expected = chat.render(messages, add_generation_prompt=True)
        got = _call(my_render, "my_render", todo, [dict(m) for m in messages])
        if not isinstance(got, str):
            raise NotYet(f"my_render should return the prompt as a string, not {type(got).__name__}",
                         f"my_render 應該回傳提示詞字串，而不是 {type(got).__name__}")
        if got == expected:
            continue
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        zh_name = _CONVERSATIONS_ZH[name]
        if expected.startswith(got):
            missing = expected[len(got):]
            raise NotYet(f"for {name}, the template goes on after yours: {missing!r}",
                         f"{zh_name}：範本在你的結尾之後還有：{missing!r}")
        system = chat.render([{"role": "user", "content": ""}], add_generation_prompt=False)
        if messages[0]["role"] != "system" and "system" in system and "system" not in got:
            raise NotYet(f"for {name}: with no system message, this template adds its own — look at what "
                         f"chat.render gives for it",
                         f"{zh_name}：沒有系統訊息時，這個範本會自己加一個——看看 chat.render 給出什麼")
        raise NotYet(f"for {name}, yours and the template's differ at character {at}: yours "
                     f"{got[max(0, at - 12):at + 12]!r}, the template's {expected[max(0, at - 12):at + 12]!r}",
                     f"{zh_name}：你的和範本的在第 {at} 個字元開始不同：你的 {got[max(0, at - 12):at + 12]!r}，"
                     f"範本的 {expected[max(0, at - 12):at + 12]!r}")
    return ("byte for byte the model's template, for three conversations; in real code let the template do it (it "
            "knows the default system prompt, tools, and other models' formats)",
            "三段對話都和模型的範本一個位元組都不差；真正的程式還是交給範本（它知道預設系統提示、工具、"
            "以及其他模型的格式）")


@_check
def check_next_role(predicted_role, chat=None):
    """Exercise 4.2: the role the model writes next after a finished exchange rendered without the generation prompt."""
    _answered(predicted_role, ("write the role you expect as a string: 'system', 'user' or 'assistant'",
                               "把你預期的角色寫成字串：'system'、'user' 或 'assistant'"))
    if not isinstance(predicted_role, str):
        raise NotYet(f"predicted_role should be a role name (a string), not {predicted_role!r}"[:200],
                     f"predicted_role 應該是角色名稱（字串），而不是 {predicted_role!r}"[:200])
    chat = _chat(chat)
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."}]
    reply = chat.generate(messages, add_generation_prompt=False, do_sample=False, max_new_tokens=6,
                          skip_special_tokens=False).text
    start = "<|im_start|>"  # Qwen's header; another model's template writes no such header
    role = reply[len(start):].split("\n")[0] if reply.startswith(start) else None
    given = predicted_role.strip().lower()
    if role is None:  # the model wrote something else than a header: the learner is right if they said so
        if given in ("", "none", reply.strip().lower()):
            return (f"the model wrote {reply!r}, no role header", f"模型寫的是 {reply!r}，沒有角色標頭")
        raise NotYet(f"this model wrote {reply!r}: no role header at all", f"這個模型寫的是 {reply!r}：根本沒有角色標頭")
    if given == role:
        return (f"the model wrote {reply!r}: the last turn was closed, so it opened a new one, and chose who speaks "
                f"itself — add_generation_prompt=True is how we choose for it",
                f"模型寫了 {reply!r}：上一輪已經結束，所以它開了新的一輪，還自己決定誰說話——"
                f"add_generation_prompt=True 就是替它決定")
    if given == "assistant":
        raise NotYet(f"the assistant's turn is closed by <|im_end|>: the model opens a new turn, and wrote {reply!r}",
                     f"助理那一輪已被 <|im_end|> 結束：模型開了新的一輪，寫的是 {reply!r}")
    raise NotYet(f"the model wrote {reply!r}", f"模型寫的是 {reply!r}")


# ---------------------------------------------------------------- 05 generate

def _top_p_cases() -> list[tuple[torch.Tensor, float, tuple[str, str]]]:
    g = torch.Generator().manual_seed(0)
    cases = []
    for p in (0.05, 0.3, 0.5, 0.8, 0.95, 1.0):
        cases.append((torch.randn(40, generator=g) * 2, p, (f"p={p}", f"p={p}")))
    cut = torch.randn(40, generator=g) * 2
    cut[cut < cut.topk(10).values[-1]] = float("-inf")  # after top-k 10
    cases.append((cut, 0.9, ("p=0.9 after top-k 10", "top-k 10 之後 p=0.9")))
    peaked = torch.randn(40, generator=g)
    peaked[7] = 12.0  # one token holds nearly all the probability
    cases.append((peaked, 0.5, ("p=0.5, one token above p", "p=0.5，單一 token 就超過 p")))
    return cases


@_check
def check_top_p(my_top_p):
    """Exercise 5.1: ``my_top_p(logits, p)`` -> the logits with all but the nucleus set to -inf, as ``apply_top_p``."""
    from .sampling import apply_top_p
    todo = ("write my_top_p: softmax, sort from the most likely, keep tokens until their probabilities add up to p, "
            "set the others to -inf",
            "寫出 my_top_p：softmax、從最可能的開始排序、保留 token 直到機率加起來達到 p、其餘設為 -inf")
    _answered(my_top_p, todo)
    for logits, p, name in _top_p_cases():
        original = logits.clone()
        expected = apply_top_p(logits, p)
        got = _call(my_top_p, "my_top_p", todo, logits, p)
        if not torch.equal(logits, original):
            raise NotYet("my_top_p changed the logits it was given: work on a copy (logits.clone())",
                         "my_top_p 改到了傳進來的 logits：在副本上做（logits.clone()）")
        if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise NotYet(f"my_top_p should return logits of the same shape {tuple(logits.shape)}, not {shape}",
                         f"my_top_p 應該回傳同樣形狀 {tuple(logits.shape)} 的 logits，而不是 {shape}")
        kept, want = got > float("-inf"), expected > float("-inf")
        if torch.equal(kept, want) and torch.allclose(got[want], expected[want]):
            continue
        finite = got[torch.isfinite(got)]
        if finite.numel() and bool((finite >= 0).all()) and abs(float(finite.sum()) - 1) < 1e-3:
            raise NotYet("my_top_p returned probabilities; return logits, with -inf on the tokens cut",
                         "my_top_p 回傳的是機率；要回傳 logits，被刪掉的 token 設為 -inf")
        best = int(logits.argmax())
        if not kept[best]:
            raise NotYet(f"{name[0]}: the most likely token was cut; it always stays, even when it alone holds more than p",
                         f"{name[1]}：最可能的 token 被刪了；它一定要留下，即使它一個就超過 p")
        if bool((kept & ~torch.isfinite(logits)).any()):
            raise NotYet(f"{name[0]}: a token already at -inf (cut by top-k) came back; keep it cut",
                         f"{name[1]}：已經是 -inf 的 token（被 top-k 刪掉的）又回來了；讓它保持刪除")
        if torch.equal(kept, want):
            raise NotYet(f"{name[0]}: the right tokens kept, but their logits changed; keep the kept ones as they were",
                         f"{name[1]}：留下的 token 對了，但它們的 logit 變了；留下的要保持原值")
        raise NotYet(f"{name[0]}: you keep {int(kept.sum())} tokens, apply_top_p keeps {int(want.sum())}: keep the "
                     f"fewest most likely tokens whose probabilities add up to at least p",
                     f"{name[1]}：你留下 {int(kept.sum())} 個 token，apply_top_p 留下 {int(want.sum())} 個："
                     f"留下最少的、最可能的那幾個，使機率加總至少達到 p")
    return ("the same tokens kept as apply_top_p in 8 cases (p from 0.05 to 1, after top-k, one token above p)",
            "8 種情況都和 apply_top_p 留下一樣的 token（p 從 0.05 到 1、top-k 之後、單一 token 超過 p）")


@_check
def check_repetition_penalty(my_penalty):
    """Exercise 5.2: ``my_penalty(logits, previous, penalty)`` -> as ``apply_repetition_penalty``."""
    from .sampling import apply_repetition_penalty
    todo = ("write my_penalty: make each token of previous less likely — a positive logit is divided by the "
            "penalty; and a negative one?",
            "寫出 my_penalty：讓 previous 裡的每個 token 變得比較不可能——正的 logit 除以懲罰值；那負的呢？")
    _answered(my_penalty, todo)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(30, generator=g) * 3
    previous = torch.tensor([3, 7, 7, 12, 3, 20, 29, 7])  # ids seen, some several times
    negative = [i for i in previous.unique().tolist() if logits[i] < 0]
    for penalty in (1.3, 1.0, 2.0):
        original = logits.clone()
        expected = apply_repetition_penalty(logits, previous, penalty)
        got = _call(my_penalty, "my_penalty", todo, logits, previous.clone(), penalty)
        if not torch.equal(logits, original):
            raise NotYet("my_penalty changed the logits it was given: work on a copy (logits.clone())",
                         "my_penalty 改到了傳進來的 logits：在副本上做（logits.clone()）")
        if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
            raise NotYet(f"my_penalty should return logits of shape {tuple(logits.shape)}",
                         f"my_penalty 應該回傳形狀 {tuple(logits.shape)} 的 logits")
        if torch.allclose(got, expected):
            continue
        wrong = [i for i in range(len(logits)) if not torch.isclose(got[i], expected[i])]
        if negative and set(wrong) <= set(negative) and all(abs(float(got[i])) < abs(float(logits[i])) for i in wrong):
            raise NotYet("a negative logit divided by the penalty gets closer to 0, so the token becomes *more* "
                         "likely; multiply the negative ones",
                         "負的 logit 除以懲罰值會更接近 0，token 反而*更*可能出現；負的要用乘的")
        if set(wrong) <= {7, 3}:
            raise NotYet("an id seen several times (7 is three times in previous) is penalised once, as transformers does",
                         "出現好幾次的 id（7 在 previous 裡出現三次）只懲罰一次，和 transformers 一樣")
        if any(i not in previous.tolist() for i in wrong):
            raise NotYet(f"penalty {penalty}: ids never seen changed ({[i for i in wrong if i not in previous.tolist()][:4]}); "
                         f"touch only the ids in previous",
                         f"懲罰值 {penalty}：沒出現過的 id 也被改了（{[i for i in wrong if i not in previous.tolist()][:4]}）；"
                         f"只動 previous 裡的 id")
        raise NotYet(f"penalty {penalty}: the logits of ids {wrong[:5]} differ from apply_repetition_penalty's",
                     f"懲罰值 {penalty}：id {wrong[:5]} 的 logit 和 apply_repetition_penalty 的不同")
    return ("the same as apply_repetition_penalty: seen tokens lose ground whatever the sign of their logit",
            "和 apply_repetition_penalty 一樣：出現過的 token 不論 logit 正負，都變得比較不可能")


# ---------------------------------------------------------------- 06 EOS pitfalls

_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@_check
def check_reply_end_id(reply_end_id, chat=None):
    """Exercise 6.1: the id of the token that ends a chat reply."""
    _answered(reply_end_id, ("generate a reply and look at the last of its token_ids, or find the token that closes "
                             "a turn with chat.tokenizer.token_to_id",
                             "產生一則回覆，看它 token_ids 的最後一個；或用 chat.tokenizer.token_to_id 找出結束一輪的 token"))
    chat = _chat(chat)
    tok = chat.tokenizer
    if isinstance(reply_end_id, str):
        raise NotYet(f"the token's id, a number: chat.tokenizer.token_to_id({reply_end_id!r}) gives it",
                     f"要的是 token 的 id（一個數字）：chat.tokenizer.token_to_id({reply_end_id!r}) 會給你")
    got = _whole(reply_end_id, "reply_end_id")
    result = chat.generate(_QUESTION, do_sample=False, max_new_tokens=64)
    if result.finish_reason != "eos":
        raise RuntimeError(f"the model did not end its reply within 64 tokens ({result.finish_detail})")
    expected = result.token_ids[-1]
    if got == expected:
        return (f"id {expected}, {tok.id_to_token(expected)}: it closes the assistant's turn, and it is in "
                f"generation_config.json's EOS list {chat.generation_config.eos_token_id}",
                f"id {expected}，{tok.id_to_token(expected)}：它結束助理這一輪，也在 generation_config.json 的 "
                f"EOS 清單 {chat.generation_config.eos_token_id} 裡")
    name = tok.id_to_token(got) if 0 <= got < tok.vocab_size else None
    if name == "<|endoftext|>":
        raise NotYet(f"{got} is <|endoftext|>, which ends a whole document; a reply is one turn of a conversation",
                     f"{got} 是 <|endoftext|>，它結束的是整份文件；回覆只是對話中的一輪")
    raise NotYet(f"id {got} is {name!r}; a reply ended with another token: look at the last of a reply's token_ids",
                 f"id {got} 是 {name!r}；回覆是用另一個 token 結束的：看看回覆 token_ids 的最後一個")


@_check
def check_cut_at_eos(cut_at_eos, chat=None):
    """Exercise 6.2: ``cut_at_eos(token_ids, eos_ids)`` -> the ids before the first EOS id (a reply that ran on, repaired)."""
    todo = ("write cut_at_eos: walk through token_ids and stop before the first id that is in eos_ids",
            "寫出 cut_at_eos：逐一看 token_ids，遇到第一個屬於 eos_ids 的 id 就在它之前停下")
    _answered(cut_at_eos, todo)
    chat = _chat(chat)
    eos = list(chat.generation_config.eos_token_id)
    _call(cut_at_eos, "cut_at_eos", todo, [5, eos[0], 7], list(eos))  # a stub stops here, before any generation
    endoftext = chat.tokenizer.token_to_id("<|endoftext|>")
    ran_on = chat.generate(_QUESTION, eos_token_id=[endoftext] if endoftext is not None else [], do_sample=False,
                           max_new_tokens=40).token_ids
    right = chat.generate(_QUESTION, do_sample=False, max_new_tokens=40)
    meant = right.token_ids[:-1] if right.finish_reason == "eos" else right.token_ids
    cases = [(("a reply that ran past its end", "一則越過結尾的回覆"), ran_on, meant),
             (("no EOS at all", "完全沒有 EOS"), meant, meant),
             (("an EOS first", "第一個就是 EOS"), [eos[-1]] + meant, []),
             (("an EOS after three tokens", "三個 token 之後就是 EOS"), meant[:3] + [eos[0]] + meant, meant[:3])]
    for name, ids, expected in cases:
        given = list(ids)
        got = _call(cut_at_eos, "cut_at_eos", todo, given, list(eos))
        if given != list(ids):
            raise NotYet("cut_at_eos changed the list it was given: build a new one", "cut_at_eos 改到了傳進來的 list：另建一個新的")
        try:
            got = [int(i) for i in got]
        except (TypeError, ValueError):
            raise NotYet(f"cut_at_eos should return a list of ids, not {got!r}"[:200],
                         f"cut_at_eos 應該回傳 id 的 list，而不是 {got!r}"[:200]) from None
        if got == expected:
            continue
        if got[:-1] == expected and got[-1:] and got[-1] in eos:
            raise NotYet("keep only the ids before the EOS: it ends the reply, it is not part of it",
                         "只留 EOS 之前的 id：EOS 結束回覆，但不是回覆的一部分")
        if len(got) > len(expected) and got[:len(expected)] == expected:
            raise NotYet(f"{name[0]}: you went past the first EOS; any id of eos_ids ends the reply, the first one wins",
                         f"{name[1]}：你越過了第一個 EOS；eos_ids 裡任何一個 id 都會結束回覆，以第一個出現的為準")
        raise NotYet(f"{name[0]}: expected {len(expected)} ids, got {len(got)}",
                     f"{name[1]}：應有 {len(expected)} 個 id，你的有 {len(got)} 個")
    text = chat.tokenizer.decode(meant, skip_special_tokens=True)
    return (f"the reply the model meant, {text!r}, out of {len(ran_on)} tokens that ran on",
            f"從一路寫下去的 {len(ran_on)} 個 token 中，救回模型本來要說的：{text!r}")


# ---------------------------------------------------------------- 07 chat panel

@_check
def check_context_used(context_used, panel):
    """Exercise 7.1: ``context_used(panel)`` -> the tokens the panel's conversation takes in the model's context."""
    todo = ("write context_used(panel): render json.loads(panel.export()) with the chat template and count the tokens",
            "寫出 context_used(panel)：用聊天範本渲染 json.loads(panel.export())，再數 token")
    _answered(context_used, todo)
    got = _whole(_call(context_used, "context_used", todo, panel), "context_used(panel)")
    conversation = json.loads(panel.export())
    chat = panel.chat
    closed = len(chat.prompt_ids(conversation, add_generation_prompt=False))
    opened = len(chat.prompt_ids(conversation, add_generation_prompt=True))
    if got in (closed, opened):
        return (f"{got:,} of {chat.context_length:,} tokens ({got / chat.context_length:.1%}); the panel warns at "
                f"80% and stops at 100%",
                f"上下文 {chat.context_length:,} 個 token 用了 {got:,} 個（{got / chat.context_length:.1%}）；"
                f"面板到 80% 會警告，100% 就停")
    characters = (len(panel.export()), sum(len(m["content"]) for m in conversation))
    if got in characters:
        raise NotYet("that counts characters; the context is counted in tokens: render, then chat.tokenizer.encode",
                     "這算的是字元；上下文是以 token 計算的：先渲染，再 chat.tokenizer.encode")
    if got == sum(len(chat.tokenizer.encode(m["content"])) for m in conversation):
        raise NotYet(f"{got} tokens of content; the template's part takes tokens too (<|im_start|>, the role names, "
                     f"<|im_end|>, newlines): render the whole conversation",
                     f"內容的 token 有 {got} 個；範本加上的部分也佔 token（<|im_start|>、角色名稱、<|im_end|>、換行）："
                     f"要渲染整段對話")
    raise NotYet(f"{got:,} tokens; the conversation rendered by the template takes {closed:,}",
                 f"你算出 {got:,} 個 token；用範本渲染的對話是 {closed:,} 個")


@_check
def check_brief_panel(brief, question: str = "What is the capital of France?"):
    """Exercise 7.2: a ``ChatPanel`` whose replies stop at the first '.' (sends ``question`` to it)."""
    from .panel import ChatPanel
    _answered(brief, ("make brief = ChatPanel.load(MODEL, ...) with a generation setting that ends a reply at a "
                      "string",
                      "用 ChatPanel.load(MODEL, ...) 建立 brief，加上一個「遇到某字串就結束回覆」的產生設定"))
    if not isinstance(brief, ChatPanel):
        raise NotYet(f"brief should be a ChatPanel (ChatPanel.load(MODEL, ...)), not {type(brief).__name__}",
                     f"brief 應該是 ChatPanel（ChatPanel.load(MODEL, ...)），而不是 {type(brief).__name__}")
    brief.send(question)
    brief.wait(120)
    if brief.error:
        raise NotYet(f"the panel says: {brief.error}", f"面板說：{brief.error}")
    reply, reason = brief.messages[-1]["content"], brief.replies[-1]["finish_reason"]
    hint = ("GenerationConfig's stop_strings ends a reply at a string; give it to ChatPanel.load like eos_token_id=[] "
            "above",
            "GenerationConfig 的 stop_strings 遇到字串就結束回覆；像上面的 eos_token_id=[] 一樣傳給 ChatPanel.load")
    if "." in reply:
        raise NotYet(f"the reply went on past the first '.' ({reply[:60]!r}, finish: {reason}): {hint[0]}",
                     f"回覆越過了第一個 '.'（{reply[:60]!r}，結束原因：{reason}）：{hint[1]}")
    if reason != "stop":  # an EOS id on the token '.', a token limit...: ended, but not at a string
        raise NotYet(f"the reply ended before any '.' ({reply[:60]!r}, finish: {reason}), but not at a string: {hint[0]}",
                     f"回覆在任何 '.' 之前就結束了（{reply[:60]!r}，結束原因：{reason}），但不是停在字串上：{hint[1]}")
    # It stopped at a string: the first '.', or one met before it ("Paris")? Greedy, with the panel's
    # settings and without its stop strings, shows where the reply was going.
    messages = [{"role": "user", "content": question}]
    settings = {**brief.overrides, "do_sample": False}
    stopped = brief.chat.generate(messages, **settings).text
    full = brief.chat.generate(messages, **{**settings, "stop_strings": []}).text
    if stopped != full.split(".")[0]:
        rest = full[len(stopped):len(stopped) + 20]
        raise NotYet(f"the reply stopped at a string before its first '.' ({stopped!r}, where the model goes on with "
                     f"{rest!r}): stop at '.' itself",
                     f"回覆在第一個 '.' 之前就停在別的字串上了（{stopped!r}，模型接下來會寫 {rest!r}）：要停在 '.' 本身")
    return (f"the reply stopped at the first '.': {reply!r} — stop_strings, like eos_token_id, is a setting the "
            f"controls do not show",
            f"回覆在第一個 '.' 停下：{reply!r}——stop_strings 和 eos_token_id 一樣，是控制項沒有顯示的設定")

"""Tiny Qwen2 checkpoints in the exact layout of a Hub repository.

Tests make them on the fly (random weights, a few kB); the embedded
``qwen-lab/tiny-chat`` model is written by the same functions after training;
``reshard`` turns a one-file model into the sharded layout of large ones.

>>> import tempfile
>>> d = save_checkpoint(build_random(tiny_config(vocab_size=300)), tempfile.mkdtemp(),
...                     tokenizer=train_tokenizer(["hello world"] * 3, 300), chat_template="{{ messages }}")
>>> sorted(p.name for p in d.iterdir())[:3]
['config.json', 'generation_config.json', 'model.safetensors']
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .errors import SettingError
from .hub import resolve
from .load import build_model, read_safetensors

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

#: Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation, newlines, spaces.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer set up as Qwen2's is (NFC, same split, byte level)."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False)
    return tok


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on ``texts``; the special tokens get the ids right after the vocabulary."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def tiny_config(vocab_size: int, *, tie: bool = True, **sizes) -> dict:
    """A ``config.json`` dict for a small Qwen2 (grouped-query attention, 2 query heads per kv head)."""
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tie, "torch_dtype": "bfloat16",
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": 2, "bos_token_id": None, "eos_token_id": None,
    }
    config.update(sizes)
    return config


def build_random(config: dict, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """A float32 model of ``config`` with normal(0, std) weights, biases included, norms at 1."""
    model = build_model(config, "cpu")
    model.config_dict = config
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}


def tokenizer_config(tokenizer: Tokenizer, chat_template: str) -> dict:
    """Qwen2.5's ``tokenizer_config.json`` shape: eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in special_token_ids(tokenizer).items()}
    return {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
            "chat_template": chat_template, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
            "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


def save_checkpoint(model: torch.nn.Module, directory: str | Path, *, tokenizer: Tokenizer, chat_template: str,
                    generation_config: dict | None = None, shards: int = 1,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``model`` as a Hub repository: config, tokenizer files, generation config, safetensors.

    ``shards > 1`` writes ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, as large models are published.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = special_token_ids(tokenizer)
    config = dict(getattr(model, "config_dict", None) or {})
    config.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                  torch_dtype=str(dtype).removeprefix("torch."))
    if generation_config is None:
        generation_config = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
                             "do_sample": True, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                             "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json", generation_config)
    _write_json(directory / "tokenizer_config.json", tokenizer_config(tokenizer, chat_template))
    tokenizer.save(str(directory / "tokenizer.json"))

    # Tied weights are stored once, as the Hub checkpoints do (no lm_head.weight).
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
             if not (config.get("tie_word_embeddings") and k == "lm_head.weight")}
    _write_weights(state, directory, shards, index=shards > 1)
    return directory


def reshard(src_dir: str | Path, dst_dir: str | Path, shards: int) -> Path:
    """Copy the model folder ``src_dir`` to ``dst_dir`` (new) with its weights cut into ``shards``
    files plus ``model.safetensors.index.json``, as large models are published.

    The tensors and every other file stay as they are, so the copy is the same model in the
    other layout (notebook 01 serves it from a local Hub to watch a client fetch the shards).

    >>> import tempfile
    >>> from qwen_lab.hub import resolve
    >>> out = reshard(resolve("qwen-lab/tiny-chat").root, Path(tempfile.mkdtemp()) / "sharded", shards=3)
    >>> [p.name for p in resolve(out).weights]
    ['model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors']
    """
    src, dst = Path(src_dir), Path(dst_dir)
    tensors: dict[str, torch.Tensor] = {}
    for f in resolve(src).weights:
        tensors.update(read_safetensors(f))
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= len(tensors):
        raise SettingError(f"shards must be a whole number from 1 to {len(tensors)} (one tensor per shard at "
                           f"least), not {shards!r}")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    _write_weights(tensors, dst, shards, index=True)
    return dst


def _write_weights(state: dict[str, torch.Tensor], directory: Path, shards: int, index: bool) -> None:
    """``model.safetensors``, or (``index``) ``shards`` files of about equal tensor counts and their index."""
    if not index:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names, weight_map = list(state), {}
    for s in range(shards):
        filename = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[s * len(names) // shards:(s + 1) * len(names) // shards]}
        save_file(part, directory / filename, metadata={"format": "pt"})
        weight_map.update({k: filename for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(directory / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

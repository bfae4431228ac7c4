"""Llama (Llama 3.x, SmolLM2 and the many models built like them).

What makes it Llama, given the shared pieces of ``qwen_lab.layers``:

* **no biases** anywhere by default (``attention_bias``, ``mlp_bias`` in config.json);
* Llama 3.x **scales its rotary frequencies** (``rope_scaling`` of type ``llama3``): the
  slow-turning channel pairs are stretched so a model trained on 8k tokens reads 128k;
* ``head_dim`` may be given, else hidden_size / heads;
* tied embeddings in small models (SmolLM2, Llama 3.2 1B and 3B), separate ones in larger.

>>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                   num_attention_heads=4, num_key_value_heads=2)
>>> LlamaForCausalLM(cfg)(torch.tensor([[1, 2, 3]])).shape
torch.Size([1, 3, 64])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch  # noqa: F401  (the doctest)

from ..errors import UnsupportedArchitectureError
from ..layers import Attention, CausalLM, DecoderConfig, DecoderLayer, SwiGLU


@dataclass
class LlamaConfig(DecoderConfig):
    """``config.json`` of a Llama model (defaults: SmolLM2-135M-Instruct's sizes)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int | None = 3
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    pretraining_tp: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise UnsupportedArchitectureError(f"config.json: {name} must be true or false")
        if self.pretraining_tp != 1:
            raise UnsupportedArchitectureError("config.json asks for pretraining_tp > 1 (sliced matrix products); "
                                               "qwen_lab computes each product whole")


class LlamaForCausalLM(CausalLM):
    config_class = LlamaConfig

    def make_layer(self, cfg: LlamaConfig) -> DecoderLayer:
        attention = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias)
        mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        return DecoderLayer(attention, mlp, cfg.hidden_size, cfg.rms_norm_eps)

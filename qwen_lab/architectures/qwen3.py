"""Qwen3: Qwen2 with normalised queries and keys.

What makes it Qwen3, given the shared pieces of ``qwen_lab.layers``:

* **an RMSNorm on each head's q and k** (``q_norm``, ``k_norm``, over ``head_dim``), applied
  before the rotary turn: it keeps attention scores in range, which is why Qwen3 could drop
  Qwen2's q/k/v biases;
* **no biases** (``attention_bias`` false in every released checkpoint);
* ``head_dim`` is **given** (128), not derived: Qwen3-0.6B has 16 heads of 128 in a
  hidden size of 1,024, so its attention is wider than its residual stream;
* its chat template can think aloud first (``enable_thinking``): that is the template's
  business, not the network's.

>>> cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
>>> Qwen3ForCausalLM(cfg)(torch.tensor([[1, 2, 3]])).shape
torch.Size([1, 3, 64])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch  # noqa: F401  (the doctest)

from ..errors import UnsupportedArchitectureError
from ..layers import Attention, CausalLM, DecoderConfig, DecoderLayer, SwiGLU


@dataclass
class Qwen3Config(DecoderConfig):
    """``config.json`` of a Qwen3 model (defaults: Qwen3-0.6B)."""

    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    use_sliding_window: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.attention_bias, bool):
            raise UnsupportedArchitectureError("config.json: attention_bias must be true or false")
        if self.use_sliding_window is not False:
            raise UnsupportedArchitectureError("config.json turns on use_sliding_window; qwen_lab's Qwen3 attends "
                                               "to the whole context")


class Qwen3ForCausalLM(CausalLM):
    config_class = Qwen3Config

    def make_layer(self, cfg: Qwen3Config) -> DecoderLayer:
        attention = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias, qk_norm_eps=cfg.rms_norm_eps)
        return DecoderLayer(attention, SwiGLU(cfg.hidden_size, cfg.intermediate_size), cfg.hidden_size,
                            cfg.rms_norm_eps)

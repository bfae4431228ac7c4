"""Qwen2 (the Qwen2.5 models): the walkthrough's architecture.

What makes it Qwen2, given the shared pieces of ``qwen_lab.layers``:

* q, k and v projections carry a **bias**; the output projection does not;
* rotary embeddings with a large base (``rope_theta`` 1,000,000) and no scaling;
* grouped-query attention: Qwen2.5-1.5B has 12 query heads sharing 2 key/value heads;
* the small sizes (0.5B, 1.5B) tie ``lm_head`` to the embedding.

>>> cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                   num_attention_heads=4, num_key_value_heads=2)
>>> Qwen2ForCausalLM(cfg)(torch.tensor([[1, 2, 3]])).shape
torch.Size([1, 3, 64])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch  # noqa: F401  (the doctest)

from ..errors import UnsupportedArchitectureError
from ..layers import Attention, CausalLM, DecoderConfig, DecoderLayer, SwiGLU


@dataclass
class Qwen2Config(DecoderConfig):
    """``config.json`` of a Qwen2 model (defaults: Qwen2.5-0.5B-Instruct)."""

    num_key_value_heads: int | None = 2
    tie_word_embeddings: bool = True
    use_sliding_window: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_sliding_window is not False:
            raise UnsupportedArchitectureError("config.json turns on use_sliding_window; qwen_lab's Qwen2 attends "
                                               "to the whole context (as every Qwen2.5 checkpoint does)")


class Qwen2ForCausalLM(CausalLM):
    config_class = Qwen2Config

    def make_layer(self, cfg: Qwen2Config) -> DecoderLayer:
        attention = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              qkv_bias=True)
        return DecoderLayer(attention, SwiGLU(cfg.hidden_size, cfg.intermediate_size), cfg.hidden_size,
                            cfg.rms_norm_eps)

"""Qwen2 in plain PyTorch, readable top to bottom.

The classes follow the order data flows through the network:

    token ids -> Embedding -> N x Qwen2DecoderLayer -> RMSNorm -> lm_head -> logits
    Qwen2DecoderLayer: x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x))

Module and parameter names mirror the Hugging Face checkpoint
(``model.layers.0.self_attn.q_proj.weight`` ...), so a ``model.safetensors``
file loads by name with no renaming table. Loading itself lives in
``qwen_lab.load``; this file only describes the computation. On a CPU,
``load`` swaps in twins from ``qwen_lab.kernels`` that run the one-token
decoding step of ``nn.Linear``, ``RMSNorm`` and ``Qwen2Attention`` in C; this
file stays the reference they are tested against, and what prompts run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Qwen2Config:
    """The fields of ``config.json`` that the computation needs."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    head_dim: int | None = None  # Qwen2 derives it; kept for configs that spell it out

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "Qwen2Config":
        """Keep the known keys of a ``config.json`` dict; ignore the rest."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and v is not None})

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen2Config":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain.

    Computed in float32 whatever the weights' dtype, as the reference does:
    a bf16 mean of squares over 1,536 values loses too many digits.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is x * rsqrt(mean(x**2) + eps) in one fused operation
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding: position p turns each pair of channels by p * freq.

    Returns cos and sin for the given positions; ``apply_rotary`` does the turn.
    Nothing is cached per position, so the context length costs no memory here.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, head_dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim): halves, not interleaved
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x1, x2) halves: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """A preallocated key/value store for one layer, written to by position.

    Shape (batch, kv_heads, max_len, head_dim). Decoding then costs one write
    per token instead of a ``torch.cat`` that copies the whole history.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v at positions start.. and return everything stored so far."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Qwen2Attention(nn.Module):
    """Grouped-query attention: 14 query heads share 2 key/value heads (0.5B).

    q, k and v carry a bias, the output projection does not: that is Qwen2.
    """

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # now the keys of positions 0 .. start+T-1
        if T == 1:  # decoding: one query sees every key, so attention is two small products
            return self.o_proj(self.attend_one(q, k, v).reshape(B, 1, self.n_heads * self.head_dim))
        # Causal: position i sees keys 0..i.
        if k.shape[2] == T:
            mask, causal = None, True
        else:  # a chunk appended after earlier positions: spell out the mask
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v for a single query position, spelled out, in float32.

        The query heads that share a key/value head are stacked as rows, so each
        KV head does one (group x d) @ (d x L) product. On a CPU this beats the
        fused kernel's set-up cost for one row: by 7x in bfloat16 at 1,024 keys.
        Float32 throughout: CPU bf16 products of these shapes are no faster, and
        each new length L would cost the bf16 backend a cached kernel plan.
        """
        B, kv = q.shape[0], self.n_kv_heads
        q = q.float().reshape(B, kv, self.n_heads // kv, self.head_dim)  # (B, kv, group, d)
        scores = (q @ k.float().transpose(-1, -2)) * self.head_dim ** -0.5  # (B, kv, group, L)
        y = torch.softmax(scores, dim=-1) @ v.float()  # (B, kv, group, d): heads in order
        return y.to(v.dtype)


class Qwen2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; Qwen2 uses 'silu'")
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP, each added back to the stream."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, cos, sin, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, input_ids: torch.Tensor, caches: list[KVCache] | None, start: int) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary_emb(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], start)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """The decoder plus the head that turns a hidden state into next-token logits.

    >>> cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = Qwen2ForCausalLM(cfg)
    >>> model(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 64])
    """

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # one matrix reads tokens in and writes logits out
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None,
                start: int = 0, last_only: bool = False) -> torch.Tensor:
        """Logits for ``input_ids`` placed at positions ``start, start+1, ...``.

        With ``caches`` the keys and values of earlier positions come from the
        cache and the new ones are written to it. ``last_only`` projects only
        the last position to the vocabulary: during prefill that skips a
        (prompt_len x vocab) matrix that generation never reads.
        """
        h = self.model(input_ids, caches, start)
        if last_only:
            h = h[:, -1:, :]
        return self.lm_head(h)

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """One empty KV cache per layer, in the model's dtype and device."""
        cfg, w = self.config, self.lm_head.weight
        return [KVCache(batch, cfg.num_key_value_heads, max_len, cfg.head_dim, w.dtype, w.device)
                for _ in range(cfg.num_hidden_layers)]

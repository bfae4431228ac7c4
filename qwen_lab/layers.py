"""The pieces every model here is built from, in the order data flows through them.

    token ids -> Embedding -> N x DecoderLayer -> RMSNorm -> lm_head -> logits
    DecoderLayer: x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x))

Qwen2, Llama and Qwen3 (``qwen_lab/architectures/``) are all this network; they differ in a
few choices made when the pieces are put together — a bias on q/k/v, an RMSNorm on each
head's q and k, how the rotary frequencies are scaled — and each architecture's file says
which. Module and parameter names mirror the Hugging Face checkpoints
(``model.layers.0.self_attn.q_proj.weight`` ...), so a ``model.safetensors`` file loads by
name with no renaming table.

This file is the reference: prompts always run it, and the faster twins that
``qwen_lab.runtime`` swaps in for decoding (C kernels on a CPU) are tested against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, UnsupportedArchitectureError
from .pages import huge_zeros


# ---------------------------------------------------------------- the config

#: (smallest, largest) accepted for each whole-number field: generous for this kit's models,
#: and small enough that a corrupt or hostile config.json fails at once instead of building
#: a billion layers.
INT_LIMITS = {"vocab_size": (1, 2**21), "hidden_size": (1, 2**16), "intermediate_size": (1, 2**18),
              "num_hidden_layers": (1, 512), "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
              "head_dim": (2, 1024), "max_position_embeddings": (1, 2**24)}
ROPE_TYPES = ("default", "llama3")


@dataclass
class DecoderConfig:
    """The fields of ``config.json`` that the computation needs (the defaults: Qwen2.5-0.5B).

    Every value is checked here, with the field named, before anything is built.
    """

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int | None = None  # None: one per query head (no grouping)
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None        # Llama 3.x: {"rope_type": "llama3", "factor": 32.0, ...}
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads) \
                and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name, (low, high) in INT_LIMITS.items():
            value = getattr(self, name)
            if not _is_int(value):
                raise _bad(name, value, "must be a whole number")
            if not low <= value <= high:
                raise _bad(name, value, f"must be between {low:,} and {high:,}")
        for name, low, high in (("rms_norm_eps", 0.0, 1.0), ("rope_theta", 0.0, 1e12)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise _bad(name, value, f"must be a number above {low:g} and at most {high:g}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise _bad("tie_word_embeddings", self.tie_word_embeddings, "must be true or false")
        if self.num_attention_heads % self.num_key_value_heads:
            raise _bad("num_attention_heads", self.num_attention_heads,
                       f"must be a multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise _bad("head_dim", self.head_dim, "must be even (rotary embeddings turn pairs of channels)")
        if self.hidden_act != "silu":
            raise UnsupportedArchitectureError(f"config.json's hidden_act is {self.hidden_act!r}; the models here "
                                               f"use 'silu' (SwiGLU)")
        rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)  # checks rope_scaling

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderConfig":
        """Keep the known keys of a ``config.json`` dict (``null`` means "the default"); ignore the rest."""
        if not isinstance(data, dict):
            raise CheckpointError(f"config.json must hold a JSON object, not a {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        rope = data.get("rope_parameters")  # transformers 5 writes rope_theta and the scaling here
        if isinstance(rope, dict):
            if "rope_theta" in rope and "rope_theta" not in values:
                values["rope_theta"] = rope["rope_theta"]
            values.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        elif rope is not None:
            raise CheckpointError(f"config.json: rope_parameters must be an object, not {rope!r}")
        layer_types = data.get("layer_types") or []
        if not isinstance(layer_types, list):  # one kind per layer; a lone string would pass unread
            raise _bad("layer_types", layer_types, "must be a list, one attention kind per layer")
        others = sorted({str(t)[:40] for t in layer_types if t != "full_attention"})  # str: entries may be anything
        if others:
            raise UnsupportedArchitectureError(f"config.json's layer_types ask for {others[:5]}; "
                                               f"qwen_lab's layers attend to the whole context (full_attention)")
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(name: str, value: Any, rule: str) -> CheckpointError:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    return CheckpointError(f"config.json: {name} {rule}, not {shown}; is the file corrupt?")


# ---------------------------------------------------------------- the pieces

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


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """How fast each pair of channels turns with the position: ``theta ** (-2i / head_dim)``.

    Llama 3.x stretches the slow-turning pairs (long wavelengths) by ``factor`` so a model
    trained on 8k tokens reads 128k, leaves the fast ones alone, and blends in between
    (``rope_type: llama3``).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if not isinstance(scaling, dict):
        raise CheckpointError(f"config.json: rope_scaling must be an object or null, not {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise UnsupportedArchitectureError(f"config.json's rope_scaling type {kind!r} is not supported; "
                                           f"qwen_lab knows {', '.join(ROPE_TYPES)}")
    try:
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        original = float(scaling["original_max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: rope_scaling of type llama3 needs factor, low_freq_factor, "
                              f"high_freq_factor and original_max_position_embeddings ({e})") from None
    if not (factor > 0 and 0 < low < high and original > 0):
        raise CheckpointError(f"config.json: rope_scaling values are out of range: {scaling}")
    wavelength = 2 * math.pi / inv_freq
    long = wavelength > original / low     # turn slowly: stretch by the factor
    short = wavelength < original / high   # turn fast: keep
    blend = (original / wavelength - low) / (high - low)
    middle = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(long, inv_freq / factor, torch.where(short, inv_freq, middle))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding: position p turns each pair of channels by p * freq.

    Returns cos and sin for the given positions; ``apply_rotary`` does the turn.
    Nothing is cached per position, so the context length costs no memory here.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(head_dim, theta, scaling), persistent=False)

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

    Decoding then costs one write per token instead of a ``torch.cat`` that copies the
    whole history. **Layout** (a contract: the C attention step of ``qwen_lab.kernels``
    reads and writes it directly): ``k`` and ``v`` are contiguous tensors of shape
    ``(batch, kv_heads, max_len, head_dim)`` in the model's dtype, holding the keys
    *after* the rotary turn; position p of KV head g (batch 1) is row ``g * max_len + p``.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 memory: torch.Tensor | None = None) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        if memory is None:  # else zeros of shape (2, *shape) holding k and v: CausalLM.new_caches on a CPU
            memory = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]
        self.register_buffer("k", memory[0], persistent=False)
        self.register_buffer("v", memory[1], persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v at positions start.. and return everything stored so far."""
        end = start + k.shape[2]
        if end > self.max_len:  # slicing past the end would store nothing, silently
            raise ValueError(f"the KV cache holds {self.max_len} positions; positions {start}-{end - 1} do not fit "
                             f"(make the cache longer, or the conversation shorter)")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention: several query heads share each key/value head (14 and 2 in Qwen2.5-0.5B).

    ``qkv_bias``: q, k and v carry a bias (Qwen2). ``qk_norm_eps``: an RMSNorm on each head's
    q and k before the rotary turn (Qwen3), which keeps attention scores in range.
    """

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, *, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm_eps: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin)
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


class SwiGLU(nn.Module):
    """The MLP: down(silu(gate(x)) * up(x)) — a gate decides how much of each feature passes."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP, each added back to the stream."""

    def __init__(self, attention: Attention, mlp: nn.Module, hidden: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def forward(self, x, cos, sin, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embedding, the stack of layers, and the final norm; ``make_layer`` builds each layer."""

    def __init__(self, cfg: DecoderConfig, make_layer: Callable[[DecoderConfig], DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make_layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, input_ids: torch.Tensor, caches: list[KVCache] | None, start: int) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary_emb(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], start)
        return self.norm(x)


class CausalLM(nn.Module):
    """The decoder plus the head that turns a hidden state into next-token logits.

    An architecture subclasses it, names its config class and says how to build one layer
    (``make_layer``). It owns what loading must not need to know: which weights are tied
    (``tied_weights``, ``tie_weights``) and the buffers that are not in the checkpoint
    (``reset_buffers``), so ``qwen_lab.load`` works the same for every architecture.
    """

    config_class: type[DecoderConfig] = DecoderConfig

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, self.make_layer)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def make_layer(self, cfg: DecoderConfig) -> DecoderLayer:
        raise NotImplementedError

    def tied_weights(self) -> dict[str, str]:
        """Parameter names that are the same tensor as another: ``{alias: source}``.

        With ``tie_word_embeddings`` one matrix reads tokens in and writes logits out, so a
        checkpoint stores it once (as the embedding) and ``lm_head.weight`` may be absent.
        """
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self, device: torch.device | str) -> None:
        """Rebuild what is computed rather than loaded (the rotary frequencies) on ``device``."""
        cfg = self.config
        with torch.device(device):
            self.model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

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
        """One empty KV cache per layer, in the model's dtype and device. On a CPU, all of them in one block of
        memory in 2 MiB pages where the system gives them (``pages.huge_zeros``): each token's attention reads
        every cached position, and at thousands of positions 4 KiB pages cost decoding 1-4% (RESULTS.md)."""
        cfg, w = self.config, self.lm_head.weight
        shape = (cfg.num_hidden_layers, 2, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        memory = huge_zeros(shape, w.dtype) if w.device.type == "cpu" else None
        return [KVCache(batch, cfg.num_key_value_heads, max_len, cfg.head_dim, w.dtype, w.device,
                        None if memory is None else memory[i]) for i in range(cfg.num_hidden_layers)]

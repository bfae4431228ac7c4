"""Decoding with static shapes, so that a GPU can replay one captured step per token.

On a GPU a decode step of a small model is ~600 tiny kernels; launched one by one from
Python, the GPU waits for Python most of the time (measured: an H100 decoding Qwen2.5-1.5B
shapes at 38-56 tokens/s, ~5% of what its memory bandwidth allows). A CUDA graph records
the launches of one step once and replays them with a single call (measured on an H100:
226-229 tokens/s, 4.7x the eager path; ``benchmarks/RESULTS.md``) — but only if every
step has the same shapes and reads its inputs from the same memory. So this step differs
from ``layers``' in three ways, as in gpt-fast:

* the KV caches are allocated once, for ``max_len`` positions, and the new key and value
  are written at ``pos`` with ``index_copy_`` (a tensor position, not a Python int);
* the rotary cos/sin of every position are computed once, and the step picks row ``pos``;
* attention always reads all ``max_len`` cached positions and masks those after ``pos``
  (the work grows with ``max_len`` rather than the text so far; the lengths are bucketed).

The token and the position live in small tensors the step reads; nothing in it waits for
the host. The step is ordinary PyTorch and runs on any device: on a CPU it is what the
tests compare with the eager path (same greedy tokens). On CUDA ``StaticDecoder`` captures
it as a graph, and replays it; where capture fails it runs the same step eagerly.

The caches outlive a generation (one decoder per model and length bucket, kept), so a
conversation's next turn can start from what they hold, as on the eager path: ``writes``
counts every prefill, copy and step, and ``generation.PromptCache`` trusts its record of the
ids they hold only while that count is unchanged. A turn in another length bucket than the
last one's copies that prefix from the last one's caches (``copy_prefix``) rather than
computing it again. ``release(model)`` lets the kept decoders go, and their memory with them.
"""
from __future__ import annotations

from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, CausalLM, apply_rotary

#: Cache lengths are rounded up to one of these, so a few captured graphs serve every length.
MIN_BUCKET = 512


def bucket(length: int, limit: int) -> int:
    """The smallest power of two >= ``length`` (at least ``MIN_BUCKET``), capped at ``limit``.

    >>> bucket(37, 32768), bucket(600, 32768), bucket(3000, 2048)
    (512, 1024, 2048)
    """
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, limit)


def attention_step(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``layers.Attention`` for one token at tensor position ``pos``, over a full static cache."""
    q = attn.q_proj(x).view(1, 1, attn.n_heads, attn.head_dim)
    k = attn.k_proj(x).view(1, 1, attn.n_kv_heads, attn.head_dim)
    v = attn.v_proj(x).view(1, 1, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible,
                                       enable_gqa=attn.n_kv_heads != attn.n_heads)
    return attn.o_proj(y.transpose(1, 2).reshape(1, 1, attn.n_heads * attn.head_dim))


class StaticDecoder:
    """A model's decode step with static shapes, for ``max_len`` positions, optionally as a CUDA graph.

    ``prefill(ids, start)`` runs the prompt from position ``start`` (the ordinary forward,
    writing into this decoder's caches; positions before ``start`` must already hold the
    prompt's keys and values) and returns the last logits; ``step(token, pos)`` returns the
    next ones. The same decoder serves one generation after another: a prefill overwrites the
    positions it uses, and the mask hides everything after ``pos``.
    """

    def __init__(self, model: CausalLM, max_len: int, graph: bool | None = None) -> None:
        weight = model.lm_head.weight
        self.model, self.max_len, self.device = model, max_len, weight.device
        self.memory = weight_memory(model)  # where the weights were: a captured graph reads them there
        self.rotary = _rotary(model)  # the rotary module its cos and sin come from, and its frequencies then
        self.caches = model.new_caches(1, max_len)
        positions = torch.arange(max_len, device=self.device)
        self.cos, self.sin = model.model.rotary_emb(positions, weight.dtype)  # (max_len, head_dim), once
        self.positions = positions
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph, self.out = None, None
        #: prefills, copies and steps so far: each may overwrite positions, so what the caches hold is known only
        #: to whoever made the last of them (checked by ``generation``; the capture's warm-up is not counted)
        self.writes = 0
        #: how the step runs: "cuda-graph", or "static" (eager, with a reason when a graph was wanted)
        self.mode = "static"
        if graph is None:
            graph = self.device.type == "cuda"
        if graph:
            try:
                self._capture()
                self.mode = "cuda-graph"
            except Exception as e:  # an op the graph cannot hold, an old driver...: replay is an optimisation
                self.graph, self.mode = None, f"static (CUDA graph capture failed: {type(e).__name__}: {e})"

    @torch.inference_mode()
    def _step(self) -> torch.Tensor:
        m = self.model.model
        x = m.embed_tokens(self.token)
        cos, sin = self.cos[self.pos], self.sin[self.pos]  # (1, head_dim): the row of this position
        visible = (self.positions <= self.pos).view(1, 1, 1, self.max_len)
        for layer, cache in zip(m.layers, self.caches):
            h = layer.input_layernorm(x)
            x = x + attention_step(layer.self_attn, h, cos, sin, cache.k, cache.v, self.pos, visible)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(m.norm(x))[0, -1]

    def _capture(self) -> None:
        """Record one step as a CUDA graph (after warm-up runs on a side stream, as CUDA requires).

        The warm-up steps write garbage at position 0 of the caches, before any generation:
        the first generation on a new decoder prefills (or copies a prefix) from position 0, overwriting it.
        """
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._step()
        self.graph = graph

    @torch.inference_mode()
    def prefill(self, ids: list[int], start: int = 0) -> torch.Tensor:
        """Logits after ``ids`` placed at positions ``start``.. (earlier ones come from the cache)."""
        self.writes += 1
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(x, self.caches, start, last_only=True)[0, -1]

    @torch.inference_mode()
    def copy_prefix(self, source: "StaticDecoder", n: int) -> None:
        """Take the keys and values of positions ..``n`` from ``source``, another length bucket's decoder of
        the same model (the conversation's last turn in that bucket), instead of computing them again."""
        if not 0 <= n <= min(self.max_len, source.max_len) or source.caches[0].k.dtype != self.caches[0].k.dtype \
                or source.device != self.device or source.model is not self.model:
            whose = "" if source.model is self.model else " of another model"
            raise ValueError(f"cannot copy {n} positions of {source.max_len}-position {source.caches[0].k.dtype} "
                             f"caches on {source.device}{whose} into this {self.max_len}-position decoder's")
        self.writes += 1
        for mine, theirs in zip(self.caches, source.caches):
            mine.k[:, :, :n].copy_(theirs.k[:, :, :n])  # in place: a captured graph reads these tensors
            mine.v[:, :, :n].copy_(theirs.v[:, :, :n])

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits after ``token`` placed at position ``pos`` (earlier positions come from the cache)."""
        self.writes += 1
        self.token.fill_(token)
        self.pos.fill_(pos)
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self._step()


def weight_memory(model: CausalLM) -> tuple[int, ...]:
    """The address of each weight and buffer (a replaced one has another; one changed in place keeps its own)."""
    return tuple(p.data_ptr() for p in chain(model.parameters(), model.buffers()))


def _rotary(model: CausalLM) -> tuple[nn.Module, list[torch.Tensor]]:
    """The model's rotary module and a copy of its buffers (the frequencies, ``inv_freq``): what a decoder's cos
    and sin were computed from. Copies, not addresses and versions: a new tensor (version 0) may be given the
    memory of one freed (measured: a rotary module replaced twice in a row got the first one's address 10 times
    in 200 on a CPU; the CUDA caching allocator hands freed blocks back first)."""
    rotary = model.model.rotary_emb
    return rotary, [b.detach().clone() for b in rotary.buffers()]


def _same_rotary(kept: tuple[nn.Module, list[torch.Tensor]], model: CausalLM) -> bool:
    rotary, values = kept
    now = list(rotary.buffers())
    return model.model.rotary_emb is rotary and len(now) == len(values) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(values, now))


def _serves(decoder: StaticDecoder, model: CausalLM, memory: tuple[int, ...]) -> bool:
    """Whether a kept decoder still fits ``model``: caches in its dtype, on its device (``model.to(...)`` since
    would make every step fail on mixed dtypes or devices), made for its weights where they are now (a graph
    captured before a weight was replaced would replay the old weight's memory, freed since), its cos and sin
    computed from the rotary frequencies as they are now (a learner's experiment with them, in place or a
    rotary module of another base put in, left the steps turning keys by the old angles)."""
    weight = model.lm_head.weight
    return decoder.caches[0].k.dtype == weight.dtype and decoder.device == weight.device \
        and decoder.memory == memory and _same_rotary(decoder.rotary, model)


def kept_decoder(model: CausalLM, length: int, memory: tuple[int, ...] | None = None) -> StaticDecoder | None:
    """The decoder ``decoder_for(model, length)`` would return without making one, or None.

    ``memory``: ``weight_memory(model)`` where the caller has it (walking the parameters takes ~0.4 ms
    at Qwen2.5-0.5B's shapes: once a generation is enough)."""
    decoder = model.__dict__.get("_static_decoders", {}).get(bucket(length, model.config.max_position_embeddings))
    if decoder is None or not _serves(decoder, model, weight_memory(model) if memory is None else memory):
        return None
    return decoder


def new_positions(model: CausalLM, length: int, memory: tuple[int, ...] | None = None) -> int:
    """Positions ``decoder_for(model, length)`` would allocate: its bucket's, or 0 where that decoder is kept."""
    if kept_decoder(model, length, memory) is not None:
        return 0
    return bucket(length, model.config.max_position_embeddings)


def decoder_for(model: CausalLM, length: int, memory: tuple[int, ...] | None = None) -> StaticDecoder:
    """The model's static decoder for ``length`` positions, made once per length bucket and kept.

    Decoders made before the model moved, changed dtype or had a weight replaced are dropped first,
    every bucket's: they could not serve it, and their memory is wanted for the new ones.
    """
    size = bucket(length, model.config.max_position_embeddings)
    decoders = model.__dict__.setdefault("_static_decoders", {})
    memory = weight_memory(model) if memory is None else memory
    for kept, decoder in list(decoders.items()):  # a copy: ``release`` may run in another thread
        if not _serves(decoder, model, memory):
            decoders.pop(kept, None)
    if size not in decoders:
        decoders[size] = StaticDecoder(model, size)
    return decoders[size]


def release(model: CausalLM, decoder: StaticDecoder | None = None) -> int:
    """Let go of the decoders the model keeps (or only ``decoder``), so that their KV caches and CUDA graphs
    are freed; returns the bytes of KV cache let go. ``generation.PromptCache.clear()`` lets go of the one
    holding its conversation where that conversation wrote there last; this frees every one, e.g. before
    loading another model beside this one. A generation running on one finishes on it (it holds it until
    then); the next static generation makes a new decoder (on a GPU capturing its graph again: 0.067 s at
    Qwen2.5-1.5B's shapes on an H100, ``benchmarks/RESULTS.md``).
    On a GPU torch keeps the freed memory for its next tensors: ``torch.cuda.empty_cache()`` returns it
    to the driver (for other processes).
    """
    decoders, freed = model.__dict__.get("_static_decoders", {}), 0
    for size, kept in list(decoders.items()):
        if (decoder is None or kept is decoder) and decoders.pop(size, None) is kept:
            freed += sum(2 * cache.k.numel() * cache.k.element_size() for cache in kept.caches)
    return freed

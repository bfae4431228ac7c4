"""Step 4 — generate: prompt ids -> next-token logits -> a choice -> repeat, until EOS.

The loop, as in gpt-fast and Candle's ``TextGeneration``:

1. **prefill** — run the whole prompt once, filling the KV cache; only the
   last position's logits are needed;
2. **decode** — feed one token at a time at its position; the cache supplies
   the keys and values of everything before it;
3. after each token: **stop** on any id of the EOS list (from
   ``generation_config.json``: Qwen2.5 lists both ``<|im_end|>`` and
   ``<|endoftext|>``), on ``max_new_tokens``, on a stop string, or when a
   ``threading.Event`` is set.

Between the turns of a conversation a ``PromptCache`` keeps the KV cache, so the next turn's
prefill computes only its new message, not the whole conversation again (on a CPU in the cache's
own tensors; on a GPU in the static decoder's caches, while no other generation has written there).

>>> chat = ChatModel.load("qwen-lab/tiny-chat")
>>> result = chat.generate([{"role": "user", "content": "What is 2 plus 3?"}], do_sample=False)
>>> result.finish_reason
'eos'
"""
from __future__ import annotations

import math
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import chain
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import kernels, static_decode, threads
from .sampling import (MAX_TOP_LOGPROBS, TokenChoice, apply_repetition_penalty, apply_top_k, apply_top_p, choice,
                       next_token, process_logits)
from .chat_template import ChatTemplate
from .errors import CheckpointError, ContextTooLongError, QwenLabError, SettingError
from .hub import ModelFiles, resolve
from .hub import read_json_object
from .load import available_memory, check_weight_files, load_model, read_config
from .tokenizer import Tokenizer

FINISH_REASONS = ("eos", "length", "stop", "cancelled")
#: Bounds on stop strings: after every token the text's end is compared with each one's beginnings, so
#: 2,000 strings of 4,000 characters (a hostile generation_config.json) made 300 tokens take 40 s, not 6.
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 32, 256

#: Re-exported: the logits processors live in ``qwen_lab.sampling``.
__all__ = ["ChatModel", "GenerationConfig", "GenerationResult", "GenerationStream", "PromptCache", "TokenChoice",
           "apply_repetition_penalty", "apply_top_k", "apply_top_p", "generate_stream", "next_token",
           "process_logits", "thread_plan"]


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop. ``from_files`` reads ``generation_config.json``.

    ``repeat_last_n=None`` penalises every earlier token (transformers);
    a number penalises only the last N (the seed's Candle code, default 64).
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    repeat_last_n: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int = 0  # per token, report this many of the likeliest alternatives (0: none)

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int) and not isinstance(self.eos_token_id, bool):
            self.eos_token_id = [self.eos_token_id]
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        checks = [
            ("max_new_tokens", whole(self.max_new_tokens) and self.max_new_tokens >= 1, "a whole number, at least 1"),
            ("do_sample", isinstance(self.do_sample, bool), "true or false"),
            ("temperature", number(self.temperature) and self.temperature >= 0, "a finite number >= 0 (0: greedy)"),
            ("top_p", number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", whole(self.top_k) and self.top_k >= 0, "a whole number >= 0 (0 turns it off)"),
            ("repetition_penalty", number(self.repetition_penalty) and self.repetition_penalty > 0,
             "a finite number > 0 (1 turns it off)"),
            ("repeat_last_n", self.repeat_last_n is None or (whole(self.repeat_last_n) and self.repeat_last_n >= 0),
             "a whole number >= 0"),
            ("eos_token_id", isinstance(self.eos_token_id, list) and all(whole(i) and i >= 0 for i in self.eos_token_id),
             "a token id or a list of them (whole numbers >= 0)"),
            ("stop_strings", isinstance(self.stop_strings, list) and len(self.stop_strings) <= MAX_STOP_STRINGS
             and all(isinstance(t, str) and 0 < len(t) <= MAX_STOP_LENGTH for t in self.stop_strings),
             f"a list of at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} characters"),
            ("seed", self.seed is None or (whole(self.seed) and 0 <= self.seed < 2**64),
             "a whole number from 0 to 2**64 - 1"),
            ("top_logprobs", whole(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"a whole number from 0 to {MAX_TOP_LOGPROBS}"),
        ]
        for name, ok, rule in checks:
            if not ok:
                value = repr(getattr(self, name))
                raise SettingError(f"{name} must be {rule}, not {value[:60]}")

    @property
    def greedy(self) -> bool:
        """Greedy when sampling is off, or when temperature 0 asks for the single best token."""
        return not self.do_sample or self.temperature == 0

    def replace(self, **overrides) -> "GenerationConfig":
        """A copy with some fields changed; ``None`` values leave a field as it is."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and v is not None})

    #: What ``generation_config.json`` may set. The rest (``seed``, ``top_logprobs``, ``repeat_last_n``) are
    #: this kit's settings, never the model's: a file must not pin every "random" reply to one seed.
    FILE_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                   "eos_token_id", "stop_strings")

    @classmethod
    def from_files(cls, files: ModelFiles) -> "GenerationConfig":
        """``generation_config.json``; without one, greedy with ``config.json``'s eos_token_id."""
        data, source = {}, files.config
        if files.generation_config is not None:
            source = files.generation_config
            saved = read_json_object(source, "sampling settings and EOS ids")
            data = {k: saved[k] for k in cls.FILE_FIELDS if k in saved}
        if data.get("eos_token_id") is None:
            data["eos_token_id"] = read_config(files.config).get("eos_token_id")
        try:
            return cls.from_dict(data)
        except SettingError as e:
            raise CheckpointError(f"{Path(source).name}: {e}; is the file corrupt?") from None


# ---------------------------------------------------------------- the loop

@dataclass
class GenerationResult:
    """What one generation produced, and why it stopped."""

    text: str
    token_ids: list[int]           # generated ids, the EOS id included when it ended the reply
    finish_reason: str             # eos | length | stop | cancelled
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float                  # start -> first new token (prefill included)
    decode_tokens_per_s: float     # tokens after the first, per second
    prefill_tokens_per_s: float    # prompt tokens computed (those not cached), per second of ttft
    total_s: float
    prefill_threads: int = 1       # CPU threads the prompt ran on
    decode_threads: int = 1        # and each new token
    decode_path: str = "torch"     # what ran each new token: kernels, torch, cuda-graph, static, no-cache...
    finish_detail: str = ""        # finish_reason in words: which EOS token, which stop string...
    choices: list[TokenChoice] = field(default_factory=list)  # per token, with top_logprobs > 0
    cached_tokens: int = 0         # prompt tokens whose keys and values came from a PromptCache, not the prefill

    def stats(self) -> dict:
        keys = ("prompt_tokens", "cached_tokens", "generated_tokens", "ttft_s", "decode_tokens_per_s",
                "prefill_tokens_per_s", "finish_reason", "prefill_threads", "decode_threads", "decode_path")
        d = asdict(self)
        return {k: round(d[k], 4) if isinstance(d[k], float) else d[k] for k in keys}


class GenerationStream:
    """Iterate for text deltas; ``.result`` holds the ``GenerationResult`` once done.

    >>> # for delta in chat.stream(messages): print(delta, end="")
    """

    def __init__(self, steps: Iterator[str], choices: list[TokenChoice] | None = None,
                 read_at_once: Callable[[], None] | None = None) -> None:
        self._steps = steps
        #: ``generate_stream``'s, where it has a ``PromptCache``: told that the stream is read as soon as it is
        #: made (``ChatModel.generate``), it takes the cache by the look at the weights its memory check made
        self._read_at_once = read_at_once
        self._result: GenerationResult | None = None
        self._ended: BaseException | str | None = None  # why there is no result: its failure, or closed
        #: per token so far, what the model weighed (filled as tokens come, with top_logprobs > 0)
        self.choices: list[TokenChoice] = [] if choices is None else choices

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> str:
        if self._result is not None:
            raise StopIteration
        try:
            return next(self._steps)
        except StopIteration as done:
            self._result = done.value
            raise
        except BaseException as e:  # the generation failed, or was interrupted (Ctrl-C): a later read says so
            self._ended = self._ended or e
            raise

    def close(self) -> None:
        """Stop the generation where it is: what it computed goes back to its ``PromptCache`` now, not when
        the stream is collected; the stream then yields nothing more, and has no ``result``. A stream being
        read in another thread is stopped by its cancel event instead (``stream(..., cancel=event)``)."""
        try:
            self._steps.close()
        except ValueError:  # Python's "generator already executing": another thread is in the middle of a token
            raise QwenLabError("this stream is being read in another thread: stop it with its cancel event "
                               "(stream(..., cancel=event), then event.set()); close it once that thread is done") \
                from None
        if self._result is None and self._ended is None:
            self._ended = "closed"

    @property
    def result(self) -> GenerationResult:
        """The final result; reading it runs the generation to its end if needed. A stream closed before its
        end has none (``QwenLabError``); one whose generation failed raises that failure again."""
        for _ in self:
            pass
        if self._result is None:
            if isinstance(self._ended, Exception):
                raise self._ended
            how = f"interrupted ({type(self._ended).__name__})" if self._ended != "closed" else "closed (close())"
            raise QwenLabError(f"this stream was {how} before its end: it has no result; "
                               f"read a stream to its end, or use ChatModel.generate, for one")
        return self._result


@torch.inference_mode()
def _forward(model, ids: list[int], caches, start: int, n_threads: int) -> torch.Tensor:
    device = model.lm_head.weight.device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    with threads.torch_threads(n_threads):
        return model(x, caches, start, last_only=True)[0, -1]


def thread_plan(model) -> tuple[int, int]:
    """Threads for the prompt and for each new token, chosen now: ``(prefill, decode)``.

    The limit is ``kernels.num_threads()`` (what this process may use, or what the
    user set). A prompt runs torch's fork-join matrix products, which slow down a
    lot when another program wants a core, so unless the count was set by hand it
    takes only the CPUs that are free right now (``threads.threads_now``). New
    tokens run on the C kernels' pool, whose threads take work as they can and
    never wait for one that lost its core; torch's own operations between them
    are too small to share, so torch gets one thread there.
    """
    limit = kernels.num_threads()
    prefill = limit if threads.explicit_threads() else threads.threads_now(limit)
    return prefill, limit if kernels.in_use(model) else prefill


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` might be the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class PromptCache:
    """One conversation's KV cache, kept from one reply to the next: pass it as ``cache=`` to
    ``ChatModel.stream`` / ``generate`` (the chat panel keeps one per conversation).

    Each turn of a chat re-sends the whole conversation, and all of it but the new message was
    already computed by the turn before: its prompt, then its reply, token by token. With a cache,
    a generation prefills only what follows the longest common prefix of its prompt and the ids
    whose keys and values the cache holds (llama.cpp's server and Ollama keep prompts the same way).
    Measured at Qwen2.5-0.5B's shapes in bf16 on a 2-core CPU (``benchmarks/bench_conversation.py``):
    the 8th turn of a chat, 1,848 tokens, had its first token after 2.7 s instead of 21.0 s.

    The reply is the same up to rounding: the reused keys and values of the last reply were
    computed one token at a time, where a prefill computes them all at once, summing in another
    order. Where the template re-writes the last reply differently from the ids the model chose
    (another tokenization, Qwen3 dropping its thinking), the common prefix simply ends there.

    Where the keys and values are: on the eager path (a CPU's), in the cache's own tensors. On the
    static path (a GPU's, ``static=True``), in the caches that the model's ``StaticDecoder`` keeps,
    one per length bucket, shared by every generation on that model: the cache records which ids
    they hold and is trusted only while nothing else has written there since. Two conversations
    taking turns on one model (two panels) therefore prefill their whole prompt at each turn;
    neither ever reads the other's keys. A generation in another bucket writes into other caches:
    the next turn still reuses. A turn whose length (prompt plus ``max_new_tokens``) falls in
    another bucket than the last one's copies the prefix from the last one's caches into its own
    bucket's (a tensor copy per layer, not a prefill).

    A cache belongs to one model with its weights as they are, and to one path (another model, or
    one moved, converted or with a weight changed since, or the other path, starts it afresh; a
    forward hook added since is not seen: ``clear()`` it then). A generation takes it whole when it
    starts (a stream made but never read takes nothing) and gives back what it computed whole:
    all it fed, or, if it fails, what it had finished before the failure (a stream abandoned
    mid-reply gives back once it is closed, ``stream.close()``, or collected). ``clear()`` frees its memory: its own
    caches, or the static decoder holding them where its conversation wrote there last (the model's
    other decoders stay: ``static_decode.release(model)`` frees them).
    """

    def __init__(self) -> None:
        self._caches: list | None = None  # on the eager path: the KV caches, this cache's own
        self._decoder = None        # on the static path: a weak reference to the StaticDecoder holding them
        self._writes = 0            # and its write count then: they hold ``_ids`` only while it is unchanged
        self._ids: list[int] = []   # the tokens whose keys and values are held, from position 0
        self._model = None          # a weak reference to the model that computed them
        self._weights = None        # and its weights when that generation began (_Weights)
        self._claims = 0            # generations that took it so far: only the latest one may give back
        # two threads taking it at once would both get the same tensors and write into them together
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many tokens' keys and values it holds."""
        with self._lock:
            if self._decoder is not None:
                decoder = self._decoder()
                if decoder is None or decoder.writes != self._writes:
                    return 0  # the static decoder was dropped, or another generation wrote there since
            return len(self._ids)

    def clear(self) -> None:
        """Forget what it holds and free that memory: its own caches (eager path), or (static path) the
        model's decoder holding its keys and values, if this conversation was the last to write there (no
        one else can use what it holds; the next generation of that length makes a new decoder). A decoder
        another generation wrote since is left to the model: ``static_decode.release(model)`` frees them all.
        """
        with self._lock:
            decoder = self._decoder() if self._decoder is not None else None
            last = decoder is not None and decoder.writes == self._writes
            self._caches, self._ids, self._model, self._decoder = None, [], None, None
            self._claims += 1  # a generation still running gives back nothing: cleared means freed
        if last:
            static_decode.release(decoder.model, decoder)

    def _usable(self, model, prompt_ids: list[int], weights: "_Weights", static: bool, decoder=None) -> int:
        """How many leading ``prompt_ids`` it holds for ``model`` whose weights are ``weights``, where the
        generation can read them: in its own caches, or (``static``) in ``decoder``'s, the static decoder its
        record names (this generation's length bucket's, or another's, whence they are copied; 0: none serves)."""
        owner = self._model() if self._model is not None else None
        if owner is not model or weights != self._weights:
            return 0  # another model, or this one with a weight changed since
        if static and (decoder is None or decoder.writes != self._writes):
            return 0  # none (its keys are in its own caches), the decoder dropped, or its caches written since
        caches, weight = decoder.caches if static else self._caches, model.lm_head.weight
        if caches is None or caches[0].k.dtype != weight.dtype or caches[0].k.device != weight.device:
            return 0  # none of its own (kept by a static decoder), or this model moved or converted since
        # at most all but the last prompt token: its logits choose the first new token
        start, limit = 0, min(len(self._ids), len(prompt_ids) - 1)
        while start < limit and self._ids[start] == prompt_ids[start]:
            start += 1
        return start

    def _claim(self, model, prompt_ids: list[int], length: int, static: bool = False, weights: "_Weights | None" = None,
               take: bool = True) -> "_Claim | None":
        """Check the memory that a generation of ``length`` positions needs, then hand it what this cache holds.

        One decision under the lock: the cache is empty until the generation gives back (``_keep``), so two
        generations never write into the same caches. What it allocates: reused in place, nothing; grown, at
        least ``length`` positions while the old ones are copied; not reusable, ``length`` once the old ones are
        freed (here, at once); static, the decoder's bucket unless the model keeps it. Refused (``SettingError``),
        it takes nothing. ``take=False`` only checks: ``generate_stream`` does so when the stream is made, and
        takes when it starts, by the weights as they are then (``weights``: ``_weights(model)``; a stream read at
        once, ``ChatModel.generate``'s, takes by the look its check made: one look a turn).
        """
        weights = _weights(model) if weights is None else weights
        memory = weights.memory  # static_decode.weight_memory, from the same walk
        with self._lock:
            # the static decoder holding its keys (a local reference, so that it cannot go while looked at)
            decoder = self._decoder() if static and self._decoder is not None else None
            start = self._usable(model, prompt_ids, weights, static, decoder)
            caches = self._caches if start and not static else None  # its own, serving this generation
            decoder = decoder if start else None  # the prefix's, maybe another length bucket's
            dropped = self._caches if caches is None else None  # freed with the claim: counted as free
            freed = 0 if dropped is None or dropped[0].k.device != model.lm_head.weight.device \
                else sum(2 * c.k.numel() * c.k.element_size() for c in dropped)
            if caches is not None:
                positions = 0 if caches[0].max_len >= length else length
            else:
                positions = static_decode.new_positions(model, length, memory) if static else length
            _check_cache_memory(model, positions, freed)
            if not take:
                return None
            self._claims += 1
            claim = _Claim(self, self._claims, weights, start, caches, decoder, self._writes, memory)
            self._caches, self._ids, self._model, self._decoder = None, [], None, None
        return claim

    def _keep(self, claim: "_Claim", model, ids: list[int], caches: list | None = None, decoder=None) -> None:
        """A generation gives back ``ids`` (from position 0), whole in ``caches`` or in ``decoder``'s caches as
        they are now. Only the latest claim's: an abandoned stream collected after a newer generation (or
        after ``clear()``) must not replace what is newer."""
        with self._lock:
            if claim.ticket != self._claims:
                return
            self._caches, self._ids, self._model = caches, list(ids), weakref.ref(model)
            self._decoder = weakref.ref(decoder) if decoder is not None else None
            self._writes = decoder.writes if decoder is not None else 0
            self._weights = claim.weights  # as they were when it began: a change during the generation is seen


@dataclass
class _Claim:
    """What one generation took from a ``PromptCache``: its first ``start`` prompt ids are computed, in
    ``caches`` (eager) or in the static ``decoder``'s caches as its ``writes``-th write left them (that decoder
    may be another length bucket's than the generation's: they are then copied)."""

    cache: PromptCache
    ticket: int                  # the cache's claim count when taken: a later claim voids this one's give-back
    weights: "_Weights"          # _weights(model) then
    start: int = 0
    caches: list | None = None
    decoder: object = None
    writes: int = 0
    memory: tuple = ()           # where the weights were (static_decode.weight_memory)

    def eager_caches(self, model, length: int) -> list:
        """KV caches of at least ``length`` positions, holding the first ``start`` prompt ids."""
        caches, start, self.caches = self.caches, self.start, None
        if start == 0:
            return model.new_caches(1, length)
        if caches[0].max_len < length:  # grow, doubling (up to the context) where memory allows, so later turns fit
            size = min(2 * caches[0].max_len, model.config.max_position_embeddings)
            free = _free_memory(model)
            if size < length or (free is not None and _cache_bytes(model, size) > free):
                size = length
            grown = model.new_caches(1, size)
            for new, old in zip(grown, caches):
                new.k[:, :, :start] = old.k[:, :, :start]
                new.v[:, :, :start] = old.v[:, :, :start]
            caches = grown
        return caches


def _weights(model) -> "_Weights":
    return _Weights(model)


class _Weights:
    """One look at a model's weights, equal (``==``) to a later one while none has changed: for each
    weight, its storage, its address, its strides and its version counter. The buffers count as weights
    here: the rotary frequencies (``inv_freq``) turned every kept key.

    torch counts in the version each change made in place (``w.mul_(2)``, ``w.copy_(t)``,
    ``load_state_dict``). A weight replaced (``model.half().float()``, ``model.to(...)``, ``w.data = t``,
    ``load_state_dict(assign=True)``) has another storage, but not always another address: the new
    storage may get the memory the old one freed, and ``w.data = t`` keeps the parameter's version.
    Keys and values of the old weights were then reused. So each storage counts too, held weakly
    (``_weak_ref``: its memory is freed as usual, but the small object that stood for it stays while
    this look does): no other storage can be that object meanwhile. The strides tell a square weight
    from its transpose (``w.data = w.data.t()``: the same storage and address). (Inference tensors
    count no versions: those are compared by the rest only; a change made around torch, through
    numpy's view of a weight, is not seen either.) Looking takes ~0.52 ms at Qwen2.5-0.5B's shapes
    (290 weights; the address and the version alone, ~0.45 ms, most of it the walk of the parameters).
    """

    __slots__ = ("key", "memory", "_storages")
    _release = torch.UntypedStorage._free_weak_ref  # kept: at exit, torch may go before the last look

    def __init__(self, model) -> None:
        self._storages: list[int] = []
        memory, strides, versions = [], [], []
        for p in chain(model.parameters(), model.buffers()):
            self._storages.append(p.untyped_storage()._weak_ref())
            memory.append(p.data_ptr())
            strides.append(p.stride())
            versions.append(0 if p.is_inference() else p._version)
        self.memory = tuple(memory)
        self.key = (tuple(self._storages), self.memory, tuple(strides), tuple(versions))

    def __eq__(self, other) -> bool:
        return isinstance(other, _Weights) and self.key == other.key

    def __del__(self) -> None:
        for storage in self._storages:
            self._release(storage)


#: A prompt whose new tokens the kernels' few-rows walk can take (``kernels.few_rows_prompt``) runs so, with
#: torch's operations between its products on one thread, while it has at most this many positions, cached
#: ones included; past them, attention over the cache wants torch's threads, whose spinning workers slow the
#: walk, and torch's products run as before. Measured on a 2-core AMD Zen 4 (benchmarks/bench_prompt.py,
#: benchmarks/RESULTS.md): after 200 cached positions the walk was ahead, after 1,500 it was not.
SHORT_PROMPT_POSITIONS = 256


class _Eager:
    """Prefill and decode by the model's own forward, on a KV cache sized for this generation.

    Without a cache (``use_cache=False``) every step re-runs the whole text so far. With the C
    kernels, every torch operation of a decode step, the choice of the token included, runs on one
    torch thread: after a parallel operation torch's OpenMP threads spin for several milliseconds,
    taking the CPU that the kernels' pool needs (measured: a 896 x 896 product at 9 GB/s instead of
    17 while a spinning torch thread had the other core). So does a short prompt's (2 to
    ``kernels.FEW_ROWS`` new tokens after at most SHORT_PROMPT_POSITIONS), whose products the kernels'
    few-rows walk runs.
    """

    def __init__(self, model, length: int, use_cache: bool, history: torch.Tensor, claim: _Claim | None = None) -> None:
        self.model, self.history, self.claim = model, history, claim
        self.caches, self.start = None, 0  # start: the prompt's first position the prefill computes
        if use_cache and claim is not None:
            self.caches, self.start = claim.eager_caches(model, length), claim.start
        elif use_cache:
            self.caches = model.new_caches(1, length)
        self.prefill_threads, decode_threads = thread_plan(model)
        self.step_threads = (1 if kernels.in_use(model) else decode_threads) if use_cache else self.prefill_threads
        self.decode_threads = decode_threads
        # with the C kernels: one generation's step, checked once (kernels.TokenStep), else the model's forward
        self.token_step = kernels.TokenStep.for_model(model, self.caches) if use_cache else None
        on_cpu = model.lm_head.weight.device.type == "cpu"
        self.path = ("kernels" if kernels.in_use(model) else "torch" if on_cpu else "eager") if use_cache \
            else "no-cache"

    def prefill(self, ids: list[int]) -> torch.Tensor:
        new = ids[self.start:]
        if self.caches is not None and kernels.few_rows_prompt(self.model, len(new)):
            if len(ids) <= SHORT_PROMPT_POSITIONS:
                # a short prompt: its products by the kernels' few-rows walk on their pool, torch's operations
                # between them on one thread, as a token's (see the class's docstring)
                self.prefill_threads = self.decode_threads
                return _forward(self.model, new, self.caches, self.start, 1)
            with kernels.few_rows_off():  # after a long cache: torch's products, its threads for the attention
                return _forward(self.model, new, self.caches, self.start, self.prefill_threads)
        return _forward(self.model, new, self.caches, self.start, self.prefill_threads)

    def done(self, ids: list[int]) -> None:
        """The generation ended (or failed): ``ids``, from position 0, are whole in the caches."""
        if self.claim is not None and self.caches is not None:
            self.claim.cache._keep(self.claim, self.model, ids, caches=self.caches)

    def step(self, token: int, pos: int) -> torch.Tensor:
        if self.caches is None:
            return _forward(self.model, self.history[:pos + 1].tolist(), None, 0, self.step_threads)
        if self.token_step is not None:
            with torch.inference_mode():
                return self.token_step(token, pos)
        return _forward(self.model, [token], self.caches, pos, self.step_threads)


class _Static:
    """Prefill and decode through the model's ``StaticDecoder`` (a replayed CUDA graph on a GPU).

    Its caches are the model's, kept from one generation to the next whoever ran it: a claim on a
    ``PromptCache`` starts after the common prefix only if its last generation was the last to write
    the caches holding it (this length bucket's, or another's whose prefix is copied into this one's),
    and this generation gives back only if nothing else wrote there while it ran.
    """

    def __init__(self, model, length: int, claim: _Claim | None = None) -> None:
        self.model, self.claim = model, claim
        self.decoder = static_decode.decoder_for(model, length, claim.memory if claim is not None else None)
        self.path = self.decoder.mode
        self.prefill_threads = self.decode_threads = self.step_threads = torch.get_num_threads()
        source = claim.decoder if claim is not None else None
        # since the claim another thread may have used that decoder (one generation at a time is the caller's lock)
        intact = source is not None and source.writes == claim.writes
        self.start = claim.start if intact else 0  # the prompt's first position the prefill computes
        if self.start and source is not self.decoder:  # another bucket's: a copy, not a prefill, of the prefix
            self.decoder.copy_prefix(source, self.start)
        self.writes = self.decoder.writes  # the decoder's count after this generation's last write

    def _write(self) -> None:
        if self.decoder.writes != self.writes:  # two streams of one model read in turns: each overwrites the other
            raise QwenLabError("another generation used this model's static decoder (its KV cache) during this "
                               "one: run one generation at a time per model")
        self.writes += 1

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self._write()
        return self.decoder.prefill(ids[self.start:], self.start)

    def done(self, ids: list[int]) -> None:
        """The generation ended (or failed): ``ids``, from position 0, are whole in the decoder's caches."""
        if self.claim is not None and self.decoder.writes == self.writes:
            self.claim.cache._keep(self.claim, self.model, ids, decoder=self.decoder)

    def step(self, token: int, pos: int) -> torch.Tensor:
        self._write()
        return self.decoder.step(token, pos)


def generate_stream(model, tokenizer: Tokenizer, prompt_ids: list[int], config: GenerationConfig, *,
                    cancel: threading.Event | None = None, use_cache: bool = True,
                    skip_special_tokens: bool = True, static: bool | None = None,
                    cache: PromptCache | None = None) -> GenerationStream:
    """Generate from ``prompt_ids``, yielding text deltas that are whole characters.

    ``use_cache=False`` re-runs the whole sequence for every token: the same
    tokens, much slower; it exists to show what the KV cache saves. ``static``:
    decode with ``static_decode.StaticDecoder`` (a CUDA graph replayed per token);
    ``None`` does so on a GPU, where it pays, and not on a CPU. ``cache``: a ``PromptCache``
    whose common prefix with the prompt is not computed again, on either path (with the static
    decoder, only if no other generation has written the caches of the cache's last one since;
    in another length bucket's decoder, the prefix is copied). The cache is taken when the stream
    starts, by the weights as they are then: one made and never read leaves it as it was.
    """
    context, vocab = model.config.max_position_embeddings, model.config.vocab_size
    if not prompt_ids:
        raise QwenLabError("the prompt is empty: give at least one token")
    outside = next((i for i in prompt_ids if not (isinstance(i, int) and 0 <= i < vocab)), None)
    if outside is not None:
        raise SettingError(f"prompt token {outside!r} is not an id of this model's vocabulary (0 to {vocab - 1})")
    if len(prompt_ids) >= context:
        raise ContextTooLongError(f"the prompt has {len(prompt_ids)} tokens but the model's context holds "
                                  f"{context}: shorten the conversation or start a new one")
    if static is None:
        static = use_cache and model.lm_head.weight.device.type == "cuda"
    if static and not use_cache:
        raise SettingError("static decoding keeps a KV cache: it cannot run with use_cache=False")
    take = read_at_once = None
    if use_cache:
        length = len(prompt_ids) + min(config.max_new_tokens, context - len(prompt_ids))
        if cache is not None:  # the same check, counting what the cache holds; taken when the stream starts
            weights, at_once = _weights(model), []
            cache._claim(model, prompt_ids, length, static, weights, take=False)
            # judged by the weights as they are when it starts (a cell may change one after making the stream,
            # and keys of the old weight would be reused); read at once, by the look the check just made
            take = lambda: cache._claim(model, prompt_ids, length, static, weights if at_once else None)  # noqa: E731
            read_at_once = lambda: at_once.append(True)  # noqa: E731
        elif static:  # the static decoder allocates its bucket once, then keeps it
            _check_cache_memory(model, static_decode.new_positions(model, length))
        else:
            _check_cache_memory(model, length)
    choices: list[TokenChoice] = []
    return GenerationStream(_steps(model, tokenizer, list(prompt_ids), config, cancel, use_cache,
                                   skip_special_tokens, context, static, choices, take), choices, read_at_once)


def _cache_bytes(model, positions: int) -> int:
    """Bytes of a KV cache of ``positions`` positions: (layers x KV heads x head_dim) keys and as many values."""
    cfg = model.config
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * positions \
        * model.lm_head.weight.element_size()


def _free_memory(model) -> int | None:
    """Bytes free where the model computes (None where unknown). On a GPU, with what torch keeps of the
    memory it freed (an old KV cache, a prefill's activations) for its next tensors: the driver counts it
    as used."""
    device = model.lm_head.weight.device
    if device.type != "cuda":
        return available_memory()
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _check_cache_memory(model, positions: int, freed: int = 0) -> None:
    """Refuse, with the figures, a KV cache larger than the memory left: it is allocated whole, up front (on a
    CPU its pages are taken as positions are written, ``pages.huge_zeros``; they must still be there by then).

    Its size is the config's (layers x KV heads x head_dim) times the positions asked for: a
    64 MB checkpoint whose config.json claims 1,024 KV heads of 1,024 channels, asked for
    100,000 new tokens, used to meet torch's allocator with a 200 GB request (a traceback).
    ``positions``: what this generation allocates (0 where a kept cache serves as it is);
    ``freed``: bytes of a kept cache released before it.
    """
    need = _cache_bytes(model, positions)
    free = _free_memory(model) if need else None
    if free is not None and need > free + freed:
        raise SettingError(f"the KV cache for {positions:,} positions needs {need / 2**30:.1f} GiB but only "
                           f"{(free + freed) / 2**30:.1f} GiB is free: ask for fewer new tokens (max_new_tokens)")


def _steps(model, tokenizer, prompt_ids, config, cancel, use_cache, skip_special, context, static, choices, take):
    # the cache is taken here, at the first token asked for: a stream made and never read takes nothing
    claim = take() if take is not None else None
    budget = min(config.max_new_tokens, context - len(prompt_ids))
    generator = None
    if not config.greedy:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    eos, stops = set(config.eos_token_id), config.stop_strings
    decoder = tokenizer.stream(skip_special_tokens=skip_special)
    history = torch.empty(len(prompt_ids) + budget, dtype=torch.long)
    history[:len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    n = len(prompt_ids)
    new_ids: list[int] = []
    text, emitted, reason, stop_hit = "", 0, "length", ""
    steps = _Static(model, n + budget, claim) if static else _Eager(model, n + budget, use_cache, history, claim)
    t0 = time.perf_counter()
    t_first = t0

    fed = steps.start  # positions whose keys and values are whole in the caches
    try:
        check_weight_files(model)  # a weights file rewritten in place since the load: reading it would kill us
        logits = steps.prefill(prompt_ids)
        fed = n
        while True:
            with threads.torch_threads(steps.step_threads):  # see _Eager: no torch thread may spin between kernels
                chosen = choice(logits.cpu(), history[:n], config, generator, config.top_logprobs)
            token = chosen.token_id
            if config.top_logprobs:
                choices.append(chosen)
            new_ids.append(token)
            history[n] = token
            n += 1
            if len(new_ids) == 1:
                t_first = time.perf_counter()
            if token in eos:
                text += decoder.push(token) if not skip_special else ""
                reason = "eos"
                break
            text += decoder.push(token)
            hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                stop_hit = next(s for s in stops if text.find(s) == hit)
                text, reason = text[:hit], "stop"
                break
            safe = len(text) - _held_back(text, stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if len(new_ids) >= budget:
                reason = "length"
                break
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            check_weight_files(model)
            logits = steps.step(token, n - 1)
            fed = n
    finally:  # ended, failed or closed: what was computed whole is given back (the last token chosen was never fed)
        steps.done(history[:fed].tolist())
    if reason != "stop":
        text += decoder.flush()
    if len(text) > emitted:
        yield text[emitted:]
    t_end = time.perf_counter()
    ttft = t_first - t0
    detail = {"eos": lambda: f"the model wrote {tokenizer.id_to_token(new_ids[-1])} (id {new_ids[-1]}), one of the "
                             f"EOS ids {_some(sorted(eos))}",
              "stop": lambda: f"the text reached the stop string {stop_hit!r}",
              "cancelled": lambda: "stopped on request (Stop, Ctrl-C or a cancel event) before the next token",
              "length": lambda: (f"reached the end of the context ({context:,} tokens)" if n >= context
                                 else f"reached max_new_tokens ({config.max_new_tokens:,})")}[reason]()
    decode_time = t_end - t_first
    return GenerationResult(
        text=text, token_ids=new_ids, finish_reason=reason, prompt_tokens=len(prompt_ids),
        generated_tokens=len(new_ids), ttft_s=ttft,
        decode_tokens_per_s=(len(new_ids) - 1) / decode_time if len(new_ids) > 1 and decode_time > 0 else 0.0,
        prefill_tokens_per_s=(len(prompt_ids) - steps.start) / ttft if ttft > 0 else 0.0, total_s=t_end - t0,
        prefill_threads=steps.prefill_threads, decode_threads=steps.decode_threads, decode_path=steps.path,
        finish_detail=detail, choices=list(choices), cached_tokens=steps.start)


def _some(ids: list[int], limit: int = 5) -> str:
    """``ids`` for a message: the first ``limit``, and how many in all (a model's file may list thousands)."""
    shown = ", ".join(map(str, ids[:limit]))
    return f"[{shown}]" if len(ids) <= limit else f"[{shown}, ... ({len(ids):,} in all)]"


# ---------------------------------------------------------------- everything wired together

class ChatModel:
    """Model, tokenizer, chat template and generation config of one model, loaded once.

    >>> chat = ChatModel.load("qwen-lab/tiny-chat")
    >>> chat.prompt_ids([{"role": "user", "content": "Hi"}])[-3:] == chat.tokenizer.encode("<|im_start|>assistant\\n")
    True
    """

    def __init__(self, files: ModelFiles, model, tokenizer: Tokenizer, template: ChatTemplate | None,
                 generation_config: GenerationConfig) -> None:
        self.files, self.model, self.tokenizer = files, model, tokenizer
        self.template, self.generation_config = template, generation_config
        self.lock = threading.Lock()  # one generation at a time: panels may share the model

    @classmethod
    def load(cls, model: str = "qwen-lab/tiny-chat", *, dtype: str | torch.dtype = "auto",
             device: str | torch.device | None = None, revision: str | None = None, **hub_options) -> "ChatModel":
        return cls.from_files(resolve(model, revision, **hub_options), dtype=dtype, device=device)

    @classmethod
    def from_files(cls, files: ModelFiles, *, dtype: str | torch.dtype = "auto",
                   device: str | torch.device | None = None) -> "ChatModel":
        """``load`` once the files are found (``hub.resolve``): what takes the memory."""
        tokenizer = Tokenizer.from_files(files)
        template = ChatTemplate.from_files(files, required=False)  # None for a base model: raw prompts only
        generation_config = GenerationConfig.from_files(files)
        loaded = load_model(files, dtype, device)
        vocab = loaded.config.vocab_size
        # ids past the embedding would fail mid-conversation; ids may skip numbers, so the highest counts too
        if tokenizer.vocab_size > vocab or tokenizer.highest_id >= vocab:
            has = (f"{tokenizer.vocab_size:,} tokens" if tokenizer.vocab_size > vocab
                   else f"a token with id {tokenizer.highest_id:,}")
            raise CheckpointError(f"tokenizer.json has {has} but config.json's vocab_size is {vocab:,}: the "
                                  f"tokenizer is not this model's; download the model again")
        outside = [i for i in generation_config.eos_token_id if i >= vocab]
        if outside:
            raise CheckpointError(f"the EOS ids {_some(outside)} are outside the vocabulary ({vocab:,} tokens): "
                                  f"generation_config.json does not belong to this model")
        return cls(files, loaded, tokenizer, template, generation_config)

    @property
    def name(self) -> str:
        return self.files.model_id

    @property
    def device(self) -> torch.device:
        """Where the model computes: inputs built by hand go there (``torch.tensor(ids, device=chat.device)``)."""
        return self.model.lm_head.weight.device

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **template_vars) -> str:
        """The prompt text for ``messages``; ``template_vars`` are extra variables the template
        reads, e.g. Qwen3's ``enable_thinking=False``."""
        if self.template is None:
            raise QwenLabError(f"{self.name} has no chat template: send a raw prompt instead")
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    **template_vars)

    def prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                   tools: list[dict] | None = None, **template_vars) -> list[int]:
        return self.tokenizer.encode(self.render(messages, add_generation_prompt, tools, **template_vars))

    def stream(self, prompt: list[dict] | str | list[int], *, cancel: threading.Event | None = None,
               add_generation_prompt: bool = True, use_cache: bool = True, skip_special_tokens: bool = True,
               template_vars: dict | None = None, static: bool | None = None, cache: PromptCache | None = None,
               **overrides) -> GenerationStream:
        """Stream a reply to ``prompt``: messages (templated), a raw string, or ids.

        ``cache``: a ``PromptCache`` kept from the conversation's last reply, so only what is new is
        prefilled. ``template_vars`` go to the chat template (e.g. ``{"enable_thinking": False}``);
        ``overrides`` change fields of the generation config for this call only,
        e.g. ``temperature=0`` or ``eos_token_id=[...]``.
        """
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif prompt and isinstance(prompt[0], dict):
            ids = self.prompt_ids(prompt, add_generation_prompt, **(template_vars or {}))
        else:
            ids = list(prompt)
        config = self.generation_config.replace(**overrides)
        return generate_stream(self.model, self.tokenizer, ids, config, cancel=cancel, use_cache=use_cache, static=static,
                               skip_special_tokens=skip_special_tokens, cache=cache)

    def generate(self, prompt, *, on_text: Callable[[str], None] | None = None, **kwargs) -> GenerationResult:
        """Like ``stream`` but returns the ``GenerationResult``; ``on_text`` receives each delta."""
        stream = self.stream(prompt, **kwargs)
        if stream._read_at_once is not None:
            stream._read_at_once()  # read now: no weight can change between its making and its start
        for delta in stream:
            if on_text is not None:
                on_text(delta)
        return stream.result


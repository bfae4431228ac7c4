"""Step 4, first half — logits -> one token: the logits processors, the choice, and what was weighed.

The model gives one logit per vocabulary entry for the next position. Then, in transformers'
order (and Candle's ``LogitsProcessor``): the **repetition penalty** makes tokens already seen
less likely, the **temperature** sharpens or flattens the distribution, **top-k** keeps the k
best, **top-p** keeps the smallest set whose probabilities add up to p — and the token is the
argmax (greedy) or a draw with a seeded generator. ``choice`` also says what the model weighed:
the chosen token's probability and the best alternatives (``TokenChoice``), which the panel,
the notebooks and ``qwen-lab generate --top-logprobs`` show.

Every function takes float32 logits of shape (vocab,) and returns new ones. ``config`` is a
``generation.GenerationConfig`` (any object with its fields will do).

Where the C kernels are built (``qwen_lab.kernels``; ``QWEN_LAB_KERNELS=off`` turns them off), the
choice itself takes two shortcuts that give the same token, for any model: the greedy argmax
(``kernels.argmax``) and sampling's top-k candidates (``kernels.top_k``) in one C pass each, instead
of several torch operations over the whole vocabulary.

>>> logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
>>> apply_top_k(logits, 2)
tensor([2., 1., -inf, -inf])
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kernels
from .errors import NumericalError, SettingError

#: The most alternatives a step reports (OpenAI's API allows 20 too).
MAX_TOP_LOGPROBS = 20


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen less likely: positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    ids = previous.unique()
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th kept too); 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def _alive(logits: torch.Tensor) -> torch.Tensor:
    """Ids of the tokens still in the running: those top-k / top-p have not set to -inf."""
    return (logits > float("-inf")).nonzero().squeeze(-1)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities add up to more than p (nucleus)."""
    if p >= 1.0:
        return logits
    # Only tokens still in the running matter: after top-k that is 20 of 151,936, and sorting
    # 20 values instead of the whole vocabulary saves ~8 ms per token.
    alive = _alive(logits)
    sorted_logits, order = torch.sort(logits[alive])  # ascending: the tail comes first
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - p
    drop[-1] = False  # the most likely token always stays
    out = logits.clone()
    out[alive[order[drop]]] = float("-inf")
    return out


def process_logits(logits: torch.Tensor, previous: torch.Tensor, config) -> torch.Tensor:
    """repetition penalty -> temperature -> top-k -> top-p, in transformers' order."""
    logits = _scaled(logits, previous, config)
    if config.greedy:
        return logits
    logits = apply_top_k(logits, config.top_k)
    return apply_top_p(logits, config.top_p)


def _scaled(logits: torch.Tensor, previous: torch.Tensor, config) -> torch.Tensor:
    """The first two processors: repetition penalty, then (when sampling) temperature."""
    logits = apply_repetition_penalty(logits.float(), _recent(previous, config), config.repetition_penalty)
    return logits if config.greedy else logits / config.temperature


def _recent(previous: torch.Tensor, config) -> torch.Tensor:
    """The ids the repetition penalty looks at: all of them, or the last ``repeat_last_n``."""
    if config.repeat_last_n is None:
        return previous
    return previous[max(0, len(previous) - config.repeat_last_n):]  # fewer ids than the window: all of them


def _penalised(previous: torch.Tensor, config) -> torch.Tensor:
    """The ids the C passes penalise: ``_recent``'s, or none where the penalty is 1 (it changes nothing)."""
    return _recent(previous, config) if config.repetition_penalty != 1.0 else previous[:0]


def next_token(logits: torch.Tensor, previous: torch.Tensor, config, generator: torch.Generator | None) -> int:
    """Choose one token id: the argmax when greedy, else a sample from the processed distribution."""
    fast = _greedy(logits, previous, config)
    if fast is None:
        fast = _draw_top_k(logits, previous, config, generator)
    return fast if fast is not None else _draw(_process_checked(logits, previous, config), config, generator)


def _greedy(logits: torch.Tensor, previous: torch.Tensor, config) -> int | None:
    """The greedy token in one C pass over the logits: ``kernels.argmax`` without a repetition penalty
    (in a 0.5B bf16 generation on a 2-core Zen 3 the time outside the C calls fell from 1.0-1.3 to 0.7 ms
    a token), ``kernels.top_k``'s best of the penalised logits with one (Qwen2.5's own settings carry a
    penalty; among equal values it puts the lower id first, as torch's argmax). The same token as
    ``_draw(_process_checked(...))``; None where that does not apply (sampling) and where the logits are
    not finite (the caller's way says what is wrong)."""
    if not config.greedy:
        return None
    seen = _penalised(previous, config)
    if seen.numel() == 0:
        return kernels.argmax(logits)
    best = kernels.top_k(logits, seen, config.repetition_penalty, 1.0, 1)  # / 1.0 changes no float
    return None if best is None else int(best[1][0])


def _draw_top_k(logits: torch.Tensor, previous: torch.Tensor, config, generator: torch.Generator | None) -> int | None:
    """The draw of ``_draw(process_logits(...))`` when top-k samples, computed on the k candidates.

    Masking the whole vocabulary to -inf and finding the survivors again (twice) costs 1.5-2.5 ms
    per token more than this on a 2-core CPU (``benchmarks/bench_sampling.py``): on a GPU, whose
    decode step takes a few ms, that is a large part of a token. Here the survivors come from a top-k
    (``kernels.top_k``'s one C pass, or torch's operations where the kernels do not run), in ascending
    id order as ``_alive`` lists them, with the same values: the same distribution and, from the same
    generator, the same token. None where that does not hold (a tie with the k-th logit, -inf
    logits among the k): the caller takes the whole-vocabulary way.
    """
    k = config.top_k
    if config.greedy or not 0 < k < logits.shape[-1]:
        return None
    # one more than k: a tie with the k-th shows as an equal (k+1)-th. The C pass computes the penalty and
    # the temperature as _scaled's torch operations do; for NaN or infinite logits (or what it does not
    # take) it says None, and torch's operations run
    best = kernels.top_k(logits, _penalised(previous, config), config.repetition_penalty, config.temperature,
                         k + 1)
    if best is None:
        if not math.isfinite(float(logits.max())):
            return None  # _process_checked says what is wrong
        best = torch.topk(_scaled(logits, previous, config), k + 1)
    values, ids = best
    if not (math.isfinite(float(values[0])) and math.isfinite(float(values[k - 1]))) or values[k] == values[k - 1]:
        return None  # an infinite candidate (scaled past the largest float): the caller's way says what is wrong
    ids, order = ids[:k].sort()
    # top-p and the draw, as on the whole vocabulary: the same values in the same order
    return int(ids[_draw(apply_top_p(values[:k][order], config.top_p), config, generator)])


def _process_checked(logits: torch.Tensor, previous: torch.Tensor, config) -> torch.Tensor:
    top = float(logits.max())  # NaN wins a max: one pass over the vocabulary checks every number
    if not math.isfinite(top):
        raise NumericalError(f"the model computed {top} logits: its weights or config.json are broken "
                             f"(NaN weights, a rotary base of 0...); download it again or check the config")
    processed = process_logits(logits, previous, config)
    if not config.greedy and not math.isfinite(float(processed.max())):  # a softmax of it would be NaN
        raise SettingError(f"temperature {config.temperature:g} and repetition penalty "
                           f"{config.repetition_penalty:g} scale these logits past the largest float: use a "
                           f"temperature of at least 0.01 (0 for greedy) and a penalty near 1")
    return processed


def _draw(processed: torch.Tensor, config, generator: torch.Generator | None) -> int:
    if config.greedy:
        return int(processed.argmax())
    # Draw among the tokens still in the running (top-k and top-p leave a few dozen of 151,936):
    # the same distribution, and 3 ms per token less than a multinomial over the whole vocabulary.
    alive = _alive(processed)
    return int(alive[torch.multinomial(processed[alive].softmax(-1), 1, generator=generator)])


@dataclass
class TokenChoice:
    """One generated token and what the model weighed against it, in the distribution it was chosen from.

    That distribution is the processed one: after the repetition penalty, and, when sampling,
    after temperature, top-k and top-p (so a token those cut has probability 0 and is not listed).
    ``alternatives`` are the most likely tokens, the chosen one included, best first.
    """

    token_id: int
    prob: float
    alternatives: list[tuple[int, float]]

    @property
    def logprob(self) -> float:
        return math.log(self.prob) if self.prob > 0 else float("-inf")


def choice(logits: torch.Tensor, previous: torch.Tensor, config, generator: torch.Generator | None,
           top: int = 0) -> TokenChoice:
    """``next_token``, plus the chosen token's probability and the ``top`` best alternatives.

    Collecting them costs one softmax and one top-k over the vocabulary per token (measured in
    ``benchmarks/bench_inside.py``); with ``top=0`` nothing is collected.
    """
    if top <= 0:
        token = next_token(logits, previous, config, generator)
        return TokenChoice(token, float("nan"), [])
    processed = _process_checked(logits, previous, config)
    token = _draw(processed, config, generator)
    probs = processed.softmax(-1)
    best = probs.topk(min(top, probs.shape[-1]))
    alternatives = [(int(i), float(p)) for p, i in zip(best.values, best.indices) if p > 0]
    return TokenChoice(token, float(probs[token]), alternatives)
